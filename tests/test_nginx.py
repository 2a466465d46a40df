"""`flashsale serve` processes behind real nginx, running the shipped
scripts/nginx.conf (its ports changed): the invariants hold across processes,
polls are answered from nginx's one-second cache (never a request with a
token), nginx's own refusals are JSON, and a POST is never passed on to a
second process."""

import collections
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import flashsale
import pytest

from conftest import TEST_SECRET
from conftest import free_port
from conftest import race
from conftest import sale_state
from conftest import start_serve

NGINX_CONF = Path(__file__).resolve().parent.parent / 'scripts' / 'nginx.conf'


def wait_until_up(url, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f'{proc.args} exited with {proc.returncode}')
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f'{url} never answered')


def nginx_binary():
    nginx = shutil.which('nginx') or ('/usr/sbin/nginx' if os.path.exists('/usr/sbin/nginx') else None)
    if nginx is None:
        if os.environ.get('CI'):
            pytest.fail('nginx is missing in CI (.ci/run installs it)')
        pytest.skip('nginx is not installed (apt-get install nginx-light)')
    return nginx


def start_nginx(tmp_path, upstream_ports, ready_path='/health'):
    """The shipped nginx.conf in front of upstream_ports; returns (front URL,
    process) once ready_path answers 200 through it (None: once its port
    accepts connections, with no request sent upstream)."""
    nginx = nginx_binary()
    front_port = free_port()
    conf = (
        NGINX_CONF.read_text()
        .replace('127.0.0.1:8001', f'127.0.0.1:{upstream_ports[0]}')
        .replace('127.0.0.1:8002', f'127.0.0.1:{upstream_ports[1]}')
        .replace('127.0.0.1:8080', f'127.0.0.1:{front_port}')
    )
    assert f'127.0.0.1:{front_port}' in conf and f'127.0.0.1:{upstream_ports[1]}' in conf
    (tmp_path / 'nginx.conf').write_text(conf)
    (tmp_path / 'nginx-tmp').mkdir()
    # As root (CI), nginx's workers would run as nobody, who cannot write the
    # cache under the test's private temporary directory.
    globals_ = 'daemon off;' + (' user root;' if os.geteuid() == 0 else '')
    front = subprocess.Popen([nginx, '-p', str(tmp_path), '-c', 'nginx.conf', '-g', globals_])
    if ready_path:
        wait_until_up(f'http://127.0.0.1:{front_port}{ready_path}', front)
        return f'http://127.0.0.1:{front_port}', front
    deadline = time.monotonic() + 30
    while True:
        if front.poll() is not None:
            pytest.fail(f'nginx exited with {front.returncode}')
        try:
            socket.create_connection(('127.0.0.1', front_port), timeout=2).close()
            return f'http://127.0.0.1:{front_port}', front
        except OSError:
            assert time.monotonic() < deadline, 'nginx never listened'
            time.sleep(0.05)


def app_env(database_url, port):
    return dict(
        os.environ, DATABASE_URL=database_url, JWT_SECRET=TEST_SECRET, PORT=str(port),
        TRUSTED_PROXY='127.0.0.1', BCRYPT_ROUNDS='4', THREADS='4', WORKERS='1',
    )


class AppLog:
    """An app process' access log, read once every line written so far is in it."""

    def __init__(self, port, path):
        self.port = port
        self.path = path
        self.markers = 0

    def settled(self):
        """The log's text, after a request made straight to the app now has
        its line (lines go out through one writer thread, in order)."""
        self.markers += 1
        with urllib.request.urlopen(f'http://127.0.0.1:{self.port}/health', timeout=10) as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 10
        while True:
            text = self.path.read_text()
            if text.count('GET /health 200') >= self.markers:
                return text
            assert time.monotonic() < deadline, 'the app never logged the marker request'
            time.sleep(0.05)

    def count(self, needle):
        text = self.settled()
        return text.count(needle)


