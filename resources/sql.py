"""Every SQL statement flashsale runs, in one place, readable top to bottom.

Each statement is a named constant with a comment that says what it returns and
why it is safe. Resources import these names and run them with one of the three
executors at the bottom, which are named by how many rows come back. No other
module builds SQL.

Column aliases are the API's camelCase names, so a row is already the JSON
object the API returns. Every connection runs with TimeZone=UTC and in
autocommit: each statement below is its own transaction unless the caller opens
one explicitly.
"""

# --- schema -----------------------------------------------------------------

# Held for the length of the transaction that applies schema.sql, so that
# several server processes starting at once apply it one after another
# (concurrent CREATE TABLE IF NOT EXISTS can otherwise collide on the catalog).
LOCK_SCHEMA = 'SELECT pg_advisory_xact_lock(hashtext(\'flashsale schema\'))'

# One value (or UndefinedTable before the first apply): the SHA-256 of the
# schema.sql last applied. A plain read of a table nothing but an apply
# writes: it waits for no lock a backup or a purchase holds.
APPLIED_SCHEMA = 'SELECT sha256 FROM schema_applied'

# One value: this connection's lock_timeout as PostgreSQL writes it ('2s'),
# for a message that says how long a lock was waited for.
LOCK_TIMEOUT = "SELECT current_setting('lock_timeout')"

# Nothing: the schema.sql with this digest is applied (run in the
# transaction that applied it, so the record never runs ahead of the tables).
RECORD_SCHEMA = '''
    INSERT INTO schema_applied (sha256) VALUES (%(sha256)s)
    ON CONFLICT (only_row) DO UPDATE SET sha256 = EXCLUDED.sha256, applied_at = now()
'''

# One row: the connections the server takes from clients like this service
# (max_connections less those reserved for superusers and, from PostgreSQL
# 16, for roles with pg_use_reserved_connections), and how many client
# connections are open now, this one included.
CONNECTION_BUDGET = '''
    SELECT current_setting('max_connections')::int AS max_connections,
           current_setting('max_connections')::int
             - current_setting('superuser_reserved_connections')::int
             - coalesce(current_setting('reserved_connections', true)::int, 0) AS available,
           (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS in_use
'''

# The database's clock. Every time decision (sale status, the purchase window,
# serverTime) is made with now() in PostgreSQL, never with the app's clock, so
# several app processes can never disagree about whether a sale has started.
SERVER_TIME = 'SELECT now() AS "serverTime"'

# --- users ------------------------------------------------------------------

_USER_COLUMNS = '''
    id, email, is_admin AS "isAdmin", created_at AS "createdAt"
'''

# One row: the new user. A duplicate email, even from two registrations racing,
# is refused by the users_email_key unique constraint (mapped to 409 email_taken).
CREATE_USER = f'''
    INSERT INTO users (email, password_hash)
    VALUES (%(email)s, %(password_hash)s)
    RETURNING {_USER_COLUMNS}
'''

# One row or none: what login needs, including the hash to check outside the
# connection (bcrypt is slow on purpose; a connection must not wait on it),
# and the token generation to put in the new token.
FIND_USER_FOR_LOGIN = f'''
    SELECT {_USER_COLUMNS}, password_hash, token_generation
      FROM users
     WHERE email = %(email)s
'''

# One row or none: the user a verified token names, with the current token
# generation (a token of an older one was revoked). The admin flag is read from
# here on every admin request; it is never taken from the token.
FIND_USER_BY_ID = f'''
    SELECT {_USER_COLUMNS}, token_generation
      FROM users
     WHERE id = %(user_id)s
'''

# One row or none: the hash a password change checks the current password
# against, and the generation the caller's token must still be in.
FIND_USER_FOR_PASSWORD_CHANGE = f'''
    SELECT {_USER_COLUMNS}, password_hash, token_generation
      FROM users
     WHERE id = %(user_id)s
'''

# One row or none: the new password and a new token generation, which ends
# every session of the old one. Guarded by the generation the caller's token
# had when the current password was checked: if another change or a revoke
# came in between, nothing is written (none: the caller's session ended).
CHANGE_PASSWORD = f'''
    UPDATE users
       SET password_hash = %(password_hash)s,
           token_generation = token_generation + 1,
           updated_at = now()
     WHERE id = %(user_id)s AND token_generation = %(generation)s
    RETURNING {_USER_COLUMNS}, token_generation
'''

