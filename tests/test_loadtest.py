"""scripts/scenarios.py against the real waitress server and PostgreSQL: small
crowd, single-user and sold-out runs with exact counts, and the invariant
checker (scripts/invariants.py, as the scenarios and the chaos run use it) on
outcomes that break each invariant."""

import json

import invariants
import scenarios
import pytest

from conftest import sale_state


@pytest.fixture
def admin_token(make_user):
    return make_user(admin=True)[1]


def run(scenario, live_server, admin_token, database_url, **options):
    # settle=0: the test app runs with poll_cache_ms=0, every read-back is fresh.
    return scenarios.run_scenario(scenario, base_url=live_server, admin_token=admin_token,
                                 database_url=database_url, settle=0, seed=7, **options)


def test_crowd_sells_exactly_the_stock_and_every_invariant_holds(live_server, admin_token, database_url, db):
    result = run('crowd', live_server, admin_token, database_url, users=20, stock=5, rate=200, duration=1)
    assert result['requests'] == 200
    assert result['errors'] == {}
    assert result['by_status']['201'] == 5
    assert result['by_status']['409'] == 195
    assert set(result['by_code']) <= {'201', '409 sold_out', '409 already_purchased'}
    assert result['users_sent'] == 20
    assert result['invariants']['verdict'] == 'pass', result['invariants']['checks']
    assert all(c['ok'] for c in result['invariants']['checks'])
    assert result['database'] == {'total': 5, 'remaining': 0, 'orders': 5, 'duplicates': 0}
    assert sale_state(db, result['sale']['id']) == (5, 0, 5)


def test_single_user_hammering_gets_exactly_one_order(live_server, admin_token, database_url, db):
    result = run('single-user', live_server, admin_token, database_url, stock=3, rate=200, duration=1)
    assert result['by_code'] == {'409 already_purchased': 199, '201': 1}
    assert result['invariants']['verdict'] == 'pass', result['invariants']['checks']
    assert sale_state(db, result['sale']['id']) == (3, 2, 1)


def test_sold_out_refuses_everyone(live_server, admin_token, database_url, db):
    result = run('sold-out', live_server, admin_token, database_url, users=10, stock=2, rate=100, duration=0.5)
    assert result['by_code'] == {'409 sold_out': 50}
    assert result['invariants']['verdict'] == 'pass', result['invariants']['checks']
    assert sale_state(db, result['sale']['id']) == (2, 0, 2)


def test_a_crowd_before_the_opening_is_refused_until_the_sale_starts(live_server, admin_token, database_url, db):
    result = run('crowd', live_server, admin_token, database_url, users=20, stock=5, rate=100, duration=2,
                 start_delay=1)
    assert result['opening_offset_s'] is not None
    assert result['by_code']['409 sale_not_started'] > 0 and result['by_code']['201'] == 5
    assert result['invariants']['verdict'] == 'pass', result['invariants']['checks']
    assert sale_state(db, result['sale']['id']) == (5, 0, 5)


def test_closed_model_throughput_run_sells_one_unit_per_distinct_user(live_server, admin_token, database_url, db):
    result = run('throughput', live_server, admin_token, database_url, users=40, connections=8)
    assert result['model'] == 'closed'
    assert result['by_code'] == {'201': 40}
    assert result['invariants']['verdict'] == 'pass', result['invariants']['checks']
    assert sale_state(db, result['sale']['id']) == (40, 0, 40)


def test_the_result_serialises_to_json_and_an_html_report_with_charts(live_server, admin_token, database_url):
    result = run('crowd', live_server, admin_token, database_url, users=5, stock=2, rate=100, duration=0.5)
    assert json.loads(json.dumps(result))['by_status'] == result['by_status']
    page = scenarios.html_report(result)
    assert page.count('<svg') == 2
    assert 'Verdict: PASS' in page
    assert 'src=' not in page and 'href=' not in page  # no external assets


# --- the checker, on outcomes a broken server could produce ---------------------

SALE = 'sale-1'


def record(label, user, order=None):
    return scenarios.Record(0.0, 0.0, 0.001, label, user, order)


def per_user(user, orders):
    order = {'id': f'o{user}', 'userId': f'u{user}', 'flashSaleId': SALE, 'createdAt': '2026-01-01T00:00:00Z'}
    return scenarios.UserOrders(user, order if orders else None, [dict(order, id=f'o{user}-{n}' if n else f'o{user}')
                                                                 for n in range(orders)])


def verdict_of(records, remaining, total, users, **kwargs):
    sale = {'totalStock': total, 'remainingStock': remaining}
    return scenarios.check_outcome(records, sale, users, **kwargs)


def failed(outcome):
    return {c['name'] for c in outcome['checks'] if c['ok'] is False}


def test_checker_passes_a_correct_outcome():
    records = [record('201', 0, 'o0'), record('409 sold_out', 1), record('409 already_purchased', 0)]
    outcome = verdict_of(records, remaining=0, total=1, users=[per_user(0, 1), per_user(1, 0)])
    assert outcome['verdict'] == 'pass', outcome['checks']


def test_checker_fails_leaked_stock():
    records = [record('201', 0, 'o0'), record('409 sold_out', 1)]
    outcome = verdict_of(records, remaining=0, total=2, users=[per_user(0, 1), per_user(1, 0)])
    assert outcome['verdict'] == 'fail'
    assert failed(outcome) == {'stock conserved: remaining + orders == total'}


