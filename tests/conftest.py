"""Fixtures: a real PostgreSQL with a clean schema, the app, users, sales.

The database is the embedded one (pgserver, in a temporary directory) unless
TEST_DATABASE_URL names another server. Either way the run starts by dropping
and re-creating the public schema: never point it at data you want to keep.
"""

import collections
import dataclasses
import functools
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import psycopg
import pytest
import webtest
from psycopg.rows import dict_row

import flashsale
import invariants
from resources import database
from resources import embedded
from resources import serving
from resources.credentials import Credentials
import servers as launcher
from servers import free_port  # noqa: F401 (for the tests: scripts/servers.py, one for the tests and the tools)
from invariants import sale_state  # noqa: F401 (for the tests: scripts/invariants.py, one checker for all)

TEST_SECRET = 'test-secret-' + 'x' * 40
LOOPBACK = ('127.0.0.1', '::1')


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
        # fresh (tests/test_fast_paths.py covers the cache with an app of its own).
        poll_cache_ms=0,
        # The tests register and log in from loopback (WebTest's REMOTE_ADDR
        # too) far faster than any limit; tests/test_limits.py limits them.
        rate_limit_exempt=LOOPBACK,
    )


@pytest.fixture(scope='session')
def pool(settings):
    with database.connect(settings, settings.database_url) as conn:
        database.apply_schema(conn)
    pool = database.open_pool(settings, settings.database_url)
    yield pool
    pool.close()


@pytest.fixture(scope='session')
def check_connection(settings, pool):
    """The tests' own connection to the session's database, outside the app's
    pool: a test holds it from start to end, which the pool's watchdog would
    cut off after its hold limit, and it would leave the app a connection
    short. (After the pool, which applies the schema.)"""
    with database.connect(settings, settings.database_url) as conn:
        yield conn


@pytest.fixture(autouse=True)
def db(check_connection):
    """A connection for the test's own checks; every table empty at the start
    (TRUNCATE waits for no one: the pool's idle connections hold no lock)."""
    if check_connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        check_connection.rollback()  # a test that failed inside a transaction of its own
    check_connection.execute('TRUNCATE orders, flash_sales, users, auth_rate_buckets')
    return check_connection


@pytest.fixture(scope='session')
def wsgi_app(settings, pool):
    # Its hashing processes started before the first test, as `serve` does.
    hash_queue = flashsale.new_hash_queue(settings)
    app = flashsale.create_app(settings, pool, hash_queue=hash_queue)
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


def insert_user(conn, credentials, email=None, admin=False):
    """(user_id, token): a user inserted straight into the database behind
    conn (no bcrypt), with a valid token."""
    email = email or f'user-{uuid.uuid4().hex[:12]}@example.com'
    row = conn.execute(
        'INSERT INTO users (email, password_hash, is_admin) VALUES (%s, %s, %s) RETURNING id',
        (email, 'not-a-bcrypt-hash', admin),
    ).fetchone()
    return row['id'], credentials.issue(row['id'])


def insert_sale(conn, stock=10, starts_in=-60, ends_in=3600, name='Test sale', remaining=None):
    """A sale inserted into the database behind conn: its id. Offsets are
    seconds from the database's now()."""
    row = conn.execute(
        'INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) '
        "VALUES (%s, now() + make_interval(secs => %s), now() + make_interval(secs => %s), %s, %s) "
        'RETURNING id',
        (name, starts_in, ends_in, stock, stock if remaining is None else remaining),
    ).fetchone()
    return row['id']


@pytest.fixture
def make_user(db, credentials):
    """make_user(email=None, admin=False) -> (user_id, token), in the session's database."""
    return functools.partial(insert_user, db, credentials)


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
    """make_sale(stock=10, starts_in=-60, ends_in=3600, name=..., remaining=None)
    -> sale id, in the session's database."""
    return functools.partial(insert_sale, db)


