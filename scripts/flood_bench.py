#!/usr/bin/env python3
"""Anonymous floods beside the polls of the current sale, and the purchase
path, for one server or two (this checkout and --compare-with), interleaved.

    python scripts/flood_bench.py --sales 20000 --compare-with /tmp/before

It starts a private PostgreSQL (in /dev/shm where there is one) with
--sales sales in its history and one open sale, and `flashsale serve` with
its defaults (WORKERS: one per core) for each checkout, on that database.
Then, --repeat times, for each server in turn:

  polls      wrk, --connections keep-alive connections polling
             GET /api/flash-sales/current (no If-None-Match: every answer a
             200 with its body), for --seconds, alone;
  + ids      the same polls, while another wrk floods GET /api/flash-sales/{id}
             with random ids (each unknown: a 404) on as many connections;
  + list     the same polls, while another wrk floods GET /api/flash-sales?limit=N
             (the largest page, --list-limit);
  purchases  wrk, 64 connections: every request a distinct user's first
             purchase of a new sale that does not run out (the tokens signed with
             the servers' secret, for users written straight into the database);
  sold out   wrk, 64 connections: purchases of a sold-out sale.

and prints, per server, the polls' rate, p50 and p99 in each case (and the
ratio of the p99 to that of the polls alone in the same round), their p99
inside the app (from its access log: the time the server spent, without the
wait for a core), the floods' rates, and purchases/s and sold-out
refusals/s. The machine's cores are
shared by wrk, the servers and PostgreSQL: the figures are the whole
machine's.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import jwt
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'scripts'))
sys.path.insert(0, str(ROOT / 'tests'))

import bench  # noqa: E402
from private_postgres import PrivatePostgres  # noqa: E402
from wrk_purchases import run_wrk  # noqa: E402

# wrk: GETs of one path, or of random sale ids; answers counted by status.
WRK_GET_LUA = r'''
local mode = os.getenv("WRK_MODE")
local path = os.getenv("WRK_PATH")
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  statuses = {}
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
end
local function hex(n) local s = "" for _ = 1, n do s = s .. string.format("%x", math.random(0, 15)) end return s end
function request()
  if mode == "random-id" then
    return wrk.format("GET", "/api/flash-sales/" .. hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-a" .. hex(3) .. "-" .. hex(12))
  end
  return wrk.format("GET", path)
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do counts[tostring(code)] = (counts[tostring(code)] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(counts) do parts[#parts + 1] = string.format('"%s": %d', code, n) end
  io.write(string.format('WRK_RESULT {"statuses": {%s}, "duration_us": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    table.concat(parts, ", "), summary.duration, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
'''


def wrk_get(base_url, mode, path, connections, seconds, workdir):
    """Start wrk GETting `path` (mode 'path') or random sale ids ('random-id'); returns the process."""
    lua = Path(workdir) / f'get-{uuid.uuid4().hex[:8]}.lua'  # one each: a wrk starting reads its file
    lua.write_text(WRK_GET_LUA)
    env = dict(os.environ, WRK_MODE=mode, WRK_PATH=path)
    return subprocess.Popen([shutil.which('wrk'), '-t', '1', '-c', str(connections), '-d', f'{seconds}s',
                             '--timeout', '10s', '-s', str(lua), base_url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_result(proc):
    out, err = proc.communicate(timeout=120)
    line = next((x for x in out.splitlines() if x.startswith('WRK_RESULT ')), None)
    if line is None:
        raise SystemExit(f'wrk printed no result ({proc.returncode}, {proc.args}):\n{out}\n{err}')
    result = json.loads(line.split(' ', 1)[1])
    result['rate'] = sum(result['statuses'].values()) / (result['duration_us'] / 1e6)
    return result


def new_sale(url, name, stock, remaining):
    """A sale open for a day: its id."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) "
            "VALUES (%s, now() - interval '1 minute', now() + interval '1 day', %s, %s) RETURNING id",
            (name, stock, remaining)).fetchone()[0]