def test_checker_fails_an_oversell_and_a_second_order_for_one_user():
    records = [record('201', 0, 'o0'), record('201', 0, 'o0-1')]
    outcome = verdict_of(records, remaining=0, total=1, users=[per_user(0, 2)])
    assert outcome['verdict'] == 'fail'
    assert failed(outcome) >= {'at most one order per user', 'no oversell: 0 <= remaining, orders <= total',
                               'no user answered 201 twice'}


def test_checker_fails_a_201_that_is_not_the_requesters_order():
    records = [record('201', 0, 'o1'), record('409 sold_out', 1)]
    outcome = verdict_of(records, remaining=0, total=1, users=[per_user(0, 0), per_user(1, 1)])
    assert failed(outcome) == {'every 201 has its order, for that user',
                               'no order without a 201 or an admitted unknown outcome'}


def test_checker_fails_an_order_nobody_was_told_about():
    records = [record('409 sold_out', 0)]
    outcome = verdict_of(records, remaining=0, total=1, users=[per_user(0, 1)])
    assert failed(outcome) == {'no order without a 201 or an admitted unknown outcome'}


def test_checker_fails_already_purchased_without_an_order():
    records = [record('409 already_purchased', 0)]
    outcome = verdict_of(records, remaining=1, total=1, users=[per_user(0, 0)])
    assert failed(outcome) == {'every already_purchased has an order'}


def test_checker_fails_when_the_two_ways_of_reading_orders_disagree():
    records = [record('201', 0, 'o0')]
    user = per_user(0, 1)._replace(order=None)
    outcome = verdict_of(records, remaining=0, total=1, users=[user])
    assert failed(outcome) == {'GET /api/me/orders/{saleId} agrees with GET /api/me/orders'}


def test_checker_calls_an_order_behind_a_timeout_inconclusive_not_wrong():
    for label in ('timeout', 'error:ConnectionResetError', '503 outcome_unknown'):
        outcome = verdict_of([record(label, 0)], remaining=0, total=1, users=[per_user(0, 1)])
        assert outcome['verdict'] == 'inconclusive', label


def test_checker_counts_the_stock_bought_in_setup():
    setup = [scenarios.invariants.Answer(1, 'created', 'o1')]
    records = [record('409 sold_out', 0)]
    outcome = verdict_of(records, remaining=0, total=1, users=[per_user(0, 0), per_user(1, 1)],
                         setup_answers=setup)
    assert outcome['verdict'] == 'pass', outcome['checks']
    assert verdict_of(records, remaining=0, total=1, users=[per_user(0, 0), per_user(1, 1)])['verdict'] == 'fail'


def test_checker_fails_when_the_database_disagrees_with_the_api():
    records = [record('201', 0, 'o0')]
    database = {'total': 1, 'remaining': 0, 'orders': 2, 'duplicates': 1}
    outcome = verdict_of(records, remaining=0, total=1, users=[per_user(0, 1)], database=database)
    assert failed(outcome) == {'database: stock conserved: remaining + orders == total',
                               'database: no oversell: 0 <= remaining, orders <= total',
                               'database agrees with the API'}


def test_checker_after_a_storm_accounts_for_orders_settled_by_a_retry():
    """The chaos run's use: its shoppers buy again after an unknown outcome."""
    answers = [invariants.Answer('u0', 'outcome_unknown'), invariants.Answer('u0', 'sold_out')]
    state = invariants.SaleState(1, 0, 1)
    assert invariants.verdict(invariants.check_sale(state, {'u0': ['o0']}, answers)) == 'inconclusive'
    assert invariants.verdict(invariants.check_sale(state, {'u0': ['o0']}, answers, unknown_ok=True)) == 'pass'
    refused = [invariants.Answer('u0', 'sold_out')]
    assert invariants.verdict(invariants.check_sale(state, {'u0': ['o0']}, refused, unknown_ok=True)) == 'fail'


def test_sale_state_reads_what_the_database_holds(db, make_sale, make_users):
    sale_id = make_sale(stock=3)
    [(user, _)] = make_users(1)
    db.execute('UPDATE flash_sales SET remaining_stock = 2 WHERE id = %s', (sale_id,))
    db.execute('INSERT INTO orders (user_id, flash_sale_id) VALUES (%s, %s)', (user, sale_id))
    state, orders = invariants.read_sale(db, sale_id)
    assert state == (3, 2, 1) and state.orders == 1
    assert list(orders) == [str(user)] and len(orders[str(user)]) == 1


def test_percentile_is_nearest_rank():
    values = sorted(range(1, 101))
    assert [scenarios.percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert scenarios.percentile([], 50) is None


def test_a_pooled_connection_the_server_closed_while_idle_is_replaced_not_used(make_app, serve_in_thread):
    """The server closes a connection idle past IDLE_TIMEOUT_MS; the load
    tools' pool must open a new one for the next request instead of sending
    it into the closed one (which reads 0 bytes: a request lost)."""
    import asyncio

    import loadclient

    base_url = serve_in_thread(make_app(idle_timeout_ms=200))
    host, port = loadclient.split_base_url(base_url)[:2]
    raw = loadclient.build_request('GET', '/health', f'{host}:{port}')

    async def scenario():
        pool = loadclient.ConnectionPool(host, port, size=0, max_size=1)
        try:
            first = await pool.send(raw)
            [conn] = pool.idle
            deadline = asyncio.get_running_loop().time() + 30
            while not conn.reader.at_eof():  # the server's FIN has arrived
                assert asyncio.get_running_loop().time() < deadline, 'the server never closed the idle connection'
                await asyncio.sleep(0.05)
            second = await pool.send(raw)
            return first.status, second.status, pool.discarded
        finally:
            pool.close()

    assert asyncio.run(scenario()) == (200, 200, 1)
