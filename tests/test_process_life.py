"""A real `flashsale serve` with two workers, under each server, through its
life: a worker killed mid-crowd is replaced, SIGTERM however it arrives is
one graceful stop, SIGHUP changes nothing, and the port is one server's."""

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

import invariants
from conftest import answer
from conftest import backends_waiting_on_a_lock
from conftest import buy_over_http
from conftest import call
from conftest import connect
from conftest import free_port
from conftest import hold_sale_row
from conftest import requests_read_by_server
from conftest import sale_state
from conftest import send
from conftest import SERVERS
from conftest import serve_env
from conftest import start_serve
from conftest import wait_for

def start_workers(database_url, tmp_path, server, **extra):
    """`flashsale serve` with WORKERS=2 under `server`: (process, base URL,
    worker pids, log path), once both workers answer."""
    log_path = tmp_path / f'serve-{server}.log'
    proc = start_serve(serve_env(database_url, PORT=str(free_port()), WORKERS='2', THREADS='8',
                                 SERVER=server, **extra), log_path)
    found = re.search(r'listening on (\S+) \(2 workers: (\d+), (\d+)\)', log_path.read_text())
    base_url, pids = found.group(1), [int(found.group(2)), int(found.group(3))]
    wait_for(lambda: answering_pids(base_url) == set(pids), timeout=60, message='both workers to answer')
    return proc, base_url, pids, log_path


def answering_pids(base_url, tries=16):
    """The pids of the workers that answered `tries` GET /health, each on a
    new connection (the request id starts with the process' pid in hex)."""
    pids = set()
    for _ in range(tries):
        resp = call(base_url, 'GET', '/health')
        assert resp.status == 200, resp.json
        pids.add(int(resp.headers['X-Request-ID'].split('-')[0], 16))
    return pids


