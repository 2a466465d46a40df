"""granian, as `flashsale serve` runs it with SERVER=granian.

granian's HTTP/1 I/O is Rust (hyper): the socket work that is most of a
short request's CPU under waitress runs outside the interpreter lock. It is
the production engine behind nginx; its raw port is not hardened the way
resources/serving.py hardens waitress' (no body deadline, no shedding of
idle sockets, its own refusals in plain text), and nginx in front answers
those at the edge (scripts/nginx.conf).

flashsale, not granian's own supervisor, forks the workers and handles the
signals (flashsale.py), so a stop, a restart and a dead worker mean the same
under both servers. Each worker runs one granian WSGI worker on the
listening socket it inherited. That is granian's Rust worker class, below
its Python supervisor: GRANIAN_NAMES lists every name used, the version is
pinned in setup.cfg, and tests/test_granian_server.py fails naming what
changed when granian does.
"""

import io
import json
import logging
import os
import signal
import threading
import time

from waitress.proxy_headers import proxy_headers_middleware

from resources.errors import CATALOGUE
from resources.middleware import API_SECURITY_HEADERS
from resources.serving import TRUSTED_PROXY_HEADERS
from resources.serving import stop_reason

log = logging.getLogger('flashsale')

# Every name of granian's this module uses (tests/test_granian_server.py):
# module -> {name: the parameters it is called with, or () for a name only}.
GRANIAN_NAMES = {
    'granian._granian': {
        'WSGIWorker': ('worker_id', 'sock', 'ipc', 'threads', 'blocking_threads', 'py_threads',
                       'py_threads_idle_timeout', 'backpressure', 'http_mode', 'http1_opts', 'http2_opts',
                       'static_files', 'ssl_enabled', 'ssl_cert', 'ssl_key', 'ssl_key_password',
                       'ssl_protocol_min', 'ssl_ca', 'ssl_crl', 'ssl_client_verify', 'metrics'),
        'SocketHolder': ('fd', 'uds', 'backlog'),
        'WorkerSignal': (),
    },
    'granian._granian.WSGIWorker': {'serve_str': ()},
    'granian._granian.WorkerSignal': {'set': (), 'add_cb': ()},
    'granian._futures': {'_CBScheduler': ('loop', 'cb', 'aio_task', 'aio_tenter', 'aio_texit')},
    'granian._loops': {'loops': ()},
    'granian.wsgi': {'_callback_wrapper': ('callback', 'scope_opts', 'access_log_fmt')},
    'granian.http': {'HTTP1Settings': ('header_read_timeout', 'keep_alive', 'max_buffer_size', 'pipeline_flush')},
}

# How often the main thread looks at the signals recorded (a signal
# handler only appends to a list; the stop itself runs here).
_TICK = 0.2


def missing():
    """Why granian cannot be used here (not installed), or None."""
    try:
        import granian._granian  # noqa: F401, PLC0415
    except ImportError:
        return "SERVER=granian needs granian: pip install 'flashsale[granian]'"
    return None


def _refusal(status, code):
    body = json.dumps({'code': code, 'message': CATALOGUE[code].message}, separators=(',', ':')).encode()
    headers = [('Content-Type', 'application/json'), ('Content-Length', str(len(body))),
               ('Cache-Control', 'no-store'), *API_SECURITY_HEADERS]
    return status, headers, body


class _BufferedBodies:
    """The app reads a body by its Content-Length (Falcon's bounded_stream);
    a chunked request has none, and granian passes it on without one, so
    the app would read it as empty. Such a body is read here, up to the
    body limit (413 past it), and handed on with its length."""

    def __init__(self, app, max_body):
        self.app = app
        self.max_body = max_body

    def __call__(self, environ, start_response):
        if not environ.get('CONTENT_LENGTH') and 'chunked' in environ.get('HTTP_TRANSFER_ENCODING', '').lower():
            body = environ['wsgi.input'].read(self.max_body + 1)
            if len(body) > self.max_body:
                status, headers, payload = _refusal('413 Payload Too Large', 'payload_too_large')
                start_response(status, headers)
                return [payload]
            environ['CONTENT_LENGTH'] = str(len(body))
            environ['wsgi.input'] = io.BytesIO(body)
        return self.app(environ, start_response)


