"""The benchmark (`scripts/load.py bench`): servers of its own, the runs asked
for, and one report that says where and how its figures were made.

It starts a private PostgreSQL (in /dev/shm where there is one, fsync on,
commit_siblings=0, so that --commit-delay-ms can make every commit wait that
long with the sale row locked: a database whose commit is slow), or uses
--database-url. Then, for every --server (SERVER in the environment of the
`flashsale serve` it starts) and every --behind shape (`plain`: one `flashsale
serve` with its defaults; `nginx`: two single-process `flashsale serve`
behind scripts/nginx.conf), and for another checkout with --compare-with, it
starts the processes, all at once, so that the runs can take them in turns.
It registers --users buyers once (BCRYPT_ROUNDS=4) and runs:

  purchases  every request a distinct user's first purchase, stock that never
             runs out: answers/s, latency, CPU per purchase of the server,
             PostgreSQL and the client, orders per statement
  sold-out   purchases of a sold-out sale: refusals/s
  health     GET /health: what any request costs
  floods     polls of the current sale (wrk, --flood-connections, no
             If-None-Match) alone, then beside a flood of unknown sale ids (each
             a 404), then beside a flood of the list's largest pages
             (--list-limit), with --history past sales in the database
  crowd      the crowd: --crowd-rate arrivals/s for --crowd-seconds, each on a
             new connection, --crowd-users users, stock --crowd-stock
  watchers   the crowd while --watchers pages poll the sale; how many polls
             reached the app (its access log)
  direct     sql.PURCHASE and sql.PURCHASE_BATCH straight through psycopg
  standby    sql.PURCHASE straight through psycopg with an asynchronous, then a
             synchronous standby (a private primary and standby of its own)
  logins     bcrypt, logins through the server at the default cost, purchase
             latency during a login storm, the opening crowd (plain only)

purchases, sold-out and health use --client: wrk (a C client, default) or the
Python client; crowd and watchers use --crowd-client: python (default) or
artillery. After every purchase run the sales are read back from the database
(remaining + orders == total, one order per user, every 201 an order), and the
exit status is 1 if any check failed.

The report (printed, and written by --markdown and --json) starts with the
date, the commit, the machine's cores, the exact command and the clients, so
that no figure is quoted without them. The machine's cores are shared by the
clients, the servers and PostgreSQL: compare figures of one report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from pathlib import Path

import direct
import external
import loadclient
import logins
import scenarios
import servers
from private_postgres import PrivatePostgres
from private_postgres import server_version

ROOT = servers.ROOT
RUNS = ('purchases', 'sold-out', 'health', 'floods', 'crowd', 'watchers', 'direct', 'standby', 'logins')
# Runs that take a turn at each --connections level; the others run once.
LEVELLED = ('purchases', 'sold-out', 'health')
# Purchases/s no run here reaches (granian behind nginx: 5,000/s and more): wrk gets that many
# (sale, user) pairs per second.
WRK_MAX_RATE = 12000


def csv_list(kind=str):
    return lambda text: [kind(x) for x in text.split(',') if x]


def parse_args(argv, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=csv_list(), default=['purchases', 'sold-out', 'crowd'],
                        help=f'comma-separated, of {", ".join(RUNS)} (default purchases,sold-out,crowd)')
    parser.add_argument('--server', type=csv_list(), default=['waitress'],
                        help='comma-separated values of SERVER for `flashsale serve` (default waitress)')
    parser.add_argument('--behind', type=csv_list(), default=['plain'],
                        help='comma-separated: plain, nginx (default plain)')
    parser.add_argument('--client', choices=['wrk', 'python'], default='wrk',
                        help='for purchases, sold-out and health (default wrk)')
    parser.add_argument('--crowd-client', choices=['python', 'artillery'], default='python',
                        help='for crowd and watchers (default python)')
    parser.add_argument('--connections', type=csv_list(int), default=[64],
                        help='comma-separated connection counts for purchases, sold-out, health (default 64)')
    parser.add_argument('--seconds', type=int, default=5, help='seconds per wrk run (default 5)')
    parser.add_argument('--users', type=int, default=2000, help='buyers registered (default 2000)')
    for name, default, what in (('rate', 1000, 'arrivals per second'), ('seconds', 4, 'seconds of arrivals'),
                                ('users', 100, 'users'), ('stock', 50, "the sale's stock")):
        parser.add_argument(f'--crowd-{name}', type=int, default=default, help=f'the crowd: {what} (default {default})')
    parser.add_argument('--watchers', type=int, default=2000, help='pages polling in the watchers run')
    parser.add_argument('--history', type=int, default=20_000, help='past sales written for the floods run')
    parser.add_argument('--flood-connections', type=int, default=16,
                        help='floods run: connections of the polls, and of each flood (default 16)')
    parser.add_argument('--list-limit', type=int, default=200, help='floods run: the page size the list flood asks')
    parser.add_argument('--commit-delay-ms', type=csv_list(float), default=[0.0],
                        help='comma-separated commit_delay values; every run at each (private PostgreSQL only)')
    parser.add_argument('--metrics', type=csv_list(), default=['on'],
                        help="METRICS of the servers started (default on); 'on,off' measures what the metrics "
                             'cost: both variants, taken in turns')
    parser.add_argument('--compare-with', metavar='CHECKOUT',
                        help="also every run against another checkout's `flashsale serve` (e.g. an export of "
                             'main), in turns')
    parser.add_argument('--database-url', help='use this database instead of a private PostgreSQL')
    parser.add_argument('--repeat', type=int, default=1, help='turns per run (default 1)')
    parser.add_argument('--markdown', help='write the report here (Markdown)')
    parser.add_argument('--json', dest='json_file', help='write the report here (JSON)')
    args = parser.parse_args(argv)
    for run in args.runs:
        if run not in RUNS:
            parser.error(f'unknown run {run!r}; of {", ".join(RUNS)}')
    for shape in args.behind:
        if shape not in ('plain', 'nginx'):
            parser.error(f'unknown --behind {shape!r}: plain or nginx')
    if args.database_url and args.commit_delay_ms != [0.0]:
        parser.error('--commit-delay-ms needs the private PostgreSQL (no --database-url)')
    return args


# --- the header every figure carries ---------------------------------------------------


def _git(*args):
    done = subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def command_line(argv):
    python = Path(sys.executable)
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    return shlex.join([str(python), 'scripts/load.py', 'bench', *argv])


def cpu_model():
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def header(args, argv, database):
    commit = _git('rev-parse', '--short', 'HEAD') or 'unknown'
    if _git('status', '--porcelain', '--untracked-files=no'):
        commit += ' (with uncommitted changes)'
    clients = []
    if set(args.runs) & {*LEVELLED, 'floods'}:
        clients.append(f'{external.version(args.client) if args.client == "wrk" else "the Python client"} '
                       f'({", ".join(r for r in args.runs if r in (*LEVELLED, "floods"))})')
    if set(args.runs) & {'crowd', 'watchers'}:
        clients.append(f'{external.version("artillery") if args.crowd_client == "artillery" else "the Python client"}'
                       f' ({", ".join(r for r in args.runs if r in ("crowd", "watchers"))})')
    if set(args.runs) & {'direct', 'standby', 'logins'}:
        clients.append(f'psycopg / the Python client ({", ".join(r for r in args.runs if r in ("direct", "standby", "logins"))})')
    return {
        'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'commit': commit,
        'cores': len(os.sched_getaffinity(0)),
        'machine': f'{cpu_model()}, {platform.system()} {platform.release()}, load average '
                   f'{os.getloadavg()[0]:.2f} at the start',
        'command': command_line(argv),
        'client': '; '.join(clients) or '-',
        'python': platform.python_version(),
        'database': database,
        'settings': {k: os.environ[k] for k in sorted(os.environ) if k in SETTINGS_NAMES},
    }


def settings_of(checkout):
    """The names of the settings a checkout's `flashsale serve` reads (its --help)."""
    shown = subprocess.run([*servers.flashsale_command(checkout), 'serve', '--help'], capture_output=True,
                           text=True, cwd=checkout).stdout
    return set(re.findall(r'^  ([A-Z][A-Z0-9_]+) ', shown, re.M))


