-- flashsale schema. Safe to apply any number of times: every statement is
-- idempotent, and nothing here ever drops data.
--
-- The invariants the purchase statement relies on are enforced here, by the
-- database, so that no bug in application code can break them:
--   * stock never negative and never above the total  (CHECK on flash_sales)
--   * at most one order per user per sale              (UNIQUE on orders)

CREATE TABLE IF NOT EXISTS users (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text        NOT NULL,
    password_hash text        NOT NULL,
    is_admin      boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_key UNIQUE (email),
    -- The application lower-cases and trims; the database refuses anything else,
    -- so two spellings of one address can never become two accounts.
    CONSTRAINT users_email_normalised CHECK (email = lower(btrim(email)))
);

-- Every token carries the generation it was issued in; bumping it (a password
-- change, `flashsale revoke-sessions EMAIL`) ends every older session of that
-- user: a token is valid only while its generation is the user's.
ALTER TABLE users ADD COLUMN IF NOT EXISTS token_generation integer NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS flash_sales (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text        NOT NULL DEFAULT 'Flash sale',
    start_date      timestamptz NOT NULL,
    end_date        timestamptz NOT NULL,
    total_stock     integer     NOT NULL,
    remaining_stock integer     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flash_sales_window CHECK (end_date > start_date),
    CONSTRAINT flash_sales_total_stock_positive CHECK (total_stock > 0),
    CONSTRAINT flash_sales_stock_in_range CHECK (remaining_stock BETWEEN 0 AND total_stock)
);

CREATE INDEX IF NOT EXISTS flash_sales_end_date_idx ON flash_sales (end_date);
CREATE INDEX IF NOT EXISTS flash_sales_start_date_idx ON flash_sales (start_date);
-- The list of sales, newest first, a page at a time (sql.LIST_SALES_AFTER).
CREATE INDEX IF NOT EXISTS flash_sales_created_at_id_idx ON flash_sales (created_at DESC, id);

CREATE TABLE IF NOT EXISTS orders (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- No ON DELETE CASCADE: an order that silently vanished would break
    -- remaining_stock + orders = total_stock. Deleting a buyer or a sale with
    -- orders is refused instead.
    user_id       uuid        NOT NULL REFERENCES users (id),
    flash_sale_id uuid        NOT NULL REFERENCES flash_sales (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- The real guard against a second order by the same user: see the purchase
    -- statement in resources/sql.py for why no snapshot check can replace it.
    CONSTRAINT orders_one_per_user_per_sale UNIQUE (flash_sale_id, user_id)
);

-- "my orders" looks orders up by user; the unique index above serves lookups by sale.
CREATE INDEX IF NOT EXISTS orders_user_id_idx ON orders (user_id);

-- The SHA-256 of the schema.sql last applied, in one row: start-up applies
-- this file only when it differs (resources/database.py, apply_schema).
CREATE TABLE IF NOT EXISTS schema_applied (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The register/login limit (resources/ratelimit.py): one token bucket per
-- client address, shared by every process and host on this database, so that
-- AUTH_RATE_PER_MINUTE is the service's limit however many serve it. A row
-- untouched long enough to refill is the same as no row: those are pruned a
-- few at a time by the statement that takes a token (sql.TAKE_AUTH_TOKEN, by
-- counted_at). UNLOGGED: a bucket is not worth a WAL record, nor a commit's
-- flush or a standby's acknowledgement (a transaction that wrote only
-- unlogged tables commits without waiting for either); after a crash or a
-- failover the buckets start full, as after a restart of the limit in memory.
CREATE UNLOGGED TABLE IF NOT EXISTS auth_rate_buckets (
    address    text             PRIMARY KEY,
    tokens     double precision NOT NULL,
    counted_at timestamptz      NOT NULL,
    refused    boolean          NOT NULL DEFAULT false  -- the last take found no token
);

CREATE INDEX IF NOT EXISTS auth_rate_buckets_counted_at_idx ON auth_rate_buckets (counted_at);
