#!/usr/bin/env python3
"""flashsale measured with the load generators people use, and the connections real crowds make.

    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix scripts/bench-tools   # Artillery (once)
    apt-get install wrk                                                     # wrk (once)
    .venv/bin/python scripts/bench_external.py --shape plain                 # `flashsale serve`, defaults
    .venv/bin/python scripts/bench_external.py --shape nginx                 # 2 processes behind scripts/nginx.conf

Each run starts its own servers (BCRYPT_ROUNDS=4, a fresh JWT_SECRET, every
other setting the server's default unless set in the environment) against
--database-url (default: a throwaway embedded PostgreSQL), prepares users and
sales through the API (loadtest.py's client), and prints one table:

  crowd      the reference's own crowd test, run as the reference runs it:
             Artillery, 1,000 arrivals/s for 4 s, each arrival a new virtual
             user on a new connection, POST /purchase with a random one of 100
             users' tokens, stock 50. --artillery-script runs a given
             Artillery script file instead of the one generated here (e.g. the
             reference's own purchase.yml, unmodified: its CSV payloads are
             written into a data/ folder beside a copy of it).
  purchases  wrk, 64 keep-alive connections, every request a distinct
             user's first purchase (a Lua script hands out the tokens), stock
             that never runs out.
  sold-out   wrk, 64 keep-alive connections, purchases of a sold-out sale.
  watchers   (nginx shape) --watchers connections polling GET
             /api/flash-sales/current every 1.5 s with If-None-Match (as the
             page does, loadtest.py's Watchers) while the crowd test runs;
             how many polls reached the app, counted in its access log.

After every purchase run the sale is read back: remaining + orders == total,
orders == 201s answered. The machine's cores are shared by the clients, the
servers and PostgreSQL: compare figures of one run (--repeat), not of two days.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'scripts'))

import bench  # noqa: E402
import loadclient  # noqa: E402
import loadtest  # noqa: E402
from wrk_purchases import purchases_held  # noqa: E402
from wrk_purchases import run_wrk  # noqa: E402

ARTILLERY = ROOT / 'scripts' / 'bench-tools' / 'node_modules' / '.bin' / 'artillery'
NGINX_CONF = ROOT / 'scripts' / 'nginx.conf'

# The reference's crowd test: 1,000 arrivals/s for 4 s, 100 users, stock 50.
CROWD = {'rate': 1000, 'duration': 4, 'users': 100, 'stock': 50}

# --- servers --------------------------------------------------------------------


class Servers:
    """The shape under test: `plain` (one `flashsale serve`, defaults) or
    `nginx` (two `flashsale serve` on their own ports behind scripts/nginx.conf)."""

    def __init__(self, shape, database_url, workdir, env_extra=None, nginx_conf=NGINX_CONF):
        self.shape = shape
        self.nginx_conf = Path(nginx_conf)
        self.database_url = database_url
        self.workdir = Path(workdir)
        self.secret = secrets.token_urlsafe(48)
        self.env_extra = env_extra or {}
        # FLASHSALE_CMD: another checkout's server, for an A/B in one window.
        self.command = shlex.split(os.environ['FLASHSALE_CMD']) if os.environ.get('FLASHSALE_CMD') \
            else bench.flashsale_command()
        self.procs = []
        self.app_logs = []
        self.base_url = None
        self.setup_url = None  # where users are registered: nginx limits /api/auth/ per address

    def _serve(self, port, extra):
        env = dict(os.environ, DATABASE_URL=self.database_url, JWT_SECRET=self.secret, BCRYPT_ROUNDS='4',
                   HOST='127.0.0.1', PORT=str(port), **self.env_extra, **extra)
        log_path = self.workdir / f'app-{port}.log'
        self.app_logs.append(log_path)
        log = open(log_path, 'w')
        proc = subprocess.Popen(self.command + ['serve'], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def start(self):
        if self.shape == 'reference':
            # Already running (started by hand, unmodified): only its address.
            self.base_url = self.setup_url = os.environ['REFERENCE_URL']
            return self
        if self.shape == 'plain':
            port = bench.free_port()
            # Users are registered and the load sent from loopback: exempt,
            # explicitly (nothing is by default).
            self._serve(port, {'RATE_LIMIT_EXEMPT': '127.0.0.1,::1'})
            self.base_url = self.setup_url = f'http://127.0.0.1:{port}'
            self._wait(self.base_url + '/health', self.procs[0])
            return self
        nginx = shutil.which('nginx') or '/usr/sbin/nginx'
        app_ports = [bench.free_port(), bench.free_port()]
        front = bench.free_port()
        for port in app_ports:
            # Every client here is loopback, and an exemption of the proxy's
            # address is refused: the app's limits are off instead (nginx
            # still limits /api/auth/ at the door; users are registered on
            # an app port directly).
            self._serve(port, {'TRUSTED_PROXY': '127.0.0.1', 'WORKERS': os.environ.get('WORKERS', '1'),
                               'AUTH_RATE_PER_MINUTE': '0', 'PURCHASE_RATE_PER_SECOND': '0'})
        for port, proc in zip(app_ports, self.procs):
            self._wait(f'http://127.0.0.1:{port}/health', proc)
        self.setup_url = f'http://127.0.0.1:{app_ports[0]}'
        conf = (self.nginx_conf.read_text()
                .replace('127.0.0.1:8001', f'127.0.0.1:{app_ports[0]}')
                .replace('127.0.0.1:8002', f'127.0.0.1:{app_ports[1]}')
                .replace('127.0.0.1:8080', f'127.0.0.1:{front}'))
        (self.workdir / 'nginx.conf').write_text(conf)
        (self.workdir / 'nginx-tmp').mkdir(exist_ok=True)
        globals_ = 'daemon off;' + (' user root;' if os.geteuid() == 0 else '')  # root: workers could not write the cache
        self.nginx = subprocess.Popen([nginx, '-p', str(self.workdir), '-c', 'nginx.conf', '-g', globals_],
                                      stderr=open(self.workdir / 'nginx.log', 'w'))
        self.procs.append(self.nginx)
        self.base_url = f'http://127.0.0.1:{front}'
        self._wait(self.base_url + '/health', self.nginx)
        return self

    @staticmethod
    def _wait(url, proc):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f'bench_external: {proc.args} exited with {proc.returncode}')
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f'bench_external: {url} never answered')

    def app_pids(self):
        return [p.pid for p in self.procs if p is not getattr(self, 'nginx', None)]

    def app_cpu(self):
        if self.shape == 'reference':
            pid = bench.pid_listening_on(loadclient.split_base_url(self.base_url)[1])
            return bench.cpu_seconds_of(pid) if pid else 0.0
        return sum(bench.cpu_seconds_of(pid) for pid in self.app_pids())

    def log_lines(self, pattern):
        """Lines of the apps' access logs matching `pattern`, so far."""
        return sum(len(re.findall(pattern, path.read_text(errors='replace'))) for path in self.app_logs)

    def stop(self):
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- preparing users and sales through the API ------------------------------------


