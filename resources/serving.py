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
import select
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

    # The poller below learns of channels as they come and go, instead of
    # looking through every open connection on every wake-up.
    def add_channel(self, map=None):
        super().add_channel(map)
        poller = _POLLERS.get(id(self._map))
        if poller is not None:
            poller.added.append(self)

    def del_channel(self, map=None):
        fd = self._fileno
        super().del_channel(map)
        # Out of the epoll set before the socket is closed (after, the fd
        # is no longer ours to name).
        poller = _POLLERS.get(id(self._map))
        if poller is not None and fd is not None:
            poller.forget(fd)


_POLLERS = {}  # id(socket map) -> its _Poller
_READ = select.POLLIN | select.POLLPRI
_FULL_PASS_EVERY = 0.5  # seconds


class _Poll2:
    """waitress' own loop step, where there is no epoll (not Linux)."""

    def __init__(self, socket_map):
        self.map = socket_map
        self.added = []

    def poll(self, timeout, full=False):
        self.added.clear()
        wasyncore.poll2(timeout, self.map)

    def forget(self, fd):
        pass

    def close(self):
        pass


class _Poller:
    """waitress' socket loop step (wasyncore.poll2) without its cost per open
    connection. poll2 builds a new poll set on every wake-up, asking every
    open connection whether it is readable and writable (three Python calls
    each): with a crowd's thousands of connections, most of them idle
    keep-alive ones, that is milliseconds per wake-up, spent under the
    interpreter lock the request threads need, and the loop wakes up for
    every request. Here an epoll set keeps its registrations, and a wake-up
    looks only at the connections that can have changed: those with events,
    new ones, and busy ones (a request queued or running, an answer being
    sent, a close pending), whose state the request threads change. An idle
    connection changes only on its own events or by this thread's hand
    (waitress' idle sweep, the graceful stop), so every connection is
    looked at once every half second as well, and on every pass while
    stopping. Same calls on the same objects as poll2, so waitress'
    behaviour is unchanged."""

    def __init__(self, socket_map):
        self.map = socket_map
        self.epoll = select.epoll()
        self.masks = {}  # fd -> events registered
        self.watch = {}  # fd -> dispatcher to look at on the next pass
        self.added = []  # channels opened since the last pass (appended by _Channel)
        self.next_full = 0.0
        _POLLERS[id(socket_map)] = self

    def close(self):
        _POLLERS.pop(id(self.map), None)
        self.epoll.close()

    def forget(self, fd):
        self.watch.pop(fd, None)
        if self.masks.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:  # already closed (and so out of the set), or never in it
                pass

    def _update(self, fd, obj):
        flags = 0
        if obj.readable():
            flags |= _READ
        if obj.writable() and not obj.accepting:
            flags |= select.POLLOUT
        old = self.masks.get(fd)
        if flags != old:
            if not flags:
                self.forget(fd)
            else:
                try:
                    if old is None:
                        self.epoll.register(fd, flags)
                    else:
                        self.epoll.modify(fd, flags)
                except FileExistsError:
                    self.epoll.modify(fd, flags)
                except FileNotFoundError:  # the fd was closed and reused
                    self.epoll.register(fd, flags)
                self.masks[fd] = flags
        # Idle: waiting for its client, nothing queued, nothing to send.
        if isinstance(obj, HTTPChannel) and flags == _READ and not obj.requests:
            self.watch.pop(fd, None)
        else:
            self.watch[fd] = obj

    def poll(self, timeout, full=False):
        socket_map = self.map
        if self.added:
            added, self.added = self.added, []
            for obj in added:
                fd = obj._fileno
                if fd is not None and socket_map.get(fd) is obj:
                    self.forget(fd)
                    self.watch[fd] = obj
        now = time.monotonic()
        if full or now >= self.next_full:
            self.next_full = now + _FULL_PASS_EVERY
            for fd in [fd for fd in self.masks if fd not in socket_map]:
                self.forget(fd)
            candidates = list(socket_map.items())
        else:
            candidates = list(self.watch.items())
        for fd, obj in candidates:
            if socket_map.get(fd) is obj:
                self._update(fd, obj)
            else:
                self.watch.pop(fd, None)
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, flags in events:
            obj = socket_map.get(fd)
            if obj is None:
                continue
            wasyncore.readwrite(obj, flags)
            obj = socket_map.get(fd)
            if obj is not None:
                self.watch[fd] = obj


def listening_sockets(settings, count):
    """`count` TCP sockets bound to HOST:PORT, one per worker process, with
    SO_REUSEPORT: the kernel spreads new connections over them evenly. (One
    shared socket would go to whichever process wakes first: with a fast
    loop, one process took a whole burst while the other idled.)"""
    family = socket.AF_INET6 if ':' in settings.host else socket.AF_INET
    socks = []
    port = settings.port
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((settings.host, port))
        port = sock.getsockname()[1]  # PORT=0: the others join the port the first got
        # Listening from now on, before the workers start: a client connecting
        # early waits in the backlog instead of being refused.
        sock.listen(settings.backlog)
        socks.append(sock)
    return socks


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
        threads=settings.threads,
        ident='flashsale',
        max_request_body_size=settings.max_body_bytes,
        # A flash sale opens with far more clients than waitress' default
        # of 100 connections (beyond which it silently stops accepting);
        # poll() because select() cannot watch more than 1024 sockets.
        connection_limit=settings.connection_limit,
        asyncore_use_poll=True,
        backlog=settings.backlog,
        # Idle keep-alive connections cost the socket loop on every wake-up
        # (it rebuilds its poll set from every open connection), and a crowd
        # that arrives on new connections leaves thousands of them: close a
        # connection idle for IDLE_TIMEOUT_SECONDS, looking every second
        # (waitress' default looks every 30 s, after 120 s idle).
        channel_timeout=settings.idle_timeout,
        cleanup_interval=1,
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
    # A worker process holds these signals while it starts (flashsale._run_workers).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    socket_map = _socket_map(server)
    poller = (_Poller if hasattr(select, 'epoll') else _Poll2)(socket_map)
    try:
        while not signals:
            poller.poll(_TICK)
        log.info('%s: stopping; finishing the requests in flight', signal.Signals(signals[0]).name)
        for listener in _listeners(server):
            # Closes the listening socket only. (listener.close() would also
            # close the wake-up pipe the worker threads still use.) Out of the
            # epoll set first: after close() its fd is no longer ours to name.
            poller.forget(listener._fileno)
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
            poller.poll(0.05, full=True)
        server.task_dispatcher.shutdown(timeout=1)
    finally:
        wasyncore.close_all(socket_map)
        poller.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
