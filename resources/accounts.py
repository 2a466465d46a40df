"""Registering, logging in, and who am I."""

import re
import unicodedata

import falcon

from resources import sql
from resources.credentials import MAX_PASSWORD_BYTES
from resources.credentials import MIN_PASSWORD_BYTES
from resources.credentials import UserReader
from resources.credentials import current_user
from resources.errors import ACCOUNT_GONE
from resources.errors import invalid
from resources.errors import refusal
from resources.parsing import read_object
from resources.parsing import string_field

# Deliberately loose: one @, something on each side, a dot in the domain. The
# only real check of an address is mail reaching it.
_EMAIL = re.compile(r'^[^@\s]+@[^@\s]+\.[^@\s]+$')


# The invisible format characters (Unicode category Cf) of the Basic
# Multilingual Plane: zero-width spaces and joiners, U+FEFF, U+2060,
# bidirectional controls, the soft hyphen. (Those beyond it, tag characters
# and the like, come with no pasted address, and the API document's
# patterns, JSON Schema's regexes, cannot name them: resources/openapi.py.)
INVISIBLE = ''.join(chr(code) for code in range(0x10000) if unicodedata.category(chr(code)) == 'Cf')
_INVISIBLE = re.compile('[' + re.escape(INVISIBLE) + ']')


def normalised_email(text):
    """An email as it is stored and looked up: without INVISIBLE characters,
    trimmed and in lower case. Dropped, not refused: they come with a pasted
    address, unseen, and strip() keeps them, so kept, `x@y.z` and `x@y.z` +
    U+200B would be two accounts that look like one."""
    if not text.isascii():
        text = _INVISIBLE.sub('', text)
    return text.strip().lower()


def _credentials_from(req, settings):
    body = read_object(req, settings.max_body_bytes, required=('email', 'password'))
    email = normalised_email(string_field(body, 'email', max_length=254))
    if not _EMAIL.match(email):
        raise invalid('email', 'That does not look like an email address.', 'invalid_email')
    password = string_field(body, 'password', max_length=1024)
    return email, password


def _new_password(password, field):
    size = len(password.encode())
    if not MIN_PASSWORD_BYTES <= size <= MAX_PASSWORD_BYTES:
        raise invalid(
            field,
            f'The password must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes long.',
            'invalid_password',
        )
    return password


class _WithCredentials:
    """A resource that hashes or checks passwords (Register, Login, Password)."""

    def __init__(self, pool, credentials, settings):
        self._pool = pool
        self._credentials = credentials
        self._settings = settings


class Register(_WithCredentials):
    def on_post(self, req, resp):
        email, password = _credentials_from(req, self._settings)
        password_hash = self._credentials.hash_password(_new_password(password, 'password'))
        with self._pool.connection() as conn:
            user = sql.one(conn, sql.CREATE_USER, {'email': email, 'password_hash': password_hash})
        resp.status = falcon.HTTP_201
        # A new user's tokens are of generation 0 (the column's default).
        resp.media = {'user': user, 'token': self._credentials.issue(user['id'])}


class Login(_WithCredentials):
    def on_post(self, req, resp):
        email, password = _credentials_from(req, self._settings)
        with self._pool.connection() as conn:
            user = sql.one(conn, sql.FIND_USER_FOR_LOGIN, {'email': email})
        # Unknown email and wrong password: one answer, and the same bcrypt time.
        password_hash = None if user is None else user.pop('password_hash')
        if not self._credentials.check_password(password, password_hash):
            raise refusal('invalid_credentials')
        generation = user.pop('token_generation')
        resp.media = {'user': user, 'token': self._credentials.issue(user['id'], generation)}


class Me(UserReader):
    def on_get(self, req, resp):
        with self._pool.connection() as conn:
            resp.media = {'user': current_user(conn, req)}


class Refresh:
    """POST /api/auth/refresh: a valid token buys a new one with a new expiry,
    without the password (no bcrypt: one indexed read). A page left open
    renews in the background and is still logged in when the sale opens. An
    expired or revoked token cannot be refreshed: it takes the password."""

    login_required = frozenset({'POST'})

    def __init__(self, pool, credentials):
        self._pool = pool
        self._credentials = credentials

    def on_post(self, req, resp):
        with self._pool.connection() as conn:
            user = current_user(conn, req)
        resp.media = {'user': user, 'token': self._credentials.issue(user['id'], req.context.token_generation)}


class Password(_WithCredentials):
    """POST /api/me/password {currentPassword, newPassword}: a new password,
    and the end of every other session: the user's token generation moves on,
    so every token issued before fails (the answer carries a new one)."""

    login_required = frozenset({'POST'})

    def on_post(self, req, resp):
        body = read_object(req, self._settings.max_body_bytes, required=('currentPassword', 'newPassword'))
        current = string_field(body, 'currentPassword', max_length=1024)
        new = _new_password(string_field(body, 'newPassword', max_length=1024), 'newPassword')
        with self._pool.connection() as conn:
            user = sql.one(conn, sql.FIND_USER_FOR_PASSWORD_CHANGE, {'user_id': req.context.user_id})
        if user is None:
            raise refusal('invalid_token', ACCOUNT_GONE)
        if user['token_generation'] != req.context.token_generation:
            raise refusal('session_revoked')
        if not self._credentials.check_password(current, user['password_hash']):
            raise refusal('invalid_credentials', 'The current password is wrong.')
        password_hash = self._credentials.hash_password(new)
        with self._pool.connection() as conn:
            user = sql.one(conn, sql.CHANGE_PASSWORD, {
                'user_id': req.context.user_id, 'generation': req.context.token_generation,
                'password_hash': password_hash,
            })
        if user is None:  # another change or a revoke came first
            raise refusal('session_revoked')
        generation = user.pop('token_generation')
        resp.media = {'user': user, 'token': self._credentials.issue(user['id'], generation)}