class Prepared:
    def __init__(self, base_url, database_url):
        self.api = loadclient.Api(base_url)
        self.database_url = database_url
        self.run_id = uuid.uuid4().hex[:8]
        self.admin = None
        self.batches = 0  # each call's users are new ones, also in a --repeat

    def label(self, label):
        self.batches += 1
        return f'ext-{self.run_id}-{label}-{self.batches}'

    async def admin_token(self):
        if self.admin is None:
            self.admin = await self.api.admin_token(grant_admin=True, flashsale_cmd=' '.join(bench.flashsale_command()),
                                                    database_url=self.database_url, run_id=self.run_id)
        return self.admin

    async def users(self, count, label):
        users = await self.api.register_users(count, self.label(label), concurrency=8)
        self.api.pool.close()
        return users

    async def sale(self, stock, label):
        admin = await self.admin_token()
        now, _ = await self.api.server_clock()
        sale = await self.api.create_sale(admin, stock, now - timedelta(seconds=1), timedelta(hours=1),
                                          f'external {label} {self.run_id}')
        self.api.pool.close()
        return sale['id']

    async def state(self, sale_id):
        """(total, remaining, orders) from the database."""
        await asyncio.sleep(1.0)  # past the server's poll cache
        db = loadtest.read_database(self.database_url, sale_id)
        return db


