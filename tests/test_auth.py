import time
import uuid

import bcrypt
import falcon.testing
import jwt
import pytest
import webtest

from conftest import TEST_SECRET
from conftest import auth
from conftest import run_together
from conftest import wait_for
from resources.credentials import Credentials


def register(client, email='shopper@example.com', password='password123', status=201):
    return client.post_json('/api/auth/register', {'email': email, 'password': password}, status=status)


def test_register_creates_user_with_bcrypt_hash_and_returns_token(client, db):
    resp = register(client, email='  Shopper@Example.COM ')
    user = resp.json['user']
    assert user['email'] == 'shopper@example.com'
    assert user['isAdmin'] is False
    row = db.execute('SELECT email, password_hash FROM users WHERE id = %s', (user['id'],)).fetchone()
    assert row['email'] == 'shopper@example.com'
    assert bcrypt.checkpw(b'password123', row['password_hash'].encode())
    me = client.get('/api/me', headers=auth(resp.json['token']), status=200)
    assert me.json['user']['id'] == user['id']


def test_register_duplicate_email_is_409_email_taken(client, db):
    register(client)
    resp = register(client, email='SHOPPER@example.com', status=409)
    assert resp.json['code'] == 'email_taken'
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 1


@pytest.mark.parametrize('invisible', ['\u200b', '\ufeff', '\u2060', '\u200d', '\u202e', '\u00ad'],
                         ids=['zero-width-space', 'bom', 'word-joiner', 'zero-width-joiner', 'bidi-override', 'soft-hyphen'])
def test_invisible_format_characters_make_no_second_account(client, db, invisible):
    """Unicode category Cf survives strip() and shows nothing: dropped from
    an email, wherever it is, so it names the account it looks like."""
    user_id = register(client).json['user']['id']
    for spelling in (f'shopper@example.com{invisible}', f'{invisible}shopper@example.com',
                     f'shop{invisible}per@example{invisible}.com'):
        resp = register(client, email=spelling, status=409)
        assert resp.json['code'] == 'email_taken'
        login = client.post_json('/api/auth/login', {'email': spelling, 'password': 'password123'}, status=200)
        assert login.json['user']['id'] == user_id
    assert db.execute('SELECT email FROM users').fetchall() == [{'email': 'shopper@example.com'}]


def test_racing_registrations_of_one_email_create_one_user(wsgi_app, db):
    results = []

    def attempt():
        resp = webtest.TestApp(wsgi_app).post_json(
            '/api/auth/register', {'email': 'race@example.com', 'password': 'password123'}, status=[201, 409])
        results.append((resp.status_int, resp.json.get('code')))

    run_together([attempt] * 10, released_together=True)
    assert sorted(results, key=str) == [(201, None)] + [(409, 'email_taken')] * 9
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 1


@pytest.mark.parametrize(
    ('body', 'code', 'field'),
    [
        ({'email': 'not-an-email', 'password': 'password123'}, 'invalid_email', 'email'),
        ({'email': 'a@b.co', 'password': 'short'}, 'invalid_password', 'password'),
        # 73 bytes: bcrypt would silently ignore the last one.
        ({'email': 'a@b.co', 'password': 'x' * 73}, 'invalid_password', 'password'),
        # 37 two-byte characters: 74 bytes, though only 37 characters.
        ({'email': 'a@b.co', 'password': 'é' * 37}, 'invalid_password', 'password'),
        ({'email': 'a@b.co'}, 'missing_field', 'password'),
        ({'email': 'a@b.co', 'password': 'password123', 'isAdmin': True}, 'unknown_field', 'isAdmin'),
        ({'email': 42, 'password': 'password123'}, 'invalid_field', 'email'),
        ({'email': 'a@b.co', 'password': None}, 'invalid_field', 'password'),
    ],
)
def test_register_refuses_bad_input(client, db, body, code, field):
    resp = client.post_json('/api/auth/register', body, status=400)
    assert resp.json['code'] == code
    assert resp.json['field'] == field
    assert resp.json['message']
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 0


def test_password_of_exactly_72_bytes_is_accepted(client):
    register(client, password='x' * 72)
    client.post_json('/api/auth/login', {'email': 'shopper@example.com', 'password': 'x' * 72}, status=200)


