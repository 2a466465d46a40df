"""Request limits and rate limits: what a hostile or broken client gets."""

import json
import subprocess
import sys
import time

import pytest
import webtest

import flashsale
from conftest import auth
from conftest import raw_http
from conftest import raw_post
from conftest import serve_env
from resources import parsing
from resources.ratelimit import TokenBuckets


# --- request limits ------------------------------------------------------------


@pytest.mark.parametrize(
    ('name', 'request_bytes', 'status', 'code'),
    [
        ('content-length over the limit',
         raw_post('/api/auth/login', b'x' * 2000, b'Content-Length: 2000\r\n'), 413, 'payload_too_large'),
        # No Content-Length to refuse up front: waitress counts as it reads.
        ('chunked body over the limit',
         raw_post('/api/auth/login', b'400\r\n' + b'x' * 1024 + b'\r\n400\r\n' + b'x' * 1024 + b'\r\n0\r\n\r\n',
              b'Transfer-Encoding: chunked\r\n'), 413, 'payload_too_large'),
        ('not HTTP at all', b'GARBAGE\r\n\r\n', 400, 'bad_request'),
        ('header line without a colon', b'GET /health HTTP/1.1\r\nHost: test\r\nNoColon\r\n\r\n', 400, 'bad_request'),
        ('content-length not a number', raw_post('/api/auth/login', b'', b'Content-Length: ten\r\n'),
         400, 'bad_request'),
        ('headers too large', b'GET /health HTTP/1.1\r\nHost: test\r\nX-Big: ' + b'a' * 300_000 + b'\r\n\r\n',
         431, 'headers_too_large'),
        ('unsupported transfer encoding', raw_post('/api/auth/login', b'', b'Transfer-Encoding: gzip\r\n'),
         501, 'not_implemented'),
    ],
)
def test_what_waitress_refuses_itself_is_json_too(make_app, serve_in_thread, name, request_bytes, status, code):
    got, headers, body = raw_http(serve_in_thread(make_app(max_body_bytes=1024)), request_bytes)
    assert got == status, (name, body)
    assert headers['Content-Type'] == 'application/json'
    assert json.loads(body)['code'] == code
    # The same security headers as every answer of the app.
    assert headers['Content-Security-Policy'] == "default-src 'none'; frame-ancestors 'none'"
    assert (headers['X-Frame-Options'], headers['Referrer-Policy'], headers['X-Content-Type-Options']) == (
        'DENY', 'no-referrer', 'nosniff')


def test_a_chunked_body_within_the_limit_is_read(make_app, serve_in_thread, db):
    base_url = serve_in_thread(make_app(max_body_bytes=1024))
    body = b'{"email": "chunks@example.com", "password": "password123"}'
    status, _, answer = raw_http(base_url, raw_post(
        '/api/auth/register', b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body),
        b'Transfer-Encoding: chunked\r\nConnection: close\r\n'))
    assert status == 201, answer
    assert db.execute("SELECT count(*) AS n FROM users WHERE email = 'chunks@example.com'").fetchone()['n'] == 1


def nested(depth, leaf='"x"'):
    return '[' * depth + leaf + ']' * depth


def test_json_nested_deeper_than_the_limit_is_400_before_parsing(client, db):
    body = '{"email": %s, "password": "password123"}' % nested(parsing.MAX_JSON_DEPTH)
    resp = client.post('/api/auth/register', body, content_type='application/json', status=400)
    assert resp.json['code'] == 'invalid_json'
    assert str(parsing.MAX_JSON_DEPTH) in resp.json['message']
    # Within the limit it parses, and is simply the wrong type.
    body = '{"email": %s, "password": "password123"}' % nested(parsing.MAX_JSON_DEPTH - 1)
    resp = client.post('/api/auth/register', body, content_type='application/json', status=400)
    assert (resp.json['code'], resp.json['field']) == ('invalid_field', 'email')
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 0


def test_brackets_inside_strings_are_not_nesting(client):
    password = '[{' * 20 + '"\\"]'
    client.post_json('/api/auth/register', {'email': 'brackets@example.com', 'password': password[:72]},
                     status=201)


@pytest.mark.parametrize('path', ['/api/auth/register', '/api/auth/login', '/api/flash-sales'])
@pytest.mark.parametrize('content_type', ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data',
                                          'application/jsonx', ''])
def test_anything_but_json_is_415(client, make_user, path, content_type):
    _, token = make_user(admin=True)
    resp = client.post(path, b'{"email": "a@b.co", "password": "password123"}', headers=auth(token),
                       content_type=content_type, status=415)
    assert resp.json['code'] == 'unsupported_media_type'


@pytest.mark.parametrize('path', ['/nothing', '/api', '/api/flash-sales/current/extra', '/static/no-such-file.js',
                                  '/static/../flashsale.py', '/api/me/orders/x/y'])