class ReferencePrepared(Prepared):
    """The same preparation for the reference app (Express + Drizzle, run by
    hand and unmodified, REFERENCE_URL and REFERENCE_JWT_SECRET): its sales
    may not overlap in time, so each run's sale ends the one before; its
    registration hashes at bcrypt cost 10 or more, so users are written
    straight into its database (same table and column names as ours) with
    tokens signed by its secret, as its login would sign them."""

    async def admin_token(self):
        return None

    async def users(self, count, label):
        import jwt
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "INSERT INTO users (email, password) SELECT %s || '-' || g || '@example.com', 'x' "
                'FROM generate_series(1, %s) g RETURNING id, email', (self.label(label), count),
            ).fetchall()
        secret = os.environ['REFERENCE_JWT_SECRET']
        now = int(time.time())
        return [loadclient.User(i, email, str(uid),
                              jwt.encode({'id': str(uid), 'email': email, 'iat': now, 'exp': now + 86400},
                                         secret, algorithm='HS256'))
                for i, (uid, email) in enumerate(rows)]

    async def sale(self, stock, label):
        import psycopg

        start = time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(time.time() - 1))
        end = time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(time.time() + 3600))
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("UPDATE flash_sales SET end_date = %s::timestamp - interval '1 millisecond' "
                         'WHERE end_date >= %s::timestamp', (start[:-1], start[:-1]))
        _, body = await self.api.call('POST', '/api/flash-sales', expect=(200, 201),
                                      body={'startDate': start, 'endDate': end, 'totalStock': stock})
        self.api.pool.close()
        return body['flashSale']['id']


# --- Artillery: the reference's crowd test ---------------------------------------------


def artillery_script(target):
    """The reference's crowd scenario as an Artillery script (JSON is YAML):
    1,000 arrivals/s for 4 s, each a new virtual user on its own connection
    posting one purchase with a random user's token from data/users.csv."""
    return {
        'config': {
            'target': target,
            'phases': [{'duration': CROWD['duration'], 'arrivalRate': CROWD['rate']}],
            'payload': [
                {'path': './data/users.csv', 'fields': ['email', 'password', 'token'], 'skipHeader': True},
                {'path': './data/flash-sale.csv', 'fields': ['flash_sale_id'], 'skipHeader': True},
            ],
            'defaults': {'headers': {'Content-Type': 'application/json'}},
        },
        'scenarios': [{
            'name': 'purchase',
            'flow': [{'post': {'url': '/api/flash-sales/{{ flash_sale_id }}/purchase',
                               'headers': {'Authorization': 'Bearer {{ token }}'},
                               'json': {}}}],
        }],
    }


