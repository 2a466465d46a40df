"""Sessions that outlast the wait: renewing a token without the password, and
ending sessions (a password change, `flashsale revoke-sessions`)."""

import logging
import subprocess
import sys
import time

import jwt

from conftest import TEST_SECRET
from conftest import auth
from conftest import sale_state
from conftest import serve_env

PASSWORD = 'password123'


def register(client, email='shopper@example.com'):
    return client.post_json('/api/auth/register', {'email': email, 'password': PASSWORD}, status=201).json


def test_refresh_gives_a_new_token_with_a_later_expiry(client):
    first = register(client)
    old_claims = jwt.decode(first['token'], TEST_SECRET, algorithms=['HS256'])
    # iat is in whole seconds: wait for the next one, so the expiry must move.
    while int(time.time()) == old_claims['iat']:
        time.sleep(0.05)
    resp = client.post('/api/auth/refresh', headers=auth(first['token']), status=200)
    claims = jwt.decode(resp.json['token'], TEST_SECRET, algorithms=['HS256'])
    assert resp.json['user'] == first['user']
    assert claims['sub'] == first['user']['id']
    assert claims['exp'] > old_claims['exp']
    client.get('/api/me', headers=auth(resp.json['token']), status=200)


def test_refresh_needs_a_token(client):
    assert client.post('/api/auth/refresh', status=401).json['code'] == 'unauthorized'


def test_an_expired_token_cannot_be_refreshed(client, make_user):
    user_id, _ = make_user()
    now = int(time.time())
    expired = jwt.encode({'sub': str(user_id), 'gen': 0, 'iat': now - 7200, 'exp': now - 3600}, TEST_SECRET,
                         algorithm='HS256')
    resp = client.post('/api/auth/refresh', headers=auth(expired), status=401)
    assert resp.json['code'] == 'token_expired'


def test_a_token_from_before_generations_still_works(client, make_user):
    """Tokens issued before this release carry no `gen`: generation 0."""
    user_id, _ = make_user()
    now = int(time.time())
    legacy = jwt.encode({'sub': str(user_id), 'iat': now, 'exp': now + 60}, TEST_SECRET, algorithm='HS256')
    client.get('/api/me', headers=auth(legacy), status=200)
    client.post('/api/auth/refresh', headers=auth(legacy), status=200)


def test_a_forged_generation_claim_is_refused(client, make_user):
    user_id, _ = make_user()
    now = int(time.time())
    for gen in ('1', 2**40, True, -1):
        token = jwt.encode({'sub': str(user_id), 'gen': gen, 'iat': now, 'exp': now + 60}, TEST_SECRET,
                           algorithm='HS256')
        assert client.get('/api/me', headers=auth(token), status=401).json['code'] == 'invalid_token'


def test_password_change_ends_every_older_session(client, make_sale, db):
    first = register(client)
    second = client.post_json('/api/auth/login', {'email': 'shopper@example.com', 'password': PASSWORD},
                              status=200).json['token']
    resp = client.post_json('/api/me/password', {'currentPassword': PASSWORD, 'newPassword': 'battery staple'},
                            headers=auth(second), status=200)
    new_token = resp.json['token']
    sale_id = make_sale(stock=5)
    for old in (first['token'], second):
        assert client.get('/api/me', headers=auth(old), status=401).json['code'] == 'session_revoked'
        assert client.post('/api/auth/refresh', headers=auth(old), status=401).json['code'] == 'session_revoked'
        assert client.get('/api/me/orders', headers=auth(old), status=401).json['code'] == 'session_revoked'
        bought = client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(old), status=401)
        assert bought.json['code'] == 'session_revoked'
    assert sale_state(db, sale_id) == (5, 5, 0)
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(new_token), status=201)
    client.post_json('/api/auth/login', {'email': 'shopper@example.com', 'password': PASSWORD}, status=401)
    client.post_json('/api/auth/login', {'email': 'shopper@example.com', 'password': 'battery staple'}, status=200)


def test_password_change_needs_the_current_password(client, db):
    token = register(client)['token']
    resp = client.post_json('/api/me/password', {'currentPassword': 'not-it-at-all', 'newPassword': 'battery staple'},
                            headers=auth(token), status=401)
    assert resp.json['code'] == 'invalid_credentials'
    client.get('/api/me', headers=auth(token), status=200)
    assert db.execute('SELECT token_generation FROM users').fetchone()['token_generation'] == 0


def test_password_change_checks_the_new_password(client):
    token = register(client)['token']
    resp = client.post_json('/api/me/password', {'currentPassword': PASSWORD, 'newPassword': 'short'},
                            headers=auth(token), status=400)
    assert (resp.json['code'], resp.json['field']) == ('invalid_password', 'newPassword')
    client.get('/api/me', headers=auth(token), status=200)


def test_revoke_sessions_command_ends_the_users_sessions(settings, client, make_sale, db, tmp_path):
    token = register(client)['token']
    other = register(client, 'bystander@example.com')['token']
    sale_id = make_sale(stock=5)
    env = serve_env(settings.database_url)
    done = subprocess.run([sys.executable, '-m', 'flashsale', 'revoke-sessions', 'Shopper@example.com'],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'shopper@example.com' in done.stdout
    assert client.get('/api/me', headers=auth(token), status=401).json['code'] == 'session_revoked'
    assert client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token), status=401).json['code'] \
        == 'session_revoked'
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(other), status=201)
    assert sale_state(db, sale_id) == (5, 4, 1)
    unknown = subprocess.run([sys.executable, '-m', 'flashsale', 'revoke-sessions', 'nobody@example.com'],
                             env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert unknown.returncode == 2 and 'no user' in unknown.stderr and 'Traceback' not in unknown.stderr


def test_no_password_or_token_in_any_log_record(make_app, caplog):
    """Register, log in, refresh, change the password, and be refused with an
    old token: neither password nor any token appears in a log record."""
    caplog.set_level(logging.DEBUG)
    client = make_app(hash_queue=2).client
    first = client.post_json('/api/auth/register', {'email': 'logs@example.com', 'password': 'secret-one-1'},
                             status=201).json['token']
    login = client.post_json('/api/auth/login', {'email': 'logs@example.com', 'password': 'secret-one-1'},
                             status=200).json['token']
    renewed = client.post('/api/auth/refresh', headers=auth(login), status=200).json['token']
    changed = client.post_json('/api/me/password', {'currentPassword': 'secret-one-1', 'newPassword': 'secret-two-2'},
                               headers=auth(renewed), status=200).json['token']
    client.get('/api/me', headers=auth(first), status=401)
    logged = '\n'.join(r.getMessage() + (r.exc_text or '') for r in caplog.records)
    assert 'POST /api/auth/refresh 200' in logged
    for secret in ('secret-one-1', 'secret-two-2', first, login, renewed, changed):
        assert secret not in logged
