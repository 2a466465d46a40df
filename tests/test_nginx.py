"""`flashsale serve` processes behind real nginx, running the shipped
scripts/nginx.conf (its ports changed): the invariants hold across processes,
polls are answered from nginx's one-second cache (never a request with a
token), nginx's own refusals are JSON, and a POST is never passed on to a
second process, whether the first one dropped it or never answered."""

import collections
import http.client
import json
import os
import re
import signal
import socket
import threading
import time

import flashsale
import invariants
import pytest
import servers

from conftest import NGINX_CONF
from conftest import answer
from conftest import app_env
from conftest import call
from conftest import connect
from conftest import free_port
from conftest import race_and_check
from conftest import raw_http
from conftest import sale_state
from conftest import send
from conftest import start_nginx
from conftest import start_serve
from conftest import wait_for
from resources import ratelimit

class AppLog:
    """An app process' access log, read once every line written so far is in it."""

    def __init__(self, port, path):
        self.port = port
        self.path = path
        self.markers = 0

    def settled(self):
        """The log's text, once a request made straight to the app now (a
        marker, with a request id of its own) has its line: lines go out
        in order, through one writer thread, so every line before it is
        in too."""
        self.markers += 1
        marker = f'marker-{os.getpid()}-{id(self)}-{self.markers}'
        assert call(f'http://127.0.0.1:{self.port}', 'GET', '/health', headers={'X-Request-ID': marker},
                    timeout=10).status == 200
        wait_for(lambda: f'id={marker}\n' in self.path.read_text(), message='the app to log the marker request')
        return self.path.read_text()

    def count(self, needle):
        text = self.settled()
        return text.count(needle)


@pytest.fixture
def behind_nginx(database_url, tmp_path, each_server):
    app_ports = [free_port(), free_port()]
    apps = []
    for port in app_ports:
        log_path = tmp_path / f'app-{port}.log'
        apps.append((start_serve(app_env(database_url, port, each_server), log_path), AppLog(port, log_path)))
    front = None
    try:
        base_url, front = start_nginx(tmp_path, app_ports)
        yield base_url, [log for _, log in apps]
    finally:
        if front is not None:
            front.terminate()
        for proc, _ in apps:
            proc.terminate()
            proc.wait(timeout=30)
        if front is not None:
            front.wait(timeout=30)


def test_two_processes_behind_nginx_sell_exactly_the_stock(behind_nginx, make_users, make_sale, db):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=50)
    assert race_and_check(base_url, db, sale_id, make_users(200)) == {201: 50, 'sold_out': 150}
    assert sale_state(db, sale_id) == (50, 0, 50)
    # Both processes took purchases, and nginx replayed none.
    served = [log.count('/purchase ') for log in logs]
    assert all(n > 0 for n in served), served
    assert sum(served) == 200


def test_polls_come_from_nginx_cache_with_etag_and_304(behind_nginx, make_sale):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=5)
    path = f'/api/flash-sales/{sale_id}'
    status, headers, body = call(base_url, 'GET', path)
    assert status == 200 and headers['x-cache'] in ('MISS', 'EXPIRED', 'UPDATING', 'STALE')
    etag = headers['etag']
    assert body['flashSale']['id'] == str(sale_id)
    # The same answer again, from the cache, still with its ETag ...
    hits = 0
    for _ in range(20):
        status, headers, again = call(base_url, 'GET', path)
        assert status == 200 and headers['etag'] == etag
        assert again['flashSale'] == body['flashSale']
        hits += headers['x-cache'] == 'HIT'
    assert hits > 0
    # ... and If-None-Match makes it a bodiless 304, from nginx or the app.
    status, headers, empty = call(base_url, 'GET', path, headers={'If-None-Match': etag})
    assert (status, empty) == (304, None)
    assert headers['etag'] == etag
    status, _, _ = call(base_url, 'GET', path, headers={'If-None-Match': '"something-else"'})
    assert status == 200


def test_a_request_with_a_token_is_never_answered_from_or_stored_in_the_cache(behind_nginx, make_sale,
                                                                              make_users):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=5)
    path = f'/api/flash-sales/{sale_id}'
    [(_, token)] = make_users(1)
    before = sum(log.count(f'GET {path} ') for log in logs)
    for _ in range(5):
        status, headers, _ = call(base_url, 'GET', path, token=token)
        assert status == 200 and headers['x-cache'] == 'BYPASS'
    # Every one of them reached the app ...
    assert sum(log.count(f'GET {path} ') for log in logs) - before == 5
    # ... and none was stored: the first request without a token misses.
    status, headers, _ = call(base_url, 'GET', path)
    assert status == 200 and headers['x-cache'] == 'MISS'
    # A token on a cached key still bypasses it.
    status, headers, _ = call(base_url, 'GET', path, token=token)
    assert headers['x-cache'] == 'BYPASS'


