#!/usr/bin/env python3
"""Why the purchase is one statement with a plain INSERT: three strategies, one crowd.

The same crowd (by default 200 users, 30 of whom click "buy" in 5 tabs at
once, for a sale of 50 items) hits the same sale with three purchase
strategies, straight against PostgreSQL (threads, each with its own psycopg
connection, released together by a barrier):

  (a) WRONG, on purpose: naive read-then-write, in autocommit, as a naive app
      would write it: SELECT remaining_stock; if > 0, UPDATE it to the value
      computed in Python, then INSERT the order ON CONFLICT DO NOTHING.
      Two requests that read the same stock both write the same value back (a
      lost update): more orders than stock. A user's second tab decrements
      and then inserts nothing: stock lost.
  (b) WRONG, on purpose: one statement, a CTE that decrements first, guarded
      by remaining_stock > 0 and NOT EXISTS (an order of this user), then
      INSERT ... ON CONFLICT DO NOTHING. No oversell, but it leaks stock when
      one user races in several tabs: every sub-statement reads the snapshot
      taken when the statement started, so neither tab's NOT EXISTS sees the
      other's order; the second tab's decrement goes through (the row lock
      re-checks only the row's own columns), its insert hits the first tab's
      order, DO NOTHING keeps the decrement and drops the order.
  (c) ours: the statement flashsale ships, imported from resources/sql.py
      (sql.PURCHASE), so this demo always runs exactly what the server runs.
      It should be a guarded decrement followed by a PLAIN insert: the racing
      duplicate raises unique_violation, and the whole statement, decrement
      included, rolls back.
  (d) ours, batched: the server's own batching (resources/batching.py) over a
      connection pool. Clicks that arrive while a statement for the sale is in
      flight go together in the next one, sql.PURCHASE_BATCH: as correct as
      (c), in far fewer statements.

For each it prints orders created, stock left, units oversold (orders -
total, when > 0) and units leaked (total - remaining - orders, when > 0),
the purchase statements it sent for the crowd, and a verdict. Each strategy runs --rounds times on a fresh sale.

Everything happens in a scratch schema (`race_demo` by default) of the
database given by --database-url (or DATABASE_URL): every connection sets its
search_path to it, the app's own tables are never touched, and the schema is
dropped at the end unless --keep.

    python scripts/race_demo.py --database-url postgresql://postgres@127.0.0.1:5432/scratch
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resources import sql as flashsale_sql  # noqa: E402  (the statement the server ships)
from resources.batching import Batches  # noqa: E402  (the server's own batching)

# Purchase statements sent in the current round, by every strategy.
STATEMENTS = [0]
_COUNT = threading.Lock()


def sent(n=1):
    with _COUNT:
        STATEMENTS[0] += n

# --- (a) WRONG: read, compute in Python, write back ----------------------------
NAIVE_READ = 'SELECT remaining_stock FROM flash_sales WHERE id = %(sale_id)s'
NAIVE_WRITE = 'UPDATE flash_sales SET remaining_stock = %(remaining)s WHERE id = %(sale_id)s'
NAIVE_INSERT = '''
    INSERT INTO orders (flash_sale_id, user_id) VALUES (%(sale_id)s, %(user_id)s)
    ON CONFLICT DO NOTHING
    RETURNING id
'''

# --- (b) WRONG: one statement, but ON CONFLICT DO NOTHING keeps the decrement ---
LEAKY_CTE = '''
    WITH taken AS (
        UPDATE flash_sales
           SET remaining_stock = remaining_stock - 1
         WHERE id = %(sale_id)s
           AND remaining_stock > 0
           AND now() >= start_date AND now() < end_date
           AND NOT EXISTS (SELECT 1 FROM orders
                            WHERE flash_sale_id = %(sale_id)s AND user_id = %(user_id)s)
        RETURNING id
    )
    INSERT INTO orders (flash_sale_id, user_id)
    SELECT id, %(user_id)s FROM taken
    ON CONFLICT DO NOTHING
    RETURNING id
'''


def buy_naive(conn, sale_id, user_id, pause):
    sent()
    row = conn.execute(NAIVE_READ, {'sale_id': sale_id}).fetchone()
    if row['remaining_stock'] <= 0:
        return False
    if pause:
        time.sleep(pause)  # widens the read-to-write window; see --naive-pause-ms
    sent(2)
    conn.execute(NAIVE_WRITE, {'sale_id': sale_id, 'remaining': row['remaining_stock'] - 1})
    return conn.execute(NAIVE_INSERT, {'sale_id': sale_id, 'user_id': user_id}).fetchone() is not None


def buy_leaky_cte(conn, sale_id, user_id, pause):
    sent()
    return conn.execute(LEAKY_CTE, {'sale_id': sale_id, 'user_id': user_id}).fetchone() is not None


def buy_shipped(conn, sale_id, user_id, pause):
    sent()
    try:
        row = conn.execute(flashsale_sql.PURCHASE, {'sale_id': sale_id, 'user_id': user_id,
                                                      'generation': 0}).fetchone()
    except psycopg.errors.UniqueViolation:
        return False  # the racing duplicate: the whole statement rolled back
    if row is None:
        return False
    if 'outcome' in row:
        return row['outcome'] == 'created'
    return row.get('id') is not None


class BatchedBuyer:
    """(d): every worker thread buys through one Batches over one pool, as the
    server's request threads do (their own connections stay unused)."""

    def __init__(self):
        self.batches = None

    def start(self, url, schema, connections):
        from psycopg_pool import ConnectionPool  # noqa: PLC0415

        self.pool = ConnectionPool(url, min_size=8, max_size=8, open=True, kwargs={
            'autocommit': True, 'row_factory': dict_row, 'options': f'-c search_path={schema} -c TimeZone=UTC'})
        self.batches = Batches(self.pool, max_batch=64, queue_wait=30, answer_wait=30)

    def stop(self):
        sent(self.batches.statements)
        self.pool.close()

    def __call__(self, conn, sale_id, user_id, pause):
        try:
            return self.batches.buy(sale_id, user_id, 0)['outcome'] == 'created'  # new users: generation 0
        except psycopg.errors.UniqueViolation:
            return False


