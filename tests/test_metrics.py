"""GET /metrics (resources/metrics.py): exact counts after a known set of
requests, read with prometheus_client's own parser, in one process and
across the processes of a real `flashsale serve` with WORKERS=2; who may
read them; and METRICS=off.

The instruments are the process' (one process exports one set), so a test
in this process compares two scrapes: what changed between them is what it
did. The purchase batching and the login queue have their metrics checked
in tests/test_batching.py and tests/test_hashing.py, the cardinality after
fuzzing in tests/test_fuzz.py.
"""

import re
import uuid
from pathlib import Path

import pytest

from conftest import auth
from conftest import call
from conftest import counted
from conftest import free_port
from conftest import metric_samples
from conftest import raw_http
from conftest import scrape
from conftest import serve_env
from conftest import start_serve
from conftest import wait_for

PURCHASE = '/api/flash-sales/{sale_id}/purchase'
ROUTE_METRICS = (('method', 'GET'), ('route', '/metrics'), ('status', '200'))  # the scrapes themselves
SALE = '/api/flash-sales/{sale_id}'


def requests(route, method, status, n):
    return {('flashsale_http_requests_total', (('method', method), ('route', route), ('status', status))): n}


def timed(route, n):
    return {('flashsale_http_request_duration_seconds_count', (('route', route),)): n}


def errors(route, code, n):
    return {('flashsale_http_errors_total', (('code', code), ('route', route))): n}


def purchases(outcome, n):
    return {('flashsale_purchases_total', (('outcome', outcome),)): n}


def total(name, n):
    return {(name, ()): n}


def read(client):
    return metric_samples(client.get('/metrics', status=200).text)


def test_a_scrape_counts_exactly_the_requests_answered_since_the_last_one(client, make_sale, make_users):
    sale_id = make_sale(stock=2)
    (_, a), (_, b), (_, c), (_, d) = make_users(4)
    before = read(client)
    for _ in range(3):
        client.get('/health', status=200)
    for _ in range(2):
        client.get(f'/api/flash-sales/{sale_id}', status=200)
    client.get(f'/api/flash-sales/{uuid.uuid4()}', status=404)
    client.get('/api/flash-sales/not-an-id', status=404)
    for path in (f'/nothing/{uuid.uuid4()}', f'/api/{uuid.uuid4()}/x', '/%00'):
        client.get(path, status=404)
    client.request('/health', method='BREW', status=400)
    buy = f'/api/flash-sales/{sale_id}/purchase'
    client.post(buy, headers=auth(a), status=201)
    client.post(buy, headers=auth(a), status=409)  # already_purchased
    client.post(buy, headers=auth(b), status=201)
    client.post(buy, headers=auth(c), status=409)  # sold_out, told by the statement
    client.post(buy, headers=auth(d), status=409)  # sold_out, from memory
    client.post(buy, status=401)
    after = read(client)

    assert counted(before, after) == {
        **requests('/metrics', 'GET', '200', 1), **timed('/metrics', 1),  # the first scrape
        **requests('/health', 'GET', '200', 3), **requests('/health', 'other', '400', 1), **timed('/health', 4),
        **errors('/health', 'bad_request', 1),
        **requests(SALE, 'GET', '200', 2), **requests(SALE, 'GET', '404', 2), **timed(SALE, 4),
        **errors(SALE, 'sale_not_found', 2),
        **requests('unmatched', 'GET', '404', 3), **timed('unmatched', 3), **errors('unmatched', 'not_found', 3),
        **requests(PURCHASE, 'POST', '201', 2), **requests(PURCHASE, 'POST', '409', 3),
        **requests(PURCHASE, 'POST', '401', 1), **timed(PURCHASE, 6),
        **errors(PURCHASE, 'already_purchased', 1), **errors(PURCHASE, 'sold_out', 2),
        **errors(PURCHASE, 'unauthorized', 1),
        **purchases('created', 2), **purchases('already_purchased', 1), **purchases('sold_out', 2),
        **purchases('unauthorized', 1),
        **total('flashsale_purchases_sold_out_remembered_total', 1),
        # One statement per purchase that reached the database, each alone.
        **total('flashsale_purchase_statements_total', 4), **total('flashsale_purchase_batch_size_count', 4),
    }
    assert after[('flashsale_purchase_batch_size_bucket', (('le', '1.0'),))] - \
        before[('flashsale_purchase_batch_size_bucket', (('le', '1.0'),))] == 4
    # The gauges are this app's, read at the scrape: nothing waits now.
    assert after[('flashsale_pool_max_connections', ())] == 8
    assert after[('flashsale_pool_connections_in_use', ())] == 0
    assert after[('flashsale_purchases_waiting', ())] == 0
    assert after[('flashsale_login_queue_depth', ())] == 0
    assert after[('flashsale_login_queue_capacity', ())] == 64
    assert after[('flashsale_processes', ())] == 1