@pytest.fixture
def behind_nginx(database_url, tmp_path):
    app_ports = [free_port(), free_port()]
    apps = []
    for port in app_ports:
        log_path = tmp_path / f'app-{port}.log'
        apps.append((start_serve(app_env(database_url, port), log_path), AppLog(port, log_path)))
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


def request(base_url, method, path, headers=None, body=None, conn=None):
    """(status, headers, raw body) of one request."""
    host, port = base_url.removeprefix('http://').split(':')
    own = conn is None
    conn = conn or http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        if own:
            conn.close()


def test_two_processes_behind_nginx_sell_exactly_the_stock(behind_nginx, make_users, make_sale, db):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=50)
    results = race(base_url, [(sale_id, token) for _, token in make_users(200)])
    counts = collections.Counter(code or status for status, code, _ in results)
    assert counts == {201: 50, 'sold_out': 150}
    assert sale_state(db, sale_id) == (50, 0, 50)
    answered = {r[2]['id'] for r in results if r[0] == 201}
    assert answered == {str(r['id']) for r in db.execute('SELECT id FROM orders')}
    # Both processes took purchases, and nginx replayed none.
    served = [log.count('/purchase ') for log in logs]
    assert all(n > 0 for n in served), served
    assert sum(served) == 200


def test_polls_come_from_nginx_cache_with_etag_and_304(behind_nginx, make_sale):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=5)
    path = f'/api/flash-sales/{sale_id}'
    status, headers, body = request(base_url, 'GET', path)
    assert status == 200 and headers['x-cache'] in ('MISS', 'EXPIRED', 'UPDATING', 'STALE')
    etag = headers['etag']
    assert json.loads(body)['flashSale']['id'] == str(sale_id)
    # The same answer again, from the cache, still with its ETag ...
    hits = 0
    for _ in range(20):
        status, headers, again = request(base_url, 'GET', path)
        assert status == 200 and headers['etag'] == etag
        assert json.loads(again)['flashSale'] == json.loads(body)['flashSale']
        hits += headers['x-cache'] == 'HIT'
    assert hits > 0
    # ... and If-None-Match makes it a bodiless 304, from nginx or the app.
    status, headers, empty = request(base_url, 'GET', path, headers={'If-None-Match': etag})
    assert (status, empty) == (304, b'')
    assert headers['etag'] == etag
    status, _, _ = request(base_url, 'GET', path, headers={'If-None-Match': '"something-else"'})
    assert status == 200


def test_a_request_with_a_token_is_never_answered_from_or_stored_in_the_cache(behind_nginx, make_sale,
                                                                              make_users):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=5)
    path = f'/api/flash-sales/{sale_id}'
    [(_, token)] = make_users(1)
    before = sum(log.count(f'GET {path} ') for log in logs)
    for _ in range(5):
        status, headers, _ = request(base_url, 'GET', path, headers={'Authorization': f'Bearer {token}'})
        assert status == 200 and headers['x-cache'] == 'BYPASS'
    # Every one of them reached the app ...
    assert sum(log.count(f'GET {path} ') for log in logs) - before == 5
    # ... and none was stored: the first request without a token misses.
    status, headers, _ = request(base_url, 'GET', path)
    assert status == 200 and headers['x-cache'] == 'MISS'
    # A token on a cached key still bypasses it.
    status, headers, _ = request(base_url, 'GET', path, headers={'Authorization': f'Bearer {token}'})
    assert headers['x-cache'] == 'BYPASS'


