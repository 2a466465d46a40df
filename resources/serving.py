"""waitress, as `flashsale serve` runs it.

What waitress does not do on its own:

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
  refused: a proxy tries another process), serves every request already
  received, running or queued, and those that still come on open
  connections before they have been idle for _STOP_IDLE_SECONDS, each
  answer with Connection: close, and only then returns (tests/test_faults.py).
- Hold against hostile clients on its port (tests/test_edge.py): deadlines
  for a request's headers and body (waitress closes only connections silent
  for two minutes, so a client trickling a byte every few seconds held one
  forever), room kept for new clients when connections pile up, the request
  checks RFC 9112 asks of a server (smuggling, Host, 100-continue), a
  header parse that stays linear when trickled, and refusals a plain client
  can read.

All of this is built on waitress' internals (its parser, channel, listener
and socket loop, at the version setup.cfg pins): every name of waitress used
here is in tests/test_waitress_contract.py (CONTRACT), which fails naming
the ones a new waitress changes. A name used here is listed there.
"""

import errno
import heapq
import json
import logging
import re
import resource
import select
import signal
import socket
import time

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.parser import ParsingError
from waitress.receiver import ChunkedReceiver
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.task import WSGITask
from waitress.utilities import BadRequest
from waitress.utilities import RequestEntityTooLarge

from resources.errors import CATALOGUE
from resources.middleware import ACCESS_LINE
from resources.middleware import API_SECURITY_HEADERS
from resources.middleware import loggable

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

# The request line and headers: a bearer token and a few short headers fit
# many times over. (A browser may add cookies another app on the same host
# set, hence not less.)
MAX_HEADER_BYTES = 32 * 1024
# A chunk-size line or a trailer longer than these is not an honest client.
_MAX_CHUNK_LINE_BYTES = 1024
_MAX_TRAILER_BYTES = 4096
# After refusing a request whose body it did not read, the server reads and
# drops what the client still sends, for up to this long and this much, and
# only then closes. Closing with unread data makes the kernel send a reset,
# and a plain client (urllib, most libraries) that is still sending sees
# "connection reset" instead of the answer.
_DRAIN_SECONDS = 5.0
_DRAIN_BYTES = 16 * 1024 * 1024
# Connections that are not being served (idle keep-alive, a new one that has
# sent nothing, a request still arriving) are closed, the longest-waiting
# first, once this share of CONNECTION_LIMIT is open, down to the second
# share; so a new client always finds room, whatever sockets hold the rest.
_SHED_AT = 0.9
_SHED_TO = 0.8
_ACCEPTS_PER_WAKE = 64
_BATCH_FROM = 256  # open connections
# Answers below this are sent by the socket loop in one send() (create_server).
_SEND_BYTES = 16 * 1024
# A port held by another socket is asked again for this long before the
# start is refused (listening_sockets).
_PORT_WAIT_SECONDS = 3.0
# What a TRUSTED_PROXY is believed on (and the headers dropped from any
# other client): waitress' proxy_headers_middleware, also under granian.
TRUSTED_PROXY_HEADERS = frozenset({'x-forwarded-for', 'x-forwarded-proto'})
# How often the deadlines are checked (waitress' cleanup_interval, seconds).
_SWEEP_SECONDS = 1
# While stopping, a keep-alive connection is closed once it has been idle
# this long: a request that comes on it before is served (its answer says
# Connection: close). Closing one at once races a client that is sending
# on it: nginx cannot retry a POST it has sent, and answers 502. The
# shipped nginx.conf closes its idle upstream connections sooner (2 s).
_STOP_IDLE_SECONDS = 3.0
_ACCEPTS_AT_STOP = 4096  # at most: LISTEN_BACKLOG's default


