"""Hostile tokens on every route that takes one; what the logs hold and what
they must never hold; what errors reveal."""

import logging
import re
import time
import uuid

import jwt
import pytest

import flashsale
from conftest import TEST_SECRET
from conftest import auth


def claims(user_id, **changes):
    now = int(time.time())
    return {'sub': str(user_id), 'iat': now, 'exp': now + 600, **changes}


TOKENS = {
    'alg-none': lambda uid: jwt.encode(claims(uid), None, algorithm='none'),
    # The right secret with another HMAC than the service's HS256: accepting
    # these would mean the header chooses the algorithm.
    'hs384': lambda uid: jwt.encode(claims(uid), TEST_SECRET, algorithm='HS384'),
    'hs512': lambda uid: jwt.encode(claims(uid), TEST_SECRET, algorithm='HS512'),
    'other-secret': lambda uid: jwt.encode(claims(uid), 'another-secret-' + 'y' * 40, algorithm='HS256'),
    'expired': lambda uid: jwt.encode(claims(uid, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
                                      TEST_SECRET, algorithm='HS256'),
    # A valid token's payload swapped for one naming another user.
    'tampered': lambda uid: '.'.join(
        part if i != 1 else jwt.encode(claims(uuid.uuid4()), 'x' * 40, algorithm='HS256').split('.')[1]
        for i, part in enumerate(jwt.encode(claims(uid), TEST_SECRET, algorithm='HS256').split('.'))),
    'no-signature': lambda uid: jwt.encode(claims(uid), TEST_SECRET, algorithm='HS256').rsplit('.', 1)[0] + '.',
    'garbage': lambda uid: 'not.a.token',
    'not-bearer': lambda uid: None,
}
EXPECTED_CODE = {'expired': 'token_expired'}


def routes(sale_id):
    return [
        ('GET', '/api/me'),
        ('GET', '/api/me/orders'),
        ('GET', f'/api/me/orders/{sale_id}'),
        ('POST', f'/api/flash-sales/{sale_id}/purchase'),
        ('POST', '/api/flash-sales'),
    ]


def call(client, method, path, headers, status):
    if method == 'GET':
        return client.get(path, headers=headers, status=status)
    return client.post_json(path, {'startDate': '2030-01-01T10:00:00Z', 'endDate': '2030-01-01T12:00:00Z',
                                   'totalStock': 5}, headers=headers, status=status)


@pytest.mark.parametrize('kind', TOKENS)
def test_hostile_tokens_are_401_on_every_route_that_takes_a_token(client, make_user, make_sale, db, kind):
    admin_id, _ = make_user(admin=True)
    sale_id = make_sale(stock=5)
    token = TOKENS[kind](admin_id)
    headers = {'Authorization': f'Basic {admin_id}'} if token is None else auth(token)
    for method, path in routes(sale_id):
        resp = call(client, method, path, headers, 401)
        assert resp.json['code'] == EXPECTED_CODE.get(kind, 'invalid_token'), (method, path)
        assert resp.headers['WWW-Authenticate'] == 'Bearer'
    assert db.execute('SELECT count(*) AS n FROM orders').fetchone()['n'] == 0
    assert db.execute('SELECT count(*) AS n FROM flash_sales').fetchone()['n'] == 1


def test_a_deleted_users_token_is_401_on_every_route_that_takes_a_token(client, make_user, make_sale, db):
    """Not an empty list of orders, not a 404: the account is gone."""
    user_id, token = make_user(admin=True)
    sale_id = make_sale(stock=5)
    db.execute('DELETE FROM users WHERE id = %s', (user_id,))
    for method, path in routes(sale_id):
        resp = call(client, method, path, auth(token), 401)
        assert resp.json['code'] == 'invalid_token', (method, path)
    assert db.execute('SELECT remaining_stock FROM flash_sales').fetchone()['remaining_stock'] == 5


def test_a_non_admin_gets_403_on_the_admin_route_and_nothing_is_created(client, make_user, db):
    _, token = make_user(admin=False)
    resp = call(client, 'POST', '/api/flash-sales', auth(token), 403)
    assert resp.json['code'] == 'forbidden'
    assert db.execute('SELECT count(*) AS n FROM flash_sales').fetchone()['n'] == 0


def test_is_admin_is_read_from_the_database_not_the_token(client, make_user, db):
    user_id, _ = make_user(admin=False)
    forged = jwt.encode(claims(user_id, isAdmin=True, admin=True, role='admin'), TEST_SECRET, algorithm='HS256')
    call(client, 'POST', '/api/flash-sales', auth(forged), 403)


def test_a_short_jwt_secret_is_refused():
    """(A missing one is refused by `flashsale serve` whenever DATABASE_URL is
    set: tests/test_server.py.)"""
    with pytest.raises(flashsale.ConfigError, match='JWT_SECRET'):
        flashsale.Settings.from_env({'DATABASE_URL': 'postgresql://db/flashsale', 'JWT_SECRET': 'x' * 31})
    assert flashsale.Settings.from_env(
        {'DATABASE_URL': 'postgresql://db/flashsale', 'JWT_SECRET': 'x' * 32}).jwt_secret == 'x' * 32


# --- logs ------------------------------------------------------------------------

ACCESS_LINE = re.compile(r'^(GET|POST|DELETE) (\S+) (\d{3}) \d+\.\dms id=([A-Za-z0-9._-]+)$')


def access_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == 'flashsale.access']


