"""Registering, logging in, and who am I."""

import re

import falcon

from resources import sql
from resources.credentials import MAX_PASSWORD_BYTES
from resources.credentials import MIN_PASSWORD_BYTES
from resources.credentials import current_user
from resources.errors import invalid
from resources.errors import refusal
from resources.parsing import read_object
from resources.parsing import string_field

# Deliberately loose: one @, something on each side, a dot in the domain. The
# only real check of an address is mail reaching it.
_EMAIL = re.compile(r'^[^@\s]+@[^@\s]+\.[^@\s]+$')


def _credentials_from(req, settings):
    body = read_object(req, settings.max_body_bytes, required=('email', 'password'))
    email = string_field(body, 'email', max_length=254).strip().lower()
    if not _EMAIL.match(email):
        raise invalid('email', 'That does not look like an email address.', 'invalid_email')
    password = string_field(body, 'password', max_length=1024)
    return email, password


class Register:
    def __init__(self, pool, credentials, settings):
        self._pool = pool
        self._credentials = credentials
        self._settings = settings

    def on_post(self, req, resp):
        email, password = _credentials_from(req, self._settings)
        size = len(password.encode())
        if not MIN_PASSWORD_BYTES <= size <= MAX_PASSWORD_BYTES:
            raise invalid(
                'password',
                f'The password must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes long.',
                'invalid_password',
            )
        password_hash = self._credentials.hash_password(password)
        with self._pool.connection() as conn:
            user = sql.one(conn, sql.CREATE_USER, {'email': email, 'password_hash': password_hash})
        resp.status = falcon.HTTP_201
        resp.media = {'user': user, 'token': self._credentials.issue(user['id'])}


class Login:
    def __init__(self, pool, credentials, settings):
        self._pool = pool
        self._credentials = credentials
        self._settings = settings

    def on_post(self, req, resp):
        email, password = _credentials_from(req, self._settings)
        with self._pool.connection() as conn:
            user = sql.one(conn, sql.FIND_USER_FOR_LOGIN, {'email': email})
        # Unknown email and wrong password: one answer, and the same bcrypt time.
        password_hash = None if user is None else user.pop('password_hash')
        if not self._credentials.check_password(password, password_hash):
            raise refusal('invalid_credentials')
        resp.media = {'user': user, 'token': self._credentials.issue(user['id'])}


class Me:
    login_required = frozenset({'GET'})

    def __init__(self, pool):
        self._pool = pool

    def on_get(self, req, resp):
        with self._pool.connection() as conn:
            resp.media = {'user': current_user(conn, req)}
