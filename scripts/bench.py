#!/usr/bin/env python3
"""flashsale's benchmark in one go: what the HTTP service gets out of PostgreSQL.

    python scripts/bench.py --start-server --database-url postgresql://postgres@127.0.0.1:5432/benchdb

--start-server runs `flashsale serve` on a free port against --database-url,
with BCRYPT_ROUNDS=4 and a generated JWT_SECRET (THREADS, POOL_SIZE and the
other settings pass through from the environment), and stops it at the end.
That is the documented way to run it. Against a server already running, give
--base-url and an admin (--admin-email/--admin-password, or --grant-admin with
the server's DATABASE_URL in --database-url); the direct-to-database part
needs --database-url and is skipped without it.

It prints one table:

  1. purchases over HTTP, closed model at concurrency 8/32/64, stock that never
     runs out (every request a different user's first purchase): req/s, p50, p99
  2. the same statement (resources/sql.py's PURCHASE) straight through psycopg,
     no HTTP, same concurrencies (threads, each with its own connection), and
     the HTTP/direct ratio
  3. sold-out refusals per second over HTTP, and the ratio to GET /health at
     the same concurrency
  4. the crowd scenario (100 users, stock 50, 1,000 req/s for 4 s): exact
     counts, p99, invariants
  5. the server's resident memory (VmRSS, and the peak VmHWM) after the runs

`--logins` runs the login benchmark instead (scripts/login_bench.py: bcrypt
and the interpreter lock, logins/s at the default cost, purchases during a
login storm, the opening-crowd scenario), with a server of its own at
BCRYPT_ROUNDS=12.

It reuses loadtest.py's client, setup and checks (scripts/invariants.py); --json writes every figure.

--metrics-cost measures what the metrics (METRICS=on, the default) cost the
hot path: two servers on one database, one with METRICS=on and one with
METRICS=off, driven by wrk in turns (--repeat rounds, the order swapped each
round): purchases (every request a distinct user's first purchase, stock
never running out) and sold-out refusals (answered from memory), each for
--wrk-seconds at --refusal-concurrency connections. It prints each one's
answers/s and server CPU per answer, medians of the rounds, and on/off; then
the app's own CPU per purchase and per sold-out answer, called as a WSGI
function in a process of its own (no HTTP, no server: the figure the
machine's other work disturbs least), on and off in turns.

--standby-cost measures something else instead: what a synchronous standby
costs each purchase. It makes a private primary with a streaming standby
(tests/private_postgres.py) and runs the purchase statement straight through
psycopg (as in 2.) with the standby asynchronous, then synchronous, in turns
(--repeat rounds, same cluster, same load), and prints purchases/s for each
and their ratio.
The machine's cores are shared by this client, the server and PostgreSQL:
the figures are for that whole machine, and vary run to run (take --repeat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'scripts'))

import invariants  # noqa: E402
import loadtest  # noqa: E402
from wrk_purchases import purchases_held  # noqa: E402
from wrk_purchases import run_wrk  # noqa: E402


# --- the server ---------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def flashsale_command():
    """This checkout's flashsale.py when there is one (so the bench measures the code beside it,
    whatever an editable install elsewhere points `flashsale` at), else the installed command."""
    if (ROOT / 'flashsale.py').is_file():
        return [sys.executable, str(ROOT / 'flashsale.py')]
    found = shutil.which('flashsale') or shutil.which('flashsale', path=os.path.dirname(sys.executable))
    if not found:
        raise SystemExit('bench: neither flashsale.py beside scripts/ nor a `flashsale` command')
    return [found]


def start_server(database_url, log_path, secret=None, checkout=ROOT, bcrypt_rounds='4', settings=None):
    """`flashsale serve` on a free port with BCRYPT_ROUNDS=4 (or `bcrypt_rounds`)
    and a fresh JWT_SECRET (or `secret`), from `checkout` (default: this one);
    `settings`: more environment variables for it. Loopback, where the bench
    registers its users and sends its load from, is exempt from the rate
    limits unless RATE_LIMIT_EXEMPT says otherwise."""
    port = free_port()
    env = dict({'RATE_LIMIT_EXEMPT': '127.0.0.1,::1'}, **os.environ, DATABASE_URL=database_url,
               JWT_SECRET=secret or secrets.token_urlsafe(48), BCRYPT_ROUNDS=bcrypt_rounds, HOST='127.0.0.1',
               PORT=str(port), **(settings or {}))
    log = open(log_path, 'w')
    command = flashsale_command() if checkout == ROOT else [sys.executable, str(Path(checkout) / 'flashsale.py')]
    proc = subprocess.Popen(command + ['serve'], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=checkout)
    base_url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f'bench: the server exited ({proc.returncode}); see {log_path}:\n'
                             + Path(log_path).read_text()[-2000:])
        try:
            with urllib.request.urlopen(base_url + '/health', timeout=2) as resp:
                if resp.status == 200:
                    return proc, base_url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f'bench: the server did not answer /health within 60 s; see {log_path}')


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pid_listening_on(port):
    """The process with a listening TCP socket on `port`, found through /proc (Linux)."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == '0A' and int(fields[1].rsplit(':', 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f'socket:[{fields[9]}]')
    for proc_dir in Path('/proc').iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            for fd in (proc_dir / 'fd').iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc_dir.name)
        except OSError:
            continue
    return None


def server_processes(pid):
    """The server's process and its worker processes (WORKERS > 1: forked children)."""
    pids = [pid]
    for proc_dir in Path('/proc').iterdir():
        if proc_dir.name.isdigit():
            try:
                fields = (proc_dir / 'stat').read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:  # ppid
                pids.append(int(proc_dir.name))
    return pids


