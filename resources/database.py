"""Connections to PostgreSQL: the pool the app uses, and applying schema.sql."""

import sys
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


def connect(settings, url):
    """One connection outside the pool (for commands and start-up work)."""
    return psycopg.connect(
        url, autocommit=True, row_factory=dict_row, options=connection_options(settings)
    )


class Pool(ConnectionPool):
    """A ConnectionPool that remembers whether its latest attempt to open a
    connection failed, so that "no connection came free in time" can be told
    apart: the database is down (503 database_unavailable) or merely busy
    (503 overloaded)."""

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
        },
        name='flashsale',
        open=True,
    )


def apply_schema(conn):
    """Apply schema.sql in one transaction. Safe to run any number of times
    and from several processes at once."""
    with conn.transaction():
        conn.execute(sql.LOCK_SCHEMA)
        conn.execute(schema_path().read_text())
