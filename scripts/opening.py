"""The opening crowd (`scripts/load.py opening`): people who are not logged
in arrive at a sale's opening.

    python3 scripts/load.py opening --users 1000 --duration 20 --stock 100 \
        --tokenless 200 --grant-admin --database-url postgresql://... --jwt-secret ...

`--users` people arrive at a fixed rate over `--duration` seconds. Each one:

  1. gets a session: `--tokenless` of them (chosen at random) have no valid
     token and log in with their password (bcrypt, at the server's cost);
     `--newcomers` register a new account; the rest hold a token from
     earlier and renew it (POST /api/auth/refresh, no bcrypt);
  2. buys (POST /api/flash-sales/{id}/purchase).

Like the page, a person told 503 or 429 waits the Retry-After the server gave,
plus up to a quarter of it (at most a second) of jitter, and tries again;
after a lost answer they buy again, which is safe (one order per person).
A person is settled by an order (201, or already_purchased after a retry) or
a clear sold_out. The report: login, refresh and purchase latency (from the
first try to the answer that settled it, waits included), the answers over
time, and how long until the last person was settled. Checks: every person
settled, none with an unexplained answer, exactly min(stock, users) orders,
remaining + orders = total.

Preparing 1,000 accounts through the API costs a bcrypt hash each (minutes at
the default cost). With --database-url and --jwt-secret (the server's) the
accounts are written straight into the database instead, all with the hash
of one account registered through the API (so at the server's own cost), and
the earlier tokens are signed here (HS256, standard library). Without them,
every account is registered through the API, 32 at a time (the server queues
them; it no longer refuses a burst beyond a few).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import json
import random
import time
import uuid
from datetime import timedelta

import loadclient
from loadreport import deliver
from loadreport import latency_summary

REGISTER_CONCURRENCY = 32
# A person gives up after this many tries of one step (it is then "unsettled").
MAX_TRIES = 60


def mint_token(secret, user_id, ttl_seconds=3600):
    """A token as the server issues it (resources/credentials.py), signed with its secret."""
    def part(obj):
        raw = json.dumps(obj, separators=(',', ':')).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b'=')

    now = int(time.time())
    signing_input = part({'alg': 'HS256', 'typ': 'JWT'}) + b'.' + part(
        {'sub': str(user_id), 'gen': 0, 'iat': now, 'exp': now + ttl_seconds})
    signature = base64.urlsafe_b64encode(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())
    return (signing_input + b'.' + signature.rstrip(b'=')).decode()


async def prepare_people(api, count, run_id, database_url=None, jwt_secret=None, log=print):
    """[loadclient.User] with a valid token each, and the password USER_PASSWORD."""
    prefix = f'oc-{run_id}'
    if not (database_url and jwt_secret):
        log(f'registering {count} accounts through the API ({REGISTER_CONCURRENCY} at a time) ...')
        return await api.register_users(count, prefix, REGISTER_CONCURRENCY)
    import psycopg  # noqa: PLC0415 (only this path needs it)

    first = await api.register(f'{prefix}-0@example.com', loadclient.USER_PASSWORD, index=0)
    log(f'writing {count - 1} more accounts into the database (the hash of {first.email}) ...')
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO users (email, password_hash) "
            "SELECT %(prefix)s || '-' || i || '@example.com', "
            "       (SELECT password_hash FROM users WHERE email = %(first)s) "
            "  FROM generate_series(1, %(n)s) AS i "
            "RETURNING id, email",
            {'prefix': prefix, 'first': first.email, 'n': count - 1},
        ).fetchall()
    people = [first]
    for index, (user_id, email) in enumerate(sorted(rows, key=lambda r: int(r[1].split('-')[-1].split('@')[0])),
                                             start=1):
        people.append(loadclient.User(index, email, str(user_id), mint_token(jwt_secret, user_id)))
    return people


@dataclasses.dataclass
class Crowd:
    """The run: one task per person, records of every answer."""

    api: loadclient.Api
    sale_id: str
    t0: float
    # (seconds since t0 it was sent, seconds it took, step, label)
    records: list = dataclasses.field(default_factory=list)
    people: dict = dataclasses.field(default_factory=dict)  # index -> outcome dict

    async def send(self, step, method, path, token=None, body=None):
        raw = loadclient.build_request(method, path, self.api.host_header, token, body)
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self.api.timeout):
                response = await self.api.pool.send(raw)
        except TimeoutError:
            label, response = 'timeout', None
        except (OSError, asyncio.IncompleteReadError, loadclient.ProtocolError) as exc:
            label, response = f'error:{type(exc).__name__}', None
        else:
            code = (response.json() or {}).get('code') if response.status >= 400 else None
            label = f'{response.status} {code}' if code else str(response.status)
        self.records.append((sent - self.t0, time.monotonic() - sent, step, label))
        return label, response

    async def step(self, step, method, path, token=None, body=None, done=lambda label: label[0] == '2'):
        """Try until `done(label)` or an answer that is no reason to try again;
        returns (label, response, seconds from the first try)."""
        started = time.monotonic()
        for _ in range(MAX_TRIES):
            label, response = await self.send(step, method, path, token, body)
            if done(label):
                break
            if response is not None and response.status in (429, 503) and not label.endswith('outcome_unknown'):
                wait = float(response.headers.get('retry-after') or 1)
                await asyncio.sleep(wait + random.uniform(0, min(1.0, wait / 4)))
            elif response is None or label.endswith('outcome_unknown'):
                await asyncio.sleep(0.5)  # nothing known was done: try again (buying again is safe)
            else:
                break
        return label, response, time.monotonic() - started

    async def person(self, user, role, arrive_at):
        await asyncio.sleep(max(0.0, arrive_at - (time.monotonic() - self.t0)))
        arrived = time.monotonic()
        outcome = {'role': role, 'arrived': arrived - self.t0}
        self.people[user.index] = outcome
        credentials = {'email': user.email, 'password': loadclient.USER_PASSWORD}
        if role == 'login':
            label, response, seconds = await self.step('login', 'POST', '/api/auth/login', body=credentials)
        elif role == 'register':
            credentials['email'] = user.email.replace('@', '-new@')
            label, response, seconds = await self.step('register', 'POST', '/api/auth/register', body=credentials)
        else:
            label, response, seconds = await self.step('refresh', 'POST', '/api/auth/refresh', token=user.token)
        outcome.update(session=label, session_s=seconds)
        if label[0] != '2':
            outcome['settled'] = None
            return
        token = response.json()['token']
        settled = {'201', '409 sold_out', '409 already_purchased'}
        label, response, seconds = await self.step(
            'purchase', 'POST', f'/api/flash-sales/{self.sale_id}/purchase', token=token,
            done=lambda label: label in settled)
        outcome.update(purchase=label, purchase_s=seconds)
        if label in settled:
            outcome['settled'] = time.monotonic() - self.t0
            outcome['bought'] = label != '409 sold_out'
            outcome['user_id'] = response.json()['order']['userId'] if label == '201' else None
        else:
            outcome['settled'] = None


def check(checks, name, ok, detail):
    checks.append({'name': name, 'ok': ok, 'detail': detail})


def roles_for(count, tokenless, newcomers, rng):
    roles = ['login'] * tokenless + ['register'] * newcomers
    roles += ['refresh'] * (count - len(roles))
    rng.shuffle(roles)
    return roles


def answers_over_time(records, bucket=1.0):
    buckets = collections.defaultdict(collections.Counter)
    for sent, _, step, label in records:
        buckets[int(sent // bucket)][f'{step} {label}'] += 1
    return [{'t': round(b * bucket, 2), 'answers': dict(sorted(counts.items()))}
            for b, counts in sorted(buckets.items())]


async def run_async(base_url, users=1000, stock=100, duration=20.0, tokenless=None, newcomers=0,
                    admin_email=None, admin_password=None, grant_admin=False, flashsale_cmd=None,
                    database_url=None, jwt_secret=None, timeout=60.0, max_connections=400, seed=None,
                    admin_token=None, log=print):
    tokenless = users // 5 if tokenless is None else tokenless
    if tokenless + newcomers > users:
        raise loadclient.SetupError('--tokenless plus --newcomers is more than --users')
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:8]
    api = loadclient.Api(base_url, connections=max_connections, timeout=timeout)
    try:
        admin = admin_token or await api.admin_token(admin_email, admin_password, grant_admin, flashsale_cmd,
                                                     database_url, run_id)
        people = await prepare_people(api, users, run_id, database_url, jwt_secret, log)
        server_now, _ = await api.server_clock()
        sale = await api.create_sale(admin, stock, server_now - timedelta(seconds=1), timedelta(hours=1),
                                     f'opening crowd {run_id}')
        roles = roles_for(users, tokenless, newcomers, rng)
        log(f'{users} people over {duration:g} s ({tokenless} log in, {newcomers} register, '
            f'{users - tokenless - newcomers} renew their token), stock {stock} ...')
        crowd = Crowd(api, sale['id'], time.monotonic())
        gap = duration / users
        await asyncio.gather(*(crowd.person(user, role, i * gap) for i, (user, role) in enumerate(zip(people, roles))))
        elapsed = time.monotonic() - crowd.t0
        _, body = await api.call('GET', f'/api/flash-sales/{sale["id"]}')
        remaining = body['flashSale']['remainingStock']
        orders_in_db = None
        if database_url:
            import psycopg  # noqa: PLC0415

            with psycopg.connect(database_url) as conn:
                orders_in_db = conn.execute('SELECT count(*), count(DISTINCT user_id) FROM orders '
                                            'WHERE flash_sale_id = %s', (sale['id'],)).fetchone()
    finally:
        api.close()
    return summarize(crowd, users, stock, remaining, orders_in_db, elapsed)


def summarize(crowd, users, stock, remaining, orders_in_db, elapsed):
    outcomes = list(crowd.people.values())
    created = sum(1 for r in crowd.records if r[2] == 'purchase' and r[3] == '201')
    settled = [o for o in outcomes if o.get('settled') is not None]
    last_arrival = max((o['arrived'] for o in outcomes), default=0.0)
    last_settled = max((o['settled'] for o in settled), default=None)
    ends = collections.Counter(o.get('purchase') or f'no session: {o["session"]}' for o in outcomes)

    def latency(step):
        if step == 'purchase':
            return latency_summary([o['purchase_s'] for o in outcomes if 'purchase_s' in o])
        return latency_summary([o['session_s'] for o in outcomes if o['role'] == step])

    checks = []
    expected = min(stock, users)
    check(checks, 'every person settled (an order or sold_out)', len(settled) == users,
                   f'{len(settled)} of {users} settled; ends: {dict(ends)}')
    check(checks, 'exactly min(stock, users) orders', created == expected,
                   f'{created} x 201, expected {expected}')
    check(checks, 'remaining + orders == total', remaining + created == stock,
                   f'{remaining} + {created} = {remaining + created}, total {stock}')
    if orders_in_db is not None:
        count, buyers = orders_in_db
        check(checks, 'the database has those orders, one per buyer', count == buyers == created,
                       f'{count} orders, {buyers} buyers, {created} x 201')
    return {
        'scenario': 'opening',
        'users': users,
        'stock': stock,
        'roles': dict(collections.Counter(o['role'] for o in outcomes)),
        'elapsed_s': round(elapsed, 2),
        'last_arrival_s': round(last_arrival, 2),
        'last_settled_s': None if last_settled is None else round(last_settled, 2),
        'ends': dict(ends),
        'latency_ms': {'login': latency('login'), 'register': latency('register'),
                       'refresh': latency('refresh'), 'purchase': latency('purchase')},
        'answers': dict(collections.Counter(f'{r[2]} {r[3]}' for r in crowd.records)),
        'timeline': answers_over_time(crowd.records),
        'checks': checks,
        'verdict': 'pass' if all(c['ok'] for c in checks) else 'fail',
    }


def format_report(result):
    lines = [f'opening: {result["users"]} people ({result["roles"]}), stock {result["stock"]}',
             f'  last arrival at {result["last_arrival_s"]} s; last person settled at {result["last_settled_s"]} s',
             f'  how it ended: {result["ends"]}']
    for step, summary in result['latency_ms'].items():
        if summary['p50'] is not None:
            lines.append(f'  {step:8} p50 {summary["p50"]:>9.1f} ms  p99 {summary["p99"]:>9.1f} ms  '
                         f'max {summary["max"]:>9.1f} ms')
    lines.append('  answers over time (sent in second t: step answer x count):')
    for point in result['timeline']:
        lines.append(f'    {point["t"]:>5.0f} s  ' + ', '.join(f'{k} x{v}' for k, v in point['answers'].items()))
    for c in result['checks']:
        lines.append(f'  [{"PASS" if c["ok"] else "FAIL"}] {c["name"]}: {c["detail"]}')
    return '\n'.join(lines)


def parse_args(argv, prog=None):
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--base-url', default=loadclient.DEFAULT_BASE_URL)
    parser.add_argument('--users', type=int, default=1000)
    parser.add_argument('--stock', type=int, default=100)
    parser.add_argument('--duration', type=float, default=20.0, help='seconds over which the people arrive')
    parser.add_argument('--tokenless', type=int, help='people with no valid token, who log in (default: a fifth)')
    parser.add_argument('--newcomers', type=int, default=0, help='people who register a new account')
    parser.add_argument('--admin-email')
    parser.add_argument('--admin-password')
    parser.add_argument('--grant-admin', action='store_true')
    parser.add_argument('--flashsale-cmd')
    parser.add_argument('--database-url', help='write the accounts straight into it (with --jwt-secret)')
    parser.add_argument('--jwt-secret', help="the server's JWT_SECRET, to sign the earlier tokens")
    parser.add_argument('--timeout', type=float, default=60.0, help='per request, seconds')
    parser.add_argument('--max-connections', type=int, default=400)
    parser.add_argument('--seed', type=int)
    parser.add_argument('--json', dest='json_file')
    return parser.parse_args(argv)


def main(argv, prog=None):
    import sys  # noqa: PLC0415

    args = parse_args(argv, prog)
    try:
        result = asyncio.run(run_async(
            args.base_url, args.users, args.stock, args.duration, args.tokenless, args.newcomers,
            args.admin_email, args.admin_password, args.grant_admin, args.flashsale_cmd, args.database_url,
            args.jwt_secret, args.timeout, args.max_connections, args.seed,
            log=lambda msg: print(msg, file=sys.stderr, flush=True)))
    except loadclient.SetupError as exc:
        print(f'{prog or "opening"}: {exc}', file=sys.stderr)
        return 3
    deliver(format_report(result), result, args.json_file)
    return 0 if result['verdict'] == 'pass' else 1