def stop(proc):
    """SIGTERM to the parent; its exit status."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize('server', SERVERS)
def test_a_killed_worker_is_replaced_and_the_other_keeps_selling(
        server, database_url, tmp_path, make_users, make_sale, db):
    proc, base_url, pids, log_path = start_workers(database_url, tmp_path, server)
    try:
        sale_id = make_sale(stock=150)
        users = make_users(400)
        answers = [None] * len(users)
        killed = threading.Event()
        after_kill = []  # (pid that answered) for purchases answered after the kill

        def buyer(offset):
            for index in range(offset, len(users), 16):
                user, token = users[index]
                status, code, order, pid = buy_over_http(base_url, sale_id, token)
                kind = 'created' if status == 201 else code or 'no_answer'
                answers[index] = invariants.Answer(str(user), kind, (order or {}).get('id'))
                if killed.is_set() and pid is not None:
                    after_kill.append(pid)
                if index == 160 and not killed.is_set():
                    _kill(pids[0], signal.SIGKILL)
                    killed.set()

        threads = [threading.Thread(target=buyer, args=(offset,)) for offset in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert killed.is_set()
        # The other worker kept answering, and so did a replacement.
        assert pids[1] in after_kill
        wait_for(lambda: 'started in place of the one that died' in log_path.read_text(), timeout=30,
                 message='a replacement worker')
        replacement = int(re.search(r'worker (\d+) started in place', log_path.read_text()).group(1))
        # The parent forks with no thread of its own running (a fork copies
        # only the forking thread, and any lock another one held).
        assert os.listdir(f'/proc/{proc.pid}/task') == [str(proc.pid)]
        wait_for(lambda: replacement in answering_pids(base_url), timeout=30, message='the replacement to answer')
        assert proc.poll() is None
        # Only what the killed worker was serving went unanswered.
        lost = [a for a in answers if a.kind == 'no_answer']
        assert len(lost) <= 16, lost
        # The users left without an answer settle it by buying again.
        for index, lost_one in enumerate(answers):
            if lost_one.kind == 'no_answer':
                status, code, order, _ = buy_over_http(base_url, sale_id, users[index][1])
                answers.append(invariants.Answer(lost_one.user, 'created' if status == 201 else code,
                                                 (order or {}).get('id')))
        state, orders = invariants.read_sale(db, sale_id)
        checks = invariants.check_sale(state, orders, answers, unknown_ok=True)
        assert invariants.verdict(checks) == 'pass', checks
        assert state.orders == 150
    finally:
        assert stop(proc) == 0, log_path.read_text()


@pytest.mark.parametrize('server', SERVERS)
def test_sigterm_to_every_process_twice_answers_every_purchase_in_flight(
        server, database_url, tmp_path, make_users, make_sale, db):
    """systemd's default stop: SIGTERM to the parent and to each worker at
    once (and the parent passes its own on), here twice, with 20 purchases
    held behind the sale's row lock: every client gets its answer, and the
    orders are those answered 201."""
    proc, base_url, pids, log_path = start_workers(database_url, tmp_path, server)
    port = int(base_url.rsplit(':', 1)[1])
    sale_id = make_sale(stock=50)
    users = make_users(20)
    locker = hold_sale_row(database_url, sale_id)
    results = [None] * len(users)

    def buyer(index):
        results[index] = buy_over_http(base_url, sale_id, users[index][1])

    threads = [threading.Thread(target=buyer, args=(i,)) for i in range(len(users))]
    try:
        for thread in threads:
            thread.start()
        # Every request read by a worker, and a statement waiting on the lock.
        wait_for(lambda: requests_read_by_server(port) >= len(users), timeout=30, message='20 requests read')
        wait_for(lambda: backends_waiting_on_a_lock(database_url) >= 1, timeout=30, message='a purchase statement')
        for _ in range(2):
            for pid in (proc.pid, *pids):
                _kill(pid, signal.SIGTERM)
        wait_for(lambda: log_path.read_text().count('SIGTERM: stopping') >= 2, timeout=30,
                 message='both workers stopping')
    finally:
        locker.commit()
        locker.close()
    for thread in threads:
        thread.join(60)
    assert proc.wait(timeout=60) == 0, log_path.read_text()
    assert [status for status, *_ in results] == [201] * len(users), results
    answered = {order['id'] for _, _, order, _ in results}
    stored = {str(row['id']) for row in db.execute('SELECT id FROM orders WHERE flash_sale_id = %s', (sale_id,))}
    assert answered == stored
    assert 'unfinished' not in log_path.read_text()


def test_sighup_changes_nothing(database_url, tmp_path):
    """logrotate's `kill -HUP`, a closed terminal: every process goes on
    serving (nothing to reopen: the log is stderr); SIGTERM still stops."""
    proc, base_url, pids, log_path = start_workers(database_url, tmp_path, 'waitress')
    for pid in (proc.pid, *pids):
        _kill(pid, signal.SIGHUP)
    # Each process has taken it once the parent answers a signal it handles:
    # the workers are asked again until both answer.
    wait_for(lambda: answering_pids(base_url) == set(pids), timeout=30, message='both workers after SIGHUP')
    assert proc.poll() is None
    assert 'stopping' not in log_path.read_text()
    assert stop(proc) == 0


def test_a_second_server_on_a_taken_port_refuses_to_start(database_url, tmp_path):
    proc, base_url, pids, log_path = start_workers(database_url, tmp_path, 'waitress')
    try:
        port = base_url.rsplit(':', 1)[1]
        second = subprocess.run([sys.executable, '-m', 'flashsale', 'serve'],
                                env=serve_env(database_url, PORT=port, WORKERS='2'),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f'cannot listen on 127.0.0.1:{port}: Address already in use' in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        # The first is untouched: both its workers answer, nothing else does.
        assert answering_pids(base_url) == set(pids)
    finally:
        assert stop(proc) == 0


def test_granian_refuses_the_limits_of_waitress_raw_port(database_url):
    result = subprocess.run([sys.executable, '-m', 'flashsale', 'serve'],
                            env=serve_env(database_url, PORT='0', SERVER='granian', IDLE_TIMEOUT_MS='5000'),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith('flashsale: IDLE_TIMEOUT_MS is a setting of the waitress server only')
    assert 'Traceback' not in result.stderr
    result = subprocess.run([sys.executable, '-m', 'flashsale', 'serve'],
                            env=serve_env(database_url, PORT='0', SERVER='gunicorn'),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'SERVER must be waitress or granian' in result.stderr


@pytest.mark.parametrize('server', SERVERS)
def test_sigterm_on_a_busy_host_answers_the_logins_being_hashed_within_the_grace(server, database_url, tmp_path):
    """Three CPU burners at normal priority leave the SCHED_IDLE hashing
    processes nothing: the registrations being hashed at SIGTERM are
    answered (503 with Retry-After unless their hash ended) within the
    grace (the log says no request was left unfinished), and the server
    exits without waiting for the hashes."""
    log_path = tmp_path / 'serve.log'
    proc = start_serve(serve_env(database_url, PORT=str(free_port()), SERVER=server, BCRYPT_ROUNDS='15',
                                 HASH_PROCESSES='1', SHUTDOWN_TIMEOUT_MS='2000'), log_path)
    base_url = re.search(r'listening on (\S+)', log_path.read_text()).group(1)
    port = int(base_url.rsplit(':', 1)[1])
    burners = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(3)]
    results = [None] * 3

    def register(index):
        try:
            resp = call(base_url, 'POST', '/api/auth/register', timeout=60,
                        body={'email': f'busy-{index}-{os.getpid()}@example.com', 'password': 'a long password'})
            results[index] = (resp.status, resp.headers.get('Retry-After'))
        except OSError as exc:
            results[index] = (None, type(exc).__name__)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
        # Each read by the server (or, if its hash was quick, answered already).
        wait_for(lambda: requests_read_by_server(port) + sum(r is not None for r in results) >= 3, timeout=30,
                 message='3 registrations read')
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        # The code before waited for the starved hashes: exit 30 s and more
        # after the signal, its clients cut off unanswered at the grace.
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        proc.kill()
    assert all(status in (201, 503) for status, _ in results), results
    assert all(after for status, after in results if status == 503), results
    assert 'unfinished' not in log_path.read_text()


@pytest.mark.parametrize('server', SERVERS)
def test_the_answers_of_a_stopping_server_say_connection_close(server, database_url, tmp_path, make_users,
                                                                 make_sale, db):
    """A purchase held behind the sale's row lock at SIGTERM is answered on
    its keep-alive connection with Connection: close, so the client sends
    its next request on a new connection (to another process) instead of
    on one about to close; under waitress, a request that comes on an open
    keep-alive connection during the stop is served the same way."""
    log_path = tmp_path / 'serve.log'
    proc = start_serve(serve_env(database_url, PORT=str(free_port()), SERVER=server), log_path)
    base_url = re.search(r'listening on (\S+)', log_path.read_text()).group(1)
    sale_id = make_sale(stock=5)
    (_, first), (_, second) = make_users(2)
    held = connect(base_url)
    idle = connect(base_url)
    send(idle, 'GET', '/health')
    assert answer(idle).status == 200
    locker = hold_sale_row(database_url, sale_id)
    try:
        send(held, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=first)
        wait_for(lambda: backends_waiting_on_a_lock(database_url) >= 1, timeout=30, message='the purchase waiting')
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: 'SIGTERM: stopping' in log_path.read_text(), timeout=30, message='the stop')
        if server == 'waitress':
            send(idle, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=second)
    finally:
        locker.commit()
        locker.close()
    got = answer(held)
    assert got.status == 201 and got.headers['Connection'].lower() == 'close', (got.status, dict(got.headers))
    if server == 'waitress':
        late = answer(idle)
        assert late.status == 201 and late.headers['Connection'].lower() == 'close'
    assert proc.wait(timeout=30) == 0
    assert sale_state(db, sale_id).orders == (2 if server == 'waitress' else 1)