def test_many_pollers_cost_the_app_about_one_request_per_second(behind_nginx, make_sale):
    base_url, logs = behind_nginx
    make_sale(stock=5)
    before = sum(log.count('GET /api/flash-sales/current ') for log in logs)
    answered = []
    polls = []  # one item per answered poll (list.append is atomic)
    stop = threading.Event()

    def poll():
        conn = connect(base_url)
        n = 0
        while not stop.is_set():
            send(conn, 'GET', '/api/flash-sales/current')
            status, _, body = answer(conn)
            assert status == 200 and body['status'] == 'active'
            n += 1
            polls.append(1)
        conn.close()
        answered.append(n)

    pollers = [threading.Thread(target=poll) for _ in range(16)]
    started = time.monotonic()
    for t in pollers:
        t.start()
    # For at least 2 s, and until the pollers have made 400 requests.
    deadline = started + 60
    while (time.monotonic() - started < 2 or len(polls) < 400) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in pollers:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    assert len(answered) == len(pollers)
    reached_app = sum(log.count('GET /api/flash-sales/current ') for log in logs) - before
    # One fetch per second of validity, and one per nginx worker process at
    # most at the edges of a second: far fewer than the polls answered.
    assert 1 <= reached_app <= 2 * (elapsed + 2), (reached_app, elapsed, sum(answered))
    assert sum(answered) >= 20 * reached_app, (reached_app, sum(answered))


def test_nginx_refuses_in_the_api_error_shape(behind_nginx):
    base_url, _ = behind_nginx
    # A body over client_max_body_size: nginx answers, the app never sees it.
    status, headers, body = call(base_url, 'POST', '/api/auth/login', body='x' * 20000)
    assert status == 413
    assert headers['content-type'] == 'application/json'
    assert body['code'] == 'payload_too_large'
    # Not HTTP: nginx's 400.
    status, headers, rest = raw_http(base_url, b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n')
    assert status == 400
    assert json.loads(rest)['code'] == 'bad_request'
    # register/login beyond the burst from one address: 429 with Retry-After.
    login = {'email': 'nobody@example.com', 'password': 'wrong password'}
    statuses = collections.Counter()
    limited = None
    for _ in range(40):
        status, headers, body = call(base_url, 'POST', '/api/auth/login', body=login)
        statuses[status] += 1
        if status == 429:
            limited = (headers, body)
    assert set(statuses) == {401, 429} and statuses[429] >= 5, statuses
    headers, body = limited
    assert headers['content-type'] == 'application/json' and int(headers['retry-after']) >= 1
    assert body == {'code': 'rate_limited', 'message': 'Too many requests; slow down.'}


def test_nginx_never_passes_metrics_on(behind_nginx):
    """Through nginx, /metrics is a 404 in the API's shape, however the path
    is spelt; straight to the app on loopback it is there."""
    base_url, logs = behind_nginx
    for path in ('/metrics', '//metrics', '/%6Detrics', '/metrics?x=1', '/./metrics'):
        status, headers, body = call(base_url, 'GET', path)
        assert (status, headers['content-type'], body['code']) == (404, 'application/json', 'not_found'), path
    status, _, body = raw_http(f'http://127.0.0.1:{logs[0].port}', b'GET /metrics HTTP/1.1\r\nHost: a\r\n'
                                                                    b'Connection: close\r\n\r\n')
    assert status == 200 and b'flashsale_http_requests_total' in body
    # The app saw that one request, and none of those sent through nginx.
    assert [log.count('GET /metrics ') for log in logs] == [1, 0]


class BrokenUpstream:
    """An upstream that reads a whole request and then never answers it:
    `reset` drops the connection (as a process killed while it served the
    request), `silent` keeps it open and says nothing (as a process that
    hangs). Every request it saw is recorded."""

    def __init__(self, mode='reset'):
        self.mode = mode
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.seen = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.settimeout(30)
            data = b''
            while b'\r\n\r\n' not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b'\r\n\r\n')
            lines = head.decode('latin-1').split('\r\n')
            length = next((int(v) for k, _, v in (x.partition(':') for x in lines[1:])
                           if k.strip().lower() == 'content-length'), 0)
            while len(body) < length:
                body += conn.recv(65536)
            self.seen.append(lines[0])
            if self.mode == 'silent':
                self.stop.wait(60)
                return
            # Reset, not a clean close: the answer is gone for good.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')

    def close(self):
        self.stop.set()
        self.listener.close()


