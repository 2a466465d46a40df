"""The fast paths: the poll cache with ETags, and the sold-out short-circuit.
(The queue that keeps a login burst from taking every thread: test_hashing.py.)"""

import functools
import threading
import time
import uuid
from datetime import datetime

import webtest

import flashsale
from conftest import auth
from conftest import run_together
from conftest import sale_state
from conftest import wait_for
from resources.cache import PollCache


def server_time(resp):
    return datetime.fromisoformat(resp.json['serverTime'].replace('Z', '+00:00'))


def test_unchanged_current_sale_is_a_304_for_its_etag(client, make_sale):
    make_sale()
    first = client.get('/api/flash-sales/current', status=200)
    assert first.headers['Cache-Control'] == 'max-age=1'
    etag = first.headers['ETag']
    again = client.get('/api/flash-sales/current', headers={'If-None-Match': etag}, status=304)
    assert again.body == b''
    assert again.headers['ETag'] == etag


def test_etag_changes_when_the_stock_does(client, make_sale, make_user):
    sale_id = make_sale()
    etag = client.get(f'/api/flash-sales/{sale_id}', status=200).headers['ETag']
    _, token = make_user()
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token), status=201)
    resp = client.get(f'/api/flash-sales/{sale_id}', headers={'If-None-Match': etag}, status=200)
    assert resp.headers['ETag'] != etag
    assert resp.json['flashSale']['remainingStock'] == 9


def test_cache_serves_one_query_per_ttl_with_a_moving_server_clock(make_app, make_sale, db):
    """Within its lifetime a cached answer is served (with serverTime moved
    on by the time since it was loaded); after it, the next request loads
    anew. Decided by when each request ran, not by sleeps: the test polls
    until the new stock shows."""
    ttl = 1.0
    client = make_app(poll_cache_ms=int(ttl * 1000)).client
    sale_id = make_sale(stock=10)
    before_load = time.monotonic()  # the cache entry is younger than this
    first = client.get(f'/api/flash-sales/{sale_id}', status=200)
    loaded = time.monotonic()  # ... and older than this
    db.execute('UPDATE flash_sales SET remaining_stock = 3 WHERE id = %s', (sale_id,))
    answers = []  # (started, ended, remaining stock, serverTime)

    def fresh():
        started = time.monotonic()
        resp = client.get(f'/api/flash-sales/{sale_id}', status=200)
        answers.append((started, time.monotonic(), resp.json['flashSale']['remainingStock'], server_time(resp)))
        return answers[-1][2] == 3

    wait_for(fresh, timeout=10, message='the cached answer to expire')
    surely_cached = [a for a in answers if a[1] < before_load + ttl]
    surely_expired = [a for a in answers if a[0] > loaded + ttl]
    assert surely_cached, (
        f'no request ended within the cache lifetime ({ttl} s after the first): the first took '
        f'{answers[0][1] - before_load:.3f} s, so the machine stalled for longer than the lifetime')
    assert all(stock == 10 for _, _, stock, _ in surely_cached), (
        f'answers within {ttl} s of the first load (the cache lifetime) were not served from the cache: '
        f'{[(round(a[1] - before_load, 3), a[2]) for a in surely_cached]} (seconds after the load, stock)')
    assert any(when > server_time(first) for *_, when in surely_cached), 'the cached serverTime never moved on'
    assert all(stock == 3 for _, _, stock, _ in surely_expired), (
        f'answers started more than {ttl} s after the first load (the cache lifetime) still came from the cache: '
        f'{[(round(a[0] - loaded, 3), a[2]) for a in surely_expired]} (seconds after the load, stock)')


def test_cache_keeps_no_sale_and_unknown_sale_answers_right(make_app):
    cached_client = make_app(poll_cache_ms=300).client
    assert cached_client.get('/api/flash-sales/current', status=404).json['code'] == 'no_sale'
    unknown = '00000000-0000-0000-0000-000000000001'
    assert cached_client.get(f'/api/flash-sales/{unknown}', status=404).json['code'] == 'sale_not_found'


def in_a_thread(target):
    """target() started in a thread of its own; returns the thread."""
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_a_slow_load_holds_up_only_the_requests_for_its_own_key():
    cache = PollCache(ttl=60, default=str)
    loading, release = threading.Event(), threading.Event()

    def slow():
        loading.set()
        release.wait(30)
        return {'id': 'slow'}, None

    answers = []
    askers = [in_a_thread(lambda: answers.append(cache.get('slow', slow))) for _ in range(3)]
    wait_for(loading.is_set, message='the slow load to begin')
    # While it loads, other keys load and answer, found or not.
    others = []
    other = in_a_thread(lambda: others.extend([cache.get('fast', lambda: ({'id': 'fast'}, None))[0],
                                               cache.get('unknown', lambda: (None, None))[0]]))
    other.join(10)
    assert others == [{'id': 'fast'}, None], 'another key waited for the slow load'
    assert answers == []  # the slow key's askers wait for its one load
    release.set()
    for asker in askers:
        asker.join(10)
    assert [payload for payload, _, _ in answers] == [{'id': 'slow'}] * 3
    assert cache.loads == 3  # one each