class _ChunkedReceiver(ChunkedReceiver):
    """waitress' chunked body reader, refusing at once what it would wait on:
    a chunk bigger than the whole body may be (it would wait for those bytes
    or for the body limit), and chunk-size lines and trailers longer than any
    honest one (it would keep them whole, copying them on every read)."""

    def __init__(self, buf, max_body):
        super().__init__(buf)
        self.max_body = max_body

    def received(self, s):
        consumed = super().received(s)
        if self.error is None:
            if self.chunk_remainder >= self.max_body:
                self.error = RequestEntityTooLarge('chunk larger than the body limit')
            elif len(self.control_line) > _MAX_CHUNK_LINE_BYTES or len(self.trailer) > _MAX_TRAILER_BYTES:
                self.error = BadRequest('chunk-size line or trailer too long')
            else:
                return consumed
            self.all_chunks_received = True
        return consumed


class _Parser(HTTPRequestParser):
    """waitress' request parser, with the checks RFC 9112 asks of a server
    facing clients directly, which waitress leaves out."""

    _held = None  # the start of a header arriving in pieces

    def received(self, data):
        if self._held is not None:
            # waitress would join and search the whole header again on every
            # read, quadratic for a header trickled in small pieces; only the
            # new piece, and the three bytes before it, can hold its end.
            held = self._held
            if len(held) + len(data) < self.adj.max_request_header_size and b'\r\n\r\n' not in held[-3:] + data:
                held += data
                return len(data)
            self._held = None
            consumed = super().received(bytes(held) + data) - len(held)
        else:
            consumed = super().received(data)
            if self.body_rcv is None and not self.completed and self.header_plus:
                self._held = bytearray(self.header_plus)
                self.header_plus = b''
        if self.error is not None:
            # Refused already (a Content-Length over the limit): answer now,
            # never "100 Continue" to a body that will not be read.
            self.expect_continue = False
        return consumed

    def parse_header(self, header_plus):
        # A folded header line (obs-fold): RFC 9112 §5.2 allows refusing it,
        # and a proxy in front may read it differently.
        if b'\r\n ' in header_plus or b'\r\n\t' in header_plus:
            raise ParsingError('obs-fold in a header')
        super().parse_header(header_plus)
        if self.chunked:
            # Content-Length and Transfer-Encoding together is how a request
            # is smuggled past a proxy that reads the other one (RFC 9112
            # §6.1); refused, and the connection closed with the answer.
            if _field_lines(header_plus, b'content-length'):
                raise ParsingError('both Content-Length and Transfer-Encoding')
            self.body_rcv = _ChunkedReceiver(self.body_rcv.getbuf(), self.adj.max_request_body_size)
        elif _field_lines(header_plus, b'transfer-encoding'):
            # Not ending in chunked: HTTP/1.0 has none (waitress ignores it
            # there), and an empty one is malformed (waitress ignores it).
            raise ParsingError('Transfer-Encoding without chunked')
        # RFC 9112 §3.2: exactly one Host in an HTTP/1.1 request.
        if self.version == '1.1' and (_field_lines(header_plus, b'host') != 1 or ',' in self.headers.get('HOST', '')):
            raise ParsingError('HTTP/1.1 needs one Host header')


def _field_lines(header_plus, name):
    """How many lines of the request's header (`header_plus`, the request
    line first) are the field `name` (lower case), counted in the bytes
    received, so that the checks above do not depend on what waitress keeps
    in its parsed headers: it joins repeated fields into one, and its main
    branch drops Content-Length from a chunked request. Each field is a
    line of its own, after a CRLF: waitress' parse refuses a space before
    the colon and a bare CR or LF, and obs-fold is refused first."""
    return len(_FIELD_LINE[name].findall(header_plus))


_FIELD_LINE = {name: re.compile(b'\r\n' + re.escape(name) + b':', re.IGNORECASE)
               for name in (b'content-length', b'transfer-encoding', b'host')}


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
            ('Cache-Control', 'no-store'),
            *API_SECURITY_HEADERS,
        ])
        self.set_close_on_finish()
        # The request may have a body nobody read: drain it before closing.
        self.channel.drain_after_answer = True
        self.content_length = len(body)
        self.write(body)
        # A request too broken to parse may have no method or path.
        access_log.info(
            ACCESS_LINE, loggable(getattr(self.request, 'command', None) or '-', 16),
            loggable(getattr(self.request, 'path', None) or '-'), error.code, 0.0, '-',
        )