# One row or none: used by `flashsale revoke-sessions EMAIL`. Every token
# issued so far for that user fails from the next request on.
REVOKE_SESSIONS = f'''
    UPDATE users
       SET token_generation = token_generation + 1, updated_at = now()
     WHERE email = %(email)s
    RETURNING {_USER_COLUMNS}, token_generation
'''

# One row or none: used by `flashsale grant-admin EMAIL`.
GRANT_ADMIN = f'''
    UPDATE users
       SET is_admin = true, updated_at = now()
     WHERE email = %(email)s
    RETURNING {_USER_COLUMNS}
'''

# A value: how many users exist (the demo data is seeded only into an empty database).
COUNT_USERS = 'SELECT count(*) FROM users'

# --- flash sales ------------------------------------------------------------

# status is computed by the database from its own clock at the moment of the
# query, with the same comparisons the purchase statement uses: a sale is
# active from start_date (inclusive) until end_date (exclusive).
_SALE_COLUMNS = '''
    id, name,
    start_date AS "startDate", end_date AS "endDate",
    total_stock AS "totalStock", remaining_stock AS "remainingStock",
    CASE WHEN now() < start_date THEN 'upcoming'
         WHEN now() < end_date   THEN 'active'
         ELSE 'ended'
    END AS status,
    created_at AS "createdAt",
    now() AS "serverTime"
'''

# One row: the new sale, with all of its stock remaining.
CREATE_SALE = f'''
    INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock)
    VALUES (%(name)s, %(start_date)s, %(end_date)s, %(total_stock)s, %(total_stock)s)
    RETURNING {_SALE_COLUMNS}
'''

# One row or none: the sale a shopper should see now. Active sales first (the
# one that ends soonest), then upcoming ones (the one that starts soonest), then
# ended ones (the one that ended last).
CURRENT_SALE = f'''
    SELECT {_SALE_COLUMNS}
      FROM flash_sales
     ORDER BY CASE WHEN now() < start_date THEN 1
                   WHEN now() < end_date   THEN 0
                   ELSE 2
              END,
              CASE WHEN now() >= start_date AND now() < end_date THEN end_date END,
              CASE WHEN now() < start_date THEN start_date END,
              end_date DESC,
              id
     LIMIT 1
'''

# A page of the list is built as JSON text by the database, not by the app:
# encoding 200 sales in Python (their datetimes and UUIDs through json's
# default hook) took 8 ms of the interpreter, which the polls and the
# purchases share, against a fraction of that in PostgreSQL's json_agg. The
# objects are the FlashSale the other statements return (_SALE_COLUMNS),
# with times written as the app writes them (flashsale._json_default: to
# the microsecond, as stored, and Z); tests/test_sales.py compares the two.
_API_TIME = '''to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')'''


def _sales_page(where):
    """One row: `flashSales`, the JSON text of a page of sales (at most
    %(limit)s, newest first: created_at descending, then id); `more`, whether
    another page follows; `lastCreatedAt` and `lastId`, the place of the
    page's last sale in that order (the next page's cursor); serverTime.
    One index range scan (flash_sales_created_at_id_idx) of limit + 1 rows,
    however many sales there are."""
    return f'''
    WITH page AS (
        SELECT candidate.*, row_number() OVER (ORDER BY created_at DESC, id) AS n
          FROM (SELECT * FROM flash_sales {where}
                 ORDER BY created_at DESC, id LIMIT %(limit)s + 1) AS candidate
    )
    SELECT coalesce(json_agg(json_build_object(
               'id', id, 'name', name,
               'startDate', {_API_TIME.format('start_date')},
               'endDate', {_API_TIME.format('end_date')},
               'totalStock', total_stock, 'remainingStock', remaining_stock,
               'status', CASE WHEN now() < start_date THEN 'upcoming'
                              WHEN now() < end_date   THEN 'active'
                              ELSE 'ended'
                         END,
               'createdAt', {_API_TIME.format('created_at')}
           ) ORDER BY n) FILTER (WHERE n <= %(limit)s), '[]')::text AS "flashSales",
           count(*) > %(limit)s AS more,
           max(created_at) FILTER (WHERE n = %(limit)s) AS "lastCreatedAt",
           max(id::text) FILTER (WHERE n = %(limit)s) AS "lastId",
           now() AS "serverTime"
      FROM page
'''