@pytest.mark.parametrize(
    ('body', 'content_type', 'status', 'code'),
    [
        (b'{"email": ', 'application/json', 400, 'invalid_json'),
        (b'[1, 2]', 'application/json', 400, 'invalid_body'),
        (b'', 'application/json', 400, 'invalid_json'),
        (b'[' * 5000 + b']' * 5000, 'application/json', 400, 'invalid_json'),
        (b'email=a@b.co&password=password123', 'application/x-www-form-urlencoded', 415, 'unsupported_media_type'),
        (b'{"email": "a@b.co", "password": "password123"}', 'text/plain', 415, 'unsupported_media_type'),
        (b'{"email": "' + b'a' * 20000 + b'@b.co", "password": "password123"}', 'application/json', 413, 'payload_too_large'),
    ],
)
def test_malformed_bodies_get_a_4xx_with_a_code(client, db, body, content_type, status, code):
    resp = client.post('/api/auth/register', body, content_type=content_type, status=status)
    assert resp.content_type == 'application/json'
    assert resp.json['code'] == code
    assert db.execute('SELECT count(*) AS n FROM users').fetchone()['n'] == 0


def test_login_returns_user_and_token(client):
    user_id = register(client).json['user']['id']
    resp = client.post_json('/api/auth/login', {'email': 'SHOPPER@example.com ', 'password': 'password123'}, status=200)
    assert resp.json['user']['id'] == user_id
    assert 'password_hash' not in resp.json['user']
    claims = jwt.decode(resp.json['token'], TEST_SECRET, algorithms=['HS256'])
    assert claims['sub'] == user_id
    assert claims['exp'] > claims['iat']


def test_wrong_password_and_unknown_email_get_the_same_answer(client):
    register(client)
    wrong = client.post_json('/api/auth/login', {'email': 'shopper@example.com', 'password': 'password124'}, status=401)
    unknown = client.post_json('/api/auth/login', {'email': 'nobody@example.com', 'password': 'password123'}, status=401)
    assert wrong.json == unknown.json == {'code': 'invalid_credentials', 'message': 'Wrong email or password.'}


def test_unknown_email_login_spends_bcrypt_time_too(make_app):
    """The login for an unknown email checks a decoy hash, so it costs about
    as much as a wrong password (at cost 10 bcrypt takes tens of ms, far
    above everything else in the request). The hashing processes at normal
    priority and the two kinds taken in turns: at nice 19 on a busy machine
    a hash takes whatever the other work leaves, which changes by the second."""
    slow = make_app(bcrypt_rounds=10, hash_nice=0).client
    slow.post_json('/api/auth/register', {'email': 'timing@example.com', 'password': 'password123'}, status=201)
    times = {'timing@example.com': [], 'nobody@example.com': []}
    for _ in range(3):
        for email, taken in times.items():
            started = time.perf_counter()
            slow.post_json('/api/auth/login', {'email': email, 'password': 'wrong-password'}, status=401)
            taken.append(time.perf_counter() - started)
    known, unknown = min(times['timing@example.com']), min(times['nobody@example.com'])
    assert 0.5 < unknown / known < 2.0, (
        f'a login with an unknown email took {unknown:.3f} s and one with a known email and a wrong password '
        f'{known:.3f} s (best of three each): ratio {unknown / known:.2f}, bound 0.5 to 2.0')


def test_me_without_token_is_401_unauthorized(client):
    resp = client.get('/api/me', status=401)
    assert resp.json['code'] == 'unauthorized'
    assert resp.headers['WWW-Authenticate'] == 'Bearer'


@pytest.mark.parametrize(
    'make_token',
    [
        pytest.param(lambda uid: 'garbage', id='garbage'),
        pytest.param(lambda uid: jwt.encode({'sub': uid, 'iat': int(time.time()), 'exp': int(time.time()) + 60}, 'another-secret-' + 'y' * 40, algorithm='HS256'), id='other-secret'),
        pytest.param(lambda uid: jwt.encode({'sub': uid, 'iat': int(time.time()), 'exp': int(time.time()) + 60}, None, algorithm='none'), id='alg-none'),
        pytest.param(lambda uid: jwt.encode({'sub': uid, 'iat': int(time.time())}, TEST_SECRET, algorithm='HS256'), id='no-exp'),
        pytest.param(lambda uid: jwt.encode({'sub': 'not-a-uuid', 'iat': int(time.time()), 'exp': int(time.time()) + 60}, TEST_SECRET, algorithm='HS256'), id='bad-sub'),
        pytest.param(lambda uid: jwt.encode({'sub': uid, 'iat': int(time.time()), 'exp': int(time.time()) + 60}, TEST_SECRET, algorithm='HS512'), id='hs512'),
    ],
)
def test_invalid_tokens_are_401_invalid_token(client, make_user, make_token):
    user_id, _ = make_user()
    resp = client.get('/api/me', headers=auth(make_token(str(user_id))), status=401)
    assert resp.json['code'] == 'invalid_token'


