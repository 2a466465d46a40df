"""Batched purchases (resources/batching.py, sql.PURCHASE_BATCH) under real
concurrency: real waitress servers, real threads and processes, the real
database, then the invariants.

Batches are made deterministic where the test is about one batch: a test
connection holds the sale row's lock, so the first purchase's statement waits
on it (seen in pg_stat_activity) and the next ones queue behind it (seen in
Batches.queued); releasing the lock lets them run as one statement. Which
orders came from one statement is read from the database: the rows a
transaction wrote carry its id in xmin.
"""

import collections
import dataclasses
import http.client
import json
import os
import signal
import threading
import time

import invariants
import psycopg
import pytest

import flashsale
from conftest import ServerInThread
from conftest import TEST_SECRET
from conftest import auth
from conftest import counted
from conftest import free_port
from conftest import race
from conftest import run_together
from conftest import sale_state
from conftest import scrape
from conftest import start_serve
from resources import database
from resources import serving


def wait_for(predicate, timeout=20, message='condition'):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {message() if callable(message) else message}')
        time.sleep(0.005)


@pytest.fixture
def server(settings, database_url, each_server):
    """server(**settings overrides) -> (base URL, Batches): the real server
    as `flashsale serve` builds it, with a pool and batches of its own,
    under each server."""
    made = []

    def start(**overrides):
        mine = dataclasses.replace(settings, **{'threads': 64, 'pool_size': 8, 'port': 0, **overrides})
        pool = database.open_pool(mine, database_url)
        batches = flashsale.purchase_batches(mine, pool)
        srv = ServerInThread(flashsale.create_app(mine, pool, batches), mine,
                             on_stop=lambda: batches.stop(mine.shutdown_timeout / 2), engine=each_server)
        made.append((srv, pool))
        return srv.base_url, batches

    yield start
    for srv, pool in made:
        srv.stop()
        pool.close(timeout=1)


def buy(base_url, sale_id, token):
    """(status, code, order) of one purchase over a new connection."""
    host, port = base_url.removeprefix('http://').split(':')
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request('POST', f'/api/flash-sales/{sale_id}/purchase', headers=auth(token))
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    return resp.status, body.get('code'), body.get('order')


class Buyers:
    """Purchases started one at a time, in a known order, each in its own thread."""

    def __init__(self, base_url, sale_id):
        self.base_url, self.sale_id = base_url, sale_id
        self.threads, self.results = [], {}

    def start(self, key, token):
        def run():
            self.results[key] = buy(self.base_url, self.sale_id, token)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def join(self):
        for thread in self.threads:
            thread.join(90)
        assert not any(t.is_alive() for t in self.threads)
        return self.results


def hold_sale_row(database_url, sale_id):
    """A test connection holding the sale row's lock in an open transaction
    (as a purchase in another process would); rollback() lets go."""
    holder = psycopg.connect(database_url)
    holder.execute('UPDATE flash_sales SET remaining_stock = remaining_stock WHERE id = %s', (sale_id,))
    return holder


def lock_waiters(db, like='%'):
    return db.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
        (like,)).fetchone()['n']


def start_first_then_queue(buyers, batches, db, first, queued):
    """`first` runs its statement (waiting on the held row); each of `queued`
    (key, token) is started only once the one before it is in the queue."""
    buyers.start(*first)
    wait_for(lambda: lock_waiters(db) == 1, message='the first purchase to wait on the row')
    for i, (key, token) in enumerate(queued, 1):
        buyers.start(key, token)
        wait_for(lambda i=i: batches.queued(buyers.sale_id) == i, message=f'{i} purchases queued')


def batch_behind_held_row(base, batches, db, database_url, sale_id, tokens):
    """Hold the sale row; the first of `tokens` runs its statement alone
    (waiting on the row), the rest queue for the next one, in order. Returns
    (holder, buyers), keyed by index."""
    holder = hold_sale_row(database_url, sale_id)
    buyers = Buyers(base, sale_id)
    start_first_then_queue(buyers, batches, db, (0, tokens[0]), list(enumerate(tokens))[1:])
    return holder, buyers