class _Task(WSGITask):
    def build_response_header(self):
        # Stopping: the connection's last answer says so, and the client
        # sends its next request elsewhere (nginx: to another upstream)
        # rather than on a connection about to close.
        if self.channel.server.stopping:
            self.set_close_on_finish()
        return super().build_response_header()


class _Channel(HTTPChannel):
    task_class = _Task
    error_task_class = _JSONErrorTask
    parser_class = _Parser
    request_started = 0.0  # when the first byte of the request being received came
    drain_after_answer = False
    draining_until = None  # set: the answer is sent, the write side shut

    def received(self, data):
        if self.request is None:
            self.request_started = self.last_activity  # just set by handle_read
        return super().received(data)

    def readable(self):
        return self.draining_until is not None or super().readable()

    def handle_read(self):
        if self.draining_until is None:
            super().handle_read()
            return
        self.drained = getattr(self, 'drained', 0) + len(self.recv(65536))  # recv closes on EOF
        if self.drained > _DRAIN_BYTES or time.time() > self.draining_until:
            self.handle_close()

    def handle_write(self):
        if self.draining_until is not None:
            # Writable again only once told to close (a deadline passed).
            self.handle_close()
        elif self.drain_after_answer and self.close_when_flushed and not self.will_close:
            self._flush_exception(self._flush_some)
            if self.will_close:  # the send failed
                self.handle_close()
            elif not self.total_outbufs_len:
                self.close_when_flushed = False
                self.draining_until = time.time() + _DRAIN_SECONDS
                try:
                    self.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    self.handle_close()
        else:
            super().handle_write()

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

    def waiting_since(self):
        """Since when this connection has waited on its client, or None
        while it is being served or has an answer to send."""
        if self.requests or self.total_outbufs_len or self.will_close:
            return None
        return self.last_activity if self.request is None else self.request_started


class _Listener(TcpWSGIServer):
    """waitress' listening socket, with deadlines for what clients send and
    room kept for new clients. Its maintenance() runs from the socket loop
    every _SWEEP_SECONDS; handle_accept() for each new connection."""

    channel_class = _Channel
    stopping = False  # run() has begun to stop: every answer closes its connection

    def configure(self, settings):
        self.header_timeout = settings.header_timeout_ms / 1000
        self.body_timeout = settings.body_timeout_ms / 1000
        self.idle_timeout = settings.idle_timeout_ms / 1000
        # (waitress stops accepting when its map holds connection_limit
        # entries, this socket and its wake-up pipe among them.)
        self.shed_at = min(int(settings.connection_limit * _SHED_AT), settings.connection_limit - 3)
        self.shed_to = min(int(settings.connection_limit * _SHED_TO), self.shed_at - 1)

    def maintenance(self, now):
        # In place of waitress' own, which closes only connections silent for
        # channel_timeout: a client trickling a byte every few seconds was
        # never closed.
        for channel in self.active_channels.values():
            if channel.requests:
                continue
            request = channel.request
            if channel.draining_until is not None:
                late = now > channel.draining_until
            elif request is None:
                late = now - channel.last_activity > self.idle_timeout
            elif not request.headers_finished:
                late = now - channel.request_started > self.header_timeout
            else:
                late = now - channel.request_started > self.body_timeout
            if late:
                channel.will_close = True
                _look_again(channel)

    def handle_accept(self):
        # With many connections open, up to _ACCEPTS_PER_WAKE each time the
        # socket loop finds some waiting, where waitress takes one: with a
        # thousand open, draining a full backlog one per pass kept a new
        # client waiting over a second (each pass looks at the busy ones,
        # and at all of them twice a second: _Poller). With few open, one
        # per pass: a pass is cheap then.
        # (Called when one is waiting; whether another is, select() tells.)
        batch = _ACCEPTS_PER_WAKE if len(self.active_channels) >= _BATCH_FROM else 1
        for turn in range(batch):
            if turn and not select.select([self.socket], [], [], 0)[0]:
                return
            if len(self.active_channels) >= self.shed_at:
                self._shed()
            if len(self._map) >= self.adj.connection_limit:
                return
            super().handle_accept()

    def _shed(self):
        waiting = [(since, fd) for fd, channel in self.active_channels.items()
                   if (since := channel.waiting_since()) is not None]
        excess = len(self.active_channels) - self.shed_to
        longest = heapq.nsmallest(excess, waiting)
        for _, fd in longest:
            self.active_channels[fd].handle_close()
        log.warning('%d connections open: closed the %d waiting longest on their clients',
                    len(self.active_channels) + len(longest), len(longest))