# One row, as _sales_page: the first page of the list, the newest sales.
LIST_SALES = _sales_page('')

# One row, as _sales_page: the page after the sale at (%(created_at)s,
# %(id)s), the last of the page before. A keyset, not an OFFSET: a page deep
# in the list costs what the first does, and a sale created meanwhile
# neither repeats nor skips one. "After" in created_at descending, id
# ascending is an earlier created_at, or the same one and a greater id; the
# first condition is said alone as well, so that it bounds the index scan.
LIST_SALES_AFTER = _sales_page('''
                 WHERE created_at <= %(created_at)s
                   AND (created_at < %(created_at)s OR id > %(id)s)''')

# One row or none.
FIND_SALE = f'''
    SELECT {_SALE_COLUMNS}
      FROM flash_sales
     WHERE id = %(sale_id)s
'''

# --- the purchase -----------------------------------------------------------

# One row, always: the outcome of one purchase attempt, and the order if one
# was placed. Run in autocommit, so the whole statement is one transaction.
#
# Why this is correct when thousands of requests arrive at once:
#
# 1. `taken` is a guarded decrement. UPDATE takes the sale row's lock, and under
#    READ COMMITTED a waiting UPDATE re-reads the newest committed version of the
#    row and re-checks `remaining_stock > 0` on it before it writes. So requests
#    queue on the row one at a time and each sees the stock its predecessor left:
#    stock can never go below zero (and the CHECK constraint on flash_sales
#    would refuse it anyway). The window check uses now(), the same clock that
#    reports a sale's status.
#
# 2. `placed` inserts the order only if a unit was taken, with a PLAIN insert.
#    If the same user's other tab placed an order that this statement's
#    snapshot cannot see yet, the unique index on (flash_sale_id, user_id)
#    raises unique_violation, which aborts the WHOLE statement: the decrement in
#    `taken` is rolled back with it, so no unit of stock is lost. The caller
#    maps that error to 409 already_purchased.
#
#    ON CONFLICT DO NOTHING would be wrong here: it would keep the decrement and
#    silently drop the order, leaking one unit per racing duplicate. The
#    `NOT EXISTS` check in `taken` cannot catch that race either, because every
#    part of one statement reads the same snapshot; it only saves a lock on the
#    hot row for the common case of a user clicking again after their order
#    committed. The unique index is the real guard. (scripts/race_demo.py
#    shows both wrong versions losing stock.)
#
# 3. Every invariant follows: a unit leaves the stock only together with an
#    order in the same transaction (remaining_stock + orders = total_stock), at
#    most one order per user per sale, stock never negative.
#
# 4. `buyer` is the token's check against revocation, inside the same
#    statement (no extra round trip): the user must still exist, with the
#    token's generation (users.token_generation, bumped by a password change
#    or a revoke). One primary-key lookup; a purchase by a revoked token or a
#    deleted user takes no lock on the sale row.
#
# 5. When nothing was placed, `outcome` explains why from the statement's own
#    snapshot. If the sale is open, not yet bought by this user and the
#    decrement still did nothing, the stock was 0 when the row lock was ours:
#    sold out.
PURCHASE = '''
    WITH sale AS (
        SELECT id, start_date, end_date
          FROM flash_sales
         WHERE id = %(sale_id)s
    ),
    bought_before AS (
        SELECT EXISTS (
            SELECT 1 FROM orders
             WHERE flash_sale_id = %(sale_id)s AND user_id = %(user_id)s
        ) AS yes
    ),
    buyer AS (
        SELECT (SELECT token_generation FROM users WHERE id = %(user_id)s) AS generation
    ),
    taken AS (
        UPDATE flash_sales
           SET remaining_stock = remaining_stock - 1
         WHERE id = %(sale_id)s
           AND remaining_stock > 0
           AND now() >= start_date AND now() < end_date
           AND NOT (SELECT yes FROM bought_before)
           AND (SELECT generation FROM buyer) = %(generation)s
        RETURNING id
    ),
    placed AS (
        INSERT INTO orders (flash_sale_id, user_id)
        SELECT id, %(user_id)s FROM taken
        RETURNING id, user_id, flash_sale_id, created_at
    )
    SELECT CASE WHEN placed.id IS NOT NULL       THEN 'created'
                WHEN buyer.generation IS NULL    THEN 'invalid_token'
                WHEN buyer.generation <> %(generation)s THEN 'session_revoked'
                WHEN sale.id IS NULL             THEN 'sale_not_found'
                WHEN now() < sale.start_date     THEN 'sale_not_started'
                WHEN now() >= sale.end_date      THEN 'sale_ended'
                WHEN bought_before.yes           THEN 'already_purchased'
                ELSE 'sold_out'
           END AS outcome,
           placed.id, placed.user_id AS "userId",
           placed.flash_sale_id AS "flashSaleId", placed.created_at AS "createdAt"
      FROM bought_before
     CROSS JOIN buyer
      LEFT JOIN sale ON true
      LEFT JOIN placed ON true
'''