def _nonblocking(fd):
    """`fd`, non-blocking: granian's accept loop (tokio) takes the socket as
    it is, and a blocking accept() would stall its I/O thread whenever the
    other workers took the waiting connection first."""
    os.set_blocking(fd, False)
    return fd


class Server:
    """One granian WSGI worker for `app` on `sock`, not yet serving."""

    def __init__(self, app, settings, sock):
        from granian._futures import _CBScheduler  # noqa: PLC0415
        from granian._granian import SocketHolder  # noqa: PLC0415
        from granian._granian import WorkerSignal  # noqa: PLC0415
        from granian._granian import WSGIWorker  # noqa: PLC0415
        from granian._loops import loops  # noqa: PLC0415
        from granian.http import HTTP1Settings  # noqa: PLC0415
        from granian.wsgi import _callback_wrapper  # noqa: PLC0415

        self.effective_port = sock.getsockname()[1]
        self._signal = WorkerSignal()
        self._drained = threading.Event()
        # Called by granian once it has stopped accepting and every request
        # in flight has been answered.
        self._signal.add_cb(self._drained.set)
        self._loop = loops.get('auto')
        # TRUSTED_PROXY as under waitress, by waitress' own middleware: the
        # client's address from the last X-Forwarded-For hop of that proxy
        # only, those headers dropped from anyone else (the rate limits
        # count by that address).
        wsgi = proxy_headers_middleware(_BufferedBodies(app, settings.max_body_bytes),
                                        trusted_proxy=settings.trusted_proxy,
                                        trusted_proxy_headers=TRUSTED_PROXY_HEADERS, clear_untrusted=True)
        # Without the asyncio task granian's own _new_cbscheduler makes for
        # ASGI: a WSGI call runs in granian's blocking threads and never
        # uses it (src/wsgi/callbacks.rs), and that task, registered with
        # asyncio but never initialised, makes asyncio.all_tasks() raise in
        # this process for as long as the server exists.
        self._scheduler = _CBScheduler(self._loop, _callback_wrapper(wsgi, {}, None), None, None, None)
        self._worker = WSGIWorker(
            worker_id=1,
            # granian closes the socket it is given when it stops: its own
            # copy, so that closing it closes the listener (ours is closed
            # below), and nothing else closes the same descriptor twice.
            sock=(None, SocketHolder(fd=_nonblocking(os.dup(sock.fileno())), uds=False, backlog=settings.backlog)),
            ipc=None,
            # THREADS for everything, plus one for each login the hashing
            # queue may hold, as under waitress (resources/serving.py).
            py_threads=settings.threads + settings.hash_queue,
            # Connections served at once (granian holds one permit per open
            # connection, idle keep-alive ones included): CONNECTION_LIMIT.
            # Beyond it new ones wait in the kernel's backlog; granian does
            # not close the idle ones to make room, as serving.py does.
            backpressure=settings.connection_limit,
            http_mode='1',
            http1_opts=HTTP1Settings(header_read_timeout=settings.header_timeout_ms),
        )
        sock.close()

    def start(self):
        """Serving from now on, on granian's own threads."""
        self._worker.serve_str(self._scheduler, self._loop, self._signal)

    def begin_stop(self):
        """No new connections from now on; the requests in flight are answered."""
        self._signal.set()

    def stopped(self, wait):
        """Whether every request in flight has been answered, waiting up to `wait` seconds."""
        return self._drained.wait(wait)


def create_server(app, settings, sock):
    return Server(app, settings, sock)


def serve(server, grace_seconds, stops, on_stop=None):
    """Serve until `stops` (a list, appended to by a signal handler or by
    another thread) is not empty, then stop: on_stop(), no new connections,
    and the requests in flight answered, for up to grace_seconds; a SIGINT
    after the first entry (Ctrl-C again) stops waiting. The same contract
    as serving.serve."""
    server.start()
    while not stops:
        time.sleep(_TICK)
    log.info('%s: stopping; finishing the requests in flight', stop_reason(stops[0]))
    deadline = time.monotonic() + grace_seconds
    server.begin_stop()
    if on_stop is not None:
        on_stop()
    # Until they are answered, the grace is over, or Ctrl-C again.
    while not server.stopped(_TICK):
        if time.monotonic() > deadline or signal.SIGINT in stops[1:]:
            log.warning('stopping with requests unfinished')
            break