_POLLERS = {}  # id(socket map) -> its _Poller


def _look_again(channel):
    """Have the poller look at `channel` on its next pass (this thread
    changed it: closing it is due), not at its next full pass."""
    poller = _POLLERS.get(id(channel._map))
    if poller is not None:
        poller.added.append(channel)
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
    loop, one process took a whole burst while the other idled.)
    SO_REUSEPORT would also let a second flashsale (or anything else that
    sets it) bind the same port and take a share of the connections: a port
    anything is bound to is refused first (OSError, EADDRINUSE)."""
    family = socket.AF_INET6 if ':' in settings.host else socket.AF_INET
    port = settings.port
    if port:
        _alone_on(family, settings.host, port)
    socks = []
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


def _alone_on(family, host, port):
    """Raise OSError (EADDRINUSE) if a socket holds host:port. Without
    SO_REUSEPORT, binding fails while any socket holds the port, whether or
    not it set SO_REUSEPORT. A server that was just stopped or killed (its
    workers stop when their parent dies) lets go of it within moments: it
    is asked again for up to _PORT_WAIT_SECONDS. (Two servers starting in
    the same instant could both pass this; one after the other cannot.)"""
    deadline = time.monotonic() + _PORT_WAIT_SECONDS
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


def listening_socket(settings):
    """One bound TCP socket on HOST:PORT."""
    return listening_sockets(settings, 1)[0]


def _allow_open_files(count):
    """Raise this process' soft limit on open files to `count` (within the
    hard limit): each connection is one, and a soft limit of 1,024 is common."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def create_server(app, settings, sock=None):
    """The waitress server for `app`, listening but not yet serving; on
    `sock` when given (shared by worker processes), else on HOST:PORT."""
    proxy = {}
    if settings.trusted_proxy:
        # Behind nginx: believe X-Forwarded-For/-Proto from that address only.
        proxy = {
            'trusted_proxy': settings.trusted_proxy,
            'trusted_proxy_headers': TRUSTED_PROXY_HEADERS,
        }
    # Connections, the pool, the database's files and the log: room for all.
    _allow_open_files(settings.connection_limit + 2 * settings.pool_size + 256)
    if sock is None:
        sock = listening_socket(settings)
    adj = Adjustments(
        sockets=[sock],
        # THREADS for everything, plus one for each login the hashing queue
        # may hold (resources/hashing.py): logins waiting their turn never
        # take the threads purchases (and so their batches) and polls need.
        threads=settings.threads + settings.hash_queue,
        ident='flashsale',
        max_request_body_size=settings.max_body_bytes,
        max_request_header_size=MAX_HEADER_BYTES,
        # A flash sale opens with far more clients than waitress' default
        # of 100 connections (beyond which it silently stops accepting);
        # poll() because select() cannot watch more than 1024 sockets.
        connection_limit=settings.connection_limit,
        asyncore_use_poll=True,
        backlog=settings.backlog,
        cleanup_interval=_SWEEP_SECONDS,
        clear_untrusted_proxy_headers=True,
        **proxy,
    )
    # An answer smaller than this is sent by the socket loop once the worker
    # thread has finished it, headers and body in one send(), instead of by
    # the worker in two as soon as each is written (waitress' default of 1):
    # one segment for the client to take in, not two, and no send() of the
    # worker's under the interpreter lock (README.md, "Slow commits": 11%
    # more purchases, a third more GET /health). Set on the object, not as
    # an argument: waitress 3 warns that the argument will go. Once it has,
    # nothing breaks: the attribute is no longer read and answers go out as
    # with waitress' default, slower; tests/test_waitress_contract.py
    # (test_send_bytes_is_still_honoured) fails first, to remove this line
    # or put waitress' replacement in its place.
    adj.send_bytes = _SEND_BYTES
    server = _Listener(
        app, _sock=sock, adj=adj, bind_socket=False,
        sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
    )
    server.configure(settings)
    return server


