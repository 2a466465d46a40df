"""The real server: waitress over HTTP, the `flashsale` command, the embedded database."""

import os
import re
import signal

import pytest

import flashsale
from conftest import call
from conftest import clean_env
from conftest import free_port
from conftest import race_and_check
from conftest import run_cli
from conftest import sale_state
from conftest import run_together
from conftest import serve_env
from conftest import start_serve
from conftest import timed
from conftest import wait_for
from resources import embedded


def test_waitress_serves_health_with_security_headers(live_server):
    status, headers, body = call(live_server, 'GET', '/health')
    assert status == 200
    assert body['status'] == 'ok' and body['database'] == 'ok'
    assert headers['Server'] == 'flashsale'
    assert headers['X-Content-Type-Options'] == 'nosniff'
    assert headers['X-Frame-Options'] == 'DENY'
    assert "default-src 'none'" in headers['Content-Security-Policy']
    assert headers['Cache-Control'] == 'no-store'


def test_waitress_answers_unknown_routes_with_json(live_server):
    status, headers, body = call(live_server, 'GET', '/api/nothing-here')
    assert (status, body['code']) == (404, 'not_found')
    assert headers['Content-Type'] == 'application/json'


def test_health_is_503_when_the_database_is_unreachable(make_app):
    client = make_app(filled=False, database_url='postgresql://postgres@127.0.0.1:1/none', pool_size=1,
                      pool_timeout=0.5).client
    resp, took = timed(lambda: client.get('/health', status=503))
    assert took < 3
    assert resp.json['code'] == 'database_unavailable'
    assert resp.headers['Retry-After']


@pytest.mark.parametrize('secret', [None, 'too-short'])
def test_serve_refuses_to_start_without_a_strong_jwt_secret(database_url, secret):
    env = clean_env(DATABASE_URL=database_url, PORT=str(free_port()))
    if secret:
        env['JWT_SECRET'] = secret
    result = run_cli('serve', env=env)
    assert result.returncode == 2
    assert 'JWT_SECRET' in result.stderr
    assert 'Traceback' not in result.stderr


