"""Passwords (bcrypt) and session tokens (JWT, HS256), and who is calling: the
Authentication middleware verifies a request's token once and puts its user
id on req.context."""

import contextlib
import threading
import time
import uuid

import bcrypt
import jwt

from resources import sql
from resources.errors import ACCOUNT_GONE
from resources.errors import refusal

# bcrypt looks at the first 72 bytes only; longer passwords are refused rather
# than silently truncated.
MAX_PASSWORD_BYTES = 72
MIN_PASSWORD_BYTES = 8


class Credentials:
    def __init__(self, secret, ttl_seconds, bcrypt_rounds, bcrypt_slots):
        self._secret = secret
        self._ttl = ttl_seconds
        self._rounds = bcrypt_rounds
        self._bcrypt_slots = threading.BoundedSemaphore(bcrypt_slots)
        # Checked against when the email is unknown, so that a login for an
        # unknown email costs the same bcrypt time as a wrong password.
        self._decoy_hash = bcrypt.hashpw(b'decoy password', bcrypt.gensalt(bcrypt_rounds))

    @contextlib.contextmanager
    def _bcrypt_slot(self):
        # bcrypt takes ~0.2 s of CPU at the default cost. A burst of logins at
        # the opening of a sale must not take every server thread and leave
        # purchases waiting: only a few hash at once, and a login that finds
        # no free slot is refused at once (a waiting thread is a taken thread).
        if not self._bcrypt_slots.acquire(blocking=False):
            raise refusal('overloaded', 'Too many logins at once; try again in a second.')
        try:
            yield
        finally:
            self._bcrypt_slots.release()

    # NOTE: callers must not hold a database connection while these run.
    def hash_password(self, password):
        with self._bcrypt_slot():
            return bcrypt.hashpw(password.encode(), bcrypt.gensalt(self._rounds)).decode()

    def check_password(self, password, password_hash):
        """True if password matches; with password_hash None (no such user),
        spends the same time and returns False."""
        secret = password.encode()
        # bcrypt 5 raises on more than 72 bytes (older ones read only those).
        # No such password was ever registered: it matches nothing, after the
        # same bcrypt time as any other wrong password.
        too_long = len(secret) > MAX_PASSWORD_BYTES
        with self._bcrypt_slot():
            if password_hash is None or too_long:
                bcrypt.checkpw(secret[:MAX_PASSWORD_BYTES], self._decoy_hash)
                return False
            return bcrypt.checkpw(secret, password_hash.encode())

    def issue(self, user_id):
        now = int(time.time())
        claims = {'sub': str(user_id), 'iat': now, 'exp': now + self._ttl}
        return jwt.encode(claims, self._secret, algorithm='HS256')

    def user_id(self, req):
        """The id of the user whose valid token the request carries, or 401."""
        header = req.get_header('Authorization')
        if not header:
            raise refusal('unauthorized')
        scheme, _, token = header.partition(' ')
        if scheme.lower() != 'bearer' or not token.strip():
            raise refusal('invalid_token', 'Use "Authorization: Bearer <token>".')
        try:
            # The algorithm is pinned: a token claiming "none" or any other
            # algorithm is refused, whatever its header says.
            claims = jwt.decode(
                token.strip(),
                self._secret,
                algorithms=['HS256'],
                options={'require': ['exp', 'iat', 'sub']},
            )
            return uuid.UUID(claims['sub'])
        except jwt.ExpiredSignatureError:
            raise refusal('token_expired') from None
        except (jwt.InvalidTokenError, ValueError, TypeError, AttributeError):
            raise refusal('invalid_token') from None


class Authentication:
    """Falcon middleware: the token is verified once per request, here, and only
    for the responders that need a user. A resource names their methods in
    `login_required`; for those, req.context.user_id is the verified user's id
    (or the request is refused 401 here), before the rate limits, which key
    purchases by it, and before the responder. Anonymous requests (the polls,
    the page) cost one set lookup; a method the resource lacks is its 405."""

    def __init__(self, credentials):
        self._credentials = credentials

    def process_resource(self, req, resp, resource, params):
        if req.method in getattr(resource, 'login_required', ()):
            req.context.user_id = self._credentials.user_id(req)


def current_user(conn, req):
    """The row of the user the request's verified token names; 401 if they
    were deleted since."""
    user = sql.one(conn, sql.FIND_USER_BY_ID, {'user_id': req.context.user_id})
    if user is None:
        raise refusal('invalid_token', ACCOUNT_GONE)
    return user