def test_tampered_payload_is_401(client, make_user):
    user_id, token = make_user()
    other_id, _ = make_user()
    header, payload, signature = token.split('.')
    forged = jwt.encode({'sub': str(other_id), 'iat': 1, 'exp': 2**40}, 'x' * 40, algorithm='HS256').split('.')[1]
    resp = client.get('/api/me', headers=auth(f'{header}.{forged}.{signature}'), status=401)
    assert resp.json['code'] == 'invalid_token'


def test_expired_token_is_401_token_expired(client, make_user):
    user_id, _ = make_user()
    old = int(time.time()) - 7200
    token = jwt.encode({'sub': str(user_id), 'iat': old, 'exp': old + 60}, TEST_SECRET, algorithm='HS256')
    resp = client.get('/api/me', headers=auth(token), status=401)
    assert resp.json['code'] == 'token_expired'


def test_token_of_deleted_user_is_401(client, make_user, db):
    user_id, token = make_user()
    db.execute('DELETE FROM users WHERE id = %s', (user_id,))
    resp = client.get('/api/me', headers=auth(token), status=401)
    assert resp.json['code'] == 'invalid_token'


def test_a_token_once_verified_still_expires_at_its_exp(client, make_user):
    """Verified tokens are remembered (resources/credentials.py); the
    remembered one is refused from its exp second on, as PyJWT refuses it."""
    user_id, _ = make_user()
    exp = int(time.time()) + 2
    token = jwt.encode({'sub': str(user_id), 'iat': int(time.time()), 'exp': exp}, TEST_SECRET, algorithm='HS256')
    assert client.get('/api/me', headers=auth(token)).json['user']['id'] == str(user_id)
    wait_for(lambda: time.time() >= exp, timeout=10, message='the token\'s exp second')
    resp = client.get('/api/me', headers=auth(token), status=401)
    assert resp.json['code'] == 'token_expired'


def test_a_remembered_token_matches_only_itself(client, make_user):
    user_id, token = make_user()
    assert client.get('/api/me', headers=auth(token)).status_code == 200
    header, payload, signature = token.split('.')
    # Another signature, the payload kept; and the same token with a
    # character appended: neither is the remembered token.
    other = jwt.encode(jwt.decode(token, options={'verify_signature': False}), 'z' * 48, algorithm='HS256')
    for forged in (f'{header}.{payload}.{other.split(".")[2]}', f'{token}x', f'{header}.{payload}.'):
        resp = client.get('/api/me', headers=auth(forged), status=401)
        assert resp.json['code'] == 'invalid_token', forged
    assert client.get('/api/me', headers=auth(f'  {token}  ')).status_code == 200


def test_the_remembered_tokens_are_bounded(monkeypatch, settings):
    from resources import credentials as module

    monkeypatch.setattr(module, 'MAX_VERIFIED_TOKENS', 3)
    creds = module.Credentials(settings.jwt_secret, settings.jwt_ttl_seconds, settings.bcrypt_rounds)
    tokens = [creds.issue(uuid.uuid4()) for _ in range(7)]
    sizes = []
    for token in tokens:
        session = creds.session(falcon.testing.create_req(headers={'Authorization': f'Bearer {token}'}))
        assert str(session.user_id) == jwt.decode(token, options={'verify_signature': False})['sub']
        sizes.append(creds.verified_tokens())
    # Full, the oldest goes, not all of them.
    assert sizes == [1, 2, 3, 3, 3, 3, 3], sizes
    assert list(creds._verified) == tokens[-3:]


def test_expired_tokens_leave_the_memory_first(settings):
    creds = Credentials(settings.jwt_secret, settings.jwt_ttl_seconds, settings.bcrypt_rounds)

    def verify(token):
        creds.session(falcon.testing.create_req(headers={'Authorization': f'Bearer {token}'}))

    exp = int(time.time()) + 1
    verify(jwt.encode({'sub': str(uuid.uuid4()), 'iat': exp - 1, 'exp': exp}, TEST_SECRET, algorithm='HS256'))
    assert creds.verified_tokens() == 1
    wait_for(lambda: time.time() >= exp, timeout=10, message="the token's exp second")
    later = creds.issue(uuid.uuid4())
    verify(later)
    assert list(creds._verified) == [later]