def test_unknown_routes_are_404_json(client, path):
    resp = client.get(path, status=404)
    assert resp.content_type == 'application/json'
    assert resp.json['code'] == 'not_found'


@pytest.mark.parametrize(
    ('method', 'path', 'allowed'),
    [
        ('DELETE', '/api/flash-sales', 'GET, HEAD, POST'),
        ('PUT', '/api/me', 'GET, HEAD'),
        ('GET', '/api/auth/login', 'POST'),
        ('PATCH', '/api/flash-sales/00000000-0000-0000-0000-000000000000', 'GET, HEAD'),
        ('GET', '/api/flash-sales/00000000-0000-0000-0000-000000000000/purchase', 'POST'),
        ('POST', '/health', 'GET, HEAD'),
        ('POST', '/', 'GET, HEAD'),
        # Falcon's static route would serve the file to any method.
        ('POST', '/static/index.html', 'GET, HEAD'),
        ('DELETE', '/static/index.html', 'GET, HEAD'),
    ],
)
def test_wrong_method_is_405_json_with_allow(client, method, path, allowed):
    resp = client.request(path, method=method, status=405)
    assert resp.content_type == 'application/json'
    assert resp.json['code'] == 'method_not_allowed'
    # (Falcon answers OPTIONS itself on every route, and lists it.)
    assert set(resp.headers['Allow'].replace(' ', '').split(',')) - {'OPTIONS'} == set(allowed.split(', '))


# --- rate limits ---------------------------------------------------------------


def limited_client(make_app, address='203.0.113.7', **limits):
    """A WebTest client of an app with these limits, calling from `address`
    (not loopback, which the tests' settings exempt)."""
    return webtest.TestApp(make_app(**limits).wsgi, extra_environ={'REMOTE_ADDR': address})


def test_register_and_login_share_a_per_address_limit(make_app, db):
    client = limited_client(make_app, auth_rate_per_minute=3)
    credentials = {'email': 'limited@example.com', 'password': 'password123'}
    client.post_json('/api/auth/register', credentials, status=201)
    client.post_json('/api/auth/login', credentials, status=200)
    client.post_json('/api/auth/login', {**credentials, 'password': 'wrong-password'}, status=401)
    resp = client.post_json('/api/auth/login', credentials, status=429)
    assert resp.json['code'] == 'rate_limited'
    # Three a minute: the next token comes in 20 seconds.
    assert 19 <= int(resp.headers['Retry-After']) <= 20
    client.post_json('/api/auth/register', {**credentials, 'email': 'other@example.com'}, status=429)
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 1
    # Another address has its own bucket; the rest of the API is not limited.
    other = webtest.TestApp(client.app, extra_environ={'REMOTE_ADDR': '203.0.113.8'})
    other.post_json('/api/auth/login', credentials, status=200)
    client.get('/api/flash-sales', status=200)


def test_no_address_is_exempt_by_default(make_app):
    """Behind a proxy on the same host every client is loopback: a loopback
    exemption by default would turn every limit off there."""
    assert flashsale.Settings().rate_limit_exempt == flashsale.Settings.from_env({}).rate_limit_exempt == ()
    client = limited_client(make_app, address='127.0.0.1', rate_limit_exempt=(), auth_rate_per_minute=2)
    login = {'email': 'nobody@example.com', 'password': 'password123'}
    client.post_json('/api/auth/login', login, status=401)
    client.post_json('/api/auth/login', login, status=401)
    assert client.post_json('/api/auth/login', login, status=429).json['code'] == 'rate_limited'


def test_an_exempt_address_is_not_limited(make_app):
    """How the tests and the load tests call from loopback (README: Rate limits)."""
    client = limited_client(make_app, address='127.0.0.1', rate_limit_exempt=('127.0.0.1',), auth_rate_per_minute=2)
    for _ in range(5):
        client.post_json('/api/auth/login', {'email': 'nobody@example.com', 'password': 'password123'}, status=401)


@pytest.mark.parametrize(('proxy', 'exempt'), [('127.0.0.1', '127.0.0.1,::1'), ('*', '10.0.0.5')])
def test_an_exemption_covering_the_trusted_proxy_is_refused(proxy, exempt):
    """Every client the proxy forwards without X-Forwarded-For would be
    exempt; with every proxy trusted, any client could claim an exempt address."""
    with pytest.raises(flashsale.ConfigError, match='RATE_LIMIT_EXEMPT must not cover TRUSTED_PROXY'):
        flashsale.Settings.from_env({'TRUSTED_PROXY': proxy, 'RATE_LIMIT_EXEMPT': exempt})
    # Another address, or none, is fine.
    flashsale.Settings.from_env({'TRUSTED_PROXY': '127.0.0.1', 'RATE_LIMIT_EXEMPT': '127.0.0.2'})
    flashsale.Settings.from_env({'TRUSTED_PROXY': proxy, 'RATE_LIMIT_EXEMPT': ''})


