"""What the rate limits mean with several processes: the register/login limit
is the service's, kept in PostgreSQL and shared by every process on the
database (WORKERS, or `flashsale serve` processes on other ports or hosts);
the purchase limit is per process (README.md, "Rate limits")."""

import functools
import time

import pytest
import webtest

import flashsale
from conftest import auth
from conftest import call
from conftest import free_port
from conftest import run_together
from conftest import serve_env
from conftest import start_serve
from conftest import wait_for
from resources.ratelimit import SharedBuckets

# A client address that is not loopback, named by X-Forwarded-For from a
# trusted proxy at 127.0.0.1 (waitress believes it from there only).
CLIENT = '198.51.100.23'
LOGIN = {'email': 'nobody@example.com', 'password': 'password123'}


def login(base_url, address=CLIENT):
    """(status, Retry-After or None) of one login from `address`, on a new connection."""
    status, headers, _ = call(base_url, 'POST', '/api/auth/login', LOGIN, headers={'X-Forwarded-For': address})
    retry_after = headers.get('Retry-After')
    return status, None if retry_after is None else int(retry_after)


def burst_of_logins(base_urls, count=60):
    """`count` logins from CLIENT at once, spread over base_urls in turn, each
    on its own connection: (their answers, seconds from release to the last
    answer)."""
    answers = []
    started = []

    def one(base_url):
        if not started:
            started.append(time.monotonic())
        answers.append(login(base_url))

    targets = [functools.partial(one, base_urls[i % len(base_urls)]) for i in range(count)]
    run_together(targets, timeout=120, released_together=True)
    return answers, time.monotonic() - started[0]


