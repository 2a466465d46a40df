"""The purchase under real concurrency: threads firing real HTTP requests at
the real waitress server and PostgreSQL at once, then the invariants checked
in the database."""

import collections
import http.client
import json
import threading
import time
import urllib.parse

from conftest import race
from conftest import sale_state


def codes(results):
    return collections.Counter(code or status for status, code, _ in results)


def assert_orders_match_answers(db, sale_id, results):
    """Every order answered 201 exists; no other order does."""
    answered = {r[2]['id'] for r in results if r[0] == 201}
    stored = {str(row['id']) for row in db.execute('SELECT id FROM orders WHERE flash_sale_id = %s', (sale_id,))}
    assert answered == stored


def test_many_users_little_stock_sells_exactly_the_stock(live_server, make_users, make_sale, db):
    sale_id = make_sale(stock=50)
    users = make_users(200)
    results = race(live_server, [(sale_id, token) for _, token in users])
    assert codes(results) == {201: 50, 'sold_out': 150}
    assert sale_state(db, sale_id) == (50, 0, 50)
    assert_orders_match_answers(db, sale_id, results)


def test_one_user_many_tabs_gets_one_order_and_stock_drops_by_one(live_server, make_users, make_sale, db):
    """Several users each racing 10 tabs of their own at once: a duplicate
    check that reads a snapshot would let a tab's decrement through and then
    drop its order, leaking a unit. Stock must drop by exactly the number of
    users."""
    sale_id = make_sale(stock=100)
    users = make_users(8)
    results = race(live_server, [(sale_id, token) for _, token in users for _ in range(10)])
    assert codes(results) == {201: 8, 'already_purchased': 72}
    assert sale_state(db, sale_id) == (100, 92, 8)
    per_user = collections.Counter(row['user_id'] for row in db.execute('SELECT user_id FROM orders'))
    assert sorted(per_user.values()) == [1] * 8
    assert_orders_match_answers(db, sale_id, results)


def test_one_user_twenty_five_tabs(live_server, make_users, make_sale, db):
    sale_id = make_sale(stock=10)
    [(_, token)] = make_users(1)
    results = race(live_server, [(sale_id, token)] * 25)
    assert codes(results) == {201: 1, 'already_purchased': 24}
    assert sale_state(db, sale_id) == (10, 9, 1)


def test_the_last_item_goes_to_exactly_one_user(live_server, make_users, make_sale, db):
    sale_id = make_sale(stock=1)
    results = race(live_server, [(sale_id, token) for _, token in make_users(30)])
    assert codes(results) == {201: 1, 'sold_out': 29}
    assert sale_state(db, sale_id) == (1, 0, 1)
    assert_orders_match_answers(db, sale_id, results)


def test_the_window_holds_under_a_stampede(live_server, make_users, make_sale, db):
    """Users keep buying across the opening and the closing of a short sale:
    every order placed lies inside [start, end), everyone refused before the
    start was told sale_not_started and after the end sale_ended, and stock
    remained throughout."""
    sale_id = make_sale(stock=1000, starts_in=0.6, ends_in=1.4)
    users = make_users(40)
    address = urllib.parse.urlsplit(live_server)
    results = collections.defaultdict(list)
    stop = time.monotonic() + 2.2

    def keep_buying(user_id, token):
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        while time.monotonic() < stop:
            conn.request('POST', f'/api/flash-sales/{sale_id}/purchase', headers={'Authorization': f'Bearer {token}'})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            results[user_id].append(body.get('code') or resp.status)
            time.sleep(0.02)
        conn.close()

    threads = [threading.Thread(target=keep_buying, args=user) for user in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    window = db.execute(
        'SELECT count(*) AS outside FROM orders o JOIN flash_sales s ON s.id = o.flash_sale_id '
        'WHERE s.id = %s AND (o.created_at < s.start_date OR o.created_at >= s.end_date)',
        (sale_id,),
    ).fetchone()
    assert window['outside'] == 0
    total, remaining, orders = sale_state(db, sale_id)
    assert remaining + orders == total
    assert 0 < orders <= len(users)
    for user_id, answers in results.items():
        # Each user's answers run: not started..., then at most one 201 with
        # already_purchased after it, then ended...
        phases = [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]
        assert phases[0] == 'sale_not_started', phases
        assert phases[-1] == 'sale_ended', phases
        assert answers.count(201) <= 1
        assert set(phases) <= {'sale_not_started', 201, 'already_purchased', 'sale_ended'}
