"""flashsale: a small, fast, correct flash-sale service.

This module holds the settings (read once from the environment), the app
factory create_app(), and the `flashsale` command line (serve, init-db,
grant-admin, revoke-sessions). Everything else lives in resources/.
"""

import argparse
import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import falcon
import psycopg
import psycopg.conninfo

from resources import accounts
from resources import batching
from resources import database
from resources import errors
from resources import hashing
from resources import health
from resources import logformat
from resources import logwriter
from resources import metrics
from resources import middleware
from resources import orders
from resources import openapi
from resources import outcomes
from resources import page
from resources import sales
from resources import sql
from resources.cache import PollCache
from resources.credentials import Authentication
from resources.credentials import Credentials
from resources.hashing import HashQueue
from resources.ratelimit import RateLimits

log = logging.getLogger('flashsale')

MIN_JWT_SECRET_BYTES = 32


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


def default_workers():
    """One server process per core this process may run on: one process uses
    at most one core (the interpreter lock), and most of a short request's CPU
    is waitress' own."""
    try:
        return max(1, min(64, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(64, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, with its default. VARIABLES below says which environment
    variable sets each one; README.md documents them."""

    database_url: str | None = None  # unset: the embedded development database
    jwt_secret: str | None = None  # required whenever database_url is set
    host: str = '127.0.0.1'
    port: int = 8000
    workers: int = 1  # server processes sharing the port (from_env: one per core)
    threads: int = 64  # a purchase waiting for its sale's next statement holds one (resources/batching.py)
    pool_size: int = 8  # not THREADS: queued purchases hold no connection
    pool_timeout: float = 5.0  # seconds a request waits for a connection, then 503
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 2000
    cors_origins: tuple = ()
    bcrypt_rounds: int = 12
    jwt_ttl_seconds: int = 3600
    poll_cache_ms: int = 500  # how long GET /api/flash-sales/current and /{id} answers are reused
    hash_processes: int = 1  # bcrypt processes (nice 19); default: the cores this process may use, / WORKERS
    hash_queue: int = 64  # logins and registrations queued or hashing at once; more get 503 at once
    hash_wait: float = 20.0  # seconds a login may wait for its turn, then 503 with Retry-After
    hash_nice: int = 19  # the hashing processes' niceness (19: also SCHED_IDLE): they get the CPU nothing else wants
    max_body_bytes: int = 16 * 1024
    data_dir: str = '.flashsale'  # the embedded database and its secret
    trusted_proxy: str | None = None  # e.g. 127.0.0.1 when behind nginx
    connection_limit: int = 4000  # open client connections waitress accepts (per process)
    backlog: int = 4096  # connections the kernel queues before the server accepts them
    header_timeout_ms: int = 5000  # from a request's first byte to the end of its headers
    body_timeout_ms: int = 10_000  # from a request's first byte to the end of its body
    idle_timeout_ms: int = 10_000  # a connection waiting for its next request
    auth_rate_per_minute: int = 30  # register, login, password change per client address, service-wide (0: off)
    purchase_rate_per_second: int = 5  # purchases per user per process, twice that at once (0: off)
    # Client addresses no limit applies to: none by default. Behind a proxy on
    # the same host every client would be loopback, so a loopback default
    # would turn every limit off there (README, "Rate limits").
    rate_limit_exempt: tuple = ()
    shutdown_timeout: float = 10.0  # seconds SIGTERM waits for requests in flight
    purchase_batch_max: int = 64  # purchases of one sale in one statement, at most
    log_level: str = 'INFO'
    server: str = 'waitress'  # or 'granian' (resources/granian_server.py), behind nginx
    log_format: str = 'text'  # or 'json': one object per line (resources/logformat.py)
    metrics: str = 'on'  # GET /metrics and the counting behind it (resources/metrics.py)
    metrics_allow: tuple = ('127.0.0.1', '::1')  # client addresses and networks GET /metrics answers

    @classmethod
    def from_env(cls, environ=os.environ):
        values = {}
        for variable in VARIABLES:
            values[variable.field] = variable.read(environ.get(variable.name), values)
        settings = cls(**values)
        if settings.server not in SERVERS:
            raise ConfigError(f"SERVER must be {' or '.join(SERVERS)}, not {settings.server!r}")
        if settings.server == 'granian':
            # The raw-port defences of resources/serving.py that granian has
            # no equivalent of: nginx in front holds them (scripts/nginx.conf).
            for name in _WAITRESS_ONLY:
                if environ.get(name):
                    raise ConfigError(f'{name} is a setting of the waitress server only; under SERVER=granian '
                                      'nginx in front holds that limit (scripts/nginx.conf): unset it')
        if settings.jwt_secret and len(settings.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f'JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes long')
        for origin in settings.cors_origins:
            _check_origin(origin)
        _check_exemption(settings)
        try:
            metrics.allowed_networks(settings.metrics_allow)
        except ValueError as exc:
            raise ConfigError(f'METRICS_ALLOW: {exc}') from None
        return settings


# An origin as a browser sends it: scheme://host[:port], in lower case (an
# IDN in punycode), no path, no trailing slash. Falcon's CORSMiddleware
# compares it as written, so anything else never matches.
_ORIGIN = re.compile(r'^[a-z][a-z0-9+.-]*://[a-z0-9.\-\[\]:]+$')


def _check_origin(origin):
    if origin == '*':
        # Falcon takes '*' only as a string, not in a list (a ValueError in
        # every worker). And an API that holds accounts and orders is not
        # for every site on the web to call: the origins are named.
        raise ConfigError('CORS_ORIGINS=* is refused: list the origins that may call the API from a browser, '
                          'e.g. CORS_ORIGINS=https://shop.example.com,https://admin.example.com')
    if not _ORIGIN.match(origin):
        raise ConfigError(f'CORS_ORIGINS: {origin!r} is not an origin as a browser sends it: '
                          'scheme://host[:port] in lower case, without a path or a trailing slash, '
                          'e.g. https://shop.example.com')


def _check_exemption(settings):
    """An exemption that covers the proxy exempts every client it forwards
    without X-Forwarded-For; with every proxy trusted ('*'), any client can
    claim an exempt address in that header."""
    proxy = settings.trusted_proxy
    if proxy and settings.rate_limit_exempt and (proxy == '*' or proxy in settings.rate_limit_exempt):
        raise ConfigError(f'RATE_LIMIT_EXEMPT must not cover TRUSTED_PROXY ({proxy}): every client behind '
                          'the proxy would be exempt; set RATE_LIMIT_EXEMPT= (empty), or AUTH_RATE_PER_MINUTE=0 '
                          'and PURCHASE_RATE_PER_SECOND=0 for a load test through the proxy')


@dataclasses.dataclass(frozen=True)
class Variable:
    """An environment variable, the Settings field it sets, and how it is read:
    text (one of `choices`, if given), a whole number from `low` to `high`
    (`per_unit` of them make one of the field's: 1000 for a *_MS variable
    setting seconds), or a list."""

    name: str
    field: str
    meaning: str
    low: int | None = None
    high: int | None = None
    per_unit: int = 1
    is_list: bool = False
    default_from: object = None  # (values read so far) -> the default, when it depends on them
    default_text: str | None = None  # how --help shows that default
    choices: tuple = ()  # the only texts it takes, when given

    def default(self, values):
        if self.default_from is not None:
            return self.default_from(values)
        return Settings.__dataclass_fields__[self.field].default

    def read(self, raw, values):
        if self.is_list:
            if raw is None:
                return self.default(values)
            return tuple(item.strip() for item in raw.split(',') if item.strip())
        if raw is None or raw == '':
            return self.default(values)
        if self.choices and raw not in self.choices:
            raise ConfigError(f'{self.name} must be {" or ".join(self.choices)}, not {raw!r}')
        if self.low is None:
            return raw
        try:
            number = int(raw)
        except ValueError:
            raise ConfigError(f'{self.name} must be a whole number, not {raw!r}') from None
        if not self.low <= number <= self.high:
            raise ConfigError(f'{self.name} must be between {self.low} and {self.high}, not {number}')
        return number / self.per_unit if self.per_unit != 1 else number

    def shown_default(self):
        if self.default_text is not None:
            return self.default_text
        value = Settings.__dataclass_fields__[self.field].default
        if self.is_list:
            return ','.join(value) or '(none)'
        if value is None:
            return '(unset)'
        return str(int(value * self.per_unit)) if self.per_unit != 1 else str(value)


# Read in this order: a default may depend on a variable above it.
VARIABLES = (
    Variable('DATABASE_URL', 'database_url', 'libpq URL of the database', default_text='(unset: embedded PostgreSQL)'),
    Variable('JWT_SECRET', 'jwt_secret', f'token signing secret, at least {MIN_JWT_SECRET_BYTES} bytes; '
             'required with DATABASE_URL', default_text='(generated, embedded only)'),
    Variable('HOST', 'host', 'address to listen on'),
    Variable('PORT', 'port', 'port to listen on (0: any free one)', 0, 65535),
    Variable('WORKERS', 'workers', 'server processes sharing the port', 1, 64,
             default_from=lambda values: default_workers(), default_text='one per core'),
    Variable('THREADS', 'threads', 'worker threads per process', 1, 256),
    Variable('POOL_SIZE', 'pool_size', 'database connections per process', 1, 256,
             default_from=lambda values: min(values['threads'], Settings.pool_size), default_text='8 (at most THREADS)'),
    Variable('POOL_TIMEOUT_MS', 'pool_timeout', 'wait for a connection, then 503', 1, 600_000, 1000),
    Variable('STATEMENT_TIMEOUT_MS', 'statement_timeout_ms', 'PostgreSQL statement_timeout', 1, 600_000),
    Variable('LOCK_TIMEOUT_MS', 'lock_timeout_ms', 'PostgreSQL lock_timeout', 1, 600_000),
    Variable('CORS_ORIGINS', 'cors_origins', 'origins allowed to call the API from a browser', is_list=True),
    Variable('BCRYPT_ROUNDS', 'bcrypt_rounds', 'bcrypt cost', 4, 16),
    Variable('JWT_TTL_SECONDS', 'jwt_ttl_seconds', 'token lifetime', 30, 7 * 24 * 3600),
    Variable('POLL_CACHE_MS', 'poll_cache_ms', 'reuse of polled sale answers (0: off)', 0, 10_000),
    Variable('HASH_PROCESSES', 'hash_processes', 'bcrypt processes per server process', 1, 256,
             default_from=lambda values: max(1, len(os.sched_getaffinity(0)) // values['workers']),
             default_text='usable cores / WORKERS (at least 1)'),
    Variable('HASH_QUEUE', 'hash_queue', 'logins, registrations, password changes queued or hashing; beyond, 503', 1, 10_000),
    Variable('HASH_WAIT_MS', 'hash_wait', 'a login waits this long for its turn, then 503', 100, 600_000, 1000),
    Variable('HASH_NICE', 'hash_nice', "the bcrypt processes' niceness", 0, 19),
    Variable('MAX_BODY_BYTES', 'max_body_bytes', 'largest request body (413 above)', 256, 1024 * 1024),
    Variable('FLASHSALE_DATA_DIR', 'data_dir', 'the embedded database and its secret'),
    Variable('TRUSTED_PROXY', 'trusted_proxy', 'reverse proxy whose X-Forwarded-For is believed'),
    Variable('CONNECTION_LIMIT', 'connection_limit', 'open client connections per process', 10, 100_000),
    Variable('LISTEN_BACKLOG', 'backlog', 'connections the kernel queues until accepted', 16, 65535),
    Variable('HEADER_TIMEOUT_MS', 'header_timeout_ms', "a request's headers must arrive within this", 100, 600_000),
    Variable('BODY_TIMEOUT_MS', 'body_timeout_ms', 'and the whole request within this', 100, 600_000),
    Variable('IDLE_TIMEOUT_MS', 'idle_timeout_ms', 'an idle connection is closed after this', 100, 3_600_000),
    Variable('AUTH_RATE_PER_MINUTE', 'auth_rate_per_minute',
             'register, login, password change per address, service-wide (0: off)', 0, 1_000_000),
    Variable('PURCHASE_RATE_PER_SECOND', 'purchase_rate_per_second', 'purchases per user, per process (0: off)', 0, 1_000_000),
    Variable('RATE_LIMIT_EXEMPT', 'rate_limit_exempt', 'addresses no rate limit applies to', is_list=True),
    Variable('SHUTDOWN_TIMEOUT_MS', 'shutdown_timeout', 'on SIGTERM, wait this long for requests in flight',
             0, 600_000, 1000),
    Variable('PURCHASE_BATCH_MAX', 'purchase_batch_max', "purchases of one sale in one statement", 1, 1000),
    Variable('LOG_LEVEL', 'log_level', 'DEBUG, INFO, WARNING or ERROR'),
    Variable('SERVER', 'server', 'waitress (hardened raw port) or granian (behind nginx)'),
    Variable('LOG_FORMAT', 'log_format', 'text, or json: one object per line', choices=('text', 'json')),
    Variable('METRICS', 'metrics', 'GET /metrics (Prometheus) and the counting behind it', choices=('on', 'off')),
    Variable('METRICS_ALLOW', 'metrics_allow', 'client addresses or networks GET /metrics answers (others: 403)',
             is_list=True),
)

SERVERS = ('waitress', 'granian')
# Limits of waitress' raw port (resources/serving.py) that granian has not.
_WAITRESS_ONLY = ('BODY_TIMEOUT_MS', 'IDLE_TIMEOUT_MS')


def _json_default(value):
    if isinstance(value, datetime):
        # To the microsecond, as PostgreSQL stores a timestamptz: a time
        # read back is the time written, and two distinct ones stay distinct.
        return value.astimezone(timezone.utc).isoformat(timespec='microseconds').replace('+00:00', 'Z')
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serializable')


def purchase_batches(settings, pool):
    """The queues that batch each sale's concurrent purchases. A purchase
    waits in one as long as it would wait for a connection; once in a
    statement, as long as the pool lets that statement hold a connection."""
    return batching.Batches(pool, settings.purchase_batch_max, settings.pool_timeout,
                            settings.pool_timeout + database.hold_limit(settings))


class _App(falcon.App):
    """Falcon's App, where every route that answers GET answers HEAD the same
    way (Falcon leaves the body out), as uptime checkers and `curl -I` expect;
    Falcon's own default for a route without on_head is 405."""

    def add_route(self, uri_template, resource, **kwargs):
        if hasattr(resource, 'on_get') and not hasattr(resource, 'on_head'):
            resource.on_head = resource.on_get
            # And with the same token check (resources/credentials.py).
            if 'GET' in getattr(resource, 'login_required', ()):
                resource.login_required = frozenset({*resource.login_required, 'HEAD'})
        super().add_route(uri_template, resource, **kwargs)


def create_app(settings, pool, batches=None, hash_queue=None, poll_cache=None):
    """The WSGI app. `pool` is an open psycopg_pool.ConnectionPool; the
    settings must carry the JWT secret. `batches`: purchase_batches(), by
    default made here (the server passes its own, to stop it on SIGTERM).
    `hash_queue`: the hashing.HashQueue to use (default: one of its own, from
    the settings; its processes start at the first login unless started).
    `poll_cache`: the PollCache of the polled answers (default: one of its
    own, from the settings)."""
    hash_queue = hash_queue or new_hash_queue(settings)
    credentials = Credentials(settings.jwt_secret, settings.jwt_ttl_seconds, settings.bcrypt_rounds, hash_queue)
    poll_cache = new_poll_cache(settings) if poll_cache is None else poll_cache

    stack = [middleware.RequestLog()]
    if settings.metrics == 'on':
        stack.append(metrics.RequestMetrics())  # after RequestLog, whose start time it reads
    stack += [middleware.SecurityHeaders(), middleware.StaticMethods()]
    if settings.cors_origins:
        stack.append(falcon.CORSMiddleware(allow_origins=list(settings.cors_origins),
                                           expose_headers=middleware.CORS_EXPOSED_HEADERS))
        stack.append(middleware.VaryByOrigin())
    # Authentication before the rate limits: they key purchases by its user id.
    stack.append(Authentication(credentials))
    stack.append(RateLimits(settings, pool))
    app = _App(middleware=stack, cors_enable=False)

    json_handler = falcon.media.JSONHandler(
        dumps=functools.partial(json.dumps, default=_json_default, separators=(',', ':')),
    )
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json_handler
    errors.add_handlers(app, pool)

    app.add_route('/health', health.Health(pool))
    app.add_route('/api/auth/register', accounts.Register(pool, credentials, settings))
    app.add_route('/api/auth/login', accounts.Login(pool, credentials, settings))
    app.add_route('/api/auth/refresh', accounts.Refresh(pool, credentials))
    app.add_route('/api/me', accounts.Me(pool))
    app.add_route('/api/me/password', accounts.Password(pool, credentials, settings))
    app.add_route('/api/me/orders', orders.MyOrders(pool))
    app.add_route('/api/me/orders/{sale_id}', orders.MyOrder(pool))
    pages = new_poll_cache(settings, sales.CACHED_PAGES)
    app.add_route('/api/flash-sales', sales.Collection(pool, settings, pages))
    app.add_route('/api/flash-sales/current', sales.Current(pool, poll_cache))
    app.add_route('/api/flash-sales/{sale_id}', sales.Item(pool, poll_cache))
    batches = batches or purchase_batches(settings, pool)
    app.add_route('/api/flash-sales/{sale_id}/purchase', orders.Purchase(batches))
    app.add_route('/openapi.json', openapi.Document())
    if settings.metrics == 'on':
        app.add_route('/metrics', metrics.Scrape(settings, metrics.Watched(pool, batches, hash_queue)))
        app.add_route('/api/purchase-outcomes', outcomes.PurchaseOutcomes(pool))
    page.add_routes(app)
    return app


def new_poll_cache(settings, entries=None):
    """The cache of polled answers; `entries`: how many it keeps (default:
    resources/cache.py's)."""
    bounds = {} if entries is None else {'max_found': entries, 'max_missing': entries}
    return PollCache(settings.poll_cache_ms / 1000, _json_default, **bounds)


def new_hash_queue(settings):
    return HashQueue(settings.hash_processes, settings.hash_queue, settings.hash_wait, niceness=settings.hash_nice)


# --- the command line ---------------------------------------------------------


def _database(settings):
    """(url, settings) for the configured database: DATABASE_URL, or the
    embedded development server with its generated JWT secret."""
    if settings.database_url:
        return settings.database_url, settings
    from resources import embedded  # noqa: PLC0415 (never imported in production)

    log.info('DATABASE_URL is not set: using the embedded PostgreSQL in %s', settings.data_dir)
    if not settings.jwt_secret:  # before the database starts: a refusal then costs nothing
        try:
            secret = embedded.jwt_secret(settings.data_dir, MIN_JWT_SECRET_BYTES)
        except OSError as exc:
            raise ConfigError(f'cannot keep the development JWT secret in {exc.filename or settings.data_dir}: '
                              f'{exc.strerror or exc}; free space or fix FLASHSALE_DATA_DIR, or set JWT_SECRET') from None
        settings = dataclasses.replace(settings, jwt_secret=secret)
    return embedded.start(settings.data_dir), settings


@contextlib.contextmanager
def _first_connection(settings, url):
    """database.connect(), with a refusal said in one line: the operator's
    next step is to fix DATABASE_URL or start the database, not to read a
    traceback."""
    try:
        conn = database.connect(settings, url)
    except psycopg.ProgrammingError as exc:  # libpq could not read the URL
        raise ConfigError(f'DATABASE_URL is malformed: {str(exc).strip()}') from None
    except psycopg.OperationalError as exc:
        # The last line says why (refused, timed out, password); the earlier
        # ones repeat it for each address tried.
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f'cannot reach the database ({_where(url)}): {reason}; '
                          'check DATABASE_URL and that PostgreSQL is running') from None
    with conn:
        yield conn


def _where(url):
    """host:port/dbname of a libpq URL, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return 'DATABASE_URL'
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _seed_demo(conn, settings):
    """On an empty embedded database: a demo admin and an open demo sale, so
    a newcomer sees something working at once."""
    if sql.value(conn, sql.COUNT_USERS):
        return
    password = secrets.token_urlsafe(12)
    # Hashed here, not through a HashQueue: this process may fork the
    # workers next, and must not have started hashing processes of its own.
    password_hash = hashing.hash_password(password.encode(), settings.bcrypt_rounds)
    sql.one(conn, sql.CREATE_USER, {'email': 'admin@example.com', 'password_hash': password_hash})
    sql.one(conn, sql.GRANT_ADMIN, {'email': 'admin@example.com'})
    now = datetime.now(timezone.utc)
    sale = sql.one(conn, sql.CREATE_SALE, {
        'name': 'Demo sale', 'start_date': now, 'end_date': now + timedelta(days=1), 'total_stock': 50,
    })
    print(
        '\nDemo data created (embedded database, first start):\n'
        f'  admin:     admin@example.com / {password}\n'
        f'  sale:      "Demo sale" {sale["id"]}, 50 items, open for 24 hours\n'
        '  Open http://{host}:{port}/ or see README.md for curl examples.\n'.format(
            host=settings.host, port=settings.port),
        flush=True,
    )


def serve(settings, stop):
    """`stop` holds the SIGTERM/SIGINT received so far, from the start: one
    that comes during start-up ends it at the next step, with exit status 0."""
    from resources import serving  # noqa: PLC0415 (only the serve command needs waitress)

    if settings.database_url and not settings.jwt_secret:
        # Only the embedded development database comes with a generated secret.
        raise ConfigError(
            'JWT_SECRET is required when DATABASE_URL is set: a random string of at least '
            f'{MIN_JWT_SECRET_BYTES} bytes, e.g. the output of\n'
            "  python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    if settings.server == 'granian':
        from resources import granian_server  # noqa: PLC0415

        if reason := granian_server.missing():
            raise ConfigError(reason)
    try:
        # Bound first: a port in use is said at once. Bound before any worker
        # is forked, so that they all accept on it; clients connecting during
        # start-up wait in the backlog.
        socks = serving.listening_sockets(settings, settings.workers)
    except OSError as exc:
        raise ConfigError(f'cannot listen on {settings.host}:{settings.port}: {exc.strerror}; '
                          'set PORT to a free port (0: any) or HOST to an address of this machine') from None
    with contextlib.ExitStack() as held:
        for sock in socks:
            held.enter_context(sock)
        settings = dataclasses.replace(settings, port=socks[0].getsockname()[1])
        url, settings = _database(settings)
        if stop:
            return
        with _first_connection(settings, url) as conn:
            if problem := database.connection_budget_problem(conn, settings):
                raise ConfigError(problem)
            database.apply_schema(conn)
            if not settings.database_url:
                _seed_demo(conn, settings)
        if stop:
            return
        metrics.prepare(settings)
        if settings.workers == 1:
            _serve_process(settings, url, socks[0], stop)
        else:
            _run_workers(settings, url, socks, stop)


def _engine(settings):
    """The module that serves HTTP: resources/serving.py (waitress) or
    resources/granian_server.py; each has create_server() and serve()."""
    if settings.server == 'granian':
        from resources import granian_server  # noqa: PLC0415

        return granian_server
    from resources import serving  # noqa: PLC0415

    return serving


def _serve_process(settings, url, sock, stop):
    """One server process: its own log writer, pool, threads and server."""
    engine = _engine(settings)
    writer = _configure_logging(logging.getLogger().level, threaded=True, log_format=settings.log_format)
    pool = database.open_pool(settings, url)
    batches = purchase_batches(settings, pool)
    hash_queue = None
    try:
        hash_queue = new_hash_queue(settings)
        app = create_app(settings, pool, batches, hash_queue)
        hash_queue.start()
        server = engine.create_server(app, settings, sock)
        if settings.workers == 1:
            print(f'flashsale listening on http://{settings.host}:{server.effective_port}', flush=True)
        # SIGTERM (docker stop, systemd, kill) and Ctrl-C: stop accepting,
        # finish and send the answers in flight, then close the pool (and stop
        # the embedded database) on the way out, exit status 0.
        # Purchases still queued for a statement get their answer within
        # half the grace, logins still queued for a hash get 503 at once
        # and those being hashed by then, so it is sent before the server
        # stops.
        def on_stop():
            hash_queue.stop(settings.shutdown_timeout / 2)
            batches.stop(settings.shutdown_timeout / 2)

        engine.serve(server, settings.shutdown_timeout, stop, on_stop=on_stop)
    finally:
        metrics.flush()  # the counts of its last moments, kept in memory until now
        if hash_queue is not None:
            hash_queue.close()
        pool.close()
        log.info('database pool closed')
        writer.stop()
        # What is logged after this (a worker's failure) is written at once.
        _configure_logging(logging.getLogger().level, log_format=settings.log_format)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# A replacement for a worker that died this soon after it started waits
# before it starts from the second time in a row, twice as long each time,
# up to the last: a worker that cannot start (the database is gone) is not
# forked again and again at full speed.
_RESPAWN_SOON = 5.0
_RESPAWN_BACKOFF = (0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


def _record_stop_signals():
    """From now on SIGTERM and SIGINT are appended to the list returned,
    instead of ending the process where it stands. SIGHUP is ignored: the
    log goes to stderr, so there is nothing to reopen for logrotate, and a
    closed terminal must not stop a sale (stop it with SIGTERM)."""
    stop = []
    for sig in _STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return stop


def _run_workers(settings, url, socks, stop):
    """WORKERS processes accepting on one port, each on its own listening
    socket (socks, bound with SO_REUSEPORT: see serving.listening_sockets).
    One process uses one core at most (the interpreter lock): a second
    process is what makes a second core count. Each worker has its own pool,
    threads, caches and rate limits.

    The parent runs no thread (every fork is of a single-threaded process)
    and keeps the listening sockets, so a worker that dies (the OOM killer's
    SIGKILL, a crash) is replaced on the same socket: connections queued on
    it wait for the replacement instead of being reset. It stops the
    workers on SIGTERM or SIGINT, however many processes got the signal
    (systemd's default sends it to all of them: the workers take a repeated
    SIGTERM as the same stop); it exits 0 when every worker stopped
    cleanly, else 1."""
    parent = os.getpid()
    prctl = _prctl()  # looked up before forking: a child loads nothing
    workers = {}  # pid -> (index, started at)
    respawn_at = {}  # index -> when its replacement starts
    backoff = dict.fromkeys(range(settings.workers), 0)

    def start(index):
        # Blocked while forking: a signal then waits until the worker has
        # its own handlers (it would run the parent's in the worker).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            # Its own process group: a Ctrl-C in the terminal reaches the
            # parent only, which passes it on once.
            os.setpgid(0, 0)
            worker_stop = _record_stop_signals()
            if stop:
                worker_stop.append(signal.SIGTERM)
            _stop_with_parent(prctl, parent)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            status = 1
            try:
                for number, other in enumerate(socks):
                    if number != index:
                        other.close()
                _serve_process(settings, url, socks[index], worker_stop)
                status = 0
            except BaseException:  # noqa: BLE001 (a worker must never return into the parent's code)
                log.exception('worker %d failed', os.getpid())
            finally:
                os._exit(status)
        workers[pid] = (index, time.monotonic())
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid

    if stop:
        return
    for index in range(settings.workers):
        start(index)
    print(f'flashsale listening on http://{settings.host}:{settings.port} '
          f'({settings.workers} workers: {", ".join(map(str, workers))})', flush=True)

    failed = False
    forwarded = 0  # stop signals passed on so far
    while workers:
        if len(stop) > forwarded:
            if not forwarded:
                # No new connections from now on (the workers close theirs).
                for sock in socks:
                    sock.close()
                respawn_at.clear()
            # The first as SIGTERM (a graceful stop); a later SIGINT (Ctrl-C
            # again) as itself: the workers stop waiting.
            sig = signal.SIGTERM if not forwarded else stop[-1]
            forwarded = len(stop)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        for index, when in list(respawn_at.items()):
            if time.monotonic() >= when:
                del respawn_at[index]
                log.info('worker %d started in place of the one that died', start(index))
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            # Not a blocking wait: the signal handlers run only between two
            # steps of Python, and a blocking wait is resumed after them.
            time.sleep(0.05)
            continue
        if pid not in workers:
            continue
        index, started = workers.pop(pid)
        metrics.process_exited(pid)
        code = os.waitstatus_to_exitcode(status)
        if stop:
            failed = failed or code != 0
            continue
        # Died on its own: the others go on serving, and a replacement starts,
        # at once unless the last ones died as soon as they started.
        backoff[index] = (min(backoff[index] + 1, len(_RESPAWN_BACKOFF) - 1)
                          if time.monotonic() - started < _RESPAWN_SOON else 0)
        delay = _RESPAWN_BACKOFF[backoff[index]]
        how = f'killed by {signal.Signals(-code).name}' if code < 0 else f'exit status {code}'
        log.error('worker %d exited unexpectedly (%s); a replacement starts in %.1f s', pid, how, delay)
        respawn_at[index] = time.monotonic() + delay
    if failed:
        raise SystemExit(1)


def _prctl():
    """libc's prctl(), or None where there is none (not Linux)."""
    try:
        import ctypes  # noqa: PLC0415

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _stop_with_parent(prctl, parent):
    """A SIGTERM for this worker when the parent dies (even by SIGKILL, which
    it cannot pass on): orphaned workers would keep the port, and a restart
    could not bind it (Linux only; elsewhere a no-op)."""
    if prctl is None:
        return
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def init_db(settings):
    url, settings = _database(settings)
    with _first_connection(settings, url) as conn:
        applied = database.apply_schema(conn)
    print('schema applied' if applied else 'schema.sql is already applied: nothing to change')


def _change_user(settings, email, statement, missing):
    """Run `statement` (one row or none) for the user with `email`, on the
    same database as `serve`; the user's row, or ConfigError(missing)."""
    url, settings = _database(settings)
    with _first_connection(settings, url) as conn:
        database.apply_schema(conn)
        user = sql.one(conn, statement, {'email': accounts.normalised_email(email)})
    if user is None:
        raise ConfigError(missing)
    return user


def grant_admin(settings, email):
    user = _change_user(settings, email, sql.GRANT_ADMIN,
                        f'no user with email {email!r}: register first (POST /api/auth/register)')
    print(f'{user["email"]} is now an admin')


def revoke_sessions(settings, email):
    user = _change_user(settings, email, sql.REVOKE_SESSIONS, f'no user with email {email!r}')
    print(f'every session of {user["email"]} is ended: their tokens fail from now on')


def _configure_logging(level, threaded=False, log_format='text'):
    """Log lines go to stderr, as text or as JSON (resources/logformat.py).
    In a server process through one writer thread, in batches
    (resources/logwriter.py); elsewhere (the command line, the parent that
    forks the workers, which must run no thread when it forks) each line at
    once."""
    if not threaded:
        writer = logwriter.DirectWriter()
    else:
        writer = logwriter.BatchedWriter()
        # Its thread never takes SIGTERM/SIGINT (a new thread inherits the
        # mask): a process-directed signal goes to a thread that does not
        # block it, and the main thread's handler must run (it is what
        # starts the stop).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            writer.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        atexit.register(writer.stop)  # writes out what is waiting before exit
    if log_format == 'json':
        writer.addFilter(logformat.RequestIds())
        writer.setFormatter(logformat.JSONFormatter())
    else:
        writer.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s %(message)s'))
    logging.basicConfig(level=level, handlers=[writer], force=True)
    return writer


def _settings_help():
    width = max(len(v.name) for v in VARIABLES)
    lines = [f'  {v.name:<{width}}  {v.meaning} (default: {v.shown_default()})' for v in VARIABLES]
    return 'settings, read from the environment once at start-up (README.md, Settings):\n' + '\n'.join(lines)


def main(argv=None):
    # A reader of this process' output that is gone (`flashsale serve | true`)
    # must not end it: what it would have read is dropped (resources/logwriter.py).
    sys.stdout = logwriter.ReaderGoneSafe(sys.stdout)
    sys.stderr = logwriter.ReaderGoneSafe(sys.stderr)
    parser = argparse.ArgumentParser(prog='flashsale', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('serve', help='run the HTTP server (settings: flashsale serve --help)',
                        description='Run the HTTP server.', epilog=_settings_help(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands.add_parser('init-db', help='apply schema.sql to the database, if it changed (safe to repeat)')
    grant = commands.add_parser('grant-admin', help='give an existing user admin rights')
    grant.add_argument('email')
    revoke = commands.add_parser('revoke-sessions', help='end every session of a user (their tokens fail)')
    revoke.add_argument('email')
    args = parser.parse_args(argv)
    stop = _record_stop_signals() if args.command == 'serve' else None

    try:
        settings = Settings.from_env()
        level = settings.log_level.upper()
        if level not in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'):
            raise ConfigError(f'LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {settings.log_level!r}')
        _configure_logging(level, log_format=settings.log_format)
        # pgserver logs every command it runs at INFO, output and all; waitress
        # warns of its task queue depth on every request that has to queue,
        # which in a flash sale is most of them (the access log already says
        # how long each request took).
        logging.getLogger('pgserver').setLevel(logging.WARNING)
        logging.getLogger('waitress.queue').setLevel(logging.ERROR)
        # granian says when each of its runtime threads starts and stops.
        logging.getLogger('_granian').setLevel(logging.WARNING)
        if args.command == 'serve':
            serve(settings, stop)
        elif args.command == 'init-db':
            init_db(settings)
        elif args.command == 'revoke-sessions':
            revoke_sessions(settings, args.email)
        else:
            grant_admin(settings, args.email)
    except (ConfigError, database.SchemaLocked) as exc:
        print(f'flashsale: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
