"""The purchase under real concurrency: threads firing real HTTP requests at
the real waitress server and PostgreSQL at once, then the invariants checked
in the database."""

import collections
import threading
import time

import webtest

from conftest import answer
from conftest import assert_orders_match_answers
from conftest import auth
from conftest import backends_waiting_on_a_lock
from conftest import connect
from conftest import hold_sale_row
from conftest import race_and_check
from conftest import sale_state
from conftest import send
from conftest import wait_for


def purchases_in_threads(app, sale_id, tokens, status):
    """Start one purchase per token, each in its own thread through the WSGI
    app, answered with one of `status`; returns (threads, answers) with
    answers[i] = (status, code, order)."""
    answers = [None] * len(tokens)

    def buy(index, token):
        resp = webtest.TestApp(app).post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token), status=status)
        answers[index] = (resp.status_int, resp.json.get('code'), resp.json.get('order'))

    threads = [threading.Thread(target=buy, args=(i, token)) for i, token in enumerate(tokens)]
    for t in threads:
        t.start()
    return threads, answers


def test_two_tabs_queued_on_the_sale_row_get_one_order_and_stock_drops_by_one(
        make_app, database_url, make_users, make_sale, db):
    """The race that matters most, made to happen every time: the sale row is
    held, the same user's two purchases both start (so both read a snapshot
    without the other's order) and queue on the row, then the row is let go.
    Only the unique constraint can stop the second one now: it must be 409
    already_purchased with its decrement rolled back. (ON CONFLICT DO NOTHING
    would keep the decrement and drop the order; without the constraint it
    would be a second order.) The tabs go to two apps, as to two server
    processes: within one, the second would queue for the next statement of
    the sale (resources/batching.py) and see the first's order."""
    apps = [make_app(pool_size=4, lock_timeout_ms=30_000, statement_timeout_ms=30_000).wsgi for _ in range(2)]
    sale_id = make_sale(stock=10)
    [(_, token)] = make_users(1)
    locker = hold_sale_row(database_url, sale_id)
    try:
        threads, answers = [], []
        for app in apps:
            started, answered = purchases_in_threads(app, sale_id, [token], status=[201, 409])
            threads += started
            answers.append(answered)
        wait_for(lambda: backends_waiting_on_a_lock(database_url) == 2, timeout=20,
                 message='both purchases to wait on the sale row')
    finally:
        locker.close()
    for t in threads:
        t.join(30)
    answers = [answer for answered in answers for answer in answered]
    assert None not in answers, answers
    assert collections.Counter((status, code) for status, code, _ in answers) == {
        (201, None): 1, (409, 'already_purchased'): 1}, answers
    assert sale_state(db, sale_id) == (10, 9, 1)
    assert_orders_match_answers(db, sale_id, answers)


def test_a_lock_timeout_is_503_and_poisons_nothing_the_same_app_then_sells(
        make_app, database_url, make_users, make_sale, db):
    """A purchase that waits longer than LOCK_TIMEOUT for the sale row is
    503 overloaded and rolled back. The error must not be taken for sold out
    (the sold-out memory is set only by a real sold_out outcome): once the
    row is free, the same app sells to the same user and to another."""
    client = make_app(pool_size=4, lock_timeout_ms=300).client
    sale_id = make_sale(stock=5)
    (_, first), (_, second) = make_users(2)
    locker = hold_sale_row(database_url, sale_id)
    try:
        resp = client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(first), status=503)
    finally:
        locker.close()
    assert (resp.status_int, resp.json['code']) == (503, 'overloaded'), resp.json
    assert int(resp.headers['Retry-After']) >= 1
    assert sale_state(db, sale_id) == (5, 5, 0)
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(first), status=201)
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(second), status=201)
    assert sale_state(db, sale_id) == (5, 3, 2)


def test_the_schema_holds_the_invariants_itself(db):
    """The guards the purchase statement relies on are constraints in the
    database, not just code: at most one order per user per sale (UNIQUE),
    stock within [0, total] (CHECK)."""
    rows = db.execute(
        "SELECT conname, contype, pg_get_constraintdef(oid) AS definition FROM pg_constraint "
        "WHERE conrelid IN ('orders'::regclass, 'flash_sales'::regclass) AND contype IN ('u', 'c')"
    ).fetchall()
    constraints = {row['conname']: (row['contype'], row['definition']) for row in rows}
    assert constraints.get('orders_one_per_user_per_sale') == ('u', 'UNIQUE (flash_sale_id, user_id)'), constraints
    assert constraints.get('flash_sales_stock_in_range') == (
        'c', 'CHECK (((remaining_stock >= 0) AND (remaining_stock <= total_stock)))'), constraints
    assert constraints.get('flash_sales_total_stock_positive') == ('c', 'CHECK ((total_stock > 0))'), constraints


