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
import logging.handlers
import os
import queue
import secrets
import signal
import sys
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone

import falcon

from resources import accounts
from resources import database
from resources import errors
from resources import hashing
from resources import health
from resources import middleware
from resources import orders
from resources import openapi
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, with its default. README.md documents each one."""

    database_url: str | None = None  # unset: the embedded development database
    jwt_secret: str | None = None  # required whenever database_url is set
    host: str = '127.0.0.1'
    port: int = 8000
    threads: int = 8
    pool_size: int = 8
    pool_timeout: float = 5.0  # seconds a request waits for a connection, then 503
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 2000
    cors_origins: tuple = ()
    bcrypt_rounds: int = 12
    jwt_ttl_seconds: int = 3600
    max_body_bytes: int = 16 * 1024
    poll_cache_ms: int = 500  # how long GET /api/flash-sales/current and /{id} answers are reused
    hash_processes: int = 1  # bcrypt processes (nice 19); default: the cores this process may use, / WORKERS
    hash_queue: int = 64  # logins and registrations queued or hashing at once; more get 503 at once
    hash_wait: float = 20.0  # seconds a login may wait for its turn, then 503 with Retry-After
    hash_nice: int = 19  # the hashing processes' niceness: they get the CPU nothing else wants
    data_dir: str = '.flashsale'  # the embedded database and its secret
    trusted_proxy: str | None = None  # e.g. 127.0.0.1 when behind nginx
    connection_limit: int = 1000  # open client connections waitress accepts
    auth_rate_per_minute: int = 30  # register + login per client address (0: off)
    purchase_rate_per_second: int = 5  # purchases per user, twice that at once (0: off)
    rate_limit_exempt: tuple = ('127.0.0.1', '::1')  # client addresses no limit applies to
    shutdown_timeout: float = 10.0  # seconds SIGTERM waits for requests in flight
    workers: int = 1  # server processes sharing the listening socket

    @classmethod
    def from_env(cls, environ=os.environ):
        def integer(name, default, low, high):
            raw = environ.get(name)
            if raw is None or raw == '':
                return default
            try:
                number = int(raw)
            except ValueError:
                raise ConfigError(f'{name} must be a whole number, not {raw!r}') from None
            if not low <= number <= high:
                raise ConfigError(f'{name} must be between {low} and {high}, not {number}')
            return number

        threads = integer('THREADS', cls.threads, 1, 256)
        workers = integer('WORKERS', cls.workers, 1, 64)
        origins = tuple(o.strip() for o in environ.get('CORS_ORIGINS', '').split(',') if o.strip())
        settings = cls(
            database_url=environ.get('DATABASE_URL') or None,
            jwt_secret=environ.get('JWT_SECRET') or None,
            host=environ.get('HOST') or cls.host,
            port=integer('PORT', cls.port, 0, 65535),
            threads=threads,
            pool_size=integer('POOL_SIZE', threads, 1, 256),
            pool_timeout=integer('POOL_TIMEOUT_MS', int(cls.pool_timeout * 1000), 1, 600_000) / 1000,
            statement_timeout_ms=integer('STATEMENT_TIMEOUT_MS', cls.statement_timeout_ms, 1, 600_000),
            lock_timeout_ms=integer('LOCK_TIMEOUT_MS', cls.lock_timeout_ms, 1, 600_000),
            cors_origins=origins,
            bcrypt_rounds=integer('BCRYPT_ROUNDS', cls.bcrypt_rounds, 4, 16),
            jwt_ttl_seconds=integer('JWT_TTL_SECONDS', cls.jwt_ttl_seconds, 30, 7 * 24 * 3600),
            max_body_bytes=integer('MAX_BODY_BYTES', cls.max_body_bytes, 256, 1024 * 1024),
            poll_cache_ms=integer('POLL_CACHE_MS', cls.poll_cache_ms, 0, 10_000),
            hash_processes=integer('HASH_PROCESSES', max(1, len(os.sched_getaffinity(0)) // workers), 1, 256),
            hash_queue=integer('HASH_QUEUE', cls.hash_queue, 1, 10_000),
            hash_wait=integer('HASH_WAIT_MS', int(cls.hash_wait * 1000), 100, 600_000) / 1000,
            hash_nice=integer('HASH_NICE', cls.hash_nice, 0, 19),
            data_dir=environ.get('FLASHSALE_DATA_DIR') or cls.data_dir,
            trusted_proxy=environ.get('TRUSTED_PROXY') or None,
            connection_limit=integer('CONNECTION_LIMIT', cls.connection_limit, 10, 100_000),
            workers=workers,
            auth_rate_per_minute=integer('AUTH_RATE_PER_MINUTE', cls.auth_rate_per_minute, 0, 1_000_000),
            purchase_rate_per_second=integer('PURCHASE_RATE_PER_SECOND', cls.purchase_rate_per_second, 0, 1_000_000),
            rate_limit_exempt=tuple(
                a.strip() for a in environ.get('RATE_LIMIT_EXEMPT', ','.join(cls.rate_limit_exempt)).split(',')
                if a.strip()
            ),
            shutdown_timeout=integer('SHUTDOWN_TIMEOUT_MS', int(cls.shutdown_timeout * 1000), 0, 600_000) / 1000,
        )
        if settings.jwt_secret and len(settings.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f'JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes long')
        return settings


def _json_default(value):
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec='milliseconds').replace('+00:00', 'Z')
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serializable')


def create_app(settings, pool, hash_queue=None):
    """The WSGI app. `pool` is an open psycopg_pool.ConnectionPool; the
    settings must carry the JWT secret. hash_queue: the hashing.HashQueue to
    use (default: one of its own, from the settings; its processes start at
    the first login unless started)."""
    credentials = Credentials(
        settings.jwt_secret, settings.jwt_ttl_seconds, settings.bcrypt_rounds, hash_queue or new_hash_queue(settings)
    )
    poll_cache = PollCache(settings.poll_cache_ms / 1000, _json_default)

    stack = [middleware.RequestLog(), middleware.SecurityHeaders(), middleware.StaticMethods()]
    if settings.cors_origins:
        stack.append(falcon.CORSMiddleware(allow_origins=list(settings.cors_origins)))
    # Authentication before the rate limits: they key purchases by its user id.
    stack.append(Authentication(credentials))
    stack.append(RateLimits(settings))
    app = falcon.App(middleware=stack, cors_enable=False)

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
    app.add_route('/api/flash-sales', sales.Collection(pool, settings))
    app.add_route('/api/flash-sales/current', sales.Current(pool, poll_cache))
    app.add_route('/api/flash-sales/{sale_id}', sales.Item(pool, poll_cache))
    app.add_route('/api/flash-sales/{sale_id}/purchase', orders.Purchase(pool))
    app.add_route('/openapi.json', openapi.Document())
    page.add_routes(app)
    return app


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
    url = embedded.start(settings.data_dir)
    if not settings.jwt_secret:
        settings = dataclasses.replace(settings, jwt_secret=embedded.jwt_secret(settings.data_dir))
    return url, settings


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


def serve(settings):
    from resources import serving  # noqa: PLC0415 (only the serve command needs waitress)

    if settings.database_url and not settings.jwt_secret:
        # Only the embedded development database comes with a generated secret.
        raise ConfigError(
            'JWT_SECRET is required when DATABASE_URL is set: a random string of at least '
            f'{MIN_JWT_SECRET_BYTES} bytes, e.g. the output of\n'
            "  python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    url, settings = _database(settings)
    with database.connect(settings, url) as conn:
        database.apply_schema(conn)
        if not settings.database_url:
            _seed_demo(conn, settings)
    if settings.workers == 1:
        _serve_process(settings, url, None)
    else:
        # Bound before the workers are forked, so that they all accept on it.
        sock = serving.listening_socket(settings)
        _run_workers(dataclasses.replace(settings, port=sock.getsockname()[1]), url, sock)


def _serve_process(settings, url, sock):
    """One server process: its own pool, threads and waitress loop."""
    from resources import serving  # noqa: PLC0415

    pool = database.open_pool(settings, url)
    hash_queue = None
    try:
        hash_queue = new_hash_queue(settings)
        app = create_app(settings, pool, hash_queue)
        hash_queue.start()
        server = serving.create_server(app, settings, sock)
        if sock is None:
            print(f'flashsale listening on http://{settings.host}:{server.effective_port}', flush=True)
        # SIGTERM (docker stop, systemd, kill) and Ctrl-C: stop accepting,
        # finish and send the answers in flight, then close the pool (and stop
        # the embedded database) on the way out, exit status 0.
        serving.run(server, settings.shutdown_timeout)
    finally:
        if hash_queue is not None:
            hash_queue.close()
        pool.close()
        log.info('database pool closed')


def _run_workers(settings, url, sock):
    """WORKERS processes accepting on one listening socket. One process uses
    one core at most (the interpreter lock), and most of a short request's CPU
    is waitress' own: a second process is what makes a second core count.
    Each worker has its own pool, threads, caches and rate limits. The parent
    only forwards SIGTERM/SIGINT and waits; it exits 0 when every worker
    stopped cleanly, else 1 (after stopping the rest)."""
    workers = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            # Its own process group: a Ctrl-C in the terminal reaches the
            # parent only, which passes it on once.
            os.setpgid(0, 0)
            writer = _configure_logging(logging.getLogger().level)
            status = 1
            try:
                _serve_process(settings, url, sock)
                status = 0
            except BaseException:  # noqa: BLE001 (a worker must never return into the parent's code)
                log.exception('worker %d failed', os.getpid())
            finally:
                writer.stop()
                os._exit(status)
        workers.append(pid)
    sock.close()
    print(f'flashsale listening on http://{settings.host}:{settings.port} '
          f'({settings.workers} workers: {", ".join(map(str, workers))})', flush=True)

    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    remaining = set(workers)
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        remaining.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed = True
        if not stopping:
            # A worker died on its own: stop the rest, so a supervisor
            # (systemd, docker) restarts the whole server.
            log.error('worker %d exited unexpectedly; stopping the others', pid)
            stop(signal.SIGTERM, None)
    if failed:
        raise SystemExit(1)


def init_db(settings):
    url, settings = _database(settings)
    with database.connect(settings, url) as conn:
        database.apply_schema(conn)
    print('schema applied')


def grant_admin(settings, email):
    url, settings = _database(settings)
    with database.connect(settings, url) as conn:
        database.apply_schema(conn)
        user = sql.one(conn, sql.GRANT_ADMIN, {'email': email.strip().lower()})
    if user is None:
        raise ConfigError(f'no user with email {email!r}: register first (POST /api/auth/register)')
    print(f'{user["email"]} is now an admin')


def revoke_sessions(settings, email):
    url, settings = _database(settings)
    with database.connect(settings, url) as conn:
        database.apply_schema(conn)
        user = sql.one(conn, sql.REVOKE_SESSIONS, {'email': email.strip().lower()})
    if user is None:
        raise ConfigError(f'no user with email {email!r}')
    print(f'every session of {user["email"]} is ended: their tokens fail from now on')


def _configure_logging(level):
    """Log lines go through a queue to one writer thread. With a handler
    writing to stderr directly, every request thread would take the
    handler's lock for a write() per access-log line, and under load the
    threads would queue on that lock for a third of a sold-out answer's
    time."""
    writer = logging.StreamHandler()
    writer.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s %(message)s'))
    records = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    atexit.register(listener.stop)  # writes out what is queued before exit
    enqueue = logging.handlers.QueueHandler(records)
    # The handler merges the message (and any traceback) before queueing; the
    # writer adds the time, level and logger name.
    enqueue.setFormatter(logging.Formatter('%(message)s'))
    logging.basicConfig(level=level, handlers=[enqueue], force=True)
    return listener


def main(argv=None):
    parser = argparse.ArgumentParser(prog='flashsale', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('serve', help='run the HTTP server (HOST, PORT, THREADS, ...)')
    commands.add_parser('init-db', help='apply schema.sql to the database (safe to repeat)')
    grant = commands.add_parser('grant-admin', help='give an existing user admin rights')
    grant.add_argument('email')
    revoke = commands.add_parser('revoke-sessions', help='end every session of a user (their tokens fail)')
    revoke.add_argument('email')
    args = parser.parse_args(argv)

    _configure_logging(os.environ.get('LOG_LEVEL', 'INFO').upper())
    # pgserver logs every command it runs at INFO, output and all; waitress
    # warns of its task queue depth on every request that has to queue, which
    # in a flash sale is most of them (the access log already says how long
    # each request took).
    logging.getLogger('pgserver').setLevel(logging.WARNING)
    logging.getLogger('waitress.queue').setLevel(logging.ERROR)
    try:
        settings = Settings.from_env()
        if args.command == 'serve':
            serve(settings)
        elif args.command == 'init-db':
            init_db(settings)
        elif args.command == 'revoke-sessions':
            revoke_sessions(settings, args.email)
        else:
            grant_admin(settings, args.email)
    except ConfigError as exc:
        print(f'flashsale: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