# Many rows, one per request, in the order given: the outcomes of a BATCH of
# purchases of one sale, the requests that arrived while the previous statement
# for that sale was in flight (resources/batching.py). %(user_ids)s is their
# user ids in arrival order, %(generations)s their tokens' generations in the
# same order; a user may appear more than once (several tabs). Each row is
# (request, outcome, the order if one was placed), with the same outcomes as
# PURCHASE plus 'retry' (below).
#
# Why a batch is exactly as correct as the same purchases run one by one, in
# arrival order, at the moment this statement holds the sale row's lock:
#
# 0. `admitted` is PURCHASE's `buyer` check for every request at once: the
#    user must still exist, with the request's token generation. A request
#    that fails it is answered invalid_token or session_revoked, as alone,
#    and takes no further part: it wants no unit, places no order and changes
#    no other request's answer (the batch buys as if it had not come).
#
# 1. `first` keeps each user's earliest admitted request; `fresh` the users
#    among them with no order in this statement's snapshot, ranked by arrival.
#    A user's later admitted requests in the batch get what a second click
#    right after the first would get: already_purchased if the first placed an
#    order, else the first's own answer (sold out stays sold out, a closed sale
#    stays closed).
#
# 2. `taken` is still one guarded UPDATE of the sale row, so the batch queues
#    on the row lock like a single purchase, and under READ COMMITTED the
#    locked row is re-read and the WHERE re-checked on the newest committed
#    version. The one thing a batch needs that a single purchase does not is
#    HOW MANY units it got when the stock runs out inside it: the first
#    least(wanted, stock at the lock) fresh users win. But the stock at the
#    lock is visible only inside the UPDATE's own SET and WHERE: RETURNING
#    shows the row after the update (before PostgreSQL 18), and every other
#    read of flash_sales in this statement, `sale` included, sees the
#    snapshot, which another process's commit may have made stale while this
#    statement waited for the lock. So the WHERE admits only the two cases in
#    which the answer does not depend on the stale value:
#      - the locked row has stock for every fresh user: each gets one, or
#      - it has less, and exactly the stock the snapshot saw (nobody sold
#        since): all of it goes, to the earliest fresh users.
#    Stock only ever goes down, so in both cases the units given are
#    least(wanted, snapshot stock), known outside the UPDATE. In the third
#    case (less than wanted, and someone sold since the snapshot) nothing is
#    taken, and the fresh users are answered 'retry': the caller runs them in
#    its next statement, whose new snapshot sees the current stock. (That
#    happens only in the last batch of a sale, and only with another process
#    selling the same sale.)
#
# 3. `placed` is a PLAIN insert, for the same reason as in PURCHASE: if another
#    process committed an order for one of these users after this statement's
#    snapshot, unique_violation aborts the whole statement, decrement and
#    every order of the batch with it: nothing was bought. The caller runs the
#    same requests again; the next snapshot sees that order, so that user is
#    told already_purchased and the rest settle as before.
#
# 4. Every invariant of PURCHASE holds for the same reasons: units leave the
#    stock only in the transaction that writes their orders, one order per
#    user (DISTINCT ON here, the unique index across statements), stock never
#    below zero (the WHERE, and the CHECK constraint), no order for a revoked
#    token (only admitted requests reach `fresh`).
#
# Why it is faster: the row lock is held until the commit is flushed, so one
# sale sells at most one statement per commit time. A batch pays that lock and
# that commit once for all of its orders: at a 2 ms commit, one purchase per
# statement sells ~370/s, a batch of 32 per statement thousands
# (README.md, "Slow commits").
PURCHASE_BATCH = '''
    WITH request AS (
        SELECT r.user_id, r.generation, r.n, users.token_generation AS current
          FROM unnest(%(user_ids)s::uuid[], %(generations)s::integer[])
               WITH ORDINALITY AS r (user_id, generation, n)
          LEFT JOIN users ON users.id = r.user_id
    ),
    admitted AS (
        SELECT user_id, n FROM request WHERE current = generation
    ),
    sale AS (
        SELECT id, start_date, end_date, remaining_stock
          FROM flash_sales
         WHERE id = %(sale_id)s
    ),
    first AS (
        SELECT DISTINCT ON (user_id) user_id, n
          FROM admitted
         ORDER BY user_id, n
    ),
    fresh AS (
        SELECT first.user_id, first.n, row_number() OVER (ORDER BY first.n) AS rank
          FROM first
         WHERE NOT EXISTS (
            SELECT 1 FROM orders
             WHERE flash_sale_id = %(sale_id)s AND user_id = first.user_id
         )
    ),
    wanted AS (
        SELECT count(*) AS units FROM fresh
    ),
    taken AS (
        UPDATE flash_sales
           SET remaining_stock = remaining_stock
                                 - least(remaining_stock, (SELECT units FROM wanted))
         WHERE id = %(sale_id)s
           AND remaining_stock > 0
           AND now() >= start_date AND now() < end_date
           AND (SELECT units FROM wanted) > 0
           AND (remaining_stock >= (SELECT units FROM wanted)
                OR remaining_stock = (SELECT remaining_stock FROM sale))
        RETURNING id
    ),
    given AS (
        SELECT least(wanted.units, sale.remaining_stock) AS units
          FROM wanted, sale, taken
    ),
    placed AS (
        INSERT INTO orders (flash_sale_id, user_id)
        SELECT %(sale_id)s, fresh.user_id
          FROM fresh, given
         WHERE fresh.rank <= given.units
        RETURNING id, user_id, flash_sale_id, created_at
    ),
    decided AS (
        SELECT first.user_id,
               CASE WHEN placed.id IS NOT NULL           THEN 'created'
                    WHEN sale.id IS NULL                 THEN 'sale_not_found'
                    WHEN now() < sale.start_date         THEN 'sale_not_started'
                    WHEN now() >= sale.end_date          THEN 'sale_ended'
                    WHEN fresh.user_id IS NULL           THEN 'already_purchased'
                    WHEN EXISTS (SELECT 1 FROM given)    THEN 'sold_out'
                    WHEN sale.remaining_stock = 0        THEN 'sold_out'
                    WHEN (SELECT units FROM wanted) = 1  THEN 'sold_out'
                    ELSE 'retry'
               END AS outcome,
               placed.id, placed.user_id AS "userId",
               placed.flash_sale_id AS "flashSaleId", placed.created_at AS "createdAt"
          FROM first
          LEFT JOIN sale ON true
          LEFT JOIN fresh ON fresh.user_id = first.user_id
          LEFT JOIN placed ON placed.user_id = first.user_id
    )
    SELECT request.n AS request,
           CASE WHEN request.current IS NULL         THEN 'invalid_token'
                WHEN request.current <> request.generation THEN 'session_revoked'
                WHEN request.n = first.n             THEN decided.outcome
                WHEN decided.outcome = 'created'     THEN 'already_purchased'
                ELSE decided.outcome
           END AS outcome,
           CASE WHEN request.n = first.n THEN decided.id END AS id,
           CASE WHEN request.n = first.n THEN decided."userId" END AS "userId",
           CASE WHEN request.n = first.n THEN decided."flashSaleId" END AS "flashSaleId",
           CASE WHEN request.n = first.n THEN decided."createdAt" END AS "createdAt"
      FROM request
      LEFT JOIN first ON first.user_id = request.user_id
      LEFT JOIN decided ON decided.user_id = request.user_id
     ORDER BY request.n
'''

