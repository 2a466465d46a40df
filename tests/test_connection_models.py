"""The connections real crowds make, against a real `flashsale serve`: every
arrival on a new connection left open after its answer, pages holding a
connection each and polling with If-None-Match (scripts/loadclient.py's
FreshConnections, scripts/scenarios.py's Watchers), and a connection table that fills up."""

import socket
import time

import scenarios
import pytest

from conftest import call
from conftest import free_port
from conftest import sale_state
from conftest import serve_env
from conftest import start_serve


def serve(database_url, tmp_path, **extra):
    port = free_port()
    proc = start_serve(serve_env(database_url, PORT=str(port), THREADS='4', **extra),
                       tmp_path / 'serve.log')
    return proc, f'http://127.0.0.1:{port}'


@pytest.fixture
def admin_token(make_user):
    return make_user(admin=True)[1]


def test_a_crowd_on_new_connections_with_watchers_sells_exactly_the_stock(database_url, tmp_path, admin_token, db):
    proc, base_url = serve(database_url, tmp_path)
    try:
        result = scenarios.run_scenario(
            'crowd', base_url=base_url, admin_token=admin_token, database_url=database_url, seed=7,
            users=20, stock=5, rate=300, duration=1, connection_model='per-arrival',
            watchers=60, watch_interval=0.5, timeout=20,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert result['requests'] == 300
    assert result['errors'] == {}
    assert result['by_status'] == {'201': 5, '409': 295}
    # Every arrival had a connection of its own, and kept it to the end.
    assert result['connections']['peak_open'] == 300
    assert result['connections']['discarded'] == 0
    assert result['invariants']['verdict'] == 'pass', result['invariants']['checks']
    assert sale_state(db, result['sale']['id']) == (5, 0, 5)
    watch = result['watchers']
    assert watch['errors'] == {}
    assert watch['answered'] >= 60
    # Unchanged answers came back bodiless: the watchers sent If-None-Match.
    assert set(watch['by_status']) <= {200, 304} and watch['by_status'].get(304, 0) > 0, watch


def test_a_full_connection_table_does_not_stop_the_server_answering(database_url, tmp_path):
    """More idle connections than CONNECTION_LIMIT: the idle ones are closed
    (the longest-waiting shed from 90% of the limit, the rest after
    IDLE_TIMEOUT_MS), and a new client is answered."""
    proc, base_url = serve(database_url, tmp_path, CONNECTION_LIMIT='20', IDLE_TIMEOUT_MS='1000')
    port = int(base_url.rsplit(':', 1)[1])
    idle = []
    try:
        for _ in range(40):
            idle.append(socket.create_connection(('127.0.0.1', port), timeout=30))
        assert call(base_url, 'GET', '/health').status == 200
        # The server closed the idle connections it had accepted (it reads
        # b'' on them); none is left hanging open forever.
        closed = 0
        deadline = time.monotonic() + 30
        for conn in idle:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if conn.recv(1) == b'':
                    closed += 1
            except (TimeoutError, OSError):
                pass
        assert closed == len(idle)
    finally:
        for conn in idle:
            conn.close()
        proc.terminate()
        proc.wait(timeout=30)