# The settings open_pool() reads: an app with one of them changed needs a pool
# of its own (lock and statement timeouts are set per connection).
POOL_SETTINGS = {'database_url', 'pool_size', 'pool_timeout', 'statement_timeout_ms', 'lock_timeout_ms'}

AppUnderTest = collections.namedtuple('AppUnderTest', 'wsgi client settings pool poll_cache')


@pytest.fixture
def make_app(settings, pool):
    """make_app(filled=True, queue=None, poll_cache=None, **changes) ->
    AppUnderTest(wsgi, client, settings, pool, poll_cache): the app with these
    settings changed, and its PollCache (default: one from the settings). On the
    session's pool, unless a change is one of POOL_SETTINGS: then on a pool of
    its own, closed at the end of the test, and filled before it is returned
    unless filled=False (a database that takes no connection: a standby, a
    server that is down). `queue`: the hashing.HashQueue its logins use
    (default: one of its own from the settings, closed at the end of the
    test; its processes start at the first login)."""
    pools, queues = [], []

    def make(filled=True, queue=None, poll_cache=None, **changes):
        changed = dataclasses.replace(settings, **changes)
        own = pool
        if POOL_SETTINGS & changes.keys():
            own = database.open_pool(changed, changed.database_url)
            pools.append(own)
            if filled:
                own.wait()
        if queue is None:
            queue = flashsale.new_hash_queue(changed)
            queues.append(queue)
        poll_cache = flashsale.new_poll_cache(changed) if poll_cache is None else poll_cache
        app = flashsale.create_app(changed, own, hash_queue=queue, poll_cache=poll_cache)
        return AppUnderTest(app, webtest.TestApp(app), changed, own, poll_cache)

    yield make
    for queue in queues:
        queue.close()
    for own in pools:
        own.close(timeout=1)


@pytest.fixture
def app_on(make_app):
    """app_on(url, filled=True, **changes) -> AppUnderTest: make_app() on a
    pool of its own on the database at url (a private cluster): 4
    connections, a 1 s pool timeout, unless changed."""

    def make(url, **changes):
        return make_app(**{'database_url': url, 'pool_size': 4, 'pool_timeout': 1.0, **changes})

    return make


def sale_state_at(url, sale_id):
    """sale_state() read on a new connection to the database at url (a
    private cluster, or one whose earlier connections died with a restart)."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return sale_state(conn, sale_id)


def wait_for(predicate, timeout=10, message='condition'):
    """Poll predicate() until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f'timed out after {timeout} s waiting for {message}')


def wait_for_health(client, timeout, message='GET /health to answer 200'):
    """Poll GET /health through a WebTest client until it is 200 (503 while
    the database is unreachable, and nothing else)."""
    wait_for(lambda: client.get('/health', status=[200, 503]).status_int == 200, timeout=timeout, message=message)


def timed(call):
    """(call's result, seconds it took)."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def run_together(targets, timeout=60, released_together=False):
    """Run every callable in a thread of its own, all started at once (with
    released_together, called only once every thread is running); return
    once all have ended, or fail after timeout seconds."""
    if released_together:
        barrier = threading.Barrier(len(targets))

        def released(target):
            barrier.wait(timeout)
            target()

        targets = [functools.partial(released, target) for target in targets]
    threads = [threading.Thread(target=target) for target in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
    running = sum(t.is_alive() for t in threads)
    if running:
        pytest.fail(f'{running} of {len(threads)} threads still running after {timeout} s')


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


def clean_env(**extra):
    """This process' environment without the database and secret settings,
    plus extra: for a `flashsale` command that must not inherit them."""
    env = {k: v for k, v in os.environ.items() if k not in ('DATABASE_URL', 'JWT_SECRET', 'TEST_DATABASE_URL')}
    env.update(extra)
    return env


def serve_env(database_url, **extra):
    """The environment of a `flashsale serve` on the tests' database and
    secret, one process unless `extra` says WORKERS (the default, one per
    core, would fork every test's server, and a connection table or a
    process' log is one process'), loopback exempt from the rate limits
    unless `extra` says RATE_LIMIT_EXEMPT (nothing is, by default)."""
    return clean_env(DATABASE_URL=database_url, JWT_SECRET=TEST_SECRET,
                     **{'BCRYPT_ROUNDS': '4', 'WORKERS': '1', 'RATE_LIMIT_EXEMPT': ','.join(LOOPBACK), **extra})


def run_cli(*args, env):
    """A `flashsale` command run to its end: its CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, '-m', 'flashsale', *args], env=env, capture_output=True, text=True, timeout=60
    )