def queued_batch(server, make_sale, make_users, db, database_url, stock, count, **settings):
    """A sale of `stock` whose row a test connection holds, and `count` users'
    purchases of it: the first alone on the row, the rest queued behind it
    (batch_behind_held_row). Returns (sale id, holder, buyers)."""
    base, batches = server(**settings)
    sale_id = make_sale(stock=stock)
    tokens = [token for _, token in make_users(count)]
    return (sale_id, *batch_behind_held_row(base, batches, db, database_url, sale_id, tokens))


def statements(db, sale_id):
    """The size of every statement that placed orders, in commit order."""
    rows = db.execute(
        'SELECT count(*) AS n FROM orders WHERE flash_sale_id = %s GROUP BY xmin::text ORDER BY min(created_at)',
        (sale_id,)).fetchall()
    return [row['n'] for row in rows]


def assert_invariants(db, sale_id, answers):
    """Every invariant of scripts/invariants.py for (status, code, order)
    answers whose users are known only from their orders: stock conserved, at
    most one order per user, every 201 its user's order and no other order;
    and no refusal carries an order."""
    state, orders_by_user = invariants.read_sale(db, sale_id)
    described = [invariants.Answer(order['userId'], 'created', order['id']) if status == 201
                 else invariants.Answer(f'refused-{i}', f'refused: {code}', None)
                 for i, (status, code, order) in enumerate(answers)]
    checks = invariants.check_sale(state, orders_by_user, described)
    assert not invariants.failures(checks), checks
    assert all(order is None for status, _, order in answers if status != 201)


def test_purchases_arriving_during_a_statement_go_in_the_next_one_and_the_earliest_arrivals_win(
        server, make_users, make_sale, db, database_url):
    sale_id, holder, buyers = queued_batch(server, make_sale, make_users, db, database_url, stock=5, count=12)
    holder.rollback()
    results = buyers.join()
    # The first alone; then one statement for the eleven queued, whose first
    # four arrivals get the four units left.
    assert [results[i][:2] for i in range(12)] == [(201, None)] * 5 + [(409, 'sold_out')] * 7
    assert statements(db, sale_id) == [1, 4]
    assert sale_state(db, sale_id) == (5, 0, 5)
    assert_invariants(db, sale_id, results.values())


def test_the_metrics_show_the_purchases_waiting_and_the_size_of_each_statement(
        server, make_users, make_sale, db, database_url):
    base, batches = server()
    sale_id = make_sale(stock=10)
    users = make_users(6)
    before = scrape(base)
    holder, buyers = batch_behind_held_row(base, batches, db, database_url, sale_id, [t for _, t in users])
    assert scrape(base)[('flashsale_purchases_waiting', ())] == 5
    holder.rollback()
    buyers.join()
    after = scrape(base)
    assert after[('flashsale_purchases_waiting', ())] == 0
    assert statements(db, sale_id) == [1, 5]
    changes = counted(before, after)
    assert changes[('flashsale_purchase_statements_total', ())] == 2
    assert changes[('flashsale_purchase_batch_size_count', ())] == 2
    sizes = {le: after[('flashsale_purchase_batch_size_bucket', (('le', le),))]
             - before[('flashsale_purchase_batch_size_bucket', (('le', le),))] for le in ('1.0', '4.0', '8.0')}
    assert sizes == {'1.0': 1, '4.0': 1, '8.0': 2}  # one of 1, one of 5 (cumulative buckets)


def test_tabs_of_one_user_in_the_same_and_in_different_batches_make_one_order(
        server, make_users, make_sale, db, database_url):
    base, batches = server()
    sale_id = make_sale(stock=10)
    (a, token_a), (b, token_b), (c, token_c) = make_users(3)
    holder = hold_sale_row(database_url, sale_id)
    buyers = Buyers(base, sale_id)
    # A's first tab runs alone; five more of A's tabs, five of B's and one of
    # C's queue behind it, interleaved.
    order = ['a', 'b', 'a', 'a', 'c', 'b', 'a', 'b', 'a', 'b', 'b']
    tokens = {'a': token_a, 'b': token_b, 'c': token_c}
    start_first_then_queue(buyers, batches, db, (('a', 0), token_a),
                           [((who, i), tokens[who]) for i, who in enumerate(order, 1)])
    holder.rollback()
    results = buyers.join()
    assert results[('a', 0)][0] == 201
    firsts = {('b', 2), ('c', 5)}
    for (who, i), (status, code, _) in results.items():
        if (who, i) == ('a', 0) or (who, i) in firsts:
            assert status == 201, (who, i)
        else:
            assert (status, code) == (409, 'already_purchased'), (who, i)
    assert statements(db, sale_id) == [1, 2]
    assert sale_state(db, sale_id) == (10, 7, 3)
    assert_invariants(db, sale_id, results.values())


