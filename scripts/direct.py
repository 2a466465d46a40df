"""The purchase statements straight through psycopg, no HTTP: what the
database side can do (the benchmark's `direct` and `standby` runs), and what
the orders of a run say about its statements."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

import invariants
from loadreport import latency_summary
from private_postgres import PrivatePostgres
from resources import database
from resources import sql as flashsale_sql

# The batched statement sells every user in this many sales, one after
# another, so that it runs long enough to time (one sale's 2,000 users are
# only 32 statements).
BATCHED_SALES = 5


def new_users_and_sales(url, users, sales=1):
    """`users` users and `sales` open sales with a unit for each of them,
    straight into the database: (user ids, sale ids)."""
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [row[0] for row in conn.execute(
            "INSERT INTO users (email, password_hash) SELECT 'direct-' || gen_random_uuid() "
            "|| '@example.com', 'x' FROM generate_series(1, %s) RETURNING id", (users,))]
        sale_ids = [conn.execute(
            'INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) '
            "VALUES ('direct', now() - interval '1 second', now() + interval '1 hour', %s, %s) RETURNING id",
            (users, users)).fetchone()[0] for _ in range(sales)]
    return ids, sale_ids


def past_sales(url, count):
    """`count` sales that ended, one a day back, straight into the database:
    a shop's history, for the list and the polls to be measured beside."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock, created_at) "
            "SELECT 'Past sale ' || n, now() - n * interval '1 day', now() - n * interval '1 day' + interval '1 hour', "
            "100, 0, now() - n * interval '1 day' FROM generate_series(1, %s) AS n", (count,))


def single_and_batched(url, users, sessions=8, batch=64):
    """sql.PURCHASE for every user once, then sql.PURCHASE_BATCH for every
    user in BATCHED_SALES sales, from `sessions` connections: two results."""
    ids, (sale, *sales) = new_users_and_sales(url, users, 1 + BATCHED_SALES)
    single = direct_purchases(url, sale, ids, sessions)
    single['statements'] = statement_sizes(url, sale)
    batched = direct_batches(url, sales, ids, sessions, batch)
    batched['statements'] = statement_sizes(url, *sales)
    return single, batched


def standby_cost(workdir, levels, purchases, repeat, log):
    """PURCHASE straight through psycopg with an asynchronous and then a
    synchronous standby, in turns (`repeat` rounds, same cluster): {(level,
    'async'|'sync'): [result, ...]}."""
    rows = {}
    with PrivatePostgres(Path(workdir) / 'primary') as primary:
        with psycopg.connect(primary.url, autocommit=True) as conn:
            database.apply_schema(conn)
        with primary.add_standby(Path(workdir) / 'standby', synchronous=False) as standby:
            for round_ in range(repeat):
                for mode in ('async', 'sync'):
                    primary.set_synchronous(standby if mode == 'sync' else None)
                    for level in levels:
                        ids, (sale,) = new_users_and_sales(primary.url, purchases)
                        log(f'round {round_ + 1}: {mode} standby, {level} sessions ...')
                        rows.setdefault((level, mode), []).append(direct_purchases(primary.url, sale, ids, level))
    return rows


def run_released(database_url, user_ids, concurrency, work):
    """work(k, conn, mine) in `concurrency` threads, each with a connection of
    its own and its share (`mine`) of user_ids, timed from when they are all
    connected until the last one ends: seconds."""
    barrier = threading.Barrier(concurrency + 1)

    def worker(k):
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row,
                             options='-c TimeZone=UTC') as conn:
            mine = user_ids[k::concurrency]
            barrier.wait()
            work(k, conn, mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def direct_purchases(database_url, sale_id, user_ids, concurrency):
    """sql.PURCHASE for every user once, from `concurrency` threads with a connection each."""
    latencies = [[] for _ in range(concurrency)]
    outcomes = [collections.Counter() for _ in range(concurrency)]

    def work(k, conn, mine):
        for user_id in mine:
            started = time.perf_counter()
            try:
                row = conn.execute(flashsale_sql.PURCHASE, {'sale_id': sale_id, 'user_id': user_id,
                                                            'generation': 0}).fetchone()
                outcome = row['outcome']
            except psycopg.errors.UniqueViolation:
                outcome = 'already_purchased'
            latencies[k].append(time.perf_counter() - started)
            outcomes[k][outcome] += 1

    elapsed = run_released(database_url, user_ids, concurrency, work)
    merged = sum(outcomes, collections.Counter())
    flat = [v for part in latencies for v in part]
    with psycopg.connect(database_url, autocommit=True) as conn:
        state = invariants.sale_state(conn, sale_id)
    return {
        'concurrency': concurrency,
        'requests': len(flat),
        'rate': round(len(flat) / elapsed, 1),
        'latency_ms': latency_summary(flat),
        'outcomes': dict(merged),
        'invariant_ok': not invariants.failures(invariants.stock_checks(state))
        and merged.get('created', 0) == state.orders,
    }


def direct_batches(database_url, sale_ids, user_ids, concurrency, batch):
    """sql.PURCHASE_BATCH over every user once in each sale (sale after sale),
    `batch` users per statement, from `concurrency` threads with a connection
    each."""
    counts = [0] * concurrency

    def work(k, conn, mine):
        for sale_id in sale_ids:
            for i in range(0, len(mine), batch):
                chunk = mine[i:i + batch]
                while chunk:
                    rows = conn.execute(flashsale_sql.PURCHASE_BATCH, {
                        'sale_id': sale_id, 'user_ids': chunk, 'generations': [0] * len(chunk),
                    }).fetchall()
                    counts[k] += sum(1 for r in rows if r['outcome'] == 'created')
                    chunk = [u for u, r in zip(chunk, rows) if r['outcome'] == 'retry']

    elapsed = run_released(database_url, user_ids, concurrency, work)
    wanted = len(user_ids) * len(sale_ids)
    return {'concurrency': concurrency, 'batch': batch, 'rate': round(wanted / elapsed, 1),
            'created': sum(counts), 'invariant_ok': sum(counts) == wanted}


def statement_sizes(database_url, *sale_ids):
    """(statements, mean orders per statement, largest) of these sales' orders:
    the orders one transaction wrote share its id, xmin."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        sizes = [n for (n,) in conn.execute(
            'SELECT count(*) FROM orders WHERE flash_sale_id = ANY(%s::uuid[]) GROUP BY xmin::text', (list(sale_ids),))]
    if not sizes:
        return {'statements': 0, 'mean': None, 'max': None}
    return {'statements': len(sizes), 'mean': round(sum(sizes) / len(sizes), 1), 'max': max(sizes)}


def set_commit_delay(database_url, delay_ms):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'ALTER SYSTEM SET commit_delay = {int(delay_ms * 1000)}')
        conn.execute('SELECT pg_reload_conf()')
