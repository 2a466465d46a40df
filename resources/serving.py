"""waitress, as `flashsale serve` runs it.

Two things waitress does not do on its own:

- Answer in JSON when it refuses a request itself, before the app sees it: a
  body over max_request_body_size (also a chunked one, which has no
  Content-Length to check up front), a malformed request line or header,
  headers that are too large. Its own answers are text/plain.
- Stop gracefully. Its own run() ends on SIGTERM/Ctrl-C by leaving the socket
  loop at once. The answers being computed still get out (with its default
  send_bytes=1 a worker thread writes its own answer), but only for 5 seconds;
  requests received and waiting for a free thread are cancelled, their
  connections closed unanswered; and the listening socket stays open until
  the process exits, so the kernel keeps accepting connections nobody will
  serve. run() here closes the listening socket first (new connections are
  refused: a proxy tries another process), closes idle keep-alive
  connections, serves every request already received, running or queued,
  sends the answers, and only then returns (tests/test_faults.py).
"""

import json
import logging
import signal
import socket
import time

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.server import MultiSocketServer
from waitress.task import ErrorTask

from resources.errors import CATALOGUE

log = logging.getLogger('flashsale')
access_log = logging.getLogger('flashsale.access')

# The errors waitress raises itself, by their status: codes of the catalogue.
_WAITRESS_CODES = {
    400: 'bad_request',
    413: 'payload_too_large',
    431: 'headers_too_large',
    501: 'not_implemented',
    500: 'internal_error',
}

# How often the socket loop looks up from its sockets to see whether a stop
# was asked for (a signal handler cannot safely wake it).
_TICK = 0.2


class _JSONErrorTask(ErrorTask):
    def execute(self):
        error = self.request.error
        code = _WAITRESS_CODES.get(error.code)
        message = CATALOGUE[code].message if code else error.reason
        code = code or 'bad_request'
        body = json.dumps({'code': code, 'message': message}, separators=(',', ':')).encode()
        self.status = f'{error.code} {error.reason}'
        self.response_headers.extend([
            ('Content-Type', 'application/json'),
            ('X-Content-Type-Options', 'nosniff'),
            ('Cache-Control', 'no-store'),
        ])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        # A request too broken to parse may have no method or path.
        access_log.info(
            '%s %s %s %.1fms id=-', getattr(self.request, 'command', None) or '-',
            getattr(self.request, 'path', None) or '-', error.code, 0.0,
        )


class _Channel(HTTPChannel):
    error_task_class = _JSONErrorTask


def listening_socket(settings):
    """A bound TCP socket for several worker processes to accept on."""
    family = socket.AF_INET6 if ':' in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    # Listening from now on, before the workers start: a client connecting
    # early waits in the backlog instead of being refused.
    sock.listen(1024)
    return sock


def create_server(app, settings, sock=None):
    """The waitress server for `app`, listening but not yet serving; on
    `sock` when given (shared by worker processes), else on HOST:PORT."""
    proxy = {}
    if settings.trusted_proxy:
        # Behind nginx: believe X-Forwarded-For/-Proto from that address only.
        proxy = {
            'trusted_proxy': settings.trusted_proxy,
            'trusted_proxy_headers': {'x-forwarded-for', 'x-forwarded-proto'},
        }
    where = {'sockets': [sock]} if sock is not None else {'host': settings.host, 'port': settings.port}
    server = waitress.create_server(
        app,
        **where,
        # THREADS for everything, plus one for each login the hashing queue
        # may hold (resources/hashing.py): logins waiting their turn never
        # take the threads purchases and polls need.
        threads=settings.threads + settings.hash_queue,
        ident='flashsale',
        max_request_body_size=settings.max_body_bytes,
        # A flash sale opens with far more clients than waitress' default
        # of 100 connections (beyond which it silently stops accepting);
        # poll() because select() cannot watch more than 1024 sockets.
        connection_limit=settings.connection_limit,
        asyncore_use_poll=True,
        clear_untrusted_proxy_headers=True,
        **proxy,
    )
    for listener in _listeners(server):
        listener.channel_class = _Channel
    return server


def _socket_map(server):
    return server.map if isinstance(server, MultiSocketServer) else server._map


def _listeners(server):
    return [d for d in list(_socket_map(server).values()) if isinstance(d, BaseWSGIServer)]


def run(server, grace_seconds):
    """Serve until SIGTERM or SIGINT, then stop gracefully: no new
    connections, requests in flight (received, queued or running) finish and
    their answers are sent, for up to grace_seconds; a second signal stops
    waiting. Returns when done."""
    signals = []
    previous = {sig: signal.signal(sig, lambda signum, frame: signals.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    socket_map = _socket_map(server)
    use_poll = server.adj.asyncore_use_poll
    try:
        while not signals:
            wasyncore.loop(timeout=_TICK, map=socket_map, use_poll=use_poll, count=1)
        log.info('%s: stopping; finishing the requests in flight', signal.Signals(signals[0]).name)
        for listener in _listeners(server):
            # Closes the listening socket only. (listener.close() would also
            # close the wake-up pipe the worker threads still use.)
            wasyncore.dispatcher.close(listener)
        deadline = time.monotonic() + grace_seconds
        while True:
            channels = [d for d in list(socket_map.values()) if isinstance(d, HTTPChannel)]
            for channel in channels:
                # No request received and waiting, being served or half
                # read: close the connection once its last answer is sent.
                # (Only the loop's thread adds requests; a worker removes one
                # after its answer is in the channel's buffer.)
                if not channel.requests and channel.request is None:
                    channel.close_when_flushed = True
            if not channels:
                break
            if time.monotonic() > deadline or len(signals) > 1:
                busy = sum(1 for c in channels if c.requests)
                log.warning('stopping with %d request(s) unfinished', busy)
                break
            wasyncore.loop(timeout=0.05, map=socket_map, use_poll=use_poll, count=1)
        server.task_dispatcher.shutdown(timeout=1)
    finally:
        wasyncore.close_all(socket_map)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