def test_a_flood_of_unknown_ids_costs_one_query_per_id_per_ttl(make_app, make_sale):
    app = make_app(poll_cache_ms=60_000)  # the whole test within one ttl
    make_sale()
    ids = [uuid.uuid4() for _ in range(40)]
    answers = []  # list.append is atomic

    def ask(sale_id):
        client = webtest.TestApp(app.wsgi)
        for _ in range(3):
            resp = client.get(f'/api/flash-sales/{sale_id}', status='*')
            answers.append((resp.status_int, resp.json['code']))
            assert client.get('/api/flash-sales/current', status=200).json['status'] == 'active'

    run_together([functools.partial(ask, sale_id) for sale_id in ids for _ in range(2)], released_together=True)
    assert answers == [(404, 'sale_not_found')] * 240
    # Each load is one query: one per id, and one for the current sale.
    assert app.poll_cache.loads == len(ids) + 1


def test_unknown_ids_are_kept_in_bounded_memory_and_never_push_a_sale_out(make_app, make_sale):
    cache = PollCache(60, flashsale._json_default, max_missing=100)
    client = make_app(poll_cache_ms=60_000, poll_cache=cache).client
    sale_id = make_sale()
    client.get(f'/api/flash-sales/{sale_id}', status=200)
    client.get('/api/flash-sales/current', status=200)
    unknown = [uuid.uuid4() for _ in range(1000)]
    for sale in unknown:
        client.get(f'/api/flash-sales/{sale}', status=404)
    assert len(cache) == 2 + 100
    loads = cache.loads
    client.get(f'/api/flash-sales/{sale_id}', status=200)
    client.get('/api/flash-sales/current', status=200)
    client.get(f'/api/flash-sales/{unknown[-1]}', status=404)  # the newest are kept
    assert cache.loads == loads
    client.get(f'/api/flash-sales/{unknown[0]}', status=404)  # the oldest were dropped
    assert cache.loads == loads + 1


def test_polls_of_the_current_sale_go_on_while_its_reload_waits_for_a_connection(make_app, make_sale):
    """The pool's one connection is taken: an unknown id's load waits for it,
    and so does the reload of the current sale once its answer is out of
    date; the other polls meanwhile get the answer before."""
    ttl = 0.2
    app = make_app(poll_cache_ms=int(ttl * 1000), pool_size=1, pool_timeout=30)
    make_sale()
    first = app.client.get('/api/flash-sales/current', status=200)
    loaded = time.monotonic()
    answers = []
    held = app.pool.getconn()
    try:
        unknown = in_a_thread(lambda: answers.append(
            webtest.TestApp(app.wsgi).get(f'/api/flash-sales/{uuid.uuid4()}', status='*').status_int))
        wait_for(lambda: app.poll_cache.loads_in_flight() == 1, message="the unknown id's load to begin")
        wait_for(lambda: time.monotonic() > loaded + ttl, message="the current sale's answer to be out of date")
        reload = in_a_thread(lambda: answers.append(
            webtest.TestApp(app.wsgi).get('/api/flash-sales/current', status='*').status_int))
        wait_for(lambda: app.poll_cache.loads_in_flight() == 2, message='the reload of the current sale to begin')
        polls = []
        poller = in_a_thread(lambda: polls.extend(
            webtest.TestApp(app.wsgi).get('/api/flash-sales/current', status='*') for _ in range(5)))
        poller.join(10)
        assert len(polls) == 5, 'a poll of the current sale waited for its reload'
        assert {(p.status_int, p.headers['ETag'], p.json['flashSale']['id']) for p in polls} == {
            (200, first.headers['ETag'], first.json['flashSale']['id'])}
    finally:
        app.pool.putconn(held)
    unknown.join(10)
    reload.join(10)
    assert sorted(answers) == [200, 404]


def test_sold_out_is_then_answered_from_memory(client, make_sale, make_users, db):
    sale_id = make_sale(stock=1)
    (_, first), (_, second), (_, third) = make_users(3)
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(first), status=201)
    assert client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(second), status=409).json['code'] == 'sold_out'
    # Were the database asked again, it would now sell: it is not asked.
    db.execute('UPDATE flash_sales SET total_stock = 2, remaining_stock = 1 WHERE id = %s', (sale_id,))
    assert client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(third), status=409).json['code'] == 'sold_out'
    assert sale_state(db, sale_id) == (2, 1, 1)


def test_only_a_real_sold_out_answer_short_circuits(client, make_sale, make_users, db):
    sale_id = make_sale(stock=1, starts_in=30, ends_in=90)
    (_, first), (_, second) = make_users(2)
    assert client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(first), status=409).json['code'] == 'sale_not_started'
    db.execute("UPDATE flash_sales SET start_date = now() - interval '1 minute' WHERE id = %s", (sale_id,))
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(first), status=201)


def test_sold_out_from_memory_still_needs_a_valid_token(client, make_sale, make_users):
    sale_id = make_sale(stock=1, remaining=0)
    [(_, token)] = make_users(1)
    client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token), status=409)
    assert client.post(f'/api/flash-sales/{sale_id}/purchase', status=401).json['code'] == 'unauthorized'
