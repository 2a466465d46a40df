"""The purchase under real concurrency: threads firing real HTTP requests at
the real waitress server and PostgreSQL at once, then the invariants checked
in the database."""

import collections
import http.client
import json
import threading
import time
import urllib.parse

import invariants
from conftest import race
from conftest import sale_state


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
    state = sale_state(db, sale_id)
    assert not invariants.failures(invariants.stock_checks(state)), state
    assert 0 < state.orders <= len(users)
    for user_id, answers in results.items():
        # Each user's answers run: not started..., then at most one 201 with
        # already_purchased after it, then ended...
        phases = [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]
        assert phases[0] == 'sale_not_started', phases
        assert phases[-1] == 'sale_ended', phases
        assert answers.count(201) <= 1
        assert set(phases) <= {'sale_not_started', 201, 'already_purchased', 'sale_ended'}