def test_in_a_batch_that_sells_out_a_second_tab_of_a_refused_user_is_sold_out_too(
        server, make_users, make_sale, db, database_url):
    """What each tab would have been told alone, in arrival order: B buys the
    last unit, B's second tab has bought already, C's tabs find it sold out."""
    base, batches = server()
    sale_id = make_sale(stock=2)
    (_, token_a), (_, token_b), (_, token_c) = make_users(3)
    holder = hold_sale_row(database_url, sale_id)
    buyers = Buyers(base, sale_id)
    start_first_then_queue(buyers, batches, db, ('a', token_a),
                           [('b1', token_b), ('a2', token_a), ('b2', token_b), ('c1', token_c), ('c2', token_c)])
    holder.rollback()
    results = buyers.join()
    assert {k: v[:2] for k, v in results.items()} == {
        'a': (201, None), 'b1': (201, None), 'a2': (409, 'already_purchased'),
        'b2': (409, 'already_purchased'), 'c1': (409, 'sold_out'), 'c2': (409, 'sold_out')}
    assert sale_state(db, sale_id) == (2, 0, 2)
    assert_invariants(db, sale_id, results.values())


def closed_loop(base_url, sale_id, tokens, connections):
    """Every token's purchase once, from `connections` keep-alive clients."""
    host, port = base_url.removeprefix('http://').split(':')
    todo = iter(enumerate(tokens))
    lock = threading.Lock()
    answers = [None] * len(tokens)

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while True:
            with lock:
                i, token = next(todo, (None, None))
            if i is None:
                break
            conn.request('POST', f'/api/flash-sales/{sale_id}/purchase', headers=auth(token))
            resp = conn.getresponse()
            body = json.loads(resp.read())
            answers[i] = (resp.status, body.get('code'), body.get('order'))
        conn.close()

    run_together([client] * connections, timeout=300)
    return answers


def test_a_revoked_token_in_a_batch_is_refused_alone_and_the_rest_of_the_batch_buys(
        server, make_users, make_sale, credentials, db, database_url):
    """Seven purchases queue behind a held row and go in one statement: a
    token of a revoked generation and one of a deleted user are refused and
    take no unit, so the units left go to the next arrivals; a token of the
    user's new generation buys (the generation comes with each request)."""
    base, batches = server()
    sale_id = make_sale(stock=4)
    (first, t_first), (u1, t1), (revoked, t_revoked), (renewed, _), (u4, t4), (tabbed, t_tabbed_old), \
        (deleted, t_deleted) = make_users(7)
    db.execute('UPDATE users SET token_generation = 1 WHERE id = ANY(%s)', ([revoked, renewed, tabbed],))
    db.execute('DELETE FROM users WHERE id = %s', (deleted,))
    tokens = [t_first, t1, t_revoked, credentials.issue(renewed, 1), t_tabbed_old, t4,
              credentials.issue(tabbed, 1), t_deleted]
    holder, buyers = batch_behind_held_row(base, batches, db, database_url, sale_id, tokens)
    holder.rollback()
    results = buyers.join()
    # The first alone takes one unit; the batch's three go to the first three
    # members whose tokens are good, the revoked ones in between taking none.
    assert [results[i][:2] for i in range(8)] == [
        (201, None), (201, None), (401, 'session_revoked'), (201, None),
        (401, 'session_revoked'), (201, None), (409, 'sold_out'), (401, 'invalid_token')]
    assert statements(db, sale_id) == [1, 3]
    assert sale_state(db, sale_id) == (4, 0, 4)
    assert {r['user_id'] for r in db.execute('SELECT user_id FROM orders')} == {first, u1, renewed, u4}
    assert_invariants(db, sale_id, results.values())


def test_thousands_of_distinct_users_sell_exactly_the_stock_in_batches(server, make_users, make_sale, db):
    base, _ = server()
    sale_id = make_sale(stock=1777)
    users = make_users(3000)
    answers = closed_loop(base, sale_id, [token for _, token in users], connections=64)
    counts = collections.Counter(code or status for status, code, _ in answers)
    assert counts == {201: 1777, 'sold_out': 1223}
    assert sale_state(db, sale_id) == (1777, 0, 1777)
    assert_invariants(db, sale_id, answers)
    sizes = statements(db, sale_id)
    assert sum(sizes) == 1777 and max(sizes) > 1  # batched: fewer statements than orders


