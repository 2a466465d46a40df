"""Passwords (bcrypt, through the hashing queue) and session tokens (JWT,
HS256), and who is calling: the Authentication middleware verifies a
request's token once and puts its user id and token generation on
req.context."""

import collections
import threading
import time
import uuid

import bcrypt
import jwt

from resources import hashing
from resources import sql
from resources.errors import ACCOUNT_GONE
from resources.errors import refusal

# bcrypt looks at the first 72 bytes only; longer passwords are refused rather
# than silently truncated.
MAX_PASSWORD_BYTES = 72
MIN_PASSWORD_BYTES = 8


# Who a verified token speaks for. `generation` is the user's token
# generation when the token was issued: bumping users.token_generation (a
# password change, `flashsale revoke-sessions`) makes every older token fail
# wherever the user is read (current_user), and in the purchase statement.
Session = collections.namedtuple('Session', 'user_id generation')

# Tokens this process has verified, with their sessions, until they expire:
# in a flash sale every shopper sends the same token again and again, and
# verifying one (PyJWT: base64, JSON, HMAC, the claims) costs a tenth of a
# purchase's CPU in the server. The key is the whole token, signature and
# all, so only a token that passed jwt.decode() can ever match; what the
# database says of it (revoked, account gone) is still asked on every
# request. Full (about 8 MiB: 530 bytes a token), the oldest entries go
# first, and any expired ones at the front with them: a crowd larger than the
# map keeps most of its tokens, where emptying the map when full made every
# shopper's token be verified again each time it filled. Per process: with N
# processes a shopper's token is verified up to N times.
MAX_VERIFIED_TOKENS = 16_384


class Credentials:
    def __init__(self, secret, ttl_seconds, bcrypt_rounds, hash_queue=None):
        """hash_queue: a hashing.HashQueue for the passwords (None: this
        instance only issues and reads tokens)."""
        self._secret = secret
        self._ttl = ttl_seconds
        self._rounds = bcrypt_rounds
        self._queue = hash_queue
        # token -> (Session, its exp claim), in the order they were verified.
        # Read without the lock (one lookup); changed under it.
        self._verified = collections.OrderedDict()
        self._verified_lock = threading.Lock()
        # Checked against when the email is unknown, so that a login for an
        # unknown email costs the same bcrypt time as a wrong password.
        started = time.perf_counter()
        self._decoy_hash = bcrypt.hashpw(b'decoy password', bcrypt.gensalt(bcrypt_rounds))
        if hash_queue is not None and hash_queue.seconds_per_hash is None:
            # The queue's first measure of a hash's time, for its estimates.
            hash_queue.seconds_per_hash = time.perf_counter() - started

    # NOTE: callers must not hold a database connection while these run.
    def hash_password(self, password):
        return self._queue.run(hashing.hash_password, password.encode(), self._rounds)

    def check_password(self, password, password_hash):
        """True if password matches; with password_hash None (no such user),
        spends the same time and returns False."""
        secret = password.encode()
        # bcrypt 5 raises on more than 72 bytes (older ones read only those).
        # No such password was ever registered: it matches nothing, after the
        # same bcrypt time (and the same turn in the queue) as any other
        # wrong password.
        if password_hash is None or len(secret) > MAX_PASSWORD_BYTES:
            self._queue.run(hashing.check_password, secret[:MAX_PASSWORD_BYTES], self._decoy_hash)
            return False
        return self._queue.run(hashing.check_password, secret, password_hash.encode())

    def issue(self, user_id, generation=0):
        now = int(time.time())
        claims = {'sub': str(user_id), 'gen': generation, 'iat': now, 'exp': now + self._ttl}
        return jwt.encode(claims, self._secret, algorithm='HS256')

    def session(self, req):
        """The Session of the valid token the request carries, or 401. Whether
        its generation is still the user's is for the database to say
        (current_user, sql.PURCHASE)."""
        header = req.get_header('Authorization')
        if not header:
            raise refusal('unauthorized')
        scheme, _, token = header.partition(' ')
        token = token.strip()
        if scheme.lower() != 'bearer' or not token:
            raise refusal('invalid_token', 'Use "Authorization: Bearer <token>".')
        known = self._verified.get(token)
        # PyJWT's own rule: expired once now >= int(exp). Past that, the token
        # goes through jwt.decode() again, which refuses it.
        if known is not None and time.time() < known[1]:
            return known[0]
        try:
            # The algorithm is pinned: a token claiming "none" or any other
            # algorithm is refused, whatever its header says.
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=['HS256'],
                options={'require': ['exp', 'iat', 'sub']},
            )
            # Tokens issued before generations existed carry none: generation 0.
            generation = claims.get('gen', 0)
            if not isinstance(generation, int) or isinstance(generation, bool) or not 0 <= generation < 2**31:
                raise TypeError('gen')
            session = Session(uuid.UUID(claims['sub']), generation)
        except jwt.ExpiredSignatureError:
            raise refusal('token_expired') from None
        except (jwt.InvalidTokenError, ValueError, TypeError, AttributeError):
            raise refusal('invalid_token') from None
        self._remember(token, session, int(claims['exp']))  # exp as PyJWT reads it
        return session

    def _remember(self, token, session, expires):
        with self._verified_lock:
            self._verified[token] = (session, expires)
            now = time.time()
            while len(self._verified) > MAX_VERIFIED_TOKENS or now >= next(iter(self._verified.values()))[1]:
                self._verified.popitem(last=False)
                if not self._verified:
                    break

    def verified_tokens(self):
        """How many verified tokens this process remembers."""
        return len(self._verified)


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
            session = self._credentials.session(req)
            req.context.user_id = session.user_id
            req.context.token_generation = session.generation


class UserReader:
    """A resource that reads what is the verified caller's own (who they
    are, their orders): its GET takes a token (Authentication above)."""

    login_required = frozenset({'GET'})

    def __init__(self, pool):
        self._pool = pool


def current_user(conn, req):
    """The row of the user the request's verified token names; 401 if they
    were deleted since, or the token's generation was revoked."""
    user = sql.one(conn, sql.FIND_USER_BY_ID, {'user_id': req.context.user_id})
    if user is None:
        raise refusal('invalid_token', ACCOUNT_GONE)
    if user.pop('token_generation') != req.context.token_generation:
        raise refusal('session_revoked')
    return user