def test_every_error_answer_is_counted_by_route_and_code(make_app):
    broken = make_app(filled=False, database_url=f'postgresql://postgres@127.0.0.1:{free_port()}/none',
                      pool_size=1, pool_timeout=0.5).client
    limited = make_app(auth_rate_per_minute=1, rate_limit_exempt=()).client
    before = read(limited)
    broken.get('/health', status=503)
    limited.post('/api/auth/login', 'not json', content_type='application/json', status=400)
    limited.post('/api/auth/login', 'not json', content_type='application/json', status=429)
    changes = counted(before, read(limited))
    assert {key: n for key, n in changes.items() if key[0] == 'flashsale_http_errors_total'} == {
        **errors('/health', 'database_unavailable', 1),
        **errors('/api/auth/login', 'invalid_json', 1), **errors('/api/auth/login', 'rate_limited', 1),
    }


def get_metrics(base, source=None, forwarded_for=None):
    """GET /metrics over a socket of its own from `source` (default 127.0.0.1):
    (status, headers, body bytes)."""
    header = f'X-Forwarded-For: {forwarded_for}\r\n'.encode() if forwarded_for else b''
    return raw_http(base, b'GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n' + header + b'\r\n',
                    source=source)


REFUSED = b'{"code":"forbidden","message":"Metrics are served only to the addresses in METRICS_ALLOW."}'


def test_metrics_are_refused_to_an_address_not_allowed(make_app, serve_in_thread):
    """The real server on 127.0.0.1; a client socket bound to 127.0.0.2 is
    another address on loopback."""
    base = serve_in_thread(make_app())
    status, headers, body = get_metrics(base, source='127.0.0.2')
    assert (status, headers['Content-Type'], body) == (403, 'application/json', REFUSED)
    status, headers, body = get_metrics(base)
    assert status == 200 and headers['Content-Type'].startswith('text/plain')
    assert b'flashsale_http_requests_total{' in body

    elsewhere = serve_in_thread(make_app(metrics_allow=('127.0.0.2/32',)))
    assert get_metrics(elsewhere, source='127.0.0.2')[0] == 200
    assert get_metrics(elsewhere)[0] == 403


def test_behind_a_trusted_proxy_metrics_are_judged_by_the_client_address(make_app, serve_in_thread):
    """The address the rate limits use: the one the proxy says it forwarded for."""
    base = serve_in_thread(make_app(trusted_proxy='127.0.0.1'))
    assert get_metrics(base, forwarded_for='203.0.113.7')[::2] == (403, REFUSED)
    assert get_metrics(base)[0] == 200  # the proxy's host itself, not forwarded

    allowed = serve_in_thread(make_app(trusted_proxy='127.0.0.1', metrics_allow=('203.0.113.0/24',)))
    assert get_metrics(allowed, forwarded_for='203.0.113.7')[0] == 200