SETTINGS_NAMES = settings_of(ROOT) | {'SERVER'}


# --- the servers under test --------------------------------------------------------------


class Target:
    """One server variant in one shape: its processes, its URL, its CPU."""

    def __init__(self, name, server, shape, checkout, env, workdir):
        self.name, self.server, self.shape = name, server, shape
        self.checkout, self.env, self.workdir = Path(checkout), env, Path(workdir)
        self.apps, self.logs, self.nginx = [], [], None
        # A checkout whose settings have no SERVER runs its one server whatever SERVER says.
        self.note = '' if server == 'waitress' or 'SERVER' in settings_of(checkout) else \
            f'this checkout has no SERVER setting: its default server ran, not {server}'

    def _serve(self, **extra):
        port = servers.free_port()
        log_path = self.workdir / f'{self.name}-{self.shape}-{port}.log'
        env = dict(self.env, PORT=str(port), SERVER=self.server, **extra)
        self.apps.append(servers.start_serve(env, log_path, command=servers.flashsale_command(self.checkout),
                                             cwd=self.checkout))
        self.logs.append(log_path)
        return f'http://127.0.0.1:{port}'

    def start(self):
        if self.shape == 'plain':
            # Users are registered and the load sent from loopback: exempt,
            # explicitly (nothing is by default), unless the environment says.
            self.base_url = self.setup_url = self._serve(
                RATE_LIMIT_EXEMPT=os.environ.get('RATE_LIMIT_EXEMPT', '127.0.0.1,::1'))
        else:
            # Every client here is loopback, and an exemption of the proxy's
            # address is refused: the app's limits are off instead (nginx
            # still limits logins at the door; users are registered on an
            # app port directly).
            workers = os.environ.get('WORKERS', '1')
            urls = [self._serve(TRUSTED_PROXY='127.0.0.1', WORKERS=workers, AUTH_RATE_PER_MINUTE='0',
                                PURCHASE_RATE_PER_SECOND='0') for _ in range(2)]
            front = servers.free_port()
            nginx_dir = self.workdir / f'nginx-{self.name}'
            nginx_dir.mkdir()
            self.nginx = servers.start_nginx(nginx_dir, [int(u.rsplit(':', 1)[1]) for u in urls], front)
            # nginx limits /api/auth/ per address: users are registered on an app process.
            self.setup_url, self.base_url = urls[0], f'http://127.0.0.1:{front}'
        wait_healthy(self.base_url, self.nginx or self.apps[0])
        return self

    def cpu(self):
        return servers.cpu_seconds(*(p.pid for p in self.apps))

    def log_count(self, needle):
        return sum(path.read_text(errors='replace').count(needle) for path in self.logs)

    def stop(self):
        for proc in ([self.nginx] if self.nginx else []) + self.apps:
            servers.stop(proc)


