"""The purchase under real concurrency: threads firing real HTTP requests at
the real waitress server and PostgreSQL at once, then the invariants checked
in the database."""

import collections
import dataclasses
import http.client
import json
import threading
import time
import urllib.parse

import invariants
import pytest
import webtest

import flashsale
from conftest import assert_orders_match_answers
from conftest import auth
from conftest import backends_waiting_on_a_lock
from conftest import hold_sale_row
from conftest import race
from conftest import sale_state
from conftest import wait_for
from resources import database


def codes(results):
    return collections.Counter(code or status for status, code, _ in results)


def race_and_check(base_url, db, sale_id, users, tabs=1):
    """Every user's purchase, `tabs` times each, all at once; then every
    invariant of scripts/invariants.py (stock conserved, one order per user,
    every 201 its user's order, no order without a 201). Returns the answers'
    codes."""
    buyers = [user for user in users for _ in range(tabs)]
    results = race(base_url, [(sale_id, token) for _, token in buyers])
    state, orders = invariants.read_sale(db, sale_id)
    answers = [invariants.Answer(str(user), 'created' if status == 201 else code, (order or {}).get('id'))
               for (user, _), (status, code, order) in zip(buyers, results)]
    checks = invariants.check_sale(state, orders, answers)
    assert not invariants.failures(checks), checks
    return codes(results)


@pytest.fixture(scope='module')
def app_with(settings):
    """app_with(**settings) -> the app on a pool of its own with those
    settings (lock and statement timeouts are set per connection)."""
    pools = []

    def make(**overrides):
        changed = dataclasses.replace(settings, pool_size=4, **overrides)
        pool = database.open_pool(changed, changed.database_url)
        pool.wait()
        pools.append(pool)
        return flashsale.create_app(changed, pool)

    yield make
    for pool in pools:
        pool.close(timeout=1)


def purchases_in_threads(app, sale_id, tokens):
    """Start one purchase per token, each in its own thread through the WSGI
    app; returns (threads, answers) with answers[i] = (status, code, order)."""
    answers = [None] * len(tokens)

    def buy(index, token):
        resp = webtest.TestApp(app).post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token),
                                         expect_errors=True)
        answers[index] = (resp.status_int, resp.json.get('code'), resp.json.get('order'))

    threads = [threading.Thread(target=buy, args=(i, token)) for i, token in enumerate(tokens)]
    for t in threads:
        t.start()
    return threads, answers


def test_two_tabs_queued_on_the_sale_row_get_one_order_and_stock_drops_by_one(
        app_with, database_url, make_users, make_sale, db):
    """The race that matters most, made to happen every time: the sale row is
    held, the same user's two purchases both start (so both read a snapshot
    without the other's order) and queue on the row, then the row is let go.
    Only the unique constraint can stop the second one now: it must be 409
    already_purchased with its decrement rolled back. (ON CONFLICT DO NOTHING
    would keep the decrement and drop the order; without the constraint it
    would be a second order.) The tabs go to two apps, as to two server
    processes: within one, the second would queue for the next statement of
    the sale (resources/batching.py) and see the first's order."""
    apps = [app_with(lock_timeout_ms=30_000, statement_timeout_ms=30_000) for _ in range(2)]
    sale_id = make_sale(stock=10)
    [(_, token)] = make_users(1)
    locker = hold_sale_row(database_url, sale_id)
    try:
        threads, answers = [], []
        for app in apps:
            started, answered = purchases_in_threads(app, sale_id, [token])
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
        app_with, database_url, make_users, make_sale, db):
    """A purchase that waits longer than LOCK_TIMEOUT for the sale row is
    503 overloaded and rolled back. The error must not be taken for sold out
    (the sold-out memory is set only by a real sold_out outcome): once the
    row is free, the same app sells to the same user and to another."""
    app = app_with(lock_timeout_ms=300)
    client = webtest.TestApp(app)
    sale_id = make_sale(stock=5)
    (_, first), (_, second) = make_users(2)
    locker = hold_sale_row(database_url, sale_id)
    try:
        resp = client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(first), expect_errors=True)
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


def test_many_users_little_stock_sells_exactly_the_stock(live_server, make_users, make_sale, db):
    sale_id = make_sale(stock=50)
    assert race_and_check(live_server, db, sale_id, make_users(200)) == {201: 50, 'sold_out': 150}
    assert sale_state(db, sale_id) == (50, 0, 50)


def test_one_user_many_tabs_gets_one_order_and_stock_drops_by_one(live_server, make_users, make_sale, db):
    """Several users each racing 10 tabs of their own at once: a duplicate
    check that reads a snapshot would let a tab's decrement through and then
    drop its order, leaking a unit. Stock must drop by exactly the number of
    users."""
    sale_id = make_sale(stock=100)
    assert race_and_check(live_server, db, sale_id, make_users(8), tabs=10) == {201: 8, 'already_purchased': 72}
    assert sale_state(db, sale_id) == (100, 92, 8)


def test_one_user_twenty_five_tabs(live_server, make_users, make_sale, db):
    sale_id = make_sale(stock=10)
    assert race_and_check(live_server, db, sale_id, make_users(1), tabs=25) == {201: 1, 'already_purchased': 24}
    assert sale_state(db, sale_id) == (10, 9, 1)


def test_the_last_item_goes_to_exactly_one_user(live_server, make_users, make_sale, db):
    sale_id = make_sale(stock=1)
    assert race_and_check(live_server, db, sale_id, make_users(30)) == {201: 1, 'sold_out': 29}
    assert sale_state(db, sale_id) == (1, 0, 1)


def test_the_window_holds_under_a_stampede(live_server, make_users, make_sale, db):
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
    address = urllib.parse.urlsplit(live_server)
    results = {user_id: [] for user_id, _ in users}
    give_up = time.monotonic() + 120

    def keep_buying(user_id, token):
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        while time.monotonic() < give_up:
            conn.request('POST', f'/api/flash-sales/{sale_id}/purchase', headers={'Authorization': f'Bearer {token}'})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            results[user_id].append(body.get('code') or resp.status)
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