@pytest.mark.parametrize(('mode', 'status', 'code', 'changes'), [
    # A process killed while it served the purchase.
    ('reset', 502, 'bad_gateway', []),
    # A process that hangs with it: nginx gives up after proxy_read_timeout,
    # cut from 15 s to 1 s for the test (`timeout` is in proxy_next_upstream).
    ('silent', 504, 'gateway_timeout', [('proxy_read_timeout 15s;', 'proxy_read_timeout 1s;')]),
])
def test_a_post_is_never_passed_on_to_a_second_process(database_url, tmp_path, make_users, make_sale, db,
                                                       mode, status, code, changes, each_server):
    """An upstream that gets a purchase and never answers it: the buyer gets
    nginx's error in the API's shape, and nginx does not send the purchase on
    to the other process, which may have bought already."""
    broken = BrokenUpstream(mode)
    app_port = free_port()
    log = AppLog(app_port, tmp_path / 'app.log')
    app = start_serve(app_env(database_url, app_port, each_server), log.path)
    front = None
    try:
        base_url, front = start_nginx(tmp_path, [broken.port, app_port], ready_path=None, changes=changes)
        sale_id = make_sale(stock=100)
        answers = collections.Counter()
        refused = None
        # Round robin sends one of the first two purchases to the broken
        # upstream (after its failure nginx leaves it out for 10 s).
        for _, token in make_users(4):
            got, headers, body = call(base_url, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token,
                                      timeout=30)
            answers[got] += 1
            if got == status:
                refused = (headers, body)
        assert answers[status] >= 1 and set(answers) == {201, status}, answers
        headers, body = refused
        assert headers['content-type'] == 'application/json'
        assert body['code'] == code and 'GET /api/me/orders/' in body['message']
        # Each refusal is a purchase the broken upstream got, and nginx did
        # not send it on: the app saw exactly the purchases it answered.
        assert len([line for line in broken.seen if line.startswith('POST ')]) == answers[status]
        assert log.count('/purchase ') == answers[201]
        assert sale_state(db, sale_id) == (100, 100 - answers[201], answers[201])
    finally:
        if front is not None:
            servers.stop(front)
        servers.stop(app)
        broken.close()


def test_nginx_drops_idle_app_connections_before_the_app_does():
    """A purchase sent on a kept-alive connection the app is just closing is
    a 502 (nginx never sends a POST twice): nginx must give up idle
    connections first."""
    conf = NGINX_CONF.read_text()
    upstream = conf[conf.index('upstream flashsale {'):]
    upstream = upstream[:upstream.index('}')]
    nginx_idle = int(re.search(r'^\s*keepalive_timeout (\d+)s;', upstream, re.M).group(1))
    assert nginx_idle < flashsale.Settings.from_env({}).idle_timeout_ms / 1000