def test_admins_read_the_purchase_outcomes_and_no_one_else_does(client, make_user, make_users, make_sale):
    _, admin = make_user(admin=True)
    _, shopper = make_user()
    assert client.get('/api/purchase-outcomes', status=401).json['code'] == 'unauthorized'
    assert client.get('/api/purchase-outcomes', headers=auth(shopper), status=403).json == {
        'code': 'forbidden', 'message': 'Only admins can see the purchase outcomes.'}
    before = client.get('/api/purchase-outcomes', headers=auth(admin), status=200).json
    sale_id = make_sale(stock=1)
    for _, token in make_users(2):
        client.post(f'/api/flash-sales/{sale_id}/purchase', headers=auth(token), status=[201, 409])
    after = client.get('/api/purchase-outcomes', headers=auth(admin), status=200).json
    assert after['server'] == before['server']
    assert {outcome: n - before['outcomes'].get(outcome, 0) for outcome, n in after['outcomes'].items()
            if n != before['outcomes'].get(outcome, 0)} == {'created': 1, 'sold_out': 1}


def test_with_metrics_off_there_is_no_endpoint(make_app):
    client = make_app(metrics='off').client
    assert client.get('/metrics', status=404).json['code'] == 'not_found'
    assert client.get('/api/purchase-outcomes', status=404).json['code'] == 'not_found'


def test_two_worker_processes_report_one_set_of_exact_counts(database_url, tmp_path, make_sale, make_users,
                                                              each_server):
    """A real `flashsale serve` with WORKERS=2, under each server: each
    request on a connection of its own, which the kernel spreads over both
    processes; the scrape, answered by either, adds up both."""
    port = free_port()
    log_path = tmp_path / 'serve.log'
    proc = start_serve(serve_env(database_url, WORKERS='2', PORT=str(port), SERVER=each_server), log_path)
    base = f'http://127.0.0.1:{port}'
    try:
        sale_id = make_sale(stock=3)
        users = make_users(6)
        for _ in range(30):
            assert call(base, 'GET', '/health').status == 200
        for _ in range(10):
            assert call(base, 'GET', f'/nothing/{uuid.uuid4()}').status == 404
        statuses = [call(base, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token).status
                    for _, token in users]
        assert sorted(statuses) == [201] * 3 + [409] * 3
        # Both processes answered some: each request id starts with its process' pid.
        wait_for(lambda: Path(log_path).read_text().count('GET /nothing/') == 10, message='the access log')
        served_by = set(re.findall(r'id=([0-9a-f]+)-\d+', Path(log_path).read_text()))
        assert len(served_by) == 2, served_by

        expected = {
            **requests('/health', 'GET', '200', 30), **requests('unmatched', 'GET', '404', 10),
            **requests(PURCHASE, 'POST', '201', 3), **requests(PURCHASE, 'POST', '409', 3),
            **purchases('created', 3), **purchases('sold_out', 3),
        }
        scraped = []

        def counts_arrived():
            # The process answering writes its counts first; the other one
            # within a second (metrics.SAMPLE_SECONDS).
            scraped.append(scrape(base))
            return {key: n for key, n in counted({}, scraped[-1]).items() if key[0] in (
                'flashsale_http_requests_total', 'flashsale_purchases_total') and key[1] != ROUTE_METRICS} == expected

        wait_for(counts_arrived, message='the counts of both processes')
        samples = scraped[-1]
        assert samples[('flashsale_processes', ())] == 2
        assert samples[('flashsale_pool_max_connections', ())] == 2 * 8
        assert samples[('flashsale_purchase_statements_total', ())] + \
            samples[('flashsale_purchases_sold_out_remembered_total', ())] == 6
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, Path(log_path).read_text()


@pytest.mark.parametrize(('variable', 'value', 'message'), [
    ('METRICS_ALLOW', 'localhost', "METRICS_ALLOW: 'localhost' is not an IP address or network"),
    ('METRICS', 'yes', "METRICS must be on or off, not 'yes'"),
])
def test_a_bad_metrics_setting_is_refused_with_a_message_naming_it(variable, value, message):
    import flashsale  # noqa: PLC0415

    with pytest.raises(flashsale.ConfigError, match=re.escape(message)):
        flashsale.Settings.from_env({variable: value})
