"""Two `flashsale serve` processes behind real nginx (scripts/nginx.conf):
the invariants hold across processes."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import call
from conftest import free_port
from conftest import race_and_check
from conftest import sale_state
from conftest import serve_env
from conftest import start_serve
from conftest import wait_for

NGINX_CONF = Path(__file__).resolve().parent.parent / 'scripts' / 'nginx.conf'


def answers_health(base_url, proc):
    """True once GET /health through nginx is 200; fails if nginx exited."""
    if proc.poll() is not None:
        pytest.fail(f'{proc.args} exited with {proc.returncode}')
    try:
        return call(base_url, 'GET', '/health', timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture
def behind_nginx(database_url, tmp_path):
    nginx = shutil.which('nginx') or ('/usr/sbin/nginx' if os.path.exists('/usr/sbin/nginx') else None)
    if nginx is None:
        if os.environ.get('CI'):
            pytest.fail('nginx is missing in CI (.ci/run installs it)')
        pytest.skip('nginx is not installed (apt-get install nginx-light)')
    app_ports = [free_port(), free_port()]
    front_port = free_port()
    apps = []
    for port in app_ports:
        env = serve_env(database_url, PORT=str(port), TRUSTED_PROXY='127.0.0.1', THREADS='4')
        log_path = tmp_path / f'app-{port}.log'
        apps.append((start_serve(env, log_path), log_path))
    conf = (
        NGINX_CONF.read_text()
        .replace('127.0.0.1:8001', f'127.0.0.1:{app_ports[0]}')
        .replace('127.0.0.1:8002', f'127.0.0.1:{app_ports[1]}')
        .replace('127.0.0.1:8080', f'127.0.0.1:{front_port}')
    )
    (tmp_path / 'nginx.conf').write_text(conf)
    (tmp_path / 'nginx-tmp').mkdir()
    front = subprocess.Popen([nginx, '-p', str(tmp_path), '-c', 'nginx.conf', '-g', 'daemon off;'])
    base_url = f'http://127.0.0.1:{front_port}'
    try:
        wait_for(lambda: answers_health(base_url, front), timeout=30, message='nginx to answer GET /health')
        yield base_url, [log_path for _, log_path in apps]
    finally:
        front.terminate()
        for proc, _ in apps:
            proc.terminate()
            proc.wait(timeout=30)
        front.wait(timeout=30)


def test_two_processes_behind_nginx_sell_exactly_the_stock(behind_nginx, make_users, make_sale, db):
    base_url, logs = behind_nginx
    sale_id = make_sale(stock=50)
    assert race_and_check(base_url, db, sale_id, make_users(200)) == {201: 50, 'sold_out': 150}
    assert sale_state(db, sale_id) == (50, 0, 50)
    # Both processes took purchases, and nginx replayed none.
    served = [log_path.read_text().count('/purchase ') for log_path in logs]
    assert all(n > 0 for n in served), served
    assert sum(served) == 200