def cpu_seconds_of(pid):
    """User + system CPU seconds the server (all its threads, and its worker
    processes) has used, from /proc/PID/stat."""
    total = 0
    for one in server_processes(pid):
        try:
            fields = Path(f'/proc/{one}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf('SC_CLK_TCK')


class CpuSplit(tuple):
    """CPU seconds of (the server, PostgreSQL, this load tool), read together;
    subtracting two readings gives what each used in between."""

    def __sub__(self, other):
        return CpuSplit(a - b for a, b in zip(self, other, strict=True))


def cpu_split_probe(server_pid, postmaster_pid):
    def probe():
        # This process and the children it has waited for (wrk).
        mine = os.times()
        client = mine.user + mine.system + mine.children_user + mine.children_system
        return CpuSplit((cpu_seconds_of(server_pid), cpu_seconds_of(postmaster_pid), client))
    return probe


def cpu_ms_per_answer(result):
    if result.get('probe_delta') is None or not result['answered']:
        return None
    return round(result['probe_delta'] * 1000 / result['answered'], 3)


def memory_of(pid):
    """{'rss_mib', 'peak_rss_mib'} of the largest server process, from
    /proc/PID/status, and how many processes there are (with WORKERS > 1 the
    workers share the parent's pages copy-on-write; 'pss_total_mib' counts
    each page once, shared ones in proportion)."""
    rss, peak, pss = [], [], 0.0
    pids = server_processes(pid)
    for one in pids:
        values = {}
        for line in Path(f'/proc/{one}/status').read_text().splitlines():
            key, _, rest = line.partition(':')
            if key in ('VmRSS', 'VmHWM'):
                values[key] = int(rest.split()[0]) / 1024
        rss.append(values.get('VmRSS', 0))
        peak.append(values.get('VmHWM', 0))
        try:
            for line in Path(f'/proc/{one}/smaps_rollup').read_text().splitlines():
                if line.startswith('Pss:'):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            pass
    return {'rss_mib': round(max(rss), 1), 'peak_rss_mib': round(max(peak), 1),
            'processes': len(pids), 'pss_total_mib': round(pss, 1)}


# --- the purchase straight through psycopg -------------------------------------


def run_released(worker, concurrency, barrier):
    """worker(k) in `concurrency` threads, timed from when they are all at
    `barrier` (a Barrier of concurrency + 1) until the last one ends: seconds."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def direct_purchases(database_url, sale_id, user_ids, concurrency):
    """sql.PURCHASE for every user once, from `concurrency` threads with a connection each."""
    import psycopg
    from psycopg.rows import dict_row

    from resources import sql as flashsale_sql

    barrier = threading.Barrier(concurrency + 1)
    latencies = [[] for _ in range(concurrency)]
    outcomes = [{} for _ in range(concurrency)]

    def worker(k):
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row,
                             options='-c TimeZone=UTC') as conn:
            mine = user_ids[k::concurrency]
            barrier.wait()
            for user_id in mine:
                started = time.perf_counter()
                try:
                    row = conn.execute(flashsale_sql.PURCHASE, {'sale_id': sale_id, 'user_id': user_id,
                                                              'generation': 0}).fetchone()
                    outcome = row['outcome']
                except psycopg.errors.UniqueViolation:
                    outcome = 'already_purchased'
                latencies[k].append(time.perf_counter() - started)
                outcomes[k][outcome] = outcomes[k].get(outcome, 0) + 1

    elapsed = run_released(worker, concurrency, barrier)
    merged = {}
    for part in outcomes:
        for key, n in part.items():
            merged[key] = merged.get(key, 0) + n
    flat = [v for part in latencies for v in part]
    with psycopg.connect(database_url, autocommit=True) as conn:
        state = invariants.sale_state(conn, sale_id)
    return {
        'concurrency': concurrency,
        'requests': len(flat),
        'rate': round(len(flat) / elapsed, 1),
        'latency_ms': loadtest.latency_summary(flat),
        'outcomes': merged,
        'invariant_ok': not invariants.failures(invariants.stock_checks(state))
        and merged.get('created', 0) == state.orders,
    }


# --- what a synchronous standby costs ------------------------------------------


def standby_cost(args, log):
    """Purchases/s with the standby asynchronous and synchronous, A/B in turns."""
    import psycopg

    sys.path.insert(0, str(ROOT / 'tests'))
    from private_postgres import PrivatePostgres
    from resources import database

    rows = {}
    with tempfile.TemporaryDirectory(prefix='flashsale-standby-cost-') as tmp:
        with PrivatePostgres(Path(tmp) / 'primary') as primary:
            with psycopg.connect(primary.url, autocommit=True) as conn:
                database.apply_schema(conn)
            with primary.add_standby(Path(tmp) / 'standby', synchronous=False) as standby:
                for round_ in range(args.repeat):
                    for mode in ('async', 'sync'):
                        primary.set_synchronous(standby if mode == 'sync' else None)
                        for level in args.levels:
                            with psycopg.connect(primary.url, autocommit=True) as conn:
                                ids = [row[0] for row in conn.execute(
                                    "INSERT INTO users (email, password_hash) SELECT 'cost-' || gen_random_uuid() "
                                    "|| '@example.com', 'x' FROM generate_series(1, %s) RETURNING id",
                                    (args.purchases,))]
                                sale_id = conn.execute(
                                    'INSERT INTO flash_sales (name, start_date, end_date, total_stock, '
                                    "remaining_stock) VALUES ('cost', now() - interval '1 second', "
                                    "now() + interval '1 hour', %s, %s) RETURNING id",
                                    (len(ids), len(ids))).fetchone()[0]
                            log(f'round {round_ + 1}: {mode} standby, concurrency {level} ...')
                            run = direct_purchases(primary.url, sale_id, ids, level)
                            if not run['invariant_ok']:
                                raise SystemExit(f'bench: invariants failed: {run}')
                            rows.setdefault((level, mode), []).append(run)
    out = [f'purchases/s straight through psycopg, {args.purchases} per run, median of {args.repeat} '
           '(async and sync in turns, one primary and one standby on this machine):', '']
    out.append(f'{"concurrency":>11}  {"async standby":>24}  {"sync standby":>24}  sync/async')
    results = []
    for level in args.levels:
        cells = {}
        for mode in ('async', 'sync'):
            best = median_by_rate(rows[(level, mode)], key=lambda r: r['rate'])
            cells[mode] = best
            results.append({'concurrency': level, 'standby': mode, 'rate': best['rate'],
                            'latency_ms': best['latency_ms'], 'all_rates': [r['rate'] for r in rows[(level, mode)]]})
        a, b = cells['async'], cells['sync']
        out.append(f'{level:>11}  {a["rate"]:>9,.0f}/s p50 {a["latency_ms"]["p50"]:5.2f} ms  '
                   f'{b["rate"]:>9,.0f}/s p50 {b["latency_ms"]["p50"]:5.2f} ms  {b["rate"] / a["rate"]:10.2f}')
    print('\n'.join(out))
    if args.json_file:
        with open(args.json_file, 'w') as fh:
            json.dump(results, fh, indent=2)
    return 0


# --- slow commits ----------------------------------------------------------------


def direct_batches(database_url, sale_ids, user_ids, concurrency, batch):
    """sql.PURCHASE_BATCH over every user once in each sale (sale after sale),
    `batch` users per statement, from `concurrency` threads with a connection
    each. Several sales, so that the run is long enough to time: one sale's
    2,000 users are only 32 statements."""
    import psycopg
    from psycopg.rows import dict_row

    from resources import sql as flashsale_sql

    barrier = threading.Barrier(concurrency + 1)
    counts = [0] * concurrency

    def worker(k):
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row,
                             options='-c TimeZone=UTC') as conn:
            mine = user_ids[k::concurrency]
            barrier.wait()
            for sale_id in sale_ids:
                for i in range(0, len(mine), batch):
                    chunk = mine[i:i + batch]
                    while chunk:
                        rows = conn.execute(flashsale_sql.PURCHASE_BATCH, {
                            'sale_id': sale_id, 'user_ids': chunk, 'generations': [0] * len(chunk),
                        }).fetchall()
                        counts[k] += sum(1 for r in rows if r['outcome'] == 'created')
                        chunk = [u for u, r in zip(chunk, rows) if r['outcome'] == 'retry']

    elapsed = run_released(worker, concurrency, barrier)
    wanted = len(user_ids) * len(sale_ids)
    return {'concurrency': concurrency, 'batch': batch, 'rate': round(wanted / elapsed, 1),
            'created': sum(counts), 'invariant_ok': sum(counts) == wanted}


# The batched statement straight through psycopg sells every user in this
# many sales, one after another (see direct_batches).
DIRECT_BATCHED_SALES = 5

# Purchases/s no run here reaches: wrk gets that many (sale, user) pairs per second.
WRK_MAX_RATE = 4000


def wrk_purchases_run(base_url, sales, users, connections, seconds, database_url, probe):
    """`seconds` of purchases through wrk (a C client: the cores it leaves go
    to the server), each request one user's first purchase, sale after sale;
    then every sale read back from the database: remaining + orders ==
    total, no user twice, and every 201 an order. wrk stops at its deadline
    without reading the answers in flight: up to `connections` orders may
    have no 201 counted, never the other way round."""
    workdir = tempfile.mkdtemp(prefix='flashsale-bench-wrk-')
    before = probe()
    result = run_wrk(base_url, [(sale, u.token) for sale in sales for u in users], workdir, connections, seconds,
                     threads=min(2, connections))
    cpu = probe() - before
    shutil.rmtree(workdir, ignore_errors=True)
    states = [loadtest.read_database(database_url, sale) for sale in sales]
    ok = purchases_held(states, result['statuses'], connections)
    return {'rate': result['rate'], 'answered': sum(result['statuses'].values()), 'cpu': cpu,
            'latency_ms': {'p50': result['p50_ms'], 'p99': result['p99_ms']}, 'verdict': 'pass' if ok else 'fail'}


def statement_sizes(database_url, *sale_ids):
    """(statements, mean orders per statement, largest) of these sales' orders:
    the orders one transaction wrote share its id, xmin."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        sizes = [n for (n,) in conn.execute(
            'SELECT count(*) FROM orders WHERE flash_sale_id = ANY(%s::uuid[]) GROUP BY xmin::text', (list(sale_ids),))]
    if not sizes:
        return {'statements': 0, 'mean': None, 'max': None}
    return {'statements': len(sizes), 'mean': round(sum(sizes) / len(sizes), 1), 'max': max(sizes)}


