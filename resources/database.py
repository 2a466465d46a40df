"""Connections to PostgreSQL: the pool the app uses, and applying schema.sql."""

import select
import sys
import time
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from resources import sql


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
CONNECT_KWARGS = {
    'connect_timeout': 3,
    'keepalives': 1,
    'keepalives_idle': 10,
    'keepalives_interval': 3,
    'keepalives_count': 3,
}

# How long a request waits for a connection while the latest attempt to open
# one has failed: the database is down, so waiting the whole pool timeout
# would only hold a thread (and everyone queued behind it) to say so later.
UNREACHABLE_WAIT = 0.2

# A connection lost with the database is tried again once, this long after a
# failed attempt; then the pool gives up on it, and from then on a request
# that finds no connection starts a new attempt at once. So while the
# database is down, attempts follow demand (a couple a second), and when it
# is back the next request reconnects the pool. (psycopg_pool's default is to
# retry each lost connection for 5 minutes with a backoff that doubles: the
# service would stay down up to a minute longer than its database.)
RECONNECT_TIMEOUT = 0.5


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


class Pool(ConnectionPool):
    """A ConnectionPool that remembers whether its latest attempt to open a
    connection failed, so that "no connection came free in time" can be told
    apart: the database is down (503 database_unavailable) or merely busy
    (503 overloaded). It answers that quickly while the database is down, and
    never hands out a connection the server has hung up on."""

    def __init__(self, *args, **kwargs):
        self.database_unreachable = False
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

    def getconn(self, timeout=None):
        if timeout is None:
            timeout = self.timeout
        if self.database_unreachable:
            timeout = min(timeout, UNREACHABLE_WAIT)
        deadline = time.monotonic() + timeout
        while True:
            conn = super().getconn(max(deadline - time.monotonic(), 0.001))
            if not _hung_up(conn):
                return conn
            # After a database restart every idle connection is dead: the
            # request would fail on the first. Drop it (the pool opens a
            # replacement) and take the next, without the pool's own check
            # loop, which would sleep a second between two dead connections.
            # Until a new connection opens, take the database for down.
            self.database_unreachable = True
            deadline = min(deadline, time.monotonic() + UNREACHABLE_WAIT)
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
        name='flashsale',
        open=True,
    )


def apply_schema(conn):
    """Apply schema.sql in one transaction. Safe to run any number of times
    and from several processes at once."""
    with conn.transaction():
        conn.execute(sql.LOCK_SCHEMA)
        conn.execute(schema_path().read_text())