def test_serve_refuses_more_pool_connections_than_the_database_takes_in_one_line(database_url, db):
    budget = db.execute("SELECT current_setting('max_connections')::int AS n").fetchone()['n']
    workers = budget // 8 + 1  # at the default POOL_SIZE of 8, one process too many
    result = run_cli('serve', env=serve_env(database_url, PORT=str(free_port()), WORKERS=str(workers)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith(f'flashsale: POOL_SIZE (8) x WORKERS ({workers}) = {8 * workers} database '
                                    'connections, but the database takes ')
    assert f'(max_connections {budget} less ' in result.stderr


def test_grant_admin_makes_a_registered_user_admin(database_url, make_user, db):
    user_id, _ = make_user(email='boss@example.com')
    # An operator's command signs no token: it needs no JWT_SECRET.
    env = clean_env(DATABASE_URL=database_url)
    result = run_cli('grant-admin', 'Boss@Example.com', env=env)
    assert result.returncode == 0, result.stderr
    assert db.execute('SELECT is_admin FROM users WHERE id = %s', (user_id,)).fetchone()['is_admin'] is True
    missing = run_cli('grant-admin', 'nobody@example.com', env=env)
    assert missing.returncode == 2
    assert 'register first' in missing.stderr


def start_embedded_serve(data_dir, port):
    """(process, its output so far): no DATABASE_URL, data in data_dir."""
    env = clean_env(FLASHSALE_DATA_DIR=str(data_dir), PORT=str(port), BCRYPT_ROUNDS='4')
    log_path = data_dir / 'serve.log'
    proc = start_serve(env, log_path)
    return proc, log_path.read_text()


def postgres_running(data_dir):
    pid_file = data_dir / 'pgdata' / 'postmaster.pid'
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_embedded_serve_seeds_a_demo_survives_sigkill_and_stops_cleanly(tmp_path):
    """No DATABASE_URL: the server starts its own PostgreSQL, seeds a demo
    admin and sale, and prints them. Killed with SIGKILL it leaves that
    PostgreSQL running; the next start adopts it, and a SIGTERM then stops
    both (exit 0) instead of leaving the database running forever. (Its
    JWT secret file is left blank, as a crash while writing it would: it is
    replaced, and logins work.)"""
    port = free_port()
    base_url = f'http://127.0.0.1:{port}'
    (tmp_path / 'jwt_secret').write_text('\n')
    proc, output = start_embedded_serve(tmp_path, port)
    try:
        assert 'jwt_secret was unusable (empty): replaced with a new secret' in output
        password = re.search(r'admin@example\.com / (\S+)', output).group(1)
        status, _, body = call(base_url, 'GET', '/api/flash-sales/current')
        assert status == 200
        assert (body['flashSale']['name'], body['status'], body['flashSale']['remainingStock']) == ('Demo sale', 'active', 50)
        credentials = {'email': 'admin@example.com', 'password': password}
        status, _, body = call(base_url, 'POST', '/api/auth/login', credentials)
        assert status == 200, body
        assert body['user']['isAdmin'] is True
    finally:
        proc.kill()
        proc.wait()
    assert postgres_running(tmp_path)

    proc, output = start_embedded_serve(tmp_path, port)
    assert 'Demo data created' not in output
    assert call(base_url, 'GET', '/health').status == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not postgres_running(tmp_path)


@pytest.mark.parametrize('kept', ['', ' \n', 'too-short-by-far'], ids=['empty', 'blank', 'short'])
def test_an_unusable_development_secret_is_replaced_once_and_kept(tmp_path, kept):
    path = tmp_path / 'jwt_secret'
    path.write_text(kept)
    secret = embedded.jwt_secret(tmp_path, flashsale.MIN_JWT_SECRET_BYTES)
    assert len(secret.encode()) >= flashsale.MIN_JWT_SECRET_BYTES
    assert path.read_text() == secret
    assert path.stat().st_mode & 0o777 == 0o600
    assert embedded.jwt_secret(tmp_path, flashsale.MIN_JWT_SECRET_BYTES) == secret


def test_embedded_serve_refuses_in_one_line_a_secret_it_cannot_keep(tmp_path):
    (tmp_path / 'jwt_secret').mkdir()  # unreadable and unreplaceable, as on a broken disk
    result = run_cli('serve', env=clean_env(FLASHSALE_DATA_DIR=str(tmp_path), PORT=str(free_port())))
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    # One line, beside the log's "DATABASE_URL is not set".
    [line] = [line for line in result.stderr.splitlines() if line.startswith('flashsale: ')]
    assert line.startswith(f'flashsale: cannot keep the development JWT secret in {tmp_path}/jwt_secret: ')
    assert not (tmp_path / 'pgdata').exists()  # said before the database was started


def test_workers_share_one_port_and_keep_the_invariants(database_url, make_users, make_sale, db, tmp_path):
    """WORKERS=2: two processes accept on one socket; 200 buyers racing for
    50 items get exactly 50 orders, both workers answer, and SIGTERM stops
    them all with exit status 0."""
    env = serve_env(database_url, PORT='0', WORKERS='2', THREADS='4')
    log_path = tmp_path / 'serve.log'
    proc = start_serve(env, log_path)
    try:
        base_url = re.search(r'listening on (\S+) \(2 workers: \d+, \d+\)', log_path.read_text()).group(1)
        # The parent prints "listening" once the workers are forked, not once
        # they serve: a SIGTERM before a worker has set up its handler would
        # kill it (status -15, and the parent exits 1). Both have answered a
        # request, so both are in their serving loop, before anything else.
        workers_seen = set()

        def both_answer():
            workers_seen.update(answering_workers(base_url))
            return len(workers_seen) == 2

        wait_for(both_answer, timeout=60, message='both workers to answer')
        sale_id = make_sale(stock=50)
        assert race_and_check(base_url, db, sale_id, make_users(200)) == {201: 50, 'sold_out': 150}
        assert sale_state(db, sale_id) == (50, 0, 50)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    purchase_lines = [line for line in log_path.read_text().splitlines() if '/purchase ' in line]
    workers = {re.search(r'id=([0-9a-f]+)-', line).group(1) for line in purchase_lines}
    assert len(purchase_lines) == 200
    assert len(workers) == 2, workers


def answering_workers(base_url):
    """The process tags (the request id's prefix) of the workers that answer
    eight GET /health sent at once, each on a new connection."""
    tags = set()

    def ask():
        resp = call(base_url, 'GET', '/health')
        assert resp.status == 200, resp.json
        tags.add(resp.headers['X-Request-ID'].split('-')[0])

    run_together([ask] * 8)
    return tags