def test_many_pollers_cost_the_app_about_one_request_per_second(behind_nginx, make_sale):
    base_url, logs = behind_nginx
    make_sale(stock=5)
    before = sum(log.count('GET /api/flash-sales/current ') for log in logs)
    answered = []
    polls = []  # one item per answered poll (list.append is atomic)
    stop = threading.Event()
    host, port = base_url.removeprefix('http://').split(':')

    def poll():
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        n = 0
        while not stop.is_set():
            status, _, body = request(base_url, 'GET', '/api/flash-sales/current', conn=conn)
            assert status == 200 and json.loads(body)['status'] == 'active'
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
    status, headers, body = request(base_url, 'POST', '/api/auth/login', body=b'x' * 20000,
                                    headers={'Content-Type': 'application/json'})
    assert status == 413
    assert headers['content-type'] == 'application/json'
    assert json.loads(body)['code'] == 'payload_too_large'
    # Not HTTP: nginx's 400.
    host, port = base_url.removeprefix('http://').split(':')
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n')
        answer = b''
        while b'}' not in answer:
            chunk = raw.recv(4096)
            assert chunk, answer
            answer += chunk
    head, _, rest = answer.partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 400')
    assert json.loads(rest)['code'] == 'bad_request'
    # register/login beyond the burst from one address: 429 with Retry-After.
    login = json.dumps({'email': 'nobody@example.com', 'password': 'wrong password'}).encode()
    statuses = collections.Counter()
    limited = None
    for _ in range(40):
        status, headers, body = request(base_url, 'POST', '/api/auth/login', body=login,
                                        headers={'Content-Type': 'application/json'})
        statuses[status] += 1
        if status == 429:
            limited = (headers, body)
    assert set(statuses) == {401, 429} and statuses[429] >= 5, statuses
    headers, body = limited
    assert headers['content-type'] == 'application/json' and int(headers['retry-after']) >= 1
    assert json.loads(body) == {'code': 'rate_limited', 'message': 'Too many requests; slow down.'}


class DiesMidRequest:
    """An upstream that reads a whole request, then drops the connection
    without answering (as a process killed while it served the request):
    every request it saw is recorded."""

    def __init__(self):
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.seen = []
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
            # Reset, not a clean close: the answer is gone for good.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')

    def close(self):
        self.listener.close()


def test_a_post_is_never_passed_on_to_a_second_process(database_url, tmp_path, make_users, make_sale, db):
    dying = DiesMidRequest()
    app_port = free_port()
    log = AppLog(app_port, tmp_path / 'app.log')
    app = start_serve(app_env(database_url, app_port), log.path)
    front = None
    try:
        base_url, front = start_nginx(tmp_path, [dying.port, app_port], ready_path=None)
        sale_id = make_sale(stock=100)
        answers = collections.Counter()
        bad_gateway = None
        # Round robin sends one of the first two purchases to the dying
        # upstream (after its failure nginx leaves it out for 10 s).
        for _, token in make_users(6):
            status, headers, body = request(base_url, 'POST', f'/api/flash-sales/{sale_id}/purchase',
                                            headers={'Authorization': f'Bearer {token}'})
            answers[status] += 1
            if status == 502:
                bad_gateway = (headers, body)
        assert answers[502] >= 1 and set(answers) == {201, 502}, answers
        headers, body = bad_gateway
        assert headers['content-type'] == 'application/json'
        assert json.loads(body)['code'] == 'bad_gateway'
        # Each 502 is a purchase the dying upstream got, and nginx did not
        # send it on: the app saw exactly the purchases it answered.
        assert len([line for line in dying.seen if line.startswith('POST ')]) == answers[502]
        assert log.count('/purchase ') == answers[201]
        assert sale_state(db, sale_id) == (100, 100 - answers[201], answers[201])
    finally:
        if front is not None:
            front.terminate()
            front.wait(timeout=30)
        app.terminate()
        app.wait(timeout=30)
        dying.close()


def test_nginx_drops_idle_app_connections_before_the_app_does():
    """A purchase sent on a kept-alive connection the app is just closing is
    a 502 (nginx never sends a POST twice): nginx must give up idle
    connections first."""
    conf = NGINX_CONF.read_text()
    upstream = conf[conf.index('upstream flashsale {'):]
    upstream = upstream[:upstream.index('}')]
    nginx_idle = int(re.search(r'^\s*keepalive_timeout (\d+)s;', upstream, re.M).group(1))
    assert nginx_idle < flashsale.Settings.from_env({}).idle_timeout
