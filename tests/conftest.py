"""Fixtures: a real PostgreSQL with a clean schema, the app, users, sales.

The database is the embedded one (pgserver, in a temporary directory) unless
TEST_DATABASE_URL names another server. Either way the run starts by dropping
and re-creating the public schema: never point it at data you want to keep.
"""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import psycopg
import pytest
import waitress
import webtest
from psycopg.rows import dict_row

import flashsale
from resources import database
from resources import embedded
from resources.credentials import Credentials
from private_postgres import free_port  # noqa: F401 (for the tests)
from invariants import sale_state  # noqa: F401 (for the tests: scripts/invariants.py, one checker for all)

TEST_SECRET = 'test-secret-' + 'x' * 40


@pytest.fixture(scope='session')
def database_url(tmp_path_factory):
    url = os.environ.get('TEST_DATABASE_URL')
    if not url:
        url = embedded.start(tmp_path_factory.mktemp('embedded-db'), delete_on_exit=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute('DROP SCHEMA IF EXISTS public CASCADE')
        conn.execute('CREATE SCHEMA public')
    return url


@pytest.fixture(scope='session')
def settings(database_url):
    return flashsale.Settings(
        database_url=database_url,
        jwt_secret=TEST_SECRET,
        bcrypt_rounds=4,
        threads=8,
        pool_size=8,
        pool_timeout=5.0,
        # Tests create and change sales between requests; each answer must be
        # fresh (tests/test_cache.py covers the cache with an app of its own).
        poll_cache_ms=0,
    )


@pytest.fixture(scope='session')
def pool(settings):
    with database.connect(settings, settings.database_url) as conn:
        database.apply_schema(conn)
    pool = database.open_pool(settings, settings.database_url)
    yield pool
    pool.close()


@pytest.fixture(autouse=True)
def db(request, pool):
    """A connection for the test's own checks; every table empty at the start."""
    with pool.connection() as conn:
        conn.execute('TRUNCATE orders, flash_sales, users')
        yield conn


@pytest.fixture(scope='session')
def wsgi_app(settings, pool):
    # Its hashing processes started before the first test, as `serve` does.
    hash_queue = flashsale.new_hash_queue(settings)
    app = flashsale.create_app(settings, pool, hash_queue)
    hash_queue.start()
    yield app
    hash_queue.close()


@pytest.fixture
def client(wsgi_app):
    return webtest.TestApp(wsgi_app)


@pytest.fixture(scope='session')
def credentials(settings):
    return Credentials(settings.jwt_secret, settings.jwt_ttl_seconds, settings.bcrypt_rounds)


def auth(token):
    return {'Authorization': f'Bearer {token}'}


@pytest.fixture
def make_user(db, credentials):
    """make_user(admin=False) -> (user_id, token): a user inserted straight
    into the database (no bcrypt), with a valid token."""

    def make(email=None, admin=False):
        email = email or f'user-{uuid.uuid4().hex[:12]}@example.com'
        row = db.execute(
            'INSERT INTO users (email, password_hash, is_admin) VALUES (%s, %s, %s) RETURNING id',
            (email, 'not-a-bcrypt-hash', admin),
        ).fetchone()
        return row['id'], credentials.issue(row['id'])

    return make


@pytest.fixture
def make_users(db, credentials):
    """make_users(n) -> [(user_id, token)] in one statement."""

    def make(count):
        rows = db.execute(
            "INSERT INTO users (email, password_hash) "
            "SELECT 'crowd-' || gen_random_uuid() || '@example.com', 'x' FROM generate_series(1, %s) "
            'RETURNING id',
            (count,),
        ).fetchall()
        return [(row['id'], credentials.issue(row['id'])) for row in rows]

    return make


@pytest.fixture
def make_sale(db):
    """make_sale(stock=10, starts_in=-60, ends_in=3600) -> sale id. Offsets are
    seconds from the database's now()."""

    def make(stock=10, starts_in=-60, ends_in=3600, name='Test sale', remaining=None):
        row = db.execute(
            'INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) '
            "VALUES (%s, now() + make_interval(secs => %s), now() + make_interval(secs => %s), %s, %s) "
            'RETURNING id',
            (name, starts_in, ends_in, stock, stock if remaining is None else remaining),
        ).fetchone()
        return row['id']

    return make


def wait_for(predicate, timeout=10, message='condition'):
    """Poll predicate() until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f'timed out after {timeout} s waiting for {message}')


def backends_waiting_on_a_lock(url):
    """How many database sessions are waiting for a lock right now."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]


def hold_sale_row(url, sale_id):
    """A connection holding the sale row's lock in an open transaction (the
    purchase statement then waits for it): commit() or close() lets go."""
    locker = psycopg.connect(url)
    locker.execute('SELECT 1 FROM flash_sales WHERE id = %s FOR UPDATE', (sale_id,))
    return locker


def start_serve(env, log_path, timeout=60):
    """`flashsale serve` as a real process with `env`, its output in log_path
    (truncated first); returns the process once it says it is listening."""
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'flashsale', 'serve'], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while 'listening on' not in Path(log_path).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail('flashsale serve did not start:\n' + Path(log_path).read_text())
        time.sleep(0.05)
    return proc


@pytest.fixture(scope='session')
def live_server(wsgi_app, settings):
    """The real waitress server on a free port, in a thread. Yields its base URL."""
    server = waitress.create_server(
        wsgi_app, host='127.0.0.1', port=0, threads=settings.threads, ident='flashsale'
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.effective_port}'
    server.close()


@pytest.fixture(scope='session')
def raw_connect(database_url):
    def connect():
        return psycopg.connect(database_url, autocommit=True, row_factory=dict_row)

    return connect


def race(base_url, requests):
    """Fire every (sale_id, token) purchase at once, one thread and one
    connection each, released together by a barrier. Returns
    [(status, code or None, order or None)] in the order given."""
    address = urllib.parse.urlsplit(base_url)
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def fire(index, sale_id, token):
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        try:
            conn.connect()
        except OSError:
            barrier.abort()  # the others must not wait for this one forever
            raise
        barrier.wait(timeout=60)
        conn.request('POST', f'/api/flash-sales/{sale_id}/purchase', headers={'Authorization': f'Bearer {token}'})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        results[index] = (resp.status, body.get('code'), body.get('order'))

    threads = [threading.Thread(target=fire, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_orders_match_answers(conn, sale_id, results):
    """Every order answered 201 (in race()'s results) exists; no other order does."""
    answered = {r[2]['id'] for r in results if r[0] == 201}
    stored = {str(row['id']) for row in conn.execute('SELECT id FROM orders WHERE flash_sale_id = %s', (sale_id,))}
    assert answered == stored, f'answered 201 but not stored: {answered - stored}; stored but not answered: {stored - answered}'