def test_a_rolling_restart_behind_nginx_loses_and_invents_no_order(database_url, tmp_path, make_users, make_sale,
                                                                    db):
    """Each of the two upstreams stopped with SIGTERM and started again in
    turn while a crowd buys through nginx: the invariants hold, and the
    answers that are 5xx or resets are at most the requests in flight (a
    stopping waitress serves what comes on its open connections, each
    answer with Connection: close, and the connections waiting in its
    backlog, so nginx almost never meets a closed connection)."""
    ports = [free_port(), free_port()]
    logs = [tmp_path / f'app-{port}.log' for port in ports]
    apps = [start_serve(app_env(database_url, port), path) for port, path in zip(ports, logs)]
    front = None
    try:
        base_url, front = start_nginx(tmp_path, ports)
        sale_id = make_sale(stock=400)
        users = make_users(1200)
        answers = [None] * len(users)
        done = collections.Counter()

        def buyer(offset):
            conn = connect(base_url)
            for index in range(offset, len(users), 16):
                try:
                    send(conn, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=users[index][1])
                    got = answer(conn)
                    answers[index] = (got.status, (got.json or {}).get('code'), (got.json or {}).get('order'))
                except (OSError, http.client.HTTPException) as exc:
                    answers[index] = (None, type(exc).__name__, None)
                    conn.close()
                    conn = connect(base_url)
                done['answered'] += 1
            conn.close()

        threads = [threading.Thread(target=buyer, args=(offset,)) for offset in range(16)]
        for thread in threads:
            thread.start()
        for turn, port in enumerate(ports):
            wait_for(lambda: done['answered'] >= 200 * (turn + 1), timeout=60, message='purchases going on')
            apps[turn].send_signal(signal.SIGTERM)
            assert apps[turn].wait(timeout=30) == 0
            apps[turn] = start_serve(app_env(database_url, port), logs[turn])
            # Back in nginx's rotation (it has passed purchases to it) before
            # the next is stopped: nginx counts a server that refused it as
            # failed for fail_timeout, and with both counted, answers 502.
            if turn + 1 < len(ports):
                wait_for(lambda: call(base_url, 'GET', '/health').status == 200
                         and 'GET /health ' in logs[turn].read_text(), timeout=60,
                         message='the restarted upstream serving through nginx')
        for thread in threads:
            thread.join(120)
        # A connection completed by the kernel in the instant between the
        # stopping server's last accept and the close of its listening
        # socket is reset, and nginx answers the purchase sent on it 502:
        # rare (0 in most runs), and never more than the requests in flight.
        failed = [i for i, a in enumerate(answers) if a[0] is None or a[0] >= 500]
        assert len(failed) <= 16, collections.Counter(answers[i][:2] for i in failed)
        summary = [invariants.Answer(str(user), 'no_answer' if i in failed else 'created' if status == 201 else code,
                                     (order or {}).get('id'))
                   for i, ((user, _), (status, code, order)) in enumerate(zip(users, answers))]
        # Those buyers settle it by buying again, through nginx.
        for i in failed:
            retry = call(base_url, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=users[i][1])
            summary.append(invariants.Answer(str(users[i][0]), 'created' if retry.status == 201 else retry.json['code'],
                                             (retry.json.get('order') or {}).get('id')))
        state, orders = invariants.read_sale(db, sale_id)
        checks = invariants.check_sale(state, orders, summary, unknown_ok=True)
        assert invariants.verdict(checks) == 'pass', checks
        assert state.orders == 400
    finally:
        if front is not None:
            front.terminate()
            front.wait(timeout=30)
        for app in apps:
            app.terminate()
            app.wait(timeout=30)


def nginx_locations(conf):
    """[(modifier, path, body)] of every location block of an nginx.conf
    (modifier '' for a prefix location)."""
    return re.findall(r'^\s*location\s+(=|~\*|~|\^~)?\s*(\S+)\s*\{(.*?)^\s*\}', conf, re.M | re.S)


def test_nginx_limits_exactly_the_routes_the_app_limits():
    """scripts/nginx.conf and resources/ratelimit.py agree: the same routes,
    POSTs only, at the app's default rate and burst."""
    conf = NGINX_CONF.read_text()
    limited = [(modifier, path, body) for modifier, path, body in nginx_locations(conf) if 'limit_req ' in body]
    # Exact locations: a prefix or a pattern would limit routes the app does not.
    assert {modifier for modifier, _, _ in limited} == {'='}, limited
    assert {path for _, path, _ in limited} == ratelimit.AUTH_ROUTES
    per_minute = flashsale.Settings().auth_rate_per_minute
    for _, path, body in limited:
        assert re.search(rf'^\s*limit_req zone=auth burst={per_minute} nodelay;', body, re.M), (path, body)
    key, rate = re.search(r'^\s*limit_req_zone (\S+) zone=auth:\S+ rate=(\d+)r/m;', conf, re.M).groups()
    assert int(rate) == per_minute
    # The app counts POSTs only (a GET there is its 405): so does nginx. A
    # request whose key is empty is not counted.
    choices = re.search(r'^\s*map \$request_method \%s \{(.*?)\}' % key, conf, re.M | re.S).group(1)
    assert dict(re.findall(r'(\S+)\s+(\S+);', choices)) == {'POST': '$binary_remote_addr', 'default': '""'}


def test_refresh_is_not_limited_behind_nginx_and_a_password_change_is(behind_nginx):
    base_url, _ = behind_nginx
    status, _, body = call(base_url, 'POST', '/api/auth/register', {'email': 'me@example.com', 'password': 'password123'})
    assert status == 201, body
    token = body['token']
    per_minute = flashsale.Settings().auth_rate_per_minute
    for _ in range(per_minute + 10):
        status, _, body = call(base_url, 'POST', '/api/auth/refresh', token=token)
        assert status == 200, body
    change = {'currentPassword': 'wrong password', 'newPassword': 'password123'}
    statuses = collections.Counter(call(base_url, 'POST', '/api/me/password', change, token=token).status
                                   for _ in range(per_minute + 10))
    assert set(statuses) == {401, 429} and statuses[429] >= 5, statuses