def test_one_log_line_per_request_with_method_path_status_duration_and_id(client, caplog, make_sale):
    caplog.set_level(logging.INFO)
    sale_id = make_sale()
    client.get('/health', status=200)
    client.get(f'/api/flash-sales/{sale_id}', headers={'X-Request-ID': 'abc-123'}, status=200)
    client.post_json('/api/auth/login', {'email': 'nobody@example.com', 'password': 'password123'}, status=401)
    client.delete('/api/flash-sales', status=405)
    client.get('/nowhere', headers={'X-Request-ID': 'no spaces allowed'}, status=404)
    lines = access_lines(caplog)
    assert len(lines) == 5, lines
    parsed = [ACCESS_LINE.match(line).groups() for line in lines]
    assert [(m, p, s) for m, p, s, _ in parsed] == [
        ('GET', '/health', '200'), ('GET', f'/api/flash-sales/{sale_id}', '200'),
        ('POST', '/api/auth/login', '401'), ('DELETE', '/api/flash-sales', '405'), ('GET', '/nowhere', '404'),
    ]
    assert parsed[1][3] == 'abc-123'  # the client's id, echoed
    assert parsed[4][3] != 'no spaces allowed'  # one of the server's own otherwise


PASSWORD = 'Sw0rdfish-unique-7d1e'


def test_passwords_are_never_logged(client, caplog, make_user, db):
    """Register, log in right and wrong, send a malformed body, and break a
    login with a 500: the password appears in no log record, traceback
    included, at any level."""
    caplog.set_level(logging.DEBUG)
    client.post_json('/api/auth/register', {'email': 'pw@example.com', 'password': PASSWORD}, status=201)
    client.post_json('/api/auth/login', {'email': 'pw@example.com', 'password': PASSWORD}, status=200)
    client.post_json('/api/auth/login', {'email': 'pw@example.com', 'password': PASSWORD + 'x'}, status=401)
    client.post_json('/api/auth/register', {'email': 'pw@example.com', 'password': PASSWORD}, status=409)
    client.post('/api/auth/login', '{"email": "pw@example.com", "password": "%s"' % PASSWORD,
                content_type='application/json', status=400)
    client.post_json('/api/auth/login', {'email': 'pw@example.com', 'password': PASSWORD, 'extra': PASSWORD},
                     status=400)
    make_user(email='broken@example.com')  # its stored hash is not a bcrypt hash: login fails with a 500
    client.post_json('/api/auth/login', {'email': 'broken@example.com', 'password': PASSWORD}, status=500)
    assert any(r.exc_info for r in caplog.records)  # the 500 was logged, traceback and all
    assert PASSWORD not in caplog.text
    for record in caplog.records:
        assert PASSWORD not in record.getMessage(), record.name


def test_a_real_5xx_is_logged_with_its_traceback_and_answered_without_one(client, caplog, make_user):
    caplog.set_level(logging.INFO)
    make_user(email='broken@example.com')
    resp = client.post_json('/api/auth/login', {'email': 'broken@example.com', 'password': 'password123'},
                            status=500)
    assert resp.json == {'code': 'internal_error', 'message': 'Something went wrong on our side.'}
    for leak in ('Traceback', 'File "', 'bcrypt', 'psycopg', 'SELECT', 'ValueError', 'password_hash'):
        assert leak not in resp.text
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.name == 'flashsale'
    assert 'POST /api/auth/login' in error.getMessage()
    assert error.exc_info is not None
    assert 'Traceback' in caplog.text
    assert access_lines(caplog) == [ACCESS_LINE.match(access_lines(caplog)[0]).group(0)]
    assert ' 500 ' in access_lines(caplog)[0]


def test_database_errors_reach_no_response(client, make_app, db):
    """Statements that fail in the database answer with our code and message
    only: no SQL, no driver message, no constraint name."""
    client.post_json('/api/auth/register', {'email': 'dup@example.com', 'password': 'password123'}, status=201)
    taken = client.post_json('/api/auth/register', {'email': 'DUP@example.com', 'password': 'password123'},
                             status=409)
    assert taken.json == {'code': 'email_taken', 'message': 'An account with this email already exists.'}
    # A statement cut off by statement_timeout (this test holds the table's lock).
    impatient = make_app(statement_timeout_ms=200, pool_size=1).client
    with db.transaction():
        db.execute('LOCK TABLE flash_sales IN ACCESS EXCLUSIVE MODE')
        timeout = impatient.get('/api/flash-sales', status=503)
    assert timeout.json['code'] == 'overloaded'
    for resp in (taken, timeout):
        for leak in ('users_email_key', 'duplicate key', 'INSERT', 'SELECT', 'DETAIL', 'canceling statement',
                     'psycopg'):
            assert leak not in resp.text


# --- account enumeration -----------------------------------------------------------


def test_login_answers_the_same_for_an_unknown_email_and_a_wrong_password(client):
    client.post_json('/api/auth/register', {'email': 'known@example.com', 'password': 'password123'}, status=201)
    answers = [
        client.post_json('/api/auth/login', {'email': email, 'password': 'wrong-password'}, status=401)
        for email in ('known@example.com', 'unknown@example.com')
    ]
    assert answers[0].json == answers[1].json
    def headers(resp):
        return {k.lower(): v for k, v in resp.headers.items() if k.lower() not in ('x-request-id', 'date')}

    assert headers(answers[0]) == headers(answers[1])


def test_a_login_with_a_password_over_72_bytes_is_a_wrong_password_not_a_500(client):
    """bcrypt 5 raises on such a password; registration refuses them, so it
    can match no account: it gets the answer of any wrong password."""
    client.post_json('/api/auth/register', {'email': 'long@example.com', 'password': 'x' * 72}, status=201)
    for password in ('x' * 73, 'x' * 72 + 'y', 'é' * 37, 'x' * 1024):
        resp = client.post_json('/api/auth/login', {'email': 'long@example.com', 'password': password}, status=401)
        assert resp.json['code'] == 'invalid_credentials'