def stop_reason(reason):
    """How a stop's first entry is logged: a signal by its name."""
    return signal.Signals(reason).name if isinstance(reason, int) else str(reason)


def serve(server, grace_seconds, stops, on_stop=None):
    """Serve until `stops` (a list, appended to by a signal handler or by
    another thread) is not empty, then stop gracefully: no new connections,
    requests in flight (received, queued or running) finish and their
    answers are sent, for up to grace_seconds; Ctrl-C again (a SIGINT
    after the first entry) stops waiting. A repeated SIGTERM is the same
    stop: systemd sends one to every process of the service, and the parent
    of the workers passes its own on. Returns when done. `on_stop()` is called when the stop
    begins. From any thread: the loop looks at `stops` every _TICK, so a
    stop asked for from a thread, or a signal, takes effect within it."""
    socket_map = server._map
    poller = (_Poller if hasattr(select, 'epoll') else _Poll2)(socket_map)
    try:
        while not stops:
            poller.poll(_TICK)
        log.info('%s: stopping; finishing the requests in flight', stop_reason(stops[0]))
        server.stopping = True
        # The connections the kernel has completed but this process not yet
        # accepted are taken first, and served: closing a listening socket
        # resets them, and nginx, whose request is already sent on one,
        # answers that 502 (it never sends a POST twice).
        for _ in range(_ACCEPTS_AT_STOP):
            if not select.select([server.socket], [], [], 0)[0] or len(server._map) >= server.adj.connection_limit:
                break
            server.handle_accept()
        # Closes the listening socket only. (server.close() would also close
        # the wake-up pipe the worker threads still use.) Out of the epoll
        # set first: after close() its fd is no longer ours to name.
        poller.forget(server._fileno)
        wasyncore.dispatcher.close(server)
        if on_stop is not None:
            on_stop()
        began = time.time()  # waitress' clock (last_activity)
        deadline = time.monotonic() + grace_seconds
        while True:
            now = time.time()
            channels = [d for d in list(socket_map.values()) if isinstance(d, HTTPChannel)]
            for channel in channels:
                # Nothing received and waiting, being served or half read,
                # for _STOP_IDLE_SECONDS: closed once its last answer is
                # sent. (Only the loop's thread adds requests; a worker
                # removes one after its answer is in the channel's buffer.)
                if (not channel.requests and channel.request is None
                        and now - max(channel.last_activity, began) > _STOP_IDLE_SECONDS):
                    channel.close_when_flushed = True
            if not channels:
                break
            if time.monotonic() > deadline or signal.SIGINT in stops[1:]:
                busy = sum(1 for c in channels if c.requests)
                log.warning('stopping with %d request(s) unfinished', busy)
                break
            poller.poll(0.05, full=True)
        server.task_dispatcher.shutdown(timeout=1)
    finally:
        wasyncore.close_all(socket_map)
        poller.close()