def assert_the_burst_is_the_services(answers, elapsed, per_minute):
    """At most the burst (a minute's worth), and what was earned while the
    logins ran, got through; the rest were told to wait."""
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {401, 429}, statuses
    let_through = statuses.count(401)
    allowed = per_minute + elapsed * per_minute / 60
    assert per_minute <= let_through <= allowed, (let_through, allowed, elapsed)
    # Never more than one token's time: 60 / per_minute seconds, rounded up.
    assert all(1 <= wait <= -(-60 // per_minute) for status, wait in answers if status == 429), answers


def assert_retry_after_is_honest(refused_at, let_in_at):
    """A login refused by `refused_at` says how long to wait; after that
    wait, a login (at `let_in_at`, maybe another process) gets in."""
    answers = []

    def refused():
        answers.append(login(refused_at))
        return answers[-1][0] == 429

    wait_for(refused, timeout=30, message='a login to be refused')
    wait = answers[-1][1]
    time.sleep(wait)  # what a client told to wait does: the behaviour under test
    assert login(let_in_at) == (401, None)


@pytest.fixture
def serve(database_url, tmp_path, each_server):
    """serve(**env) -> base URL of a `flashsale serve` behind a trusted proxy
    at 127.0.0.1, with no address exempt, under each server; stopped at the
    end of the test."""
    procs = []

    def start(**extra):
        port = free_port()
        env = serve_env(database_url, PORT=str(port), TRUSTED_PROXY='127.0.0.1', RATE_LIMIT_EXEMPT='',
                        SERVER=each_server, **extra)
        procs.append(start_serve(env, tmp_path / f'serve-{port}.log'))
        return f'http://127.0.0.1:{port}'

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def test_logins_are_limited_for_the_service_across_workers(serve):
    per_minute = flashsale.Settings().auth_rate_per_minute
    base_url = serve(WORKERS='2')
    # Each on a new connection: the kernel hands each to either worker.
    answers, elapsed = burst_of_logins([base_url])
    assert_the_burst_is_the_services(answers, elapsed, per_minute)
    # Another client behind the same proxy has a bucket of its own.
    assert login(base_url, address='198.51.100.99') == (401, None)
    assert_retry_after_is_honest(base_url, base_url)


def test_logins_are_limited_for_the_service_across_servers_sharing_a_database(serve):
    per_minute = flashsale.Settings().auth_rate_per_minute
    first, second = serve(), serve()
    answers, elapsed = burst_of_logins([first, second])
    assert_the_burst_is_the_services(answers, elapsed, per_minute)
    # Refused by one, let in by the other after the wait the first gave.
    assert_retry_after_is_honest(first, second)


def limited_client(app, address=CLIENT):
    return webtest.TestApp(app.wsgi, extra_environ={'REMOTE_ADDR': address})


def test_register_and_login_share_one_bucket_across_apps(make_app, db):
    """Two apps on one database are two processes: one bucket between them."""
    first = limited_client(make_app(auth_rate_per_minute=2))
    second = limited_client(make_app(auth_rate_per_minute=2))
    first.post_json('/api/auth/register', {'email': 'shared@example.com', 'password': 'password123'}, status=201)
    second.post_json('/api/auth/login', {'email': 'shared@example.com', 'password': 'password123'}, status=200)
    resp = first.post_json('/api/auth/login', LOGIN, status=429)
    assert 29 <= int(resp.headers['Retry-After']) <= 30  # two a minute: one every 30 s
    second.post_json('/api/auth/register', {'email': 'other@example.com', 'password': 'password123'}, status=429)
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 1
    # Another address has a bucket of its own.
    limited_client(make_app(auth_rate_per_minute=2), '198.51.100.24').post_json('/api/auth/login', LOGIN, status=401)


def test_shared_buckets_refill_at_the_rate(pool):
    first, second = SharedBuckets(pool, rate=20, burst=2), SharedBuckets(pool, rate=20, burst=2)
    assert [bucket.take('k') == 0 for bucket in (first, second, first)] == [True, True, False]
    wait = second.take('k')
    assert 0 < wait <= 1 / 20  # one token every 50 ms
    time.sleep(wait)
    assert first.take('k') == 0


def test_refused_takes_spend_no_tokens(pool):
    buckets = SharedBuckets(pool, rate=1 / 60, burst=1)
    assert buckets.take('k') == 0
    waits = [buckets.take('k') for _ in range(5)]
    # Each says the same minute, less the time gone by: nothing was spent.
    assert all(59 < wait <= 60 for wait in waits), waits
    assert waits == sorted(waits, reverse=True)


def test_full_buckets_are_pruned_as_others_are_taken(pool, db):
    """A row that has refilled is the same as none: each take deletes up to
    two of other addresses, so they never pile up."""
    db.execute("INSERT INTO auth_rate_buckets (address, tokens, counted_at) "
               "SELECT 'old-' || n, 0, now() - interval '61 seconds' FROM generate_series(1, 9) AS n")
    db.execute("INSERT INTO auth_rate_buckets (address, tokens, counted_at) VALUES ('recent', 0, now())")
    buckets = SharedBuckets(pool, rate=1, burst=60)  # full after 60 s
    for _ in range(4):
        buckets.take('taker')
    left = {row['address'] for row in db.execute('SELECT address FROM auth_rate_buckets')}
    assert left == {'old-9', 'recent', 'taker'}, left
    buckets.take('taker')
    left = {row['address'] for row in db.execute('SELECT address FROM auth_rate_buckets')}
    assert left == {'recent', 'taker'}, left


def test_the_purchase_limit_is_per_process(make_app, make_user, make_sale):
    """Chosen so that a purchase costs no statement more: each process keeps
    its own buckets, and a user gets the limit from each (README.md, "Rate
    limits"). One order per user per sale holds whatever the limit."""
    first = limited_client(make_app(purchase_rate_per_second=1))  # two at once, then one a second
    second = limited_client(make_app(purchase_rate_per_second=1))
    _, token = make_user()
    buy = f'/api/flash-sales/{make_sale()}/purchase'
    assert [first.post(buy, headers=auth(token), status='*').status_int for _ in range(3)] == [201, 409, 429]
    # The other process has a bucket of its own for the same user.
    assert [second.post(buy, headers=auth(token), status='*').status_int for _ in range(2)] == [409, 409]
