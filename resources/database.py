"""Connections to PostgreSQL: the pool the app uses, and applying schema.sql."""

import contextlib
import hashlib
import logging
import select
import socket
import sys
import threading
import time
from pathlib import Path

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from psycopg_pool import PoolTimeout

from resources import sql

log = logging.getLogger('flashsale')


def schema_path():
    """schema.sql beside flashsale.py (a checkout or an editable install), or
    where a regular install put it (setup.cfg's data_files)."""
    for candidate in (
        Path(__file__).resolve().parent.parent / 'schema.sql',
        Path(sys.prefix) / 'share' / 'flashsale' / 'schema.sql',
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError('schema.sql not found beside flashsale.py nor in share/flashsale')


def connection_options(settings):
    """Server-side limits, set per connection, so that no request can wait
    unboundedly on the hot sale row or a stuck transaction."""
    return (
        f'-c statement_timeout={settings.statement_timeout_ms}'
        f' -c lock_timeout={settings.lock_timeout_ms}'
        ' -c idle_in_transaction_session_timeout=10000'
        ' -c TimeZone=UTC'
    )


# A server that does not answer a connection attempt (a host that is down, a
# dropped packet) would otherwise keep libpq waiting for minutes. TCP
# keepalives find a peer that vanished while a connection sat open.
#
# target_session_attrs=read-write, whatever DATABASE_URL says: every
# connection must be able to take a purchase. With several hosts in the URL
# (a primary and its standbys) each attempt tries them in turn and keeps the
# first that takes writes, so after a failover new connections find the
# promoted standby by themselves; a standby, or an old primary rejoined as
# one, is refused at connect (libpq reads the server's in_hot_standby and
# default_transaction_read_only from its start-up reply: no extra round trip).
CONNECT_KWARGS = {
    'connect_timeout': 3,
    'keepalives': 1,
    'keepalives_idle': 10,
    'keepalives_interval': 3,
    'keepalives_count': 3,
    'target_session_attrs': 'read-write',
}

# How long a request waits for a connection while the latest attempt to open
# one has failed: the database is down, so waiting the whole pool timeout
# would only hold a thread (and everyone queued behind it) to say so later.
# Only a failed attempt says so. A connection the server hung up on says it
# restarted, and the one opened to replace it may take longer than this on a
# loaded machine: the request waits for it as long as the pool timeout allows.
UNREACHABLE_WAIT = 0.2

# A connection lost with the database is tried again once, this long after a
# failed attempt; then the pool gives up on it, and from then on a request
# that finds no connection starts a new attempt at once. So while the
# database is down, attempts follow demand (a couple a second), and when it
# is back the next request reconnects the pool. (psycopg_pool's default is to
# retry each lost connection for 5 minutes with a backoff that doubles: the
# service would stay down up to a minute longer than its database.)
RECONNECT_TIMEOUT = 0.5


# The longest a request waits for a connection in one go before it asks the
# pool again. psycopg_pool starts opening a connection for a request only
# when the request begins to wait, so a request that was already waiting
# when the database went away (every connection busy, e.g. commits waiting
# for a standby that is gone) would wait out the whole POOL_TIMEOUT_MS even
# after the pool gave up on the lost connections, or the database came back
# (a failover). Asking again starts that attempt, and notices within a slice
# that the database has become known to be down while it waited.
WAIT_SLICE = 0.1

# How often the pool looks for connections held too long (see Pool).
WATCHDOG_TICK = 0.25


def hold_limit(settings):
    """The longest a request may hold a connection. A request runs at most two
    statements, each cut off by the server at statement_timeout, so only a
    database that has stopped answering altogether (a frozen process, a
    stalled disk: its kernel still keeps the connection alive) takes longer."""
    return 2 * settings.statement_timeout_ms / 1000 + 1


def connect(settings, url):
    """One connection outside the pool (for commands and start-up work)."""
    return psycopg.connect(
        url, autocommit=True, row_factory=dict_row, options=connection_options(settings), **CONNECT_KWARGS
    )


def _hung_up(conn):
    """True if the server has closed this idle connection. An idle connection
    in autocommit has nothing to say: anything to read on its socket is the
    server's goodbye (it restarted, or ended the session) or the closed socket
    itself. One poll() and no round trip (tests/test_faults.py; README)."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (psycopg.Error, OSError, ValueError):
        return True


def _read_only(conn):
    """True if the server has said (since this connection opened) that it
    takes no writes now, e.g. default_transaction_read_only was switched on.
    PostgreSQL reports both settings to the client whenever they change: no
    round trip."""
    status = conn.pgconn.parameter_status
    return status(b'in_hot_standby') == b'on' or status(b'default_transaction_read_only') == b'on'


def _cut_off(conn):
    """End a connection from another thread: shut its socket down (without
    closing the descriptor, which libpq still owns). The thread waiting on it
    gets end-of-file at once, and psycopg an OperationalError."""
    try:
        sock = socket.socket(fileno=conn.fileno())
    except (psycopg.Error, OSError, ValueError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class Pool(ConnectionPool):
    """A ConnectionPool that remembers whether its latest attempt to open a
    connection failed, so that "no connection came free in time" can be told
    apart: the database is down (503 database_unavailable) or merely busy
    (503 overloaded). It answers that quickly while the database is down,
    never hands out a connection the server has hung up on, and cuts off a
    connection held longer than `hold_limit` seconds, so that no request
    waits forever on a database that stopped answering."""

    def __init__(self, *args, hold_limit=None, **kwargs):
        self.database_unreachable = False
        self._hold_limit = hold_limit
        self._held = {}  # id(conn) -> (conn, when it must be back)
        self._held_lock = threading.Lock()
        self._stop_watching = threading.Event()
        pool = self

        class Connection(psycopg.Connection):
            @classmethod
            def connect(cls, *args, **kwargs):
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.OperationalError:
                    pool.database_unreachable = True
                    raise
                pool.database_unreachable = False
                return conn

        super().__init__(*args, connection_class=Connection, **kwargs)
        if hold_limit:
            threading.Thread(target=self._watch, name=f'{self.name}-watchdog', daemon=True).start()

    def _watch(self):
        while not self._stop_watching.wait(WATCHDOG_TICK):
            now = time.monotonic()
            with self._held_lock:
                overdue = [key for key, (_, due) in self._held.items() if due <= now]
                for key in overdue:
                    conn, _ = self._held.pop(key)
                    log.error('a database connection was held over %.1f s: the database is not answering; '
                              'cutting the connection off', self._hold_limit)
                    _cut_off(conn)

    def close(self, timeout=5.0):
        self._stop_watching.set()
        super().close(timeout)

    @contextlib.contextmanager
    def connection(self, timeout=None):
        with super().connection(timeout) as conn:
            try:
                yield conn
            except psycopg.errors.ReadOnlySqlTransaction:
                # The server refused a write: it has become read-only since
                # this connection opened. Retrying on it would fail forever;
                # closed, it is replaced by a connection to whichever host
                # takes writes now (or by none, until one does).
                conn.close()
                raise

    def putconn(self, conn):
        with self._held_lock:
            self._held.pop(id(conn), None)
        super().putconn(conn)

    def getconn(self, timeout=None):
        if timeout is None:
            timeout = self.timeout
        deadline = time.monotonic() + timeout
        while True:
            # Checked again after each slice: a request already waiting when
            # an attempt to connect fails waits UNREACHABLE_WAIT from then.
            if self.database_unreachable:
                deadline = min(deadline, time.monotonic() + UNREACHABLE_WAIT)
            left = deadline - time.monotonic()
            try:
                conn = super().getconn(max(min(left, WAIT_SLICE), 0.001))
            except PoolTimeout:
                if left <= WAIT_SLICE:
                    raise
                continue
            if not _hung_up(conn) and not _read_only(conn):
                if self._hold_limit:
                    with self._held_lock:
                        self._held[id(conn)] = (conn, time.monotonic() + self._hold_limit)
                return conn
            # After a database restart every idle connection is dead: the
            # request would fail on the first (and one on a server that
            # turned read-only would fail on every write). Drop it (the pool
            # opens a replacement) and take the next, without the pool's own
            # check loop, which would sleep a second between two dead ones.
            # The deadline stays: if the database is down, not restarted, the
            # replacement's failed attempt is what shortens the wait.
            conn.close()
            self.putconn(conn)


def open_pool(settings, url):
    """The pool the app runs on: as many connections as server threads, so a
    thread never waits for a connection another thread is not using, and a
    short checkout timeout, so an overloaded server answers 503 instead of
    queueing without end."""
    return Pool(
        url,
        min_size=settings.pool_size,
        max_size=settings.pool_size,
        timeout=settings.pool_timeout,
        kwargs={
            'autocommit': True,
            'row_factory': dict_row,
            'options': connection_options(settings),
            **CONNECT_KWARGS,
        },
        reconnect_timeout=RECONNECT_TIMEOUT,
        hold_limit=hold_limit(settings),
        name='flashsale',
        open=True,
    )


class SchemaLocked(Exception):
    """schema.sql must be applied, and a lock it needs was not granted within
    the connection's lock_timeout; nothing was changed."""


def apply_schema(conn):
    """Bring the database to schema.sql; True if it had to be applied.

    Applying takes table locks even when nothing changes (ADD COLUMN IF NOT
    EXISTS waits for an exclusive lock on users, CREATE INDEX IF NOT EXISTS
    for a share lock): a backup's open transaction holds it up, and every
    purchase queues behind the waiting lock. So the file is applied only when
    its SHA-256 differs from the one recorded with the last apply, read with
    a plain SELECT that waits for nobody. When it must be applied, each lock
    waits at most the connection's lock_timeout, then SchemaLocked.

    Several processes at once apply it one after another (an advisory lock);
    one that waited re-reads the digest and finds the work done. `conn`: any
    connection in autocommit (its rows of any kind)."""
    cur = conn.cursor(row_factory=dict_row)
    text = schema_path().read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if _applied_digest(cur) == digest:
        return False
    waiting_for = 'another process applying it, itself held up by'
    try:
        with conn.transaction():
            cur.execute(sql.LOCK_SCHEMA)
            if _applied_digest(cur) == digest:
                return False
            waiting_for = 'locks on users, flash_sales and orders held by'
            cur.execute(text)
            cur.execute(sql.RECORD_SCHEMA, {'sha256': digest})
    except psycopg.errors.LockNotAvailable:
        raise SchemaLocked(
            f'schema.sql has changed, and applying it waited over {sql.value(cur, sql.LOCK_TIMEOUT)} '
            f'(LOCK_TIMEOUT_MS) for {waiting_for} another session (a backup, a long transaction); '
            'nothing was changed: start again once that session has ended'
        ) from None
    log.info('schema.sql applied (sha256 %s)', digest[:12])
    return True


def _applied_digest(cur):
    """The SHA-256 recorded by the last apply, or None before the first (in
    a savepoint when in a transaction: a missing table must not end it)."""
    try:
        with cur.connection.transaction():
            return sql.value(cur, sql.APPLIED_SCHEMA)
    except psycopg.errors.UndefinedTable:
        return None


def connection_budget_problem(conn, settings):
    """What is wrong with the connections the service will open, in one
    line, or None. Every process opens POOL_SIZE at start and keeps them
    (open_pool), and WORKERS follows the cores: from 13 cores up the
    defaults alone pass PostgreSQL's default max_connections of 100, and
    the pools would then fail to fill, request by request. Connections
    other clients (another host, a rolling restart) hold now are only
    warned of: they may be gone by the time the pools fill."""
    budget = sql.one(conn, sql.CONNECTION_BUDGET)
    needed = settings.pool_size * settings.workers
    if needed > budget['available']:
        return (f'POOL_SIZE ({settings.pool_size}) x WORKERS ({settings.workers}) = {needed} database connections, '
                f"but the database takes {budget['available']} (max_connections {budget['max_connections']} less "
                f"{budget['max_connections'] - budget['available']} reserved); lower POOL_SIZE or WORKERS, "
                'or raise max_connections')
    if needed + budget['in_use'] > budget['available']:
        log.warning('%d database connections are in use and this server will open %d more: the database takes %d; '
                    'some may be refused until others close', budget['in_use'], needed, budget['available'])
    return None