def test_many_users_little_stock_sells_exactly_the_stock(raced_server, make_users, make_sale, db):
    sale_id = make_sale(stock=50)
    assert race_and_check(raced_server, db, sale_id, make_users(200)) == {201: 50, 'sold_out': 150}
    assert sale_state(db, sale_id) == (50, 0, 50)


def test_one_user_many_tabs_gets_one_order_and_stock_drops_by_one(raced_server, make_users, make_sale, db):
    """Several users each racing 10 tabs of their own at once: a duplicate
    check that reads a snapshot would let a tab's decrement through and then
    drop its order, leaking a unit. Stock must drop by exactly the number of
    users."""
    sale_id = make_sale(stock=100)
    assert race_and_check(raced_server, db, sale_id, make_users(8), tabs=10) == {201: 8, 'already_purchased': 72}
    assert sale_state(db, sale_id) == (100, 92, 8)


def test_one_user_twenty_five_tabs(raced_server, make_users, make_sale, db):
    sale_id = make_sale(stock=10)
    assert race_and_check(raced_server, db, sale_id, make_users(1), tabs=25) == {201: 1, 'already_purchased': 24}
    assert sale_state(db, sale_id) == (10, 9, 1)


def test_the_last_item_goes_to_exactly_one_user(raced_server, make_users, make_sale, db):
    sale_id = make_sale(stock=1)
    assert race_and_check(raced_server, db, sale_id, make_users(30)) == {201: 1, 'sold_out': 29}
    assert sale_state(db, sale_id) == (1, 0, 1)


def test_the_window_holds_under_a_stampede(raced_server, make_users, make_sale, db):
    """40 users keep buying while the sale opens and while it closes: every
    order placed lies inside [start, end), everyone refused before the start
    was told sale_not_started and after the end sale_ended, and each user
    bought exactly once. The test opens and closes the sale (start_date and
    end_date set to the database's now()) once every user has seen the state
    before: with a fixed short window, a user whose requests queued behind
    the others on a busy machine could miss the window entirely, so the
    order count could only be bounded, not known."""
    sale_id = make_sale(stock=1000, starts_in=3600, ends_in=7200)
    users = make_users(40)
    results = {user_id: [] for user_id, _ in users}
    give_up = time.monotonic() + 120

    def keep_buying(user_id, token):
        conn = connect(raced_server)  # one keep-alive connection per user
        while time.monotonic() < give_up:
            send(conn, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token)
            resp = answer(conn)
            results[user_id].append(resp.json.get('code') or resp.status)
            if results[user_id][-1] == 'sale_ended':
                break
            time.sleep(0.02)
        conn.close()

    threads = [threading.Thread(target=keep_buying, args=user) for user in users]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(results.values()), timeout=60, message='every user to be told sale_not_started')
        db.execute('UPDATE flash_sales SET start_date = now() WHERE id = %s', (sale_id,))
        wait_for(lambda: all(201 in answers for answers in results.values()), timeout=60,
                 message='every user to buy')
    finally:
        # (Also when a wait failed: the sale then ends for everyone, and the threads stop.)
        db.execute("UPDATE flash_sales SET start_date = least(start_date, now() - interval '1 second'), "
                   'end_date = now() WHERE id = %s', (sale_id,))
        for t in threads:
            t.join(60)

    window = db.execute(
        'SELECT count(*) AS outside FROM orders o JOIN flash_sales s ON s.id = o.flash_sale_id '
        'WHERE s.id = %s AND (o.created_at < s.start_date OR o.created_at >= s.end_date)',
        (sale_id,),
    ).fetchone()
    assert window['outside'] == 0
    assert sale_state(db, sale_id) == (1000, 1000 - len(users), len(users))
    assert len(results) == len(users)
    for user_id, answers in results.items():
        # Each user's answers run: not started..., then one 201, then
        # already_purchased..., then ended.
        phases = [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]
        assert phases in (['sale_not_started', 201, 'sale_ended'],
                          ['sale_not_started', 201, 'already_purchased', 'sale_ended']), phases