def test_serve_refuses_an_exemption_covering_the_proxy_in_one_line(database_url):
    result = subprocess.run([sys.executable, '-m', 'flashsale', 'serve'], capture_output=True, text=True, timeout=60,
                            env=serve_env(database_url, TRUSTED_PROXY='127.0.0.1', RATE_LIMIT_EXEMPT='127.0.0.1'))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count('\n') == 1 and result.stderr.startswith('flashsale: RATE_LIMIT_EXEMPT must not cover')


def test_purchases_are_limited_per_user_not_per_address(make_app, make_user, make_sale):
    client = limited_client(make_app, purchase_rate_per_second=1)  # two at once, then one a second
    _, alice = make_user()
    _, bob = make_user()
    sale_id = make_sale()
    buy = f'/api/flash-sales/{sale_id}/purchase'
    client.post(buy, headers=auth(alice), status=201)
    client.post(buy, headers=auth(alice), status=409)
    resp = client.post(buy, headers=auth(alice), status=429)
    assert (resp.json['code'], resp.headers['Retry-After']) == ('rate_limited', '1')
    # Bob, from the same address, is not slowed down by Alice.
    client.post(buy, headers=auth(bob), status=201)
    # A bad token is refused as such, and spends nobody's tokens.
    assert client.post(buy, headers=auth('garbage'), status=401).json['code'] == 'invalid_token'
    time.sleep(1.05)
    client.post(buy, headers=auth(alice), status=409)


def test_limits_behind_a_proxy_key_on_the_client_the_proxy_names(make_app, serve_in_thread):
    """With TRUSTED_PROXY, the address limited is the one the proxy appends to
    X-Forwarded-For; whatever a client writes there itself does not help."""
    base_url = serve_in_thread(make_app(trusted_proxy='127.0.0.1', rate_limit_exempt=(), auth_rate_per_minute=2))
    body = b'{"email": "nobody@example.com", "password": "password123"}'

    def login(forwarded_for):
        return raw_http(base_url, raw_post('/api/auth/login', body, b'Content-Length: %d\r\nConnection: close\r\n'
                                   b'X-Forwarded-For: %s\r\n' % (len(body), forwarded_for)))[0]

    assert [login(b'198.51.100.1') for _ in range(2)] == [401, 401]
    assert login(b'198.51.100.1') == 429
    # A client adding a made-up address in front is still itself (nginx appends the real one).
    assert login(b'192.0.2.99, 198.51.100.1') == 429
    assert login(b'198.51.100.2') == 401


def test_token_buckets_keep_bounded_memory():
    buckets = TokenBuckets(rate=1, burst=2, max_keys=100)
    for key in range(10_000):
        assert buckets.take(key) == 0
    assert len(buckets) == 100
    # The most recent keys are the ones kept.
    assert buckets.take(9_999) == 0
    assert buckets.take(9_999) > 0


def test_token_buckets_refill_at_the_rate():
    buckets = TokenBuckets(rate=20, burst=2)
    assert [buckets.take('k') == 0 for _ in range(3)] == [True, True, False]
    wait = buckets.take('k')
    assert 0 < wait <= 1 / 20  # one token every 50 ms
    time.sleep(wait + 0.01)
    assert buckets.take('k') == 0


def test_rate_limit_settings_from_the_environment():
    settings = flashsale.Settings.from_env({
        'AUTH_RATE_PER_MINUTE': '0', 'PURCHASE_RATE_PER_SECOND': '3', 'RATE_LIMIT_EXEMPT': ' 10.0.0.5 ,, ::1 ',
    })
    assert (settings.auth_rate_per_minute, settings.purchase_rate_per_second) == (0, 3)
    assert settings.rate_limit_exempt == ('10.0.0.5', '::1')
    assert flashsale.Settings.from_env({'RATE_LIMIT_EXEMPT': ''}).rate_limit_exempt == ()
    with pytest.raises(flashsale.ConfigError):
        flashsale.Settings.from_env({'PURCHASE_RATE_PER_SECOND': '-1'})


@pytest.mark.parametrize('start', ['0001-01-01T00:00:00+00:01', '1999-12-31T23:59:59Z', '9999-12-31T23:00:00-05:00'])
def test_sale_dates_outside_the_years_2000_to_9998_are_400_and_the_list_still_reads(client, make_user, db, start):
    """Year 1 at +00:01 is 1 BC in UTC: PostgreSQL would store it and Python
    could not read it back, so every GET /api/flash-sales after it would be a
    500."""
    _, token = make_user(admin=True)
    resp = client.post_json('/api/flash-sales', {'startDate': start, 'endDate': '9999-12-31T23:30:00-05:00',
                                                 'totalStock': 1}, headers=auth(token), status=400)
    assert resp.json['field'] == 'startDate'
    assert db.execute('SELECT count(*) AS n FROM flash_sales').fetchone()['n'] == 0
    client.get('/api/flash-sales', status=200)