def wait_healthy(base_url, proc, timeout=60):
    """Once GET /health answers 200 (through nginx, too); StartError if proc exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base_url + '/health', timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise servers.StartError(f'{base_url}/health never answered 200 ({shlex.join(map(str, proc.args))})')
        time.sleep(0.1)


# --- the runs ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, database_url, postmaster_pid, workdir, log):
        self.args, self.url, self.postmaster_pid = args, database_url, postmaster_pid
        self.workdir, self.log = Path(workdir), log
        self.secret = secrets.token_urlsafe(48)
        self.run_id = uuid.uuid4().hex[:8]
        self.rows = []

    def probe(self, target):
        """(server, PostgreSQL, client) CPU seconds so far."""
        mine = os.times()
        return (target.cpu(), servers.cpu_seconds(self.postmaster_pid) if self.postmaster_pid else 0.0,
                mine.user + mine.system + mine.children_user + mine.children_system)

    def cpu_ms(self, before, after, answered):
        names = ('server', 'postgres', 'client') if self.postmaster_pid else ('server', None, 'client')
        return {n: round((b - a) * 1000 / answered, 3) for n, a, b in zip(names, before, after, strict=True)
                if n and answered}

    def row(self, run, target=None, **fields):
        row = {'run': run, 'server': target.name if target else '-', 'behind': target.shape if target else '-',
               **fields}
        if target and target.note:
            row['notes'] = '; '.join(filter(None, [row.get('notes'), target.note]))
        self.rows.append(row)
        ok = {True: 'ok', False: 'FAIL', None: '-'}[row.get('ok')]
        self.log(f'  {run} {row["server"]} {row["behind"]}: {row.get("rate")}/s {ok} {row.get("notes", "")}')
        return row

    async def sales(self, count, stock, label):
        ids = []
        for _ in range(count):
            now, _ = await self.api.server_clock()
            sale = await self.api.create_sale(self.admin, stock, now - timedelta(seconds=1), timedelta(hours=1),
                                              f'bench {label} {self.run_id}')
            ids.append(sale['id'])
        self.api.pool.close()
        return ids

    async def purchases(self, target, level, delay):
        args, users = self.args, self.users
        before = self.probe(target)
        if args.client == 'wrk':
            sales = await self.sales(-(-WRK_MAX_RATE * args.seconds // len(users)), len(users), 'purchases')
            out = await asyncio.to_thread(external.run_wrk, target.base_url,
                                          [(s, u.token) for s in sales for u in users], self.workdir, level,
                                          args.seconds, threads=min(2, level))
            after = self.probe(target)
            states = [scenarios.read_database(self.url, s) for s in sales]
            ok = external.purchases_held(states, out['statuses'], level)
            answered, rate, p50, p99 = sum(out['statuses'].values()), out['rate'], out['p50_ms'], out['p99_ms']
            notes = f'statuses {out["statuses"]}'
        else:
            result = await scenarios.run_scenario_async(
                'throughput', base_url=target.base_url, prepared_users=users, admin_token=self.admin,
                users=len(users), requests=len(users), connections=level, timeout=30, settle=0.6)
            after = self.probe(target)
            sales, ok = [result['sale']['id']], result['invariants']['verdict'] == 'pass'
            answered, rate = result['answered'], result['answered_rate']
            p50, p99 = result['latency_ms']['p50'], result['latency_ms']['p99']
            notes = f'answers {result["by_code"]}'
        st = direct.statement_sizes(self.url, *sales)
        self.row('purchases', target, client=args.client, connections=level, commit_ms=delay, rate=rate, p50=p50,
                 p99=p99, cpu_ms=self.cpu_ms(before, after, answered), batch=(st['mean'], st['max']), ok=ok,
                 notes=notes)

    async def sold_out(self, target, level, delay):
        args, users = self.args, self.users
        before = self.probe(target)
        if args.client == 'wrk':
            [sale] = await self.sales(1, 1, 'sold-out')
            status, _ = await self.api.purchase(self.early, sale)
            self.api.pool.close()
            before = self.probe(target)
            out = await asyncio.to_thread(external.run_wrk, target.base_url, [(sale, u.token) for u in users],
                                          self.workdir, level, args.seconds, cycle=True, threads=min(2, level))
            statuses, rate, p50, p99 = out['statuses'], out['rate'], out['p50_ms'], out['p99_ms']
            answered = sum(statuses.values())
        else:
            result = await scenarios.run_scenario_async(
                'sold-out', base_url=target.base_url, prepared_users=users, admin_token=self.admin,
                users=min(200, len(users)), model='closed', connections=level, requests=len(users), timeout=30,
                settle=0.6)
            sale, status = result['sale']['id'], 201  # its early bird's purchase, checked by the scenario
            statuses = dict(result['by_status'])
            rate, answered = result['answered_rate'], result['answered']
            p50, p99 = result['latency_ms']['p50'], result['latency_ms']['p99']
        after = self.probe(target)
        state = scenarios.read_database(self.url, sale)
        ok = status == 201 and state['orders'] == 1 and state['remaining'] == 0 and set(statuses) == {'409'}
        self.row('sold-out', target, client=args.client, connections=level, commit_ms=delay, rate=rate, p50=p50,
                 p99=p99, cpu_ms=self.cpu_ms(before, after, answered), ok=ok, notes=f'statuses {statuses}')

    async def health(self, target, level, delay):
        before = self.probe(target)
        if self.args.client == 'wrk':
            out = await asyncio.to_thread(external.wrk_result, external.wrk_get(
                target.base_url, 'path', '/health', level, self.args.seconds, self.workdir))
            rate, p50, p99 = out['rate'], out['p50_ms'], out['p99_ms']
            answered, ok = sum(out['statuses'].values()), set(out['statuses']) == {'200'}
        else:
            result = await scenarios.run_plain_async(target.base_url, '/health', connections=level,
                                                     requests=len(self.users))
            rate, answered = result['answered_rate'], result['answered']
            p50, p99 = result['latency_ms']['p50'], result['latency_ms']['p99']
            ok = set(result['by_status']) == {'200'}
        after = self.probe(target)
        self.row('health', target, client=self.args.client, connections=level, commit_ms=delay, rate=rate, p50=p50,
                 p99=p99, cpu_ms=self.cpu_ms(before, after, answered), ok=ok)

    async def floods(self, target, level, delay):
        """The polls alone, then beside each flood, in turn."""
        args, alone = self.args, None
        floods = {'polls': None, 'polls + unknown ids': ('random-id', ''),
                  'polls + list pages': ('path', f'/api/flash-sales?limit={args.list_limit}')}
        for run, flood in floods.items():
            flooding = flood and external.wrk_get(target.base_url, *flood, args.flood_connections, args.seconds,
                                                  self.workdir)
            polls = await asyncio.to_thread(external.wrk_result, external.wrk_get(
                target.base_url, 'path', '/api/flash-sales/current', args.flood_connections, args.seconds,
                self.workdir))
            alone = alone or polls['p99_ms']
            notes = f'polls {polls["statuses"]}, p99 {polls["p99_ms"] / alone:.2f}x alone'
            ok = set(polls['statuses']) == {'200'}
            if flooding:
                out = await asyncio.to_thread(external.wrk_result, flooding)
                notes += f'; the flood {out["rate"]:,.0f}/s {out["statuses"]}'
                ok = ok and set(out['statuses']) <= {'200', '404'}
            self.row(run, target, client='wrk', connections=args.flood_connections, commit_ms=delay,
                     rate=round(polls['rate'], 1), p50=polls['p50_ms'], p99=polls['p99_ms'], ok=ok, notes=notes)

    async def crowd(self, target, level, delay, watchers=0):
        args = self.args
        users = self.users[:args.crowd_users]
        run = 'watchers' if watchers else 'crowd'
        polls_before = target.log_count('GET /api/flash-sales/current ')
        if args.crowd_client == 'artillery':
            [sale] = await self.sales(1, args.crowd_stock, 'crowd')
            watch = scenarios.Watchers(target.base_url, watchers) if watchers else None
            if watch:
                await watch.start()
                await asyncio.sleep(watch.interval)
            started = time.monotonic()
            out = await asyncio.to_thread(external.run_artillery, target.base_url, users, sale, self.workdir,
                                          args.crowd_rate, args.crowd_seconds)
            elapsed = time.monotonic() - started
            watched = await watch.stop() if watch else None
            await asyncio.sleep(1.0)  # past the server's poll cache
            db = scenarios.read_database(self.url, sale)
            created = out['codes'].get('201', 0)
            ok = (db['remaining'] + db['orders'] == db['total'] and db['duplicates'] == 0
                  and db['orders'] == created == min(args.crowd_stock, len(users)) and not out['errors'])
            rate, p50, p99 = round(out['requests'] / args.crowd_seconds, 1), out['p50_ms'], out['p99_ms']
            notes = f'codes {out["codes"]}, errors {out["errors"] or 0}'
        else:
            started = time.monotonic()
            result = await scenarios.run_scenario_async(
                run, base_url=target.base_url, prepared_users=users, admin_token=self.admin, users=len(users),
                stock=args.crowd_stock, rate=args.crowd_rate, duration=args.crowd_seconds,
                connection_model='per-arrival', watchers=watchers, database_url=self.url, timeout=30)
            elapsed = time.monotonic() - started
            watched = result['watchers']
            ok = result['invariants']['verdict'] == 'pass' and not result['errors']
            rate, p50, p99 = result['achieved_rate'], result['latency_ms']['p50'], result['latency_ms']['p99']
            notes = f'answers {result["by_code"]}, errors {sum(result["errors"].values())}'
        if watched:
            app_polls = target.log_count('GET /api/flash-sales/current ') - polls_before
            notes += (f'; {watched["watchers"]} watchers: {watched["answered"]} polls answered '
                      f'{watched["by_status"]}, errors {watched["errors"] or 0}, the app saw '
                      f'{app_polls / elapsed:.1f} polls/s')
            ok = ok and not watched['errors']
        self.row(run, target, client=args.crowd_client, connections='per arrival', commit_ms=delay, rate=rate,
                 p50=p50, p99=p99, ok=ok, notes=notes)

    async def watchers(self, target, level, delay):
        await self.crowd(target, level, delay, watchers=self.args.watchers)

    def direct(self, delay):
        single, batched = direct.single_and_batched(self.url, len(self.users))
        for name, out in (('PURCHASE', single), ('PURCHASE_BATCH', batched)):
            st = out['statements']
            self.row(f'direct {name}', client='psycopg', connections=out['concurrency'], commit_ms=delay,
                     rate=out['rate'], p50=(out.get('latency_ms') or {}).get('p50'),
                     p99=(out.get('latency_ms') or {}).get('p99'), batch=(st['mean'], st['max']),
                     ok=out['invariant_ok'])

    def standby(self):
        with tempfile.TemporaryDirectory(prefix='bench-standby-', dir=self.workdir) as tmp:
            found = direct.standby_cost(tmp, self.args.connections, len(self.users), self.args.repeat, self.log)
        for (level, mode), runs in sorted(found.items()):
            best = sorted(runs, key=lambda r: r['rate'])[len(runs) // 2]
            self.row(f'direct PURCHASE, {mode} standby', client='psycopg', connections=level, rate=best['rate'],
                     p50=best['latency_ms']['p50'], p99=best['latency_ms']['p99'], ok=best['invariant_ok'],
                     notes=f'every turn {[r["rate"] for r in runs]}/s' if len(runs) > 1 else '')

    def logins(self, target):
        base = target._serve(BCRYPT_ROUNDS=str(logins.COST),
                             RATE_LIMIT_EXEMPT=os.environ.get('RATE_LIMIT_EXEMPT', '127.0.0.1,::1'))
        wait_healthy(base, target.apps[-1])
        processes = int(os.environ.get('HASH_PROCESSES') or max(1, len(os.sched_getaffinity(0))
                                                                // int(os.environ.get('WORKERS') or 1)))
        out = asyncio.run(logins.run(base, self.url, self.secret, processes, self.log))
        servers.stop(target.apps.pop())
        lg, oc = out['logins'], out['opening_crowd']
        self.row('logins', target, client='python', connections=50, rate=round(lg['logins_per_s'], 1),
                 p50=lg['p50'], p99=lg['p99'], ok=None,
                 notes=f'{lg["ratio_to_bcrypt_alone"]:.0%} of bcrypt alone in {processes} processes')
        calm = max(out['calm_before']['p99'], out['calm_after']['p99'])
        self.row('purchases in a login storm', target, client='python', connections='100/s', rate=100,
                 p50=out['storm']['p50'], p99=out['storm']['p99'], ok=None,
                 notes=f'p99 {out["storm"]["p99"] / calm:.1f}x the calm p99 ({calm} ms)')
        self.row('opening', target, client='python', connections='per person', p99=oc['latency_ms']['login']['p99'],
                 ok=oc['verdict'] == 'pass', notes=f'{oc["users"]} people over 20 s, the last settled '
                                                   f'{oc["last_settled_s"]} s in; p99 is the login\'s')

    async def prepare(self, target):
        self.api = loadclient.Api(target.setup_url)
        self.admin = await self.api.admin_token(grant_admin=True, flashsale_cmd=shlex.join(servers.flashsale_command()),
                                                database_url=self.url, run_id=self.run_id)
        self.log(f'registering {self.args.users} buyers ...')
        self.users = await self.api.register_users(self.args.users, f'bench-{self.run_id}')
        [self.early] = await self.api.register_users(1, f'bench-{self.run_id}-early')
        self.api.pool.close()
        if 'floods' in self.args.runs and self.args.history:
            self.log(f'writing {self.args.history} past sales ...')
            direct.past_sales(self.url, self.args.history)
        if 'floods' in self.args.runs:
            await self.sales(1, 1_000_000, 'polled')  # the current sale the polls ask for

    async def run(self, targets):
        args = self.args
        await self.prepare(targets[0])
        for delay in args.commit_delay_ms:
            if self.postmaster_pid:
                direct.set_commit_delay(self.url, delay)
            for run in args.runs:
                if run == 'direct':
                    self.direct(delay)
                    continue
                if run in ('standby', 'logins'):
                    continue
                for level in args.connections if run in LEVELLED else [None]:
                    for _ in range(args.repeat):
                        for target in targets:
                            self.log(f'{run}: {target.name} {target.shape}, commit {delay:g} ms, '
                                     f'{level or ""} ...')
                            await getattr(self, run.replace('-', '_'))(target, level, delay)
        if self.postmaster_pid:
            direct.set_commit_delay(self.url, 0)
        self.api.close()


# --- the report --------------------------------------------------------------------------


def _cell(value):
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:,.1f}' if value >= 10 else f'{value:.2f}'
    if isinstance(value, int):
        return f'{value:,}'
    return str(value)


def markdown(report):
    h = report['header']
    lines = [f'- date: {h["date"]}', f'- commit: {h["commit"]}', f'- cores: {h["cores"]} ({h["machine"]})',
             f'- client: {h["client"]}', f'- database: {h["database"]}',
             f'- settings from the environment: {", ".join(f"{k}={v}" for k, v in h["settings"].items()) or "none"}',
             '- command:', '', '```sh', h['command'], '```', '',
             '| run | server | behind | client | connections | commit ms | per s | p50 ms | p99 ms '
             '| CPU ms: server / PostgreSQL / client | orders per statement: mean (max) | checks | notes |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in report['rows']:
        cpu = r.get('cpu_ms')
        cpu = ' / '.join(_cell(cpu.get(k)) for k in ('server', 'postgres', 'client')) if cpu else '-'
        batch = r.get('batch')
        batch = f'{_cell(batch[0])} ({_cell(batch[1])})' if batch else '-'
        ok = {True: 'pass', False: '**FAIL**', None: '-'}[r.get('ok')]
        lines.append('| ' + ' | '.join([r['run'], r['server'], r['behind'], _cell(r.get('client')),
                                        _cell(r.get('connections')), '-' if r.get('commit_ms') is None else f"{r['commit_ms']:g}",
                                        _cell(r.get('rate')),
                                        _cell(r.get('p50')), _cell(r.get('p99')), cpu, batch, ok,
                                        r.get('notes', '').replace('|', '/')]) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv, prog=None):
    args = parse_args(argv, prog)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    shm = '/dev/shm' if os.path.isdir('/dev/shm') else None
    workdir = tempfile.mkdtemp(prefix='flashsale-bench-')
    cluster = None
    targets = []
    try:
        if args.database_url:
            url, postmaster, database = args.database_url, None, 'the one in --database-url'
        else:
            # In memory: a flush costs ~0.1 ms there, so commit_delay is the
            # commit time, not a shared disk's noise. fsync on: PostgreSQL
            # skips commit_delay without it; commit_delay itself is set with
            # ALTER SYSTEM (a -c on the command line would override that).
            cluster = PrivatePostgres(tempfile.mkdtemp(prefix='flashsale-bench-pg-', dir=shm))
            cluster.start(options='-c fsync=on -c commit_siblings=0 -c max_connections=300')
            url, postmaster = cluster.url, cluster.pid()
            database = f'a private PostgreSQL {server_version()} in {shm or "a temporary directory"} ' \
                       '(fsync on, commit_siblings=0)'
        report = {'header': header(args, argv, database)}
        bench = Bench(args, url, postmaster, workdir, log)
        env = dict(os.environ, DATABASE_URL=url, JWT_SECRET=bench.secret, BCRYPT_ROUNDS='4', HOST='127.0.0.1')
        checkouts = [('', ROOT)] + ([('@' + Path(args.compare_with).name, args.compare_with)]
                                    if args.compare_with else [])
        for suffix, checkout in checkouts:
            for server in args.server:
                for shape in args.behind:
                    for metrics in args.metrics:
                        name = server + suffix + ('' if args.metrics == ['on'] else f' METRICS={metrics}')
                        log(f'starting {name} ({shape}) ...')
                        targets.append(Target(name, server, shape, checkout, dict(env, METRICS=metrics),
                                              workdir).start())
        asyncio.run(bench.run(targets))
        if 'logins' in args.runs:
            for target in targets:
                if target.shape == 'plain':
                    bench.logins(target)
        if 'standby' in args.runs:
            bench.standby()
        report['rows'] = bench.rows
    except (servers.StartError, loadclient.SetupError) as exc:
        log(f'bench: {exc}')
        return 3
    finally:
        for target in targets:
            target.stop()
        if cluster is not None:
            cluster.close()
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2, default=str))
    return 1 if any(r.get('ok') is False for r in report['rows']) else 0