# --- orders -----------------------------------------------------------------

_ORDER_COLUMNS = '''
    id, user_id AS "userId", flash_sale_id AS "flashSaleId", created_at AS "createdAt"
'''

# One row or none: the caller's order for one sale. The user id comes from the
# verified token, never from the request, so nobody can read another's order.
FIND_MY_ORDER = f'''
    SELECT {_ORDER_COLUMNS}
      FROM orders
     WHERE flash_sale_id = %(sale_id)s AND user_id = %(user_id)s
'''

# Many rows: the caller's orders, newest first.
LIST_MY_ORDERS = f'''
    SELECT {_ORDER_COLUMNS}
      FROM orders
     WHERE user_id = %(user_id)s
     ORDER BY created_at DESC, id
'''

# --- rate limits ------------------------------------------------------------

# A bucket's tokens now: what it held, plus what it earned since it was
# counted, up to the burst. Time never runs backwards here: a statement that
# waited for the row's lock may have started (now()) before the one it waited
# for counted.
_REFILLED = '''least(%(burst)s::float8, bucket.tokens + %(rate)s::float8
                        * greatest(0, extract(epoch FROM now() - bucket.counted_at)::float8))'''

# One row: `wait`, 0 if the client address had a token (now spent), else the
# seconds until it will have one (nothing spent). The register/login limit
# of resources/ratelimit.py, one token bucket per address, shared by every
# process and host on this database.
#
# Why one statement is exact under concurrency: the INSERT ... ON CONFLICT DO
# UPDATE takes the address's row lock, so two takes of one address run one
# after the other, and each reads the tokens the previous one left (READ
# COMMITTED re-reads the locked row). A new address inserts a full bucket
# less one; two racing inserts of it become an insert and an update.
#
# `pruned` keeps the table as small as the addresses seen within one refill
# (a row older than that is full again, the same as no row): each take
# deletes up to two such rows of other addresses, oldest first, so the
# expired rows only ever shrink while any are left. SKIP LOCKED: a take never
# waits for another take's pruning, nor for an address being counted. (Not
# its own address: one statement may not change a row twice.)
TAKE_AUTH_TOKEN = f'''
    WITH pruned AS (
        DELETE FROM auth_rate_buckets
         WHERE address IN (
            SELECT address FROM auth_rate_buckets
             WHERE counted_at < now() - make_interval(secs => %(refill_seconds)s::float8)
               AND address <> %(address)s
             ORDER BY counted_at
             LIMIT 2
               FOR UPDATE SKIP LOCKED)
    )
    INSERT INTO auth_rate_buckets AS bucket (address, tokens, counted_at)
    VALUES (%(address)s, %(burst)s::float8 - 1, now())
    ON CONFLICT (address) DO UPDATE
       SET tokens = {_REFILLED} - CASE WHEN {_REFILLED} >= 1 THEN 1 ELSE 0 END,
           refused = {_REFILLED} < 1,
           counted_at = greatest(bucket.counted_at, now())
    RETURNING CASE WHEN refused THEN (1 - tokens) / %(rate)s::float8 ELSE 0 END AS wait
'''

# --- executors, named by how many rows come back ----------------------------


def one(conn, statement, params=None, *, prepare=None):
    """The first row as a dict, or None. prepare=True makes the server plan
    the statement once per connection (psycopg otherwise does so after five
    runs)."""
    return conn.execute(statement, params, prepare=prepare).fetchone()


def many(conn, statement, params=None, *, prepare=None):
    """Every row, as a list of dicts."""
    return conn.execute(statement, params, prepare=prepare).fetchall()


def value(conn, statement, params=None):
    """The first column of the first row."""
    row = conn.execute(statement, params).fetchone()
    return None if row is None else next(iter(row.values()))