STRATEGIES = [
    ('a', 'naive read-then-write (WRONG on purpose)', buy_naive,
     'requests that read the same stock write the same value back (lost updates): orders beyond the stock; '
     'a second tab decrements and its ON CONFLICT insert adds nothing: stock lost'),
    ('b', 'one CTE, NOT EXISTS + ON CONFLICT DO NOTHING (WRONG on purpose)', buy_leaky_cte,
     'two tabs of one user both pass NOT EXISTS (one snapshot for the whole statement), both decrement, '
     'the second insert does nothing and its decrement stays: stock lost, never oversold'),
    ('c', 'ours: sql.PURCHASE as shipped in resources/sql.py', buy_shipped,
     'the racing tab\'s plain INSERT raises unique_violation and rolls back its own decrement'),
    ('d', 'ours, batched: resources/batching.py with sql.PURCHASE_BATCH, as the server runs it', BatchedBuyer(),
     'clicks arriving during a statement go in the next one: one row lock and one commit for many orders'),
]


def connect(url, schema):
    return psycopg.connect(url, autocommit=True, row_factory=dict_row,
                           options=f'-c search_path={schema} -c TimeZone=UTC')


def prepare(url, schema, users):
    """A fresh scratch schema with the app's own schema.sql, and `users` users."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(pgsql.SQL('DROP SCHEMA IF EXISTS {} CASCADE').format(pgsql.Identifier(schema)))
        conn.execute(pgsql.SQL('CREATE SCHEMA {}').format(pgsql.Identifier(schema)))
    with connect(url, schema) as conn:
        conn.execute((ROOT / 'schema.sql').read_text())
        rows = conn.execute(
            "INSERT INTO users (email, password_hash) "
            "SELECT 'race-' || n || '@example.com', 'not-a-hash' FROM generate_series(1, %s) AS n "
            'RETURNING id', (users,),
        ).fetchall()
    return [row['id'] for row in rows]


def new_sale(url, schema, stock):
    with connect(url, schema) as conn:
        return conn.execute(
            "INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) "
            "VALUES ('race demo', now() - interval '1 minute', now() + interval '1 hour', %s, %s) RETURNING id",
            (stock, stock),
        ).fetchone()['id']


def sale_outcome(url, schema, sale_id):
    with connect(url, schema) as conn:
        return conn.execute(
            'SELECT total_stock AS total, remaining_stock AS remaining, '
            '(SELECT count(*) FROM orders WHERE flash_sale_id = s.id) AS orders, '
            '(SELECT count(DISTINCT user_id) FROM orders WHERE flash_sale_id = s.id) AS buyers '
            'FROM flash_sales s WHERE id = %s', (sale_id,),
        ).fetchone()


def clicks_for(user_ids, tabbed, tabs, rng):
    """Every click of the crowd, in arrival order: each user once, and the tabbed
    users `tabs` times in a row (their tabs fire at the same moment)."""
    order = list(user_ids)
    rng.shuffle(order)
    multi = set(rng.sample(order, tabbed))
    clicks = []
    for user in order:
        clicks.extend([user] * (tabs if user in multi else 1))
    return clicks


def run_round(url, schema, buy, sale_id, clicks, connections, pause):
    """Workers on their own connections, released together, take clicks in order."""
    barrier = threading.Barrier(connections)
    lock = threading.Lock()
    position = [0]
    failures = []

    def worker():
        try:
            conn = connect(url, schema)
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)
            barrier.abort()
            return
        with conn:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            while True:
                with lock:
                    if position[0] >= len(clicks):
                        return
                    user = clicks[position[0]]
                    position[0] += 1
                try:
                    buy(conn, sale_id, user, pause)
                except psycopg.Error as exc:
                    failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def verdict(out, stock, distinct_users):
    oversold = max(0, out['orders'] - out['total'])
    leaked = max(0, out['total'] - out['remaining'] - out['orders'])
    should_sell = min(stock, distinct_users)
    ok = (out['remaining'] + out['orders'] == out['total'] and out['orders'] == out['buyers']
          and out['orders'] == should_sell)
    return oversold, leaked, ok


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--database-url', default=os.environ.get('DATABASE_URL'),
                        help='PostgreSQL to run in (default: DATABASE_URL; with neither, a throwaway embedded '
                             'PostgreSQL it starts and deletes); only the scratch schema is touched')
    parser.add_argument('--schema', default='race_demo', help='scratch schema (dropped and re-created)')
    parser.add_argument('--users', type=int, default=200)
    parser.add_argument('--tabbed-users', type=int, default=30, help='users who click in several tabs at once')
    parser.add_argument('--tabs', type=int, default=5)
    parser.add_argument('--stock', type=int, default=50)
    parser.add_argument('--connections', type=int, default=40,
                        help='threads, each with its own connection (mind max_connections, often 100)')
    parser.add_argument('--rounds', type=int, default=3, help='fresh sales per strategy')
    parser.add_argument('--naive-pause-ms', type=float, default=0.0,
                        help='(a) only: sleep between its read and its write, to widen the race window')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--keep', action='store_true', help='keep the scratch schema for inspection')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.database_url:
        # As the server does: no database configured, an embedded one (here
        # a throwaway one in a temporary directory, gone when the demo ends).
        import tempfile

        from resources import embedded

        print('race_demo: no --database-url: starting a throwaway embedded PostgreSQL', file=sys.stderr)
        args.database_url = embedded.start(tempfile.mkdtemp(prefix='race-demo-'), delete_on_exit=True)
    rng = random.Random(args.seed)
    pause = args.naive_pause_ms / 1000
    started = time.monotonic()
    user_ids = prepare(args.database_url, args.schema, args.users)
    clicks = len(user_ids) + args.tabbed_users * (args.tabs - 1)
    print(f'crowd: {args.users} users, {args.tabbed_users} of them in {args.tabs} tabs at once '
          f'= {clicks} clicks; stock {args.stock}; {args.connections} connections released by a barrier; '
          f'{args.rounds} rounds per strategy, each on a fresh sale (schema "{args.schema}")')
    if pause:
        print(f'note: (a) sleeps {args.naive_pause_ms:g} ms between its read and its write to widen the window')
    else:
        print('note: nothing widens any window: no sleeps, every strategy runs as fast as it can')
    print()
    all_ok = {}
    for key, title, buy, why in STRATEGIES:
        print(f'({key}) {title}')
        results = []
        for n in range(args.rounds):
            sale_id = new_sale(args.database_url, args.schema, args.stock)
            order = clicks_for(user_ids, args.tabbed_users, args.tabs, rng)
            STATEMENTS[0] = 0
            if isinstance(buy, BatchedBuyer):
                buy.start(args.database_url, args.schema, args.connections)
            t0 = time.monotonic()
            try:
                failures = run_round(args.database_url, args.schema, buy, sale_id, order, args.connections, pause)
            finally:
                if isinstance(buy, BatchedBuyer):
                    buy.stop()
            took = time.monotonic() - t0
            out = sale_outcome(args.database_url, args.schema, sale_id)
            oversold, leaked, ok = verdict(out, args.stock, len(user_ids))
            results.append(ok)
            print(f'  round {n + 1}: {out["orders"]:>3} orders, {out["remaining"]:>3} left of {out["total"]}, '
                  f'oversold {oversold:>3}, leaked {leaked:>3}  '
                  f'{"correct" if ok else "WRONG"}  ({STATEMENTS[0]} statements, {took * 1000:.0f} ms'
                  + (f', {len(failures)} errors: {type(failures[0]).__name__}' if failures else '') + ')')
        wrong = results.count(False)
        all_ok[key] = wrong == 0
        print('  verdict: ' + (f'WRONG in {wrong} of {len(results)} rounds' if wrong
                                else f'correct in all {len(results)} rounds'))
        print(f'  why: {why}')
        print()
    if not args.keep:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL('DROP SCHEMA IF EXISTS {} CASCADE').format(pgsql.Identifier(args.schema)))
    print(f'done in {time.monotonic() - started:.1f} s')
    # The demo "passes" when the shipped statement is correct; (a) and (b) are expected to fail.
    return 0 if all_ok['c'] and all_ok['d'] else 1


if __name__ == '__main__':
    sys.exit(main())
