#!/usr/bin/env python3
"""Chaos (`scripts/load.py chaos`): a purchase storm against a real
`flashsale serve` while its database, or the server itself, is restarted
under it; then the invariants.

Everything it touches it makes itself, in a temporary directory: a private
PostgreSQL cluster (scripts/private_postgres.py; never a database anyone
else uses), a `flashsale serve` on a free port, users and a sale. Shoppers
(threads, each on its own keep-alive connection) buy at a steady pace, one
user after another; a user whose answer settles nothing (503, no answer at
all) tries again later, the way docs/operating.md tells clients to. Meanwhile the
events given run at even intervals:

  db:fast       pg_ctl stop -m fast, then start (a planned restart, failover)
  db:immediate  pg_ctl stop -m immediate, then start (a crash, with recovery)
  db:kill       SIGKILL to the postmaster, then start (a crash)
  db:freeze     SIGSTOP to every database process, then SIGCONT (a stalled
                disk, a paused machine: connections open, nothing answers)
  db:failover   the database has a streaming standby (--standby sync or
                async) and the service a two-host DATABASE_URL: SIGKILL to
                every process of the primary (its machine is gone), then, after
                --down-for seconds (an HA manager deciding), `pg_ctl promote`
                of the standby. The service must find the new primary by
                itself, and the checks read the NEW primary. With --lag S the
                primary's walsender is paused (SIGSTOP) S seconds before the
                kill: the link to the standby is broken while purchases go on
                (what an async standby then loses, a sync one cannot)
  app:kill      SIGKILL to `flashsale serve`, then start it again
  app:term      SIGTERM to `flashsale serve` (it finishes what is in flight
                and exits 0), then start it again

Afterwards it prints the check of every invariant (scripts/invariants.py,
the checker the load tool and the tests use too) and exits 1 if one fails:
stock + orders = total, one order per user, exactly the stock sold, every 201
has its order, no order without a 201 or an answer that admits not knowing
(503 outcome_unknown, or no answer when the server was killed), every
already_purchased has an order, only documented answers, every user settled.

    python scripts/load.py chaos                          # db:fast, db:immediate
    python scripts/load.py chaos --events db:kill app:kill app:term --users 1000
    python scripts/load.py chaos --events db:failover                 # sync standby
    python scripts/load.py chaos --events db:failover --standby async --lag 0.5

Needs the project installed (pip install -e .): it runs `python -m flashsale`.
tests/test_faults.py runs it with small numbers.
"""

import argparse
import collections
import contextlib
import http.client
import json
import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path

import psycopg

import invariants
import servers
from private_postgres import PrivatePostgres
from resources import database
from resources.credentials import Credentials

EVENTS = ('db:fast', 'db:immediate', 'db:kill', 'db:freeze', 'db:failover', 'app:kill', 'app:term')

SETTLED = {'created', 'already_purchased', 'sold_out'}
# Answers that say "not bought, try again": the statement never ran, or rolled back.
RETRY = {'database_unavailable', 'overloaded', 'rate_limited'}