def start_serve(env, log_path, timeout=60, stderr=subprocess.STDOUT):
    """`flashsale serve` as a real process with `env`, its output in log_path
    (truncated first; its log lines too, unless `stderr` is another file);
    returns the process once it says it is listening (scripts/servers.py:
    the launcher the load tool uses too)."""
    try:
        return launcher.start_serve(env, log_path, timeout, stderr=stderr)
    except launcher.StartError as exc:
        pytest.fail(str(exc))


# The servers `flashsale serve` can run (SERVER): server-level tests run on each.
SERVERS = ('waitress', 'granian')


class ServerInThread:
    """The server `flashsale serve` builds for app (`engine`: waitress, with
    resources/serving.py's connection limit, body limit, JSON errors, proxy
    headers; or granian, resources/granian_server.py), on a free loopback
    port, served in a thread by the loop `flashsale serve` runs (its
    serve(), with the graceful stop). stop() stops it as SIGTERM does,
    through the same code, and fails if it has not stopped by the end of
    its grace. on_stop: called when the stop begins (as flashsale's, e.g.
    the batches' stop)."""

    def __init__(self, app, settings, on_stop=None, engine='waitress'):
        settings = dataclasses.replace(settings, host='127.0.0.1', port=0, server=engine)
        self.grace = settings.shutdown_timeout
        module = flashsale._engine(settings)
        self.server = module.create_server(app, settings, serving.listening_socket(settings))
        self.port = self.server.effective_port
        self.base_url = f'http://127.0.0.1:{self.port}'
        self._stops = []
        self._thread = threading.Thread(target=module.serve, args=(self.server, self.grace, self._stops, on_stop),
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self._stops.append('end of test')
        # serve() gives up waiting for the requests in flight at the grace,
        # then waits up to 1 s for its worker threads.
        self._thread.join(self.grace + 5)
        if self._thread.is_alive():
            pytest.fail(f'the server on port {self.port} did not stop within {self.grace + 5} s')


@pytest.fixture(scope='session', params=SERVERS)
def each_server(request):
    """The name of a server `flashsale serve` can run: a test (or fixture)
    that takes it runs once under each."""
    return request.param


@pytest.fixture(scope='session')
def raced_server(wsgi_app, settings, each_server):
    """The session's app in the real server, in a thread, under each server. Yields its base URL."""
    server = ServerInThread(wsgi_app, settings, engine=each_server)
    yield server.base_url
    server.stop()


@pytest.fixture(scope='session')
def live_server(wsgi_app, settings):
    """The session's app in the real server, in a thread. Yields its base URL."""
    server = ServerInThread(wsgi_app, settings)
    yield server.base_url
    server.stop()


@pytest.fixture
def serve_in_thread():
    """serve_in_thread(make_app(...)) -> base URL of that app in the real
    server with its settings, closed at the end of the test."""
    servers = []

    def serve(app):
        servers.append(ServerInThread(app.wsgi, app.settings))
        return servers[-1].base_url

    yield serve
    for server in servers:
        server.stop()


# --- nginx in front -------------------------------------------------------------

NGINX_CONF = launcher.NGINX_CONF


def answers_health(base_url, proc):
    """True once GET /health through nginx is 200; fails if nginx exited."""
    if proc.poll() is not None:
        pytest.fail(f'{proc.args} exited with {proc.returncode}')
    try:
        return call(base_url, 'GET', '/health', timeout=2).status == 200
    except OSError:
        return False


def nginx_binary():
    nginx = launcher.nginx_binary()
    if nginx is None:
        if os.environ.get('CI'):
            pytest.fail('nginx is missing in CI (.ci/run installs it)')
        pytest.skip('nginx is not installed (apt-get install nginx-light)')
    return nginx


def start_nginx(tmp_path, upstream_ports, ready_path='/health', changes=()):
    """The shipped nginx.conf in front of upstream_ports; returns (front URL,
    process) once ready_path answers 200 through it (None: once its port
    accepts connections, with no request sent upstream). `changes`: more
    (text, replacement) pairs, each of whose text must be in the file."""
    nginx_binary()
    front_port = free_port()
    front = launcher.start_nginx(tmp_path, upstream_ports, front_port, changes)
    base_url = f'http://127.0.0.1:{front_port}'
    if ready_path:
        wait_for(lambda: answers_health(base_url, front), timeout=30, message='nginx to answer GET /health')
    else:
        wait_for(lambda: accepts(front_port, front), timeout=30, message='nginx to listen')
    return base_url, front


def accepts(port, proc):
    """True once 127.0.0.1:port accepts a connection; fails if proc exited."""
    if proc.poll() is not None:
        pytest.fail(f'{proc.args} exited with {proc.returncode}')
    try:
        socket.create_connection(('127.0.0.1', port), timeout=2).close()
        return True
    except OSError:
        return False


def app_env(database_url, port, server='waitress'):
    """A `flashsale serve` behind nginx. No exemption: one covering the
    proxy's address is refused (flashsale.py)."""
    return serve_env(database_url, PORT=str(port), TRUSTED_PROXY='127.0.0.1', RATE_LIMIT_EXEMPT='', THREADS='4',
                     SERVER=server)



# --- HTTP over a socket -----------------------------------------------------------

Answer = collections.namedtuple('Answer', 'status headers json')


def connect(base_url, timeout=30):
    """An open HTTP/1.1 connection to the server at base_url."""
    address = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    conn.connect()
    return conn


def send(conn, method, path, body=None, token=None, headers=None):
    """Send one request on conn: body as JSON, token as Bearer."""
    headers = dict(headers or {})
    if token:
        headers['Authorization'] = f'Bearer {token}'
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers['Content-Type'] = 'application/json'
    conn.request(method, path, body=data, headers=headers)


def answer(conn):
    """The answer to the request sent on conn: Answer(status, headers, JSON body or None)."""
    resp = conn.getresponse()
    data = resp.read()
    return Answer(resp.status, resp.headers, json.loads(data) if data else None)


def call(base_url, method, path, body=None, token=None, headers=None, timeout=30):
    """One request on a new connection: Answer(status, headers, JSON body or None)."""
    conn = connect(base_url, timeout)
    try:
        send(conn, method, path, body, token, headers)
        return answer(conn)
    finally:
        conn.close()


def buy_over_http(base_url, sale_id, token, timeout=60):
    """One purchase on a new connection: (status, code, order, pid of the
    server process that answered, from its request id), or (None,
    'no_answer', None, None) when the connection failed before an answer."""
    try:
        resp = call(base_url, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token, timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None, 'no_answer', None, None
    body = resp.json or {}
    return resp.status, body.get('code'), body.get('order'), int(resp.headers['X-Request-ID'].split('-')[0], 16)


def requests_read_by_server(port):
    """How many established connections to the server on `port` (this
    machine, IPv4) have nothing left unread on the server's side: requests
    it has read and not yet answered, once the clients have all sent."""
    local = f':{port:04X}'
    count = 0
    with open('/proc/net/tcp') as table:
        next(table)
        for line in table:
            fields = line.split()
            # local address, remote, state (01: established), tx_queue:rx_queue
            if fields[1].endswith(local) and fields[3] == '01' and fields[4].split(':')[1] == '00000000':
                count += 1
    return count


def raw_http(base_url, data, source=None):
    """Send raw bytes to the server; return (status, headers, body bytes) of its answer.
    `source`: the local address to send from (another loopback address is another client)."""
    address = urllib.parse.urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=5,
                                  source_address=(source, 0) if source else None) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and close before reading it all
        received = b''
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    head, _, body = received.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    headers = dict(line.split(': ', 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def raw_post(path, body, headers=b''):
    """The bytes of a JSON POST with these extra header lines (each ending in CRLF)."""
    return (b'POST ' + path.encode() + b' HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n'
            + headers + b'\r\n' + body)


def race(base_url, requests):
    """Fire every (sale_id, token) purchase at once, one thread and one
    connection each, released together by a barrier. Returns
    [(status, code or None, order or None)] in the order given."""
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def fire(index, sale_id, token):
        try:
            conn = connect(base_url)
        except OSError:
            barrier.abort()  # the others must not wait for this one forever
            raise
        try:
            barrier.wait(timeout=60)
            send(conn, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token)
            resp = answer(conn)
        finally:
            conn.close()
        results[index] = (resp.status, resp.json.get('code'), resp.json.get('order'))

    run_together([functools.partial(fire, i, *r) for i, r in enumerate(requests)], timeout=120)
    return results


def race_and_check(base_url, db, sale_id, users, tabs=1):
    """Every (user_id, token)'s purchase, `tabs` times each, raced at once;
    then every invariant of scripts/invariants.py (stock conserved, one
    order per user, every 201 its user's order, no order without a 201).
    Returns the answers counted by code (by status for a 201)."""
    buyers = [user for user in users for _ in range(tabs)]
    results = race(base_url, [(sale_id, token) for _, token in buyers])
    state, orders = invariants.read_sale(db, sale_id)
    answers = [invariants.Answer(str(user), 'created' if status == 201 else code, (order or {}).get('id'))
               for (user, _), (status, code, order) in zip(buyers, results)]
    checks = invariants.check_sale(state, orders, answers)
    assert not invariants.failures(checks), checks
    return collections.Counter(code or status for status, code, _ in results)


def assert_orders_match_answers(conn, sale_id, results):
    """Every order answered 201 (in race()'s results) exists; no other order does."""
    answered = {r[2]['id'] for r in results if r[0] == 201}
    stored = {str(row['id']) for row in conn.execute('SELECT id FROM orders WHERE flash_sale_id = %s', (sale_id,))}
    assert answered == stored, f'answered 201 but not stored: {answered - stored}; stored but not answered: {stored - answered}'


# --- metrics -----------------------------------------------------------------------


def metric_samples(text):
    """{(sample name, ((label, value), ...)): value} of a Prometheus text
    answer, read by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(base_url):
    """GET /metrics from the server at base_url (from 127.0.0.1), as metric_samples()."""
    conn = connect(base_url)
    try:
        conn.request('GET', '/metrics')
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200, text
    return metric_samples(text)


def counted(before, after):
    """The counts (counters, histograms' _count) that changed from one
    scrape to the next: {(sample name, labels): by how much}."""
    return {key: value - before.get(key, 0) for key, value in after.items()
            if key[0].endswith(('_total', '_count')) and value != before.get(key, 0)}


@pytest.fixture
def real_server(pool):
    """real_server(settings) -> port of the server `flashsale serve` builds
    (resources/serving.py) for the app with these settings, on the session
    database; closed at the end of the test."""
    servers = []

    def start(settings):
        servers.append(ServerInThread(flashsale.create_app(settings, pool), settings))
        return servers[-1].port

    yield start
    for server in servers:
        server.stop()