def check_tab_race(db, sale_id, users, answers, stock):
    """Users racing in several tabs: exactly the stock sold (more users than
    stock), one order per buyer, and a user told already_purchased has one."""
    assert_invariants(db, sale_id, answers)
    assert sale_state(db, sale_id) == (stock, 0, stock)
    buyers = {str(r['user_id']) for r in db.execute('SELECT user_id FROM orders WHERE flash_sale_id = %s', (sale_id,))}
    by_user = collections.defaultdict(list)
    for (user_id, _), answer in zip(users, answers):
        by_user[str(user_id)].append(answer[1] or answer[0])
    for user_id, codes in by_user.items():
        if user_id in buyers:
            # A buyer's later tabs may be refused sold_out from the
            # process's sold-out memory (orders.Purchase), which never asks who.
            assert codes.count(201) == 1 and set(codes) <= {201, 'already_purchased', 'sold_out'}, codes
        else:
            assert set(codes) == {'sold_out'}, codes


def test_users_in_six_tabs_at_once_get_one_order_each(server, make_users, make_sale, db):
    base, _ = server()
    sale_id = make_sale(stock=25)
    users = [user for user in make_users(40) for _ in range(6)]
    answers = race(base, [(sale_id, token) for _, token in users])
    check_tab_race(db, sale_id, users, answers, stock=25)


def test_batch_size_one_is_one_statement_per_order_and_still_correct(server, make_users, make_sale, db):
    # One statement at a time for 240 purchases: on a busy machine the last in
    # the queue waits longer than the default 5 s queue deadline (the pool
    # timeout), which is not what this test is about.
    base, _ = server(purchase_batch_max=1, pool_timeout=60.0)
    sale_id = make_sale(stock=25)
    users = [user for user in make_users(40) for _ in range(6)]
    answers = race(base, [(sale_id, token) for _, token in users])
    check_tab_race(db, sale_id, users, answers, stock=25)
    assert statements(db, sale_id) == [1] * 25


def test_a_racing_duplicate_from_another_process_aborts_the_batch_and_every_member_settles(
        server, make_users, make_sale, db, database_url):
    """The unique_violation path, made to happen: the batch [X, Y] takes its
    snapshot while another process's purchase of X holds the row, then that
    purchase commits X's order. The batch's plain insert of X raises
    unique_violation, nothing of the batch is kept, and the batch runs again:
    X is told already_purchased, Y gets its order.

    One step is the scheduler's: when the first purchase commits, the other
    process's purchase (woken from its wait on the row) and the batch (just
    started) both go for the row. If the batch gets there first, it buys for
    X and Y and the other purchase is rolled back; that attempt is checked and
    the scenario runs again on a new sale, until the batch is seen waiting."""
    base, batches = server(lock_timeout_ms=30_000, statement_timeout_ms=30_000)
    for attempt in range(8):
        sale_id = make_sale(stock=10)
        (u1, t1), (x, tx), (_, ty) = make_users(3)
        blocker = psycopg.connect(database_url)
        other = psycopg.connect(database_url)
        buyers = Buyers(base, sale_id)
        try:
            # 1. Keep the first purchase (U1's) in flight: its insert waits
            #    on an uncommitted order of U1's that is later rolled back.
            blocker.execute('INSERT INTO orders (flash_sale_id, user_id) VALUES (%s, %s)', (sale_id, u1))
            start_first_then_queue(buyers, batches, db, ('u1', t1), [('x', tx), ('y', ty)])
            # 2. "Another process" buys for X: it queues on the row U1's
            #    statement holds.
            decrement = threading.Thread(target=other.execute, args=(
                'UPDATE flash_sales SET remaining_stock = remaining_stock - 1 WHERE id = %s', (sale_id,)))
            decrement.start()
            wait_for(lambda: lock_waiters(db) == 2, message='the other purchase to queue on the row')
            # 3. U1's statement completes; the batch starts (its snapshot
            #    cannot see X's order, not yet written) and queues on the row
            #    behind the other purchase, which then places X's order.
            blocker.rollback()
            decrement.join()
            wait_for(lambda: lock_waiters(db, '%unnest%') == 1 or len(buyers.results) == 3,
                     message='the batch to wait on the row, or to be done')
            if lock_waiters(db, '%unnest%') == 1:
                other.execute('INSERT INTO orders (flash_sale_id, user_id) VALUES (%s, %s)', (sale_id, x))
                other.commit()
            else:
                other.rollback()
            results = buyers.join()
        finally:
            blocker.close()
            other.close()
        stored = {str(r['user_id']) for r in db.execute('SELECT user_id FROM orders WHERE flash_sale_id = %s',
                                                        (sale_id,))}
        if batches.reruns == 0:
            # The batch went first: an ordinary batch.
            assert {k: v[:2] for k, v in results.items()} == {'u1': (201, None), 'x': (201, None), 'y': (201, None)}
            assert sale_state(db, sale_id) == (10, 7, 3)
            assert stored == {str(u1), str(x), results['y'][2]['userId']}
            continue
        assert {k: v[:2] for k, v in results.items()} == {
            'u1': (201, None), 'x': (409, 'already_purchased'), 'y': (201, None)}
        assert batches.reruns == 1
        assert sale_state(db, sale_id) == (10, 7, 3)
        assert stored == {str(u1), str(x), results['y'][2]['userId']}
        return
    pytest.fail('the batch never waited behind the other purchase in 8 attempts')