class Server:
    """`flashsale serve` in a process of its own, on a fixed port; each start
    logs to a file of its own beside `log_path`."""

    def __init__(self, env, log_path):
        self.env = env
        self.port = int(env['PORT'])
        self.log_path = Path(log_path)
        self.starts = 0
        self.proc = None

    def start(self, timeout=30):
        self.starts += 1
        try:
            self.proc = servers.start_serve(self.env, self.current_log(), timeout)
        except servers.StartError as exc:
            raise RuntimeError(str(exc)) from None
        deadline = time.monotonic() + timeout
        while http_get(self.port, '/health')[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'flashsale serve did not become healthy:\n{self.log_tail()}')
            time.sleep(0.05)

    def current_log(self):
        return self.log_path.with_name(f'{self.log_path.stem}-{self.starts}{self.log_path.suffix}')

    def kill(self):
        self.proc.kill()
        return self.proc.wait()

    def terminate(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log_tail(self, lines=30):
        try:
            return '\n'.join(self.current_log().read_text().splitlines()[-lines:])
        except OSError:
            return ''


def http_get(port, path):
    try:
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
        conn.request('GET', path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body
    except (OSError, http.client.HTTPException):
        return None, b''


def prepare(url, secret, users, stock):
    """users ids and tokens, and an open sale, straight into the database."""
    credentials = Credentials(secret, 3600, 4)
    with psycopg.connect(url, autocommit=True) as conn:
        database.apply_schema(conn)
        ids = [row[0] for row in conn.execute(
            "INSERT INTO users (email, password_hash) "
            "SELECT 'chaos-' || gen_random_uuid() || '@example.com', 'x' FROM generate_series(1, %s) RETURNING id",
            (users,),
        )]
        sale_id = conn.execute(
            'INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock) '
            "VALUES ('Chaos sale', now() - interval '1 minute', now() + interval '1 hour', %s, %s) RETURNING id",
            (stock, stock),
        ).fetchone()[0]
    return {str(i): credentials.issue(i) for i in ids}, str(sale_id)


def shopper(port, sale_id, queue, tokens, pace, stop_at, records, lock):
    """Buy for one user after another from `queue`; a user not settled goes
    to the back of it. stop_at[0]: when to give up (it moves)."""
    conn = None
    while time.monotonic() < stop_at[0]:
        with lock:
            if not queue:
                return
            user = queue.popleft()
        started = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=15)
            conn.request('POST', f'/api/flash-sales/{sale_id}/purchase',
                         headers={'Authorization': f'Bearer {tokens[user]}'})
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
            try:
                body = json.loads(raw)
                kind = 'created' if status == 201 else body.get('code', f'http_{status}')
                order = (body.get('order') or {}).get('id')
            except ValueError:
                kind, order = f'not_json_{status}', None
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
            status, kind, order = None, 'no_answer', None
        with lock:
            records.append({'user': user, 'status': status, 'kind': kind, 'order': order,
                            'at': started, 'took': time.monotonic() - started})
            if kind not in SETTLED:
                queue.append(user)
        time.sleep(pace)
    if conn is not None:
        conn.close()


def check(url, sale_id, tokens, stock, records, app_events):
    """[Check(invariant, ok, detail)] from the answers given and the database."""
    with psycopg.connect(url, autocommit=True) as conn:
        state, orders = invariants.read_sale(conn, sale_id)
    answers = [invariants.Answer(r['user'], r['kind'], r['order']) for r in records]
    kinds = collections.Counter(r['kind'] for r in records)
    allowed = SETTLED | RETRY | {'outcome_unknown'} | ({'no_answer'} if app_events else set())
    unexpected = {k: n for k, n in kinds.items() if k not in allowed}
    settled = {r['user'] for r in records if r['kind'] in SETTLED}
    unsettled = [u for u in tokens if u not in settled]
    expected_sold = min(stock, len(tokens))
    # The shoppers buy again after an unknown outcome until the server settles
    # the user: an order behind one is accounted for, not undecided.
    return invariants.check_sale(state, orders, answers, unknown_ok=True) + [
        invariants.Check('exactly the stock sold (every user settled, more users than stock)',
                         not unsettled and state.orders == expected_sold,
                         f'{state.orders} sold, expected {expected_sold}'),
        invariants.Check('only documented answers', not unexpected,
                         f'unexpected: {unexpected}' if unexpected else 'yes'),
        invariants.Check('every user settled (the service recovered without a restart)' if not app_events
                         else 'every user settled', not unsettled, f'{len(unsettled)} users never settled'),
    ]


def failover(primary, standby, down_for, lag):
    """db:failover: (optionally) break the replication link `lag` seconds
    before, SIGKILL the primary, wait `down_for`, promote the standby.
    Returns monotonic times: the kill sent, the primary certainly dead, the
    promotion done."""
    if lag:
        primary.pause_replication()
        time.sleep(lag)
    killing = time.monotonic()
    primary.kill()
    killed = time.monotonic()
    time.sleep(down_for)
    standby.promote()
    return killing, killed, time.monotonic()


def unavailable_window(records, killing, killed, promoted):
    """How the service answered across a failover (seconds): until its first
    purchase answered from the database again (201 or already_purchased:
    a sold_out may come from memory), and until the end of its last 503,
    from the kill and after the promotion."""
    after = [r for r in records if r['at'] + r['took'] >= killing]
    refused = [r['at'] + r['took'] for r in after if r['status'] == 503 or r['kind'] == 'no_answer']
    answered = [r['at'] + r['took'] for r in after
                if r['kind'] in ('created', 'already_purchased') and r['at'] >= killed]
    last_503 = max(refused, default=killed)
    first_ok = min(answered, default=None)
    return {
        'promotion_after_kill': round(promoted - killed, 2),
        'answers_503': len(refused),
        'outcome_unknown': sum(1 for r in after if r['kind'] == 'outcome_unknown'),
        'last_503_after_kill': round(last_503 - killed, 2),
        'last_503_after_promotion': round(last_503 - promoted, 2),
        'first_purchase_after_kill': None if first_ok is None else round(first_ok - killed, 2),
        'first_purchase_after_promotion': None if first_ok is None else round(first_ok - promoted, 2),
    }


def lost_orders(url, sale_id, records):
    """Purchases answered 201 whose order is not in the database at `url`."""
    with psycopg.connect(url, autocommit=True) as conn:
        have = {str(row[0]) for row in conn.execute('SELECT id FROM orders WHERE flash_sale_id = %s', (sale_id,))}
    return [r for r in records if r['kind'] == 'created' and r['order'] not in have]


def run(events=('db:fast', 'db:immediate'), users=400, stock=300, rate=150.0, shoppers=16, duration=None,
        down_for=0.5, workdir=None, log=print, standby='sync', lag=0.0):
    """Run the storm and the events; return a dict: ok, checks, answers, events, ..."""
    for event in events:
        if event not in EVENTS:
            raise ValueError(f'unknown event {event!r}; choose from {", ".join(EVENTS)}')
    if events.count('db:failover') > 1:
        raise ValueError('db:failover can happen once: there is one standby')
    duration = duration or users / rate * 1.5 + 2
    with tempfile.TemporaryDirectory(prefix='flashsale-chaos-', dir=workdir) as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        log(f'private PostgreSQL in {tmp / "pg"} ...')
        pg = stack.enter_context(PrivatePostgres(tmp / 'pg'))
        secret = secrets.token_urlsafe(48)
        tokens, sale_id = prepare(pg.url, secret, users, stock)
        url, replica, failed_over = pg.url, None, None
        if 'db:failover' in events:
            replica = stack.enter_context(pg.add_standby(tmp / 'standby', synchronous=standby == 'sync'))
            # Both hosts, primary first; the pool keeps to the one that takes writes.
            url = (f'postgresql://postgres@127.0.0.1:{pg.port},127.0.0.1:{replica.port}/postgres'
                   '?target_session_attrs=read-write')
            log(f'{standby} streaming standby on port {replica.port}; DATABASE_URL={url}')
        env = {k: v for k, v in os.environ.items() if k not in ('TEST_DATABASE_URL',)}
        env.update(DATABASE_URL=url, JWT_SECRET=secret, PORT=str(servers.free_port()), HOST='127.0.0.1',
                   BCRYPT_ROUNDS='4', THREADS='8', LOG_LEVEL='WARNING',
                   # The storm comes from loopback, faster than a user's limit.
                   RATE_LIMIT_EXEMPT='127.0.0.1,::1')
        server = Server(env, tmp / 'server.log')
        server.start()
        log(f'flashsale serve on port {server.port}: {users} users, stock {stock}, '
            f'about {rate:g} purchases/s from {shoppers} shoppers; events: {", ".join(events) or "none"}')

        queue = collections.deque(tokens)
        records, lock = [], threading.Lock()
        started = time.monotonic()
        # The storm's time does not count the time the events take (a
        # restart on a busy machine can take seconds): a list, to move it.
        stop_at = [started + duration]
        threads = [threading.Thread(
            target=shopper, args=(server.port, sale_id, queue, tokens, shoppers / rate, stop_at, records, lock),
            daemon=True) for _ in range(shoppers)]
        for t in threads:
            t.start()

        # The events, evenly over the time the first round of purchases takes.
        storm = users / rate
        done_events = []
        for i, event in enumerate(events):
            time.sleep(max(0.0, started + storm * (i + 1) / (len(events) + 1) - time.monotonic()))
            at = time.monotonic() - started
            what, how = event.split(':')
            if event == 'db:failover':
                killing, killed, promoted = failover(pg, replica, down_for, lag)
                failed_over = (killing, killed, promoted)
                pg = replica  # the primary from now on (a later db:* event restarts it)
                detail = (f'primary SIGKILLed{f" {lag:g} s after replication to the standby stopped" if lag else ""}, '
                          f'{standby} standby promoted {promoted - killed:.2f} s later')
            elif what == 'db':
                pg.restart(how, down_for=down_for)
                detail = f'database {"frozen" if how == "freeze" else "down"} {down_for:g} s'
            elif how == 'kill':
                server.kill()
                server.start()
                detail = 'server killed and started again'
            else:
                status = server.terminate()
                server.start()
                detail = f'server stopped (exit {status}) and started again'
            stop_at[0] += time.monotonic() - started - at
            done_events.append({'event': event, 'at': round(at, 2), 'took': round(time.monotonic() - started - at, 2),
                                'detail': detail, 'answers_so_far': len(records)})
            log(f'  {at:5.2f} s  {event}: {detail}')

        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        exit_status = server.terminate()
        app_events = any(e.startswith('app:') for e in events)
        # Read from the primary of the end: after a failover, the promoted standby.
        checks = check(pg.url, sale_id, tokens, stock, records, app_events)
        checks.append(invariants.Check('the server exits 0 on SIGTERM', exit_status == 0,
                                       f'exit status {exit_status}'))
        lost = lost_orders(pg.url, sale_id, records) if failed_over else []
        if invariants.failures(checks):
            log('server log (tail):\n' + server.log_tail())

    answers = collections.Counter(r['kind'] for r in records)
    result = {
        'ok': not invariants.failures(checks),
        'checks': [{'invariant': name, 'ok': ok, 'detail': detail} for name, ok, detail in checks],
        'answers': dict(answers),
        'requests': len(records),
        'seconds': round(elapsed, 2),
        'slowest_answer_s': round(max((r['took'] for r in records), default=0), 3),
        'events': done_events,
        'users': users,
        'stock': stock,
    }
    if failed_over:
        result['failover'] = dict(
            unavailable_window(records, *failed_over),
            standby=standby, lag=lag, lost_201s=len(lost))
    log(f'{len(records)} requests in {elapsed:.1f} s; answers: '
        + ', '.join(f'{k} {n}' for k, n in answers.most_common()))
    if failed_over:
        f = result['failover']
        log(f'failover ({standby} standby): primary killed, standby promoted {f["promotion_after_kill"]:.2f} s '
            f'later; {f["answers_503"]} answers 503 ({f["outcome_unknown"]} of them outcome_unknown), '
            f'the last one {f["last_503_after_kill"]:.2f} s after the kill '
            f'({f["last_503_after_promotion"]:+.2f} s from the promotion); first purchase answered again '
            + ('never' if f['first_purchase_after_kill'] is None else
               f'{f["first_purchase_after_kill"]:.2f} s after the kill '
               f'({f["first_purchase_after_promotion"]:+.2f} s from the promotion)'))
        log(f'orders answered 201 but missing on the new primary: {f["lost_201s"]}')
    for c in result['checks']:
        log(f'  [{"PASS" if c["ok"] else "FAIL"}] {c["invariant"]}: {c["detail"]}')
    log('all invariants hold' if result['ok'] else 'INVARIANT VIOLATED')
    return result


def main(argv, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--events', nargs='*', default=['db:fast', 'db:immediate'], choices=EVENTS,
                        help='what happens during the storm, in order (default: db:fast db:immediate)')
    parser.add_argument('--users', type=int, default=400)
    parser.add_argument('--stock', type=int, default=300)
    parser.add_argument('--rate', type=float, default=150.0, help='purchases per second, about')
    parser.add_argument('--shoppers', type=int, default=16, help='client threads')
    parser.add_argument('--down-for', type=float, default=0.5,
                        help='seconds the database stays down (db:failover: from the kill to the promotion)')
    parser.add_argument('--standby', choices=('sync', 'async'), default='sync',
                        help='db:failover: the standby is synchronous (default) or asynchronous')
    parser.add_argument('--lag', type=float, default=0.0,
                        help='db:failover: pause replication (the primary\'s walsender) this many seconds before the kill')
    parser.add_argument('--json', help='also write the result to this file')
    args = parser.parse_args(argv)
    result = run(events=args.events, users=args.users, stock=args.stock, rate=args.rate,
                 shoppers=args.shoppers, down_for=args.down_for, standby=args.standby, lag=args.lag)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result['ok'] else 1
