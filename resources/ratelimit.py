"""Per-client rate limits: register and login per client address (password
guessing, mass sign-ups), purchases per user (bots hammering the button).

Each limit is a token bucket per key: a key may spend `burst` requests at
once, and earns `rate` more per second. A request finding its bucket empty
gets 429 rate_limited with Retry-After: the seconds until its next token
(RateLimits.process_resource, the one place a request is refused for its
rate). Where each limit's buckets are kept decides what it means with
several processes and hosts (README.md, "Rate limits"):

- register/login/password change: in PostgreSQL (SharedBuckets), one row per
  address, one statement per request, shared by every process and host on the
  database. AUTH_RATE_PER_MINUTE is the service's limit, whatever WORKERS is.
- purchases: in this process's memory (TokenBuckets), no statement on the
  hottest path. Per user *per process*: with N processes (WORKERS, hosts) a
  user may get up to N times PURCHASE_RATE_PER_SECOND. It is a brake on one
  user's clicks, not a guard of anything: one order per user per sale is the
  database's (sql.PURCHASE).
"""

import math
import threading
import time
from collections import OrderedDict

from resources import sql
from resources.errors import refusal

AUTH_ROUTES = frozenset({'/api/auth/register', '/api/auth/login', '/api/me/password'})
PURCHASE_ROUTE = '/api/flash-sales/{sale_id}/purchase'

# Buckets kept per limit. A bucket untouched for burst/rate seconds is full
# again, the same as no bucket, so forgetting the least recently used one
# when there are too many costs nothing, except under a flood of more than
# this many distinct clients within that time (whose evicted members start
# over with a full bucket). About 100 bytes each.
MAX_KEYS = 100_000


class TokenBuckets:
    """Token buckets in this process's memory."""

    def __init__(self, rate, burst, max_keys=MAX_KEYS):
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets = OrderedDict()  # key -> (tokens, when they were counted)
        self._lock = threading.Lock()

    def take(self, key):
        """Spend one of key's tokens: 0 if there was one, else the seconds
        until there will be."""
        now = time.monotonic()
        with self._lock:
            tokens, counted_at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - counted_at) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[key] = (tokens, now)  # now the most recently used
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return wait

    def __len__(self):
        return len(self._buckets)


class SharedBuckets:
    """Token buckets in PostgreSQL (sql.TAKE_AUTH_TOKEN, table
    auth_rate_buckets), shared by every process using the database: one
    statement per take, on a connection of the pool. Its clock is the
    database's, the same for every process."""

    def __init__(self, pool, rate, burst):
        self.rate = rate
        self.burst = burst
        self._pool = pool
        self._params = {'rate': rate, 'burst': burst, 'refill_seconds': burst / rate}

    def take(self, key):
        """As TokenBuckets.take."""
        with self._pool.connection() as conn:
            return sql.one(conn, sql.TAKE_AUTH_TOKEN, {**self._params, 'address': key}, prepare=True)['wait']


class RateLimits:
    """Falcon middleware: the limits, checked after routing and before the
    responder (so an unknown route or method is never counted), and after
    credentials.Authentication (whose req.context.user_id keys purchases)."""

    def __init__(self, settings, pool):
        self._exempt = frozenset(settings.rate_limit_exempt)
        per_minute = settings.auth_rate_per_minute
        per_second = settings.purchase_rate_per_second
        # A minute's worth of sign-ins at once; two seconds' worth of clicks.
        self.auth = SharedBuckets(pool, per_minute / 60, per_minute) if per_minute else None
        self.purchase = TokenBuckets(per_second, 2 * per_second) if per_second else None

    def process_resource(self, req, resp, resource, params):
        if req.method != 'POST' or req.remote_addr in self._exempt:
            return
        if req.uri_template in AUTH_ROUTES and self.auth is not None:
            wait = self.auth.take(req.remote_addr)
        elif req.uri_template == PURCHASE_ROUTE and self.purchase is not None:
            # Keyed by the verified user: a bot cannot spread its clicks over
            # made-up ids, nor spend someone else's. A bad token was refused
            # 401 before this, counting against nobody.
            wait = self.purchase.take(req.context.user_id)
        else:
            return
        if wait:
            # Rounded up: once the client has waited this long, its next
            # token is there (unless another request from it took it first).
            raise refusal('rate_limited', retry_after=max(1, math.ceil(wait)))