def test_two_server_processes_racing_the_same_users_keep_every_invariant(
        make_users, make_sale, db, database_url, tmp_path):
    """Every user's six tabs split over two `flashsale serve` processes, so
    each process's batches race the other's for the same users."""
    bases, procs = [], []
    for n in range(2):
        port = free_port()
        env = dict(os.environ, DATABASE_URL=database_url, JWT_SECRET=TEST_SECRET, PORT=str(port),
                   THREADS='64', POOL_SIZE='4', BCRYPT_ROUNDS='4', LOG_LEVEL='WARNING')
        procs.append(start_serve(env, tmp_path / f'serve-{n}.log'))
        bases.append(f'http://127.0.0.1:{port}')
    try:
        sale_id = make_sale(stock=30)
        users = [user for user in make_users(60) for _ in range(6)]
        answers = [None] * len(users)
        barrier = threading.Barrier(len(users))

        def fire(i, token):
            barrier.wait(60)
            answers[i] = buy(bases[i % 2], sale_id, token)

        threads = [threading.Thread(target=fire, args=(i, token)) for i, (_, token) in enumerate(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check_tab_race(db, sale_id, users, answers, stock=30)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0


def test_a_sale_that_ends_while_a_batch_waits_refuses_the_batch_sale_ended(
        server, make_users, make_sale, db, database_url):
    """The first purchase's statement began inside the window (its now()), so
    it places its order even though it commits after the end; the batch
    queued behind it runs after the end, and is told sale_ended."""
    base, batches = server(lock_timeout_ms=30_000)
    sale_id = make_sale(stock=10, ends_in=2.0)
    users = make_users(5)
    holder, buyers = batch_behind_held_row(base, batches, db, database_url, sale_id, [t for _, t in users])
    wait_for(lambda: db.execute('SELECT now() >= end_date AS ended FROM flash_sales WHERE id = %s',
                                (sale_id,)).fetchone()['ended'], message='the sale to end')
    holder.rollback()
    results = buyers.join()
    assert results[0][0] == 201
    assert [results[i][:2] for i in range(1, 5)] == [(409, 'sale_ended')] * 4
    assert sale_state(db, sale_id) == (10, 9, 1)
    assert_invariants(db, sale_id, results.values())
    inside = db.execute('SELECT o.created_at < s.end_date AS yes FROM orders o JOIN flash_sales s '
                        'ON s.id = o.flash_sale_id WHERE s.id = %s', (sale_id,)).fetchone()
    assert inside['yes']


# --- failures: every member gets the single purchase's answer ------------------


def test_a_batch_that_times_out_on_the_row_answers_every_member_overloaded(
        server, make_users, make_sale, db, database_url):
    sale_id, holder, buyers = queued_batch(server, make_sale, make_users, db, database_url, stock=10, count=4,
                                           lock_timeout_ms=400)
    results = buyers.join()  # the row is still held: the lone statement and then the batch time out
    holder.rollback()
    assert [results[i][:2] for i in range(4)] == [(503, 'overloaded')] * 4
    assert sale_state(db, sale_id) == (10, 10, 0)


def test_a_batch_whose_connection_is_lost_answers_every_member_outcome_unknown(
        server, make_users, make_sale, db, database_url):
    base, batches = server()
    sale_id = make_sale(stock=10)
    users = make_users(4)
    before = scrape(base)
    holder, buyers = batch_behind_held_row(base, batches, db, database_url, sale_id, [t for _, t in users])

    def cut(like):
        wait_for(lambda: lock_waiters(db, like) == 1, message=f'a statement like {like} waiting')
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE wait_event_type = 'Lock' AND query LIKE %s", (like,))

    cut('%bought_before%')  # the lone purchase
    cut('%unnest%')  # then the batch of three
    results = buyers.join()
    holder.rollback()
    assert [results[i][:2] for i in range(4)] == [(503, 'outcome_unknown')] * 4
    assert sale_state(db, sale_id) == (10, 10, 0)
    # And the metrics count them.
    changes = counted(before, scrape(base))
    assert changes[('flashsale_purchases_total', (('outcome', 'outcome_unknown'),))] == 4
    assert changes[('flashsale_http_errors_total', (('code', 'outcome_unknown'),
                                                    ('route', '/api/flash-sales/{sale_id}/purchase')))] == 4


def test_a_queued_purchase_waits_no_longer_than_the_pool_timeout(server, make_users, make_sale, db, database_url):
    base, batches = server(pool_timeout=1.0, lock_timeout_ms=20_000)
    sale_id = make_sale(stock=10)
    users = make_users(4)
    holder = hold_sale_row(database_url, sale_id)
    buyers = Buyers(base, sale_id)
    buyers.start(0, users[0][1])
    wait_for(lambda: lock_waiters(db) == 1, message='the first purchase to wait on the row')
    started = time.monotonic()
    for i in range(1, 4):
        buyers.start(i, users[i][1])
    for thread in buyers.threads[1:]:
        thread.join(30)
    took = time.monotonic() - started
    # Queued behind a statement that cannot finish: 503 after the pool
    # timeout, while the row is still held (nothing was bought).
    assert [buyers.results[i][:2] for i in range(1, 4)] == [(503, 'overloaded')] * 3
    assert 1.0 <= took < 1.0 + 2
    holder.rollback()
    results = buyers.join()
    assert results[0][0] == 201
    assert sale_state(db, sale_id) == (10, 9, 1)
    assert_invariants(db, sale_id, results.values())


def test_sigterm_answers_every_queued_purchase_before_the_server_stops(
        settings, make_users, make_sale, db, database_url):
    """Queued purchases would wait the pool timeout (5 s) for a statement,
    past the 2 s grace: on SIGTERM they are answered 503 overloaded (nothing
    was bought) within half the grace, while the row is still held. The
    server runs here as flashsale serve runs it (serving.serve with the
    batches' stop; a real process' signal reaches that stop list in
    tests/test_process_life.py)."""
    mine = dataclasses.replace(settings, threads=16, port=0, lock_timeout_ms=1500)
    pool = database.open_pool(mine, database_url)
    batches = flashsale.purchase_batches(mine, pool)
    srv = serving.create_server(flashsale.create_app(mine, pool, batches), mine)
    sale_id = make_sale(stock=10)
    users = make_users(4)
    holder = hold_sale_row(database_url, sale_id)
    buyers = Buyers(f'http://127.0.0.1:{srv.effective_port}', sale_id)

    stops = []

    def then_stop():
        start_first_then_queue(buyers, batches, db, (0, users[0][1]), [(i, users[i][1]) for i in range(1, 4)])
        stops.append(signal.SIGTERM)

    stopper = threading.Thread(target=then_stop)
    stopper.start()
    try:
        serving.serve(srv, 2.0, stops, on_stop=lambda: batches.stop(1.0))
    finally:
        stopper.join()
        results = buyers.join()
        holder.rollback()
        pool.close(timeout=1)
    # Every purchase answered: the queued ones at the stop, the one on the
    # row at its lock timeout. None bought anything.
    assert [results[i][:2] for i in range(4)] == [(503, 'overloaded')] * 4
    assert sale_state(db, sale_id) == (10, 10, 0)