def run_artillery(target, users, sale_id, workdir, script=None):
    if not ARTILLERY.exists():
        raise SystemExit(f'bench_external: {ARTILLERY} is missing: '
                         'PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix scripts/bench-tools')
    run_dir = Path(tempfile.mkdtemp(prefix='artillery-', dir=workdir))
    (run_dir / 'data').mkdir()
    with open(run_dir / 'data' / 'users.csv', 'w', newline='') as fh:
        out = csv.writer(fh)
        out.writerow(['email', 'password', 'token'])
        for u in users:
            out.writerow([u.email, loadclient.USER_PASSWORD, u.token])
    (run_dir / 'data' / 'flash-sale.csv').write_text(f'flash_sale_id\n{sale_id}\n')
    if script:
        script_path = run_dir / Path(script).name
        shutil.copyfile(script, script_path)
    else:
        script_path = run_dir / 'crowd.json'
        script_path.write_text(json.dumps(artillery_script(target), indent=2))
    report = run_dir / 'report.json'
    env = dict(os.environ, ARTILLERY_DISABLE_TELEMETRY='true', DO_NOT_TRACK='1')
    done = subprocess.run([str(ARTILLERY), 'run', '--target', target, '--output', str(report), str(script_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not report.exists():
        raise SystemExit(f'bench_external: artillery failed ({done.returncode}):\n{done.stdout[-2000:]}'
                         f'\n{done.stderr[-2000:]}')
    aggregate = json.loads(report.read_text())['aggregate']
    counters = aggregate.get('counters', {})
    summary = aggregate.get('summaries', {}).get('http.response_time', {})
    codes = {k.rsplit('.', 1)[1]: v for k, v in counters.items() if k.startswith('http.codes.')}
    errors = {k.split('.', 1)[1]: v for k, v in counters.items() if k.startswith('errors.')}
    return {'codes': codes, 'errors': errors, 'requests': counters.get('http.requests', 0),
            'p50_ms': summary.get('median'), 'p99_ms': summary.get('p99'), 'max_ms': summary.get('max')}


async def crowd(servers, prepared, workdir, script=None, log=print):
    users = await prepared.users(CROWD['users'], 'crowd')
    sale_id = await prepared.sale(CROWD['stock'], 'crowd')
    log(f'crowd (Artillery): {CROWD["rate"]} arrivals/s for {CROWD["duration"]} s against {servers.base_url} ...')
    result = await asyncio.to_thread(run_artillery, servers.base_url, users, sale_id, workdir, script)
    result['database'] = await prepared.state(sale_id)
    db = result['database']
    result['ok'] = (db['remaining'] + db['orders'] == db['total'] and db['duplicates'] == 0
                    and db['orders'] == result['codes'].get('201', result['codes'].get('200', 0)) == CROWD['stock']
                    and not result['errors'])
    return result


# --- wrk: keep-alive throughput --------------------------------------------------


async def purchases(servers, prepared, workdir, connections, duration, users_count, log=print):
    """Distinct users' first purchases: users x sales pairs, sale by sale (one hot row at a time)."""
    users = await prepared.users(users_count, 'buyers')
    expected = int(duration * 12000)  # more pairs than any run here can use (granian: 5,000/s and more)
    sales = [await prepared.sale(users_count, f'purchases {k}') for k in range(max(1, -(-expected // users_count)))]
    pairs = [(sale, u.token) for sale in sales for u in users]
    log(f'purchases (wrk): {connections} connections, {duration} s, {len(pairs)} distinct (user, sale) pairs ...')
    cpu_before = servers.app_cpu()
    result = await asyncio.to_thread(run_wrk, servers.base_url, pairs, workdir, connections, duration)
    result['server_cpu_ms'] = round((servers.app_cpu() - cpu_before) * 1000 / max(1, result['requests']), 3)
    states = [await prepared.state(sale) for sale in sales]
    orders = sum(s['orders'] for s in states)
    result['orders'] = orders
    bought = result['statuses'].get('201', 0) + result['statuses'].get('200', 0)  # the reference: 200
    result['ok'] = purchases_held(states, result['statuses'], connections, bought=('200', '201'))
    result['purchase_rate'] = round(bought / (result['duration_us'] / 1e6), 1)
    return result


async def sold_out(servers, prepared, workdir, connections, duration, log=print):
    users = await prepared.users(200, 'late')
    sale = await prepared.sale(1, 'sold-out')
    early = (await prepared.users(1, 'early'))[0]
    status, _ = await prepared.api.purchase(early, sale)
    prepared.api.pool.close()
    assert status in (200, 201), status  # the reference answers a purchase with 200
    log(f'sold-out (wrk): {connections} connections, {duration} s ...')
    cpu_before = servers.app_cpu()
    result = await asyncio.to_thread(run_wrk, servers.base_url, [(sale, u.token) for u in users], workdir,
                                     connections, duration, cycle=True)
    result['server_cpu_ms'] = round((servers.app_cpu() - cpu_before) * 1000 / max(1, result['requests']), 3)
    state = await prepared.state(sale)
    # (the reference refuses with 400, this service with 409)
    result['ok'] = (state['orders'] == 1 and state['remaining'] == 0 and len(result['statuses']) == 1
                    and '201' not in result['statuses'])
    return result


async def watchers_during_crowd(servers, prepared, workdir, watchers, script=None, log=print):
    """--watchers connections polling /current every 1.5 s; the crowd test runs once they all poll."""
    users = await prepared.users(CROWD['users'], 'crowd-w')
    sale_id = await prepared.sale(CROWD['stock'], 'crowd-w')
    log(f'watchers: opening {watchers} polling connections ...')
    watch = loadtest.Watchers(servers.base_url, watchers, interval=1.5)
    await watch.start()
    try:
        await asyncio.sleep(3.0)  # every watcher has polled at least once
        polls_before = servers.log_lines(r'GET /api/flash-sales/current ')
        answered_before = watch.answered
        t0 = time.monotonic()
        log(f'crowd (Artillery) while {watchers} watchers poll ...')
        crowd_result = await asyncio.to_thread(run_artillery, servers.base_url, users, sale_id, workdir, script)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.5)  # the app's access-log writer thread catches up
        app_polls = servers.log_lines(r'GET /api/flash-sales/current ') - polls_before
        answered = watch.answered - answered_before
    finally:
        summary = await watch.stop()
    crowd_result['database'] = await prepared.state(sale_id)
    db = crowd_result['database']
    return {
        'crowd': crowd_result, 'watchers': watchers, 'watch': summary,
        'polls_answered_per_s': round(answered / elapsed, 1),
        'app_polls_per_s': round(app_polls / elapsed, 2),
        'ok': (db['remaining'] + db['orders'] == db['total'] and db['orders'] == crowd_result['codes'].get('201', 0)
               and not crowd_result['errors'] and not summary['errors']),
    }


# --- the table ----------------------------------------------------------------------


def format_results(results):
    out = [f'flashsale, external clients, shape {results["shape"]!r} at {results["base_url"]}, '
           f'{os.cpu_count()} cores shared by clients, servers and PostgreSQL']
    for run in results.get('crowd', []):
        out.append(f'crowd (Artillery, 1,000 arrivals/s x 4 s, 100 users, stock 50): codes {run["codes"]}, '
                   f'errors {run["errors"] or 0}, p50 {run["p50_ms"]} ms, p99 {run["p99_ms"]} ms, '
                   f'max {run["max_ms"]} ms; orders {run["database"]["orders"]}, remaining '
                   f'{run["database"]["remaining"]}: {"ok" if run["ok"] else "FAIL"}')
    for run in results.get('purchases', []):
        out.append(f'purchases (wrk, {results["connections"]} connections): {run["purchase_rate"]:,.0f}/s, '
                   f'p50 {run["p50_ms"]:.1f} ms, p99 {run["p99_ms"]:.1f} ms, statuses {run["statuses"]}, '
                   f'socket errors {run["errors"]}, server CPU {run["server_cpu_ms"]} ms/request: '
                   f'{"ok" if run["ok"] else "FAIL"}')
    for run in results.get('sold_out', []):
        out.append(f'sold-out (wrk, {results["connections"]} connections): {run["rate"]:,.0f}/s, '
                   f'p50 {run["p50_ms"]:.1f} ms, p99 {run["p99_ms"]:.1f} ms, statuses {run["statuses"]}, '
                   f'server CPU {run["server_cpu_ms"]} ms/request: {"ok" if run["ok"] else "FAIL"}')
    for run in results.get('watchers', []):
        c = run['crowd']
        w = run['watch']
        out.append(f'{run["watchers"]} watchers polling every 1.5 s during the crowd: {run["polls_answered_per_s"]:,.0f} '
                   f'polls/s answered ({w["by_status"]}, errors {w["errors"] or 0}, p99 {w["latency_ms"]["p99"]} ms), '
                   f'app saw {run["app_polls_per_s"]} polls/s; crowd codes {c["codes"]}, errors {c["errors"] or 0}, '
                   f'p99 {c["p99_ms"]} ms: {"ok" if run["ok"] else "FAIL"}')
    return '\n'.join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', choices=['plain', 'nginx', 'reference'], default='plain',
                        help='reference: the reference app already running at REFERENCE_URL, its database '
                             'in --database-url, its JWT_SECRET in REFERENCE_JWT_SECRET')
    parser.add_argument('--database-url', default=os.environ.get('DATABASE_URL'))
    parser.add_argument('--runs', default='crowd,purchases,sold-out',
                        help='comma-separated: crowd, purchases, sold-out, watchers (default crowd,purchases,sold-out)')
    parser.add_argument('--repeat', type=int, default=1)
    parser.add_argument('--connections', type=int, default=64)
    parser.add_argument('--duration', type=int, default=8, help='seconds per wrk run')
    parser.add_argument('--buyers', type=int, default=2000, help='users registered for the purchase runs')
    parser.add_argument('--watchers', type=int, default=5000)
    parser.add_argument('--nginx-conf', default=str(NGINX_CONF),
                        help='(nginx shape) a variant of scripts/nginx.conf to measure, its ports as in the shipped one')
    parser.add_argument('--artillery-script', help='an Artillery script to run as the crowd test instead')
    parser.add_argument('--json', dest='json_file')
    return parser.parse_args(argv)


async def main_async(args, servers, workdir, log):
    prepared = (ReferencePrepared if args.shape == 'reference' else Prepared)(servers.setup_url, args.database_url)
    results = {'shape': args.shape, 'base_url': servers.base_url, 'connections': args.connections}
    runs = args.runs.split(',')
    try:
        for _ in range(args.repeat):
            if 'crowd' in runs:
                results.setdefault('crowd', []).append(await crowd(servers, prepared, workdir,
                                                                   args.artillery_script, log))
            if 'purchases' in runs:
                results.setdefault('purchases', []).append(await purchases(
                    servers, prepared, workdir, args.connections, args.duration, args.buyers, log))
            if 'sold-out' in runs:
                results.setdefault('sold_out', []).append(await sold_out(
                    servers, prepared, workdir, args.connections, args.duration, log))
            if 'watchers' in runs:
                results.setdefault('watchers', []).append(await watchers_during_crowd(
                    servers, prepared, workdir, args.watchers, args.artillery_script, log))
    finally:
        prepared.api.close()
    return results


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if not args.database_url:
        from resources import embedded

        log('bench_external: no --database-url: starting a throwaway embedded PostgreSQL')
        args.database_url = embedded.start(tempfile.mkdtemp(prefix='flashsale-bench-'), delete_on_exit=True)
    workdir = tempfile.mkdtemp(prefix='flashsale-external-')
    servers = Servers(args.shape, args.database_url, workdir, nginx_conf=args.nginx_conf).start()
    log(f'bench_external: {args.shape} at {servers.base_url}; logs in {workdir}')
    try:
        results = asyncio.run(main_async(args, servers, workdir, log))
    except loadclient.SetupError as exc:
        raise SystemExit(f'bench_external: {exc}') from None
    finally:
        servers.stop()
    print(format_results(results))
    for key in ('purchases', 'sold_out'):
        if len(results.get(key, [])) > 1:
            rates = [r.get('purchase_rate', r['rate']) for r in results[key]]
            print(f'  {key}: every run {", ".join(f"{r:,.0f}" for r in rates)}/s, median {statistics.median(rates):,.0f}')
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(results, indent=2))
    every = [r for key in ('crowd', 'purchases', 'sold_out', 'watchers') for r in results.get(key, [])]
    return 0 if all(r['ok'] for r in every) else 1


if __name__ == '__main__':
    sys.exit(main())