def prepare(url, sales, users, secret):
    """The history (ended sales), the current sale, a sold-out one, and
    `users` users with tokens: (sold-out sale, tokens)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock, created_at) "
            "SELECT 'Past sale ' || n, now() - n * interval '1 day', now() - n * interval '1 day' + interval '1 hour', "
            "100, 0, now() - n * interval '1 day' FROM generate_series(1, %s) AS n", (sales,))
        ids = [row[0] for row in conn.execute(
            "INSERT INTO users (email, password_hash) SELECT 'flood-' || n || '@example.com', 'x' "
            'FROM generate_series(1, %s) AS n RETURNING id', (users,))]
    now = int(time.time())
    tokens = [jwt.encode({'sub': str(i), 'gen': 0, 'iat': now, 'exp': now + 3600}, secret, algorithm='HS256')
              for i in ids]
    new_sale(url, 'Current', 1_000_000, 1_000_000)
    return new_sale(url, 'Sold out', 1, 0), tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sales', type=int, default=20_000, help='sales in the history')
    parser.add_argument('--connections', type=int, default=16, help='for the polls, and for each flood')
    parser.add_argument('--seconds', type=int, default=5, help='per wrk run')
    parser.add_argument('--list-limit', type=int, default=200, help='the page size the list flood asks for')
    parser.add_argument('--repeat', type=int, default=2, help='rounds')
    parser.add_argument('--compare-with', metavar='CHECKOUT', help='also run a server from this other checkout')
    parser.add_argument('--no-purchases', action='store_true', help='skip the purchases and sold-out runs')
    parser.add_argument('--keep-logs', action='store_true', help="keep the servers' logs (their paths are printed)")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix='flashsale-flood-')
    shm = '/dev/shm' if os.path.isdir('/dev/shm') else None
    cluster = PrivatePostgres(tempfile.mkdtemp(prefix='flashsale-flood-pg-', dir=shm))
    cluster.start(options='-c max_connections=200')
    secret = secrets.token_urlsafe(48)
    procs, servers = [], []
    try:
        for name, checkout in [('this', bench.ROOT)] + ([('before', args.compare_with)] if args.compare_with else []):
            proc, base = bench.start_server(cluster.url, os.path.join(workdir, f'{name}.log'), secret=secret,
                                            checkout=checkout)
            procs.append(proc)
            servers.append((name, base))
            print(f'{name}: {base} (pid {proc.pid}), log {workdir}/{name}.log', flush=True)
        # More users than any run here can buy in --seconds: wrk stops when they run out.
        sold_out, tokens = prepare(cluster.url, args.sales, 8_000 * args.seconds, secret)
        print(f'{args.sales} past sales, an open one, a sold-out one, {len(tokens)} users', flush=True)
        floods = {'ids': ('random-id', ''), 'list': ('path', f'/api/flash-sales?limit={args.list_limit}')}
        results = {name: [] for name, _ in servers}
        for round_ in range(args.repeat):
            for name, base in servers:
                row = {}
                for case in ('polls', 'ids', 'list'):
                    flood = wrk_get(base, *floods[case], args.connections, args.seconds, workdir) \
                        if case in floods else None
                    started = datetime.now()
                    polls = wrk_result(wrk_get(base, 'path', '/api/flash-sales/current', args.connections,
                                               args.seconds, workdir))
                    row[case] = {'polls': polls, 'flood': wrk_result(flood) if flood else None,
                                 'window': (started, datetime.now())}
                if not args.no_purchases:
                    # A sale of its own: every purchase a distinct user's first.
                    sale = new_sale(cluster.url, 'Purchases', 1_000_000, 1_000_000)
                    row['purchases'] = run_wrk(base, [(sale, t) for t in tokens], workdir, 64, args.seconds)
                    row['sold_out'] = run_wrk(base, [(sold_out, t) for t in tokens[:5000]], workdir, 64,
                                              args.seconds, cycle=True)
                results[name].append(row)
                print(f'round {round_ + 1}, {name}: ' + format_row(row), flush=True)
        for proc in procs:
            bench.stop_server(proc)
        for name, _ in servers:
            app_times(os.path.join(workdir, f'{name}.log'), results[name])
    finally:
        for proc in procs:
            bench.stop_server(proc)
        cluster.close()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    for name, rows in results.items():
        for round_, row in enumerate(rows, 1):
            print(f'round {round_}, {name}: ' + format_row(row))
    for name, rows in results.items():
        print(f'{name}, median of {len(rows)} rounds: ' + format_row({
            key: median_run([r[key] for r in rows]) for key in rows[0]}))
    return 0


_ACCESS = re.compile(r'^(\S+ \S+),(\d{3}) INFO flashsale\.access GET /api/flash-sales/current \d+ ([\d.]+)ms', re.M)


def app_times(log_path, rows):
    """Add to each case of each of `rows` the p99 of the polls' time inside the app
    (the access log's duration), in the case's window: what the server
    itself spent, apart from the time an answer waits for a core, which on
    a machine shared with the load tool and other work is most of the tail."""
    lines = [(datetime.strptime(f'{when}.{ms}', '%Y-%m-%d %H:%M:%S.%f'), float(took))
             for when, ms, took in _ACCESS.findall(Path(log_path).read_text())]
    for row in rows:
        for case in ('polls', 'ids', 'list'):
            start, end = row[case]['window']
            times = sorted(took for when, took in lines if start <= when <= end)
            row[case]['app_p99_ms'] = times[int(len(times) * 0.99)] if times else None


def median_run(runs):
    """The run with the median p99 of its polls (or rate, for a wrk purchase run)."""
    key = (lambda r: r['polls']['p99_ms']) if 'polls' in runs[0] else (lambda r: r['rate'])
    return sorted(runs, key=key)[len(runs) // 2]


def format_row(row):
    alone = row['polls']['polls']['p99_ms']
    parts = []
    for case in ('polls', 'ids', 'list'):
        polls, flood = row[case]['polls'], row[case]['flood']
        text = (f'{case}: polls {polls["rate"]:,.0f}/s p50 {polls["p50_ms"]:.1f} p99 {polls["p99_ms"]:.1f} ms '
                f'(x{polls["p99_ms"] / alone:.2f})')
        if row[case].get('app_p99_ms') is not None:
            text += f', in the app p99 {row[case]["app_p99_ms"]:.1f} ms'

        if flood:
            text += f', flood {flood["rate"]:,.0f}/s {dict(sorted(flood["statuses"].items()))}'
        parts.append(text)
    for case in ('purchases', 'sold_out'):
        if case in row:
            parts.append(f'{case} {row[case]["rate"]:,.0f}/s {dict(sorted(row[case]["statuses"].items()))}')
    return '; '.join(parts)


if __name__ == '__main__':
    sys.exit(main())