def set_commit_delay(database_url, delay_ms):
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'ALTER SYSTEM SET commit_delay = {int(delay_ms * 1000)}')
        conn.execute('SELECT pg_reload_conf()')


async def new_sales(api, admin, count, stock, label):
    """`count` sales open now, for ten minutes: their ids."""
    ids = []
    for _ in range(count):
        now, _ = await api.server_clock()
        ids.append((await api.create_sale(admin, stock, now - timedelta(seconds=1), timedelta(minutes=10),
                                          f'bench {label}'))['id'])
    api.pool.close()
    return ids


def wrk_sales_needed(users, seconds):
    """Sales of len(users) stock that a wrk run of `seconds` cannot exhaust."""
    return -(-WRK_MAX_RATE * seconds // len(users))


async def slow_commit_bench(args, servers, database_url, postmaster_pid, log):
    """At 0 ms and at --commit-delay-ms: HTTP purchases at each level for every
    server (interleaved), then the single and the batched statement direct.
    servers: (name, base URL, pid)."""
    api = loadtest.Api(servers[0][1])
    run_id = uuid.uuid4().hex[:8]
    results = {'delays': [], 'servers': [name for name, _, _ in servers]}

    try:
        admin = await api.admin_token(None, None, True, shlex.join(flashsale_command()), database_url, run_id)
        log(f'registering {args.purchases} users ...')
        users = await api.register_users(args.purchases, f'bench-{run_id}', args.register_concurrency)
        api.pool.close()
        for name, base, _ in servers:
            await loadtest.run_plain_async(base, '/health', connections=8, requests=300)  # warm-up
        for delay in (0, args.commit_delay_ms):
            set_commit_delay(database_url, delay)
            row = {'delay_ms': delay, 'http': [], 'direct': []}
            for level in [1] + args.levels:
                for name, base, pid in servers:
                    log(f'commit {delay} ms: HTTP purchases at {level} connections, {name} ({args.client}) ...')
                    probe = cpu_split_probe(pid, postmaster_pid)
                    if args.client == 'wrk':
                        # wrk runs for a set time: enough (sale, user) pairs
                        # for any rate here, sale after sale.
                        sales = await new_sales(api, admin, wrk_sales_needed(users, args.wrk_seconds), len(users),
                                                f'wrk {run_id}')
                        out = await asyncio.to_thread(wrk_purchases_run, base, sales, users, level, args.wrk_seconds,
                                                      database_url, probe)
                    else:
                        count = min(len(users), 400) if level == 1 else len(users)
                        run = await loadtest.run_scenario_async(
                            'throughput', base_url=base, prepared_users=users[:count], admin_token=admin,
                            users=count, requests=count, connections=level, timeout=args.timeout, probe=probe)
                        sales = [run['sale']['id']]
                        out = {'rate': run['answered_rate'], 'answered': run['answered'], 'cpu': run['probe_delta'],
                               'latency_ms': run['latency_ms'], 'verdict': run['invariants']['verdict']}
                    row['http'].append({
                        'server': name, 'concurrency': level, 'rate': out['rate'],
                        'cpu_ms': dict(zip(('server', 'postgres', 'client'),
                                           (round(s * 1000 / out['answered'], 3) for s in out['cpu']))),
                        'latency_ms': out['latency_ms'], 'verdict': out['verdict'],
                        'statements': statement_sizes(database_url, *sales)})
            user_ids = [u.id for u in users]
            for label, runner, count in (
                    ('single', lambda sales: direct_purchases(database_url, sales[0], user_ids, 8), 1),
                    ('batched', lambda sales: direct_batches(database_url, sales, user_ids, 8, args.direct_batch),
                     DIRECT_BATCHED_SALES)):
                log(f'commit {delay} ms: direct, {label} statement ...')
                sales = await new_sales(api, admin, count, len(user_ids), f'direct {run_id}')
                out = await asyncio.to_thread(runner, sales)
                out['statement'] = label
                out['statements'] = statement_sizes(database_url, *sales)
                row['direct'].append(out)
            results['delays'].append(row)
    finally:
        set_commit_delay(database_url, 0)
        api.close()
    return results


def format_slow_commit(results, delay):
    out = [f'slow commits: a private PostgreSQL (in /dev/shm, fsync on, commit_siblings=0), commit_delay 0 or {delay} ms '
           f'(every commit waits that long before its flush, the sale row locked), {os.cpu_count()} cores shared '
           'by client, server and PostgreSQL', '']
    out.append('  commit | server  conn |  HTTP req/s  p50 ms  p99 ms | statements  mean batch  max | '
               'CPU ms per purchase: server  postgres  client | checks')
    for row in results['delays']:
        for h in row['http']:
            st = h['statements']
            out.append(f'  {row["delay_ms"]:>3g} ms | {h["server"]:<7} {h["concurrency"]:>4} | {h["rate"]:>11,.0f} '
                       f'{h["latency_ms"]["p50"]:>7.2f} {h["latency_ms"]["p99"]:>7.1f} | {st["statements"]:>10} '
                       f'{st["mean"] or 0:>10} {st["max"] or 0:>4} | {" " * 20}{h["cpu_ms"]["server"]:>6.3f} '
                       f'{h["cpu_ms"]["postgres"]:>9.3f} {h["cpu_ms"]["client"]:>7.3f} | {h["verdict"]}')
        for d in row['direct']:
            st = d['statements']
            out.append(f'  {row["delay_ms"]:>3g} ms | direct {d["statement"]:<8} x{d["concurrency"]} sessions: '
                       f'{d["rate"]:>9,.0f} purchases/s, {st["statements"]} statements '
                       f'(mean {st["mean"]}, max {st["max"]}), {"ok" if d["invariant_ok"] else "FAIL"}')
    out.append('')
    by = {(r['delay_ms'], h['server'], h['concurrency']): h['rate'] for r in results['delays'] for h in r['http']}
    direct = {(r['delay_ms'], d['statement']): d['rate'] for r in results['delays'] for d in r['direct']}
    top = max(h['concurrency'] for r in results['delays'] for h in r['http'])
    name = results['servers'][0]
    ratios = [
        (f'HTTP at {top} conn, {delay} ms / direct single at {delay} ms', by[(delay, name, top)] / direct[(delay, 'single')]),
        (f'HTTP at {top} conn, {delay} ms / HTTP at {top} conn, 0 ms', by[(delay, name, top)] / by[(0, name, top)]),
        (f'direct batched / direct single, {delay} ms', direct[(delay, 'batched')] / direct[(delay, 'single')]),
    ]
    if len(results['servers']) > 1:
        other = results['servers'][1]
        for lv in sorted({h['concurrency'] for r in results['delays'] for h in r['http']}):
            ratios.append((f'{name} / {other}, 0 ms, {lv} conn', by[(0, name, lv)] / by[(0, other, lv)]))
    for label, value in ratios:
        out.append(f'  {label}: {value:.2f}')
    return '\n'.join(out)


def slow_commit_main(args, log):
    sys.path.insert(0, str(ROOT / 'tests'))
    from private_postgres import PrivatePostgres

    # In memory (tmpfs) where there is one: a flush there costs ~0.1 ms, so
    # commit_delay is the commit time, not the disk's noise (a busy shared
    # disk here took 2 to 9 ms per fsync). fsync on: PostgreSQL skips
    # commit_delay without it. commit_delay itself is set with ALTER SYSTEM
    # (a -c on the command line would override that).
    shm = '/dev/shm' if os.path.isdir('/dev/shm') else None
    directory = tempfile.mkdtemp(prefix='flashsale-bench-pg-', dir=shm)
    cluster = PrivatePostgres(directory)
    cluster.start(options='-c fsync=on -c commit_siblings=0 -c max_connections=200')
    procs = []
    try:
        secret = secrets.token_urlsafe(48)
        servers = []
        for name, checkout in [('this', ROOT)] + ([('before', args.compare_with)] if args.compare_with else []):
            log_path = os.path.join(tempfile.gettempdir(), f'flashsale-bench-{os.getpid()}-{name}.log')
            proc, base = start_server(cluster.url, log_path, secret=secret, checkout=checkout)
            procs.append(proc)
            servers.append((name, base, proc.pid))
            log(f'started {name} server (pid {proc.pid}) at {base}; its log: {log_path}')
        results = asyncio.run(slow_commit_bench(args, servers, cluster.url, cluster.pid(), log))
    finally:
        for proc in procs:
            stop_server(proc)
        cluster.close()
    print(format_slow_commit(results, args.commit_delay_ms))
    if args.json_file:
        with open(args.json_file, 'w') as fh:
            json.dump(results, fh, indent=2)
    ok = all(h['verdict'] == 'pass' for r in results['delays'] for h in r['http']) and \
        all(d['invariant_ok'] for r in results['delays'] for d in r['direct'])
    return 0 if ok else 1


# --- what the metrics cost ------------------------------------------------------------


async def metrics_cost_bench(args, servers, database_url, log):
    """Purchases and sold-out refusals through wrk against each server in
    turns. servers: {'on'|'off': (base URL, pid)}."""
    api = loadtest.Api(servers['on'][0])
    run_id = uuid.uuid4().hex[:8]
    runs = {(name, kind): [] for name in servers for kind in ('purchases', 'sold_out')}
    workdir = tempfile.mkdtemp(prefix='flashsale-bench-metrics-')
    try:
        admin = await api.admin_token(None, None, True, shlex.join(flashsale_command()), database_url, run_id)
        log(f'registering {args.purchases} users ...')
        users = await api.register_users(args.purchases, f'bench-{run_id}', args.register_concurrency)
        # Sold out once, by one purchase: every purchase after it, in either
        # server's processes, is answered from memory once each has learnt it.
        [gone] = await new_sales(api, admin, 1, 1, f'metrics sold out {run_id}')
        await api.purchase(users[0], gone)
        api.pool.close()
        for base, _ in servers.values():
            await loadtest.run_plain_async(base, '/health', connections=8, requests=300)  # warm-up
        for round_ in range(args.repeat):
            for name in (('on', 'off') if round_ % 2 == 0 else ('off', 'on')):
                base, pid = servers[name]
                probe = lambda pid=pid: cpu_seconds_of(pid)  # noqa: E731
                log(f'round {round_ + 1}: METRICS={name}: purchases, then sold-out refusals ...')
                sales = await new_sales(api, admin, wrk_sales_needed(users, args.wrk_seconds), len(users),
                                        f'metrics {name} {run_id}')
                for kind, pairs, cycle in (('purchases', [(s, u.token) for s in sales for u in users], False),
                                           ('sold_out', [(gone, u.token) for u in users], True)):
                    before = probe()
                    result = await asyncio.to_thread(run_wrk, base, pairs, workdir, args.refusal_concurrency,
                                                     args.wrk_seconds, cycle, min(2, args.refusal_concurrency))
                    statuses = dict(result['statuses'])
                    answered = sum(statuses.values())
                    # 503 (busy, nothing bought) is an answer too, on a machine this loaded.
                    busy = statuses.pop('503', 0)
                    if set(statuses) - ({'201'} if kind == 'purchases' else {'409'}):
                        raise SystemExit(f'bench: METRICS={name} {kind}: unexpected answers {result["statuses"]}')
                    if kind == 'purchases':
                        states = [loadtest.read_database(database_url, sale) for sale in sales]
                        if not purchases_held(states, statuses, args.refusal_concurrency):
                            raise SystemExit(f'bench: METRICS={name}: the purchase invariants failed: {states}')
                    runs[(name, kind)].append({'rate': result['rate'], 'p50_ms': result['p50_ms'],
                                               'p99_ms': result['p99_ms'], 'busy': busy,
                                               'cpu_ms': round((probe() - before) * 1000 / answered, 3)})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        api.close()
    return runs


def format_metrics_cost(runs, args):
    out = [f'METRICS=on against METRICS=off: wrk at {args.refusal_concurrency} connections, {args.wrk_seconds} s '
           f'a run, {args.repeat} rounds in turns (medians); {os.cpu_count()} cores shared by wrk, both servers '
           '(WORKERS from the environment) and PostgreSQL', '',
           '  answers         | METRICS | answers/s  p50 ms  p99 ms  server CPU ms/answer  503s | every round (answers/s)']
    for kind, label in (('purchases', 'purchases (201)'), ('sold_out', 'sold out (409)')):
        medians = {}
        for name in ('on', 'off'):
            rounds = runs[(name, kind)]
            medians[name] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            m = medians[name]
            out.append(f'  {label:<15} | {name:>7} | {m["rate"]:>9,.0f} {m["p50_ms"]:>7.2f} {m["p99_ms"]:>7.1f} '
                       f'{m["cpu_ms"]:>21.3f} {sum(r["busy"] for r in rounds):>5} | '
                       + ', '.join(f'{r["rate"]:,.0f}' for r in rounds))
        on, off = medians['on'], medians['off']
        out.append(f'  {"":<15} | on/off  | {on["rate"] / off["rate"]:>9.3f} {"":>15} '
                   f'{on["cpu_ms"] / off["cpu_ms"]:>21.3f} {"":>5} |')
    return '\n'.join(out)


APP_COST_SOLD_OUT = 20_000
APP_COST_PURCHASES = 2_000


def app_cost(database_url, mode):
    """The app's own CPU per answer, no HTTP and no server (--app-cost, in a
    process of its own): create_app with METRICS=`mode` (in multiprocess
    mode when on, as `flashsale serve` runs it), called as a WSGI function
    from one thread. Prints {answer kind: microseconds of this process' CPU}."""
    import io  # noqa: PLC0415

    import psycopg  # noqa: PLC0415

    import flashsale  # noqa: PLC0415
    from resources import database  # noqa: PLC0415
    from resources import metrics  # noqa: PLC0415
    from resources.credentials import Credentials  # noqa: PLC0415

    settings = flashsale.Settings(database_url=database_url, jwt_secret=secrets.token_urlsafe(48), bcrypt_rounds=4,
                                  metrics=mode)
    metrics.prepare(settings)
    credentials = Credentials(settings.jwt_secret, 3600, 4)
    with psycopg.connect(database_url, autocommit=True) as conn:
        user_ids = [row[0] for row in conn.execute(
            "INSERT INTO users (email, password_hash) SELECT 'app-cost-' || gen_random_uuid() || '@example.com', 'x' "
            'FROM generate_series(1, %s) RETURNING id', (APP_COST_PURCHASES,))]
        sales = [conn.execute(
            'INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) VALUES '
            "('app cost', now() - interval '1 minute', now() + interval '1 hour', %s, %s) RETURNING id",
            (stock, stock)).fetchone()[0] for stock in (APP_COST_PURCHASES, 1)]
    tokens = [credentials.issue(user_id) for user_id in user_ids]
    pool = database.open_pool(settings, database_url)
    app = flashsale.create_app(settings, pool)

    def purchase(sale_id, token):
        environ = {'REQUEST_METHOD': 'POST', 'PATH_INFO': f'/api/flash-sales/{sale_id}/purchase', 'QUERY_STRING': '',
                   'SERVER_NAME': 'bench', 'SERVER_PORT': '80', 'SERVER_PROTOCOL': 'HTTP/1.1',
                   'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(b''), 'wsgi.errors': sys.stderr,
                   'REMOTE_ADDR': '127.0.0.1', 'CONTENT_LENGTH': '0', 'HTTP_AUTHORIZATION': f'Bearer {token}'}
        b''.join(app(environ, lambda status, headers, exc_info=None: None))

    def cpu_us(calls):
        started = time.process_time()
        for call in calls:
            call()
        return round((time.process_time() - started) / len(calls) * 1e6, 2)

    gone, still = sales[1], sales[0]
    purchase(gone, tokens[0])  # bought out: the next purchases learn it, then are answered from memory
    purchase(gone, tokens[1])
    out = {'purchase': cpu_us([lambda t=t: purchase(still, t) for t in tokens]),
           'sold_out': cpu_us([lambda: purchase(gone, tokens[0])] * APP_COST_SOLD_OUT)}
    pool.close()
    print(json.dumps(out))


def app_costs(database_url, rounds, log):
    """app_cost() in a fresh process for each mode, `rounds` times, in turns."""
    costs = {'on': [], 'off': []}
    env = {k: v for k, v in os.environ.items() if k != 'PROMETHEUS_MULTIPROC_DIR'}
    for round_ in range(rounds):
        for mode in (('on', 'off') if round_ % 2 == 0 else ('off', 'on')):
            log(f'round {round_ + 1}: the app alone, METRICS={mode} ...')
            done = subprocess.run([sys.executable, __file__, '--app-cost', mode, '--database-url', database_url],
                                  env=env, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise SystemExit(f'bench: --app-cost {mode} failed:\n{done.stderr}')
            costs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return costs


def format_app_costs(costs):
    out = ['', '  the app alone (a WSGI call, no HTTP), CPU per answer, median of the rounds:']
    for kind in ('purchase', 'sold_out'):
        on, off = (statistics.median(run[kind] for run in costs[mode]) for mode in ('on', 'off'))
        out.append(f'  {kind:<10} METRICS=on {on:7.2f} us  off {off:7.2f} us  +{on - off:5.2f} us  '
                   f'(every round: on {", ".join(str(r[kind]) for r in costs["on"])}; '
                   f'off {", ".join(str(r[kind]) for r in costs["off"])})')
    return '\n'.join(out)


def metrics_cost_main(args, log):
    if not args.database_url:
        from resources import embedded  # noqa: PLC0415

        log('bench: no --database-url: starting a throwaway embedded PostgreSQL')
        args.database_url = embedded.start(tempfile.mkdtemp(prefix='flashsale-bench-'), delete_on_exit=True)
    secret = secrets.token_urlsafe(48)
    procs, servers = [], {}
    try:
        for name in ('on', 'off'):
            log_path = os.path.join(tempfile.gettempdir(), f'flashsale-bench-{os.getpid()}-metrics-{name}.log')
            proc, base = start_server(args.database_url, log_path, secret=secret, settings={'METRICS': name})
            procs.append(proc)
            servers[name] = (base, proc.pid)
            log(f'started METRICS={name} server (pid {proc.pid}) at {base}; its log: {log_path}')
        runs = asyncio.run(metrics_cost_bench(args, servers, args.database_url, log))
    except loadtest.SetupError as exc:
        raise SystemExit(f'bench: {exc}') from None
    finally:
        for proc in procs:
            stop_server(proc)
    costs = app_costs(args.database_url, max(args.repeat, 2), log)
    print(format_metrics_cost(runs, args) + format_app_costs(costs))
    if args.json_file:
        with open(args.json_file, 'w') as fh:
            json.dump({'http': {f'{name} {kind}': rounds for (name, kind), rounds in runs.items()}, 'app': costs},
                      fh, indent=2)
    return 0


# --- the runs -------------------------------------------------------------------


def median_by_rate(runs, key):
    """The run with the median rate (the middle one of an odd number)."""
    ordered = sorted(runs, key=key)
    return ordered[len(ordered) // 2]


async def bench(args, base_url, pid, log):
    results = {'base_url': base_url, 'levels': args.levels, 'purchases_per_level': args.purchases}
    # The server's CPU per answer is steadier than its rate on a machine shared with other work.
    probe = (lambda: cpu_seconds_of(pid)) if pid else None
    api = loadtest.Api(base_url)
    run_id = uuid.uuid4().hex[:8]
    try:
        admin = await api.admin_token(args.admin_email, args.admin_password, args.grant_admin or args.start_server,
                                      shlex.join(flashsale_command()), args.database_url, run_id)
        log(f'registering {args.purchases} users ...')
        t0 = time.monotonic()
        users = await api.register_users(args.purchases, f'bench-{run_id}', args.register_concurrency)
        results['registration'] = {'users': len(users), 'seconds': round(time.monotonic() - t0, 2)}
        api.pool.close()
        await loadtest.run_plain_async(base_url, '/health', connections=8, requests=500)  # warm-up

        # 1. purchases over HTTP
        results['http'] = []
        for level in args.levels:
            runs = []
            for _ in range(args.repeat):
                log(f'HTTP purchases at concurrency {level} ...')
                runs.append(await loadtest.run_scenario_async(
                    'throughput', base_url=base_url, prepared_users=users, admin_token=admin,
                    users=len(users), requests=len(users), connections=level, timeout=args.timeout, probe=probe))
            best = median_by_rate(runs, key=lambda r: r['answered_rate'])
            results['http'].append({
                'concurrency': level, 'rate': best['answered_rate'], 'latency_ms': best['latency_ms'],
                'by_code': best['by_code'], 'verdict': best['invariants']['verdict'],
                'all_rates': [r['answered_rate'] for r in runs],
                'server_cpu_ms': statistics.median([cpu_ms_per_answer(r) or 0 for r in runs]) if probe else None,
            })

        # 2. the same statement without HTTP
        results['direct'] = []
        if args.database_url:
            user_ids = [u.id for u in users]
            for level in args.levels:
                runs = []
                for _ in range(args.repeat):
                    log(f'direct purchases at concurrency {level} ...')
                    now, _ = await api.server_clock()
                    sale = await api.create_sale(admin, len(user_ids), now - timedelta(seconds=1),
                                                 timedelta(minutes=10), f'bench direct {run_id}')
                    api.pool.close()
                    runs.append(await asyncio.to_thread(direct_purchases, args.database_url, sale['id'],
                                                        user_ids, level))
                best = median_by_rate(runs, key=lambda r: r['rate'])
                best['all_rates'] = [r['rate'] for r in runs]
                results['direct'].append(best)

        # 3. sold-out refusals against GET /health
        log(f'sold-out refusals and /health at concurrency {args.refusal_concurrency} ...')
        sold_out = await loadtest.run_scenario_async(
            'sold-out', base_url=base_url, prepared_users=users, admin_token=admin, users=min(200, len(users)),
            model='closed', connections=args.refusal_concurrency, requests=args.refusals, timeout=args.timeout,
            probe=probe)
        health = await loadtest.run_plain_async(base_url, '/health', connections=args.refusal_concurrency,
                                                requests=args.refusals, timeout=args.timeout, probe=probe)
        results['sold_out'] = {'rate': sold_out['answered_rate'], 'latency_ms': sold_out['latency_ms'],
                               'by_code': sold_out['by_code'], 'verdict': sold_out['invariants']['verdict'],
                               'server_cpu_ms': cpu_ms_per_answer(sold_out)}
        results['health'] = {'rate': health['answered_rate'], 'latency_ms': health['latency_ms'],
                             'by_code': health['by_code'], 'server_cpu_ms': cpu_ms_per_answer(health)}

        # 4. the crowd
        log('crowd: 100 users, stock 50, 1,000 req/s for 4 s ...')
        crowd = await loadtest.run_scenario_async('crowd', base_url=base_url, prepared_users=users,
                                                  admin_token=admin, users=100, database_url=args.database_url,
                                                  timeout=args.timeout)
        results['crowd'] = {'by_code': crowd['by_code'], 'latency_ms': crowd['latency_ms'],
                            'achieved_rate': crowd['achieved_rate'], 'verdict': crowd['invariants']['verdict'],
                            'orders': crowd['invariants']['orders'], 'remaining': crowd['invariants']['remaining'],
                            'errors': crowd['errors']}
    finally:
        api.close()
    return results


def format_table(results):
    out = []
    rate = lambda v: '-' if v is None else f'{v:,.0f}'  # noqa: E731
    ms = lambda v: '-' if v is None else f'{v:.1f}'  # noqa: E731
    out.append(f'flashsale bench against {results["base_url"]}'
               + (f' (server pid {results["server"]["pid"]})' if results.get('server') else '')
               + f', {os.cpu_count()} cores shared by client, server and PostgreSQL')
    out.append('')
    direct = {d['concurrency']: d for d in results.get('direct', [])}
    out.append(f'1-2. purchase, stock never runs out, {results["purchases_per_level"]} distinct users per level '
               '(closed model)')
    out.append('  conc |  HTTP req/s  p50 ms  p99 ms  srv CPU ms/req | direct tx/s  p50 ms  p99 ms | HTTP/direct '
               '| checks')
    for h in results['http']:
        d = direct.get(h['concurrency'])
        ratio = f'{h["rate"] / d["rate"]:.2f}' if d and d['rate'] else '-'
        checks = h['verdict'] + ('' if not d else (', direct ok' if d['invariant_ok'] else ', direct FAIL'))
        cpu = '-' if h.get('server_cpu_ms') is None else f'{h["server_cpu_ms"]:.2f}'
        out.append(f'  {h["concurrency"]:>4} | {rate(h["rate"]):>11} {ms(h["latency_ms"]["p50"]):>7} '
                   f'{ms(h["latency_ms"]["p99"]):>7} {cpu:>15} | '
                   + (f'{rate(d["rate"]):>11} {ms(d["latency_ms"]["p50"]):>7} {ms(d["latency_ms"]["p99"]):>7}'
                      if d else f'{"(no --database-url)":>27}')
                   + f' | {ratio:>11} | {checks}')
    if any(len(h['all_rates']) > 1 for h in results['http']):
        out.append('  every run (req/s), median shown above: '
                   + '; '.join(f'HTTP {h["concurrency"]}: ' + ', '.join(rate(v) for v in h['all_rates'])
                               for h in results['http'])
                   + ''.join(f'; direct {d["concurrency"]}: ' + ', '.join(rate(v) for v in d['all_rates'])
                             for d in results.get('direct', [])))
    so, he = results['sold_out'], results['health']
    out.append('')
    out.append(f'3. sold-out refusals at concurrency {results["refusal_concurrency"]}: {rate(so["rate"])}/s '
               f'(p50 {ms(so["latency_ms"]["p50"])} ms, p99 {ms(so["latency_ms"]["p99"])} ms, {so["verdict"]}); '
               f'GET /health: {rate(he["rate"])}/s (p99 {ms(he["latency_ms"]["p99"])} ms); '
               f'refusals/health = {so["rate"] / he["rate"]:.2f}'
               + (f'; server CPU per answer {so["server_cpu_ms"]:.2f} vs {he["server_cpu_ms"]:.2f} ms'
                  if so.get('server_cpu_ms') is not None and he.get('server_cpu_ms') is not None else ''))
    cr = results['crowd']
    out.append('')
    out.append(f'4. crowd, 100 users, stock 50, 1,000 req/s x 4 s (achieved {rate(cr["achieved_rate"])} req/s): '
               + ', '.join(f'{n} x {label}' for label, n in cr['by_code'].items()))
    out.append(f'   orders {cr["orders"]}, remaining {cr["remaining"]}; latency p50 {ms(cr["latency_ms"]["p50"])} ms, '
               f'p99 {ms(cr["latency_ms"]["p99"])} ms, max {ms(cr["latency_ms"]["max"])} ms; '
               f'invariants: {cr["verdict"].upper()}')
    out.append('')
    mem = results.get('memory')
    if mem:
        if mem.get('processes', 1) > 1:
            out.append(f'5. server memory after the runs (pid {mem["pid"]} and {mem["processes"] - 1} workers): '
                       f'RSS {mem["rss_mib"]} MiB in the largest process, peak {mem["peak_rss_mib"]} MiB; '
                       f'all together {mem["pss_total_mib"]} MiB PSS (shared pages counted once)')
        else:
            out.append(f'5. server memory after the runs (pid {mem["pid"]}): RSS {mem["rss_mib"]} MiB, '
                       f'peak {mem["peak_rss_mib"]} MiB')
    else:
        out.append('5. server memory: unknown (pass --server-pid, or run the server on this machine)')
    return '\n'.join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--start-server', action='store_true',
                        help='run `flashsale serve` (BCRYPT_ROUNDS=4, generated JWT_SECRET) on a free port')
    parser.add_argument('--base-url', default=loadtest.DEFAULT_BASE_URL, help='a running server (no --start-server)')
    parser.add_argument('--database-url', default=os.environ.get('DATABASE_URL'),
                        help='the server\'s database: for --start-server, grant-admin and the direct runs (default: '
                             'DATABASE_URL; with neither, --start-server starts a throwaway embedded PostgreSQL)')
    parser.add_argument('--admin-email')
    parser.add_argument('--admin-password')
    parser.add_argument('--grant-admin', action='store_true')
    parser.add_argument('--server-pid', type=int, help='for the memory figure (default: found by port)')
    parser.add_argument('--levels', type=lambda s: [int(x) for x in s.split(',')], default=[8, 32, 64],
                        help='concurrencies, comma-separated (default 8,32,64)')
    parser.add_argument('--purchases', type=int, default=3000, help='distinct users = purchases per level')
    parser.add_argument('--refusals', type=int, default=5000, help='requests for the sold-out and /health runs')
    parser.add_argument('--refusal-concurrency', type=int, default=32)
    parser.add_argument('--repeat', type=int, default=1, help='runs per level; the median is shown')
    parser.add_argument('--register-concurrency', type=int, default=loadtest.DEFAULT_REGISTER_CONCURRENCY)
    parser.add_argument('--timeout', type=float, default=30.0)
    parser.add_argument('--json', dest='json_file')
    parser.add_argument('--standby-cost', action='store_true',
                        help='instead: purchases/s with an asynchronous and a synchronous standby (see above)')
    parser.add_argument('--commit-delay-ms', type=float,
                        help='slow-commit mode: a private PostgreSQL (fsync on, commit_siblings=0), and every '
                             'figure at commit_delay 0 and at this many ms')
    parser.add_argument('--compare-with', metavar='CHECKOUT',
                        help='slow-commit mode: also run the HTTP figures against `flashsale serve` from this '
                             'other checkout (e.g. an export of main), interleaved, same settings')
    parser.add_argument('--client', choices=['wrk', 'python'], default='wrk',
                        help='slow-commit mode: the HTTP load generator: wrk (default; a C client, see '
                             'scripts/wrk_purchases.py) or loadtest.py\'s Python client')
    parser.add_argument('--wrk-seconds', type=int, default=5, help='slow-commit mode: seconds per wrk run')
    parser.add_argument('--direct-batch', type=int, default=64, help='users per batched statement, direct')
    parser.add_argument('--metrics-cost', action='store_true',
                        help='instead: purchases and sold-out refusals with METRICS=on against METRICS=off, '
                             'in turns (see above)')
    parser.add_argument('--app-cost', choices=['on', 'off'], help=argparse.SUPPRESS)  # app_cost(), in a child
    parser.add_argument('--logins', action='store_true',
                        help='instead: the login benchmark (scripts/login_bench.py), with a server of its own '
                             'at the default bcrypt cost')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.standby_cost:
        return standby_cost(args, log)
    if args.commit_delay_ms is not None:
        return slow_commit_main(args, log)
    if args.logins:
        return bench_logins(args, log)
    if args.metrics_cost:
        return metrics_cost_main(args, log)
    if args.app_cost:
        return app_cost(args.database_url, args.app_cost)
    proc = None
    if args.start_server:
        if not args.database_url:
            # As the server does: no database configured, an embedded one (a
            # throwaway one in a temporary directory, gone when the bench ends).
            from resources import embedded

            log('bench: no --database-url: starting a throwaway embedded PostgreSQL')
            args.database_url = embedded.start(tempfile.mkdtemp(prefix='flashsale-bench-'), delete_on_exit=True)
        log_path = os.path.join(tempfile.gettempdir(), f'flashsale-bench-{os.getpid()}.log')
        proc, base_url = start_server(args.database_url, log_path)
        log(f'started flashsale serve (pid {proc.pid}) at {base_url}; its log: {log_path}')
    else:
        base_url = args.base_url
    try:
        pid = proc.pid if proc else (args.server_pid or pid_listening_on(loadtest.split_base_url(base_url)[1]))
        results = asyncio.run(bench(args, base_url, pid, log))
        results['refusal_concurrency'] = args.refusal_concurrency
        if pid:
            results['memory'] = dict(memory_of(pid), pid=pid)
            results['server'] = {'pid': pid}
    except loadtest.SetupError as exc:
        raise SystemExit(f'bench: {exc}') from None
    finally:
        if proc:
            stop_server(proc)
    print(format_table(results))
    if args.json_file:
        with open(args.json_file, 'w') as fh:
            json.dump(results, fh, indent=2)
    failed = [r for r in results['http'] if r['verdict'] != 'pass'] + \
        [r for r in results['direct'] if not r['invariant_ok']]
    if failed or results['crowd']['verdict'] != 'pass' or results['sold_out']['verdict'] != 'pass':
        return 1
    return 0


def bench_logins(args, log):
    import login_bench  # noqa: PLC0415

    if not args.database_url:
        from resources import embedded  # noqa: PLC0415

        args.database_url = embedded.start(tempfile.mkdtemp(prefix='flashsale-bench-'), delete_on_exit=True)
    secret = secrets.token_urlsafe(48)
    log_path = os.path.join(tempfile.gettempdir(), f'flashsale-bench-logins-{os.getpid()}.log')
    proc, base_url = start_server(args.database_url, log_path, secret=secret, bcrypt_rounds=str(login_bench.COST))
    log(f'started flashsale serve (pid {proc.pid}) at {base_url}, BCRYPT_ROUNDS={login_bench.COST}; log: {log_path}')
    processes = int(os.environ.get('HASH_PROCESSES') or max(1, len(os.sched_getaffinity(0))
                                                            // int(os.environ.get('WORKERS') or 1)))
    try:
        results = asyncio.run(login_bench.run(base_url, args.database_url, secret, processes, log))
    except loadtest.SetupError as exc:
        raise SystemExit(f'bench: {exc}') from None
    finally:
        stop_server(proc)
    print(login_bench.format_table(results))
    if args.json_file:
        with open(args.json_file, 'w') as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0 if results['opening_crowd']['verdict'] == 'pass' else 1


if __name__ == '__main__':
    sys.exit(main())
