#!/usr/bin/env python3
"""Load generator for flashsale: drives a running server over keep-alive HTTP/1.1.

Standard library only (``--database-url`` additionally needs psycopg, imported
only when that option is used). One process, one asyncio loop, raw HTTP/1.1 on
asyncio streams: about 75 us of client CPU per request (0.15 of a core at
2,000 req/s), so on a 2-core machine the server, not this client, is what a run
measures. The summary prints the client's own CPU use and how far it fell
behind schedule, so you can tell.

Scenarios (``python scripts/loadtest.py SCENARIO --help`` for every flag):

  single-user  one user hammers one sale           -> exactly one order
  crowd        the reference run: 100 users, stock 50, 1,000 req/s for 4 s,
               each request a purchase by a random one of the 100 users
  throughput   thousands of distinct users, stock that never runs out,
               closed model (N connections, each sends its next request as
               soon as the previous answer arrives): raw purchase throughput
  sold-out     the stock is bought before the run: everyone is refused
  opening      the sale starts --start-delay seconds into the run: the
               stampede at the start time

Two load models:

  open    requests start on a fixed schedule (--rate for --duration) whether or
          not earlier ones finished, the way real customers arrive. They are
          spread over --connections keep-alive connections; when none is free
          the client opens more, up to --max-connections (counted), and past
          that the request waits for a connection (counted). Latency is
          measured from the *scheduled* start, so a server that falls behind
          shows it (no coordinated omission).
  closed  --connections workers each send one request at a time, for
          --requests requests or --duration seconds: the most the server can
          do at that concurrency.

Every run prepares its own users and sale through the API, so it needs an
admin: ``--admin-email/--admin-password`` (log in), or ``--grant-admin`` (the
client registers an admin user and runs ``flashsale grant-admin EMAIL``, which
reads the same DATABASE_URL as the server; ``--database-url`` is passed to it
when given). Registering users costs the server one bcrypt hash each, and it
hashes at most BCRYPT_SLOTS (THREADS // 2 = 4 by default) at once, so users are
registered 4 at a time: at the default cost (BCRYPT_ROUNDS=12, ~0.25 s of a
core per hash) that is under 10 users/s on 2 cores, while BCRYPT_ROUNDS=4 gives
~800/s. For big runs start the server with a low cost, e.g.

    BCRYPT_ROUNDS=4 DATABASE_URL=postgresql://... JWT_SECRET=... flashsale serve

and then, for example:

    python3 scripts/loadtest.py crowd --grant-admin --database-url postgresql://... \
        --json crowd.json --html crowd.html
    python3 scripts/loadtest.py throughput --users 5000 --connections 64 --admin-email a@x.io --admin-password ...
    python3 scripts/loadtest.py opening --rate 2000 --duration 6 --start-delay 3 --grant-admin ...

After the run the client reads the outcome back from the API (the sale, and
for every user of the run GET /api/me/orders/{saleId} and GET /api/me/orders)
and checks the invariants: remaining + orders == total stock, no user with two
orders, orders == 201 answers received, plus what the scenario must produce.
With ``--database-url`` it also counts the orders in the database. The exit
status is 0 when every check passed, 1 when one failed, 2 when a check could
not be decided (requests that got no answer may or may not have bought), 3
when the run could not be prepared (no admin, server unreachable, ...).

Importable: ``run_scenario('crowd', base_url=..., users=20, stock=5, rate=200,
duration=1, grant_admin=True)`` returns the result dict that ``--json`` writes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import html
import itertools
import json
import math
import os
import random
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from urllib.parse import urlsplit

if sys.version_info < (3, 11):
    sys.exit('loadtest.py needs Python 3.11 or newer (asyncio.timeout)')

DEFAULT_BASE_URL = 'http://127.0.0.1:8000'
USER_PASSWORD = 'loadtest-password'

# What each scenario runs unless a flag says otherwise. stock=None means
# "never runs out": one unit per request the run can send.
SCENARIOS = {
    'single-user': dict(users=1, stock=10, model='open', rate=500, duration=2.0, connections=32),
    'crowd': dict(users=100, stock=50, model='open', rate=1000, duration=4.0, connections=32),
    'throughput': dict(users=2000, stock=None, model='closed', duration=None, connections=32),
    'sold-out': dict(users=100, stock=1, model='open', rate=1000, duration=4.0, connections=32),
    'opening': dict(users=100, stock=50, model='open', rate=1000, duration=5.0, connections=32, start_delay=2.0),
}

# waitress stops accepting at connection_limit (default 100), and counts its own
# listening socket and wake-up pipe in it: a 99th client connection sits in the
# listen backlog unanswered until the client times out. Stay below that.
DEFAULT_MAX_CONNECTIONS = 96

# The server hashes at most BCRYPT_SLOTS passwords at once (default THREADS // 2 = 4) and
# answers 503 overloaded to the rest: register no more than that at a time.
DEFAULT_REGISTER_CONCURRENCY = 4
READ_BACK_CONCURRENCY = 16


class ProtocolError(Exception):
    """The server's answer was not HTTP/1.1 this client understands."""


class SetupError(Exception):
    """Preparing the run (admin, users, sale) failed."""


# --------------------------------------------------------------------------
# HTTP/1.1 on asyncio streams
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    headers: dict
    body: bytes
    keep_alive: bool

    def json(self):
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    __slots__ = ('reader', 'writer')

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host, port):
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info('socket')
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> Response:
        self.writer.write(raw)
        head = await self.reader.readuntil(b'\r\n\r\n')
        lines = head.split(b'\r\n')
        parts = lines[0].split(b' ', 2)
        if len(parts) < 2 or not parts[0].startswith(b'HTTP/'):
            raise ProtocolError(f'bad status line {lines[0][:80]!r}')
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b':')
                headers[name.strip().lower().decode('latin-1')] = value.strip().decode('latin-1')
        if parts[0] == b'HTTP/1.0':
            keep_alive = headers.get('connection', '').lower() == 'keep-alive'
        else:
            keep_alive = headers.get('connection', '').lower() != 'close'
        if status in (204, 304) or 100 <= status < 200:
            body = b''
        elif 'chunked' in headers.get('transfer-encoding', '').lower():
            body = await self._read_chunked()
        elif 'content-length' in headers:
            body = await self.reader.readexactly(int(headers['content-length']))
        else:
            body = await self.reader.read()
            keep_alive = False
        return Response(status, headers, body, keep_alive)

    async def _read_chunked(self):
        chunks = []
        while True:
            size_line = await self.reader.readuntil(b'\r\n')
            size = int(size_line.split(b';', 1)[0], 16)
            if size == 0:
                while (await self.reader.readuntil(b'\r\n')) != b'\r\n':
                    pass  # trailers
                return b''.join(chunks)
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self):
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken socket may raise anything
            pass


class ConnectionPool:
    """Keep-alive connections to one server.

    ``size`` connections are opened up front; when none is idle a new one is
    opened, up to ``max_size`` (``peak_open`` says how far it grew); past that
    the request waits for one to come back (counted in ``waited``).

    ``open_count`` counts slots: a connection open or being opened. A slot
    freed by a closed connection passes straight to the first waiter, which
    then opens its own connection in it.
    """

    def __init__(self, host, port, size, max_size):
        self.host = host
        self.port = port
        self.size = size
        self.max_size = max(size, max_size)
        self.idle = collections.deque()
        self.waiters = collections.deque()
        self.open_count = 0
        self.in_use = 0
        self.peak_in_use = 0
        self.peak_open = 0
        self.discarded = 0
        self.waited = 0
        self.connect_errors = 0

    async def start(self):
        results = await asyncio.gather(
            *(Connection.open(self.host, self.port) for _ in range(self.size)), return_exceptions=True
        )
        for conn in results:
            if isinstance(conn, BaseException):
                self.connect_errors += 1
            else:
                self.open_count += 1
                self.idle.append(conn)
        self.peak_open = self.open_count
        if not self.idle and self.size:
            raise SetupError(f'cannot connect to {self.host}:{self.port}: {results[0]!r}')

    async def acquire(self) -> Connection:
        conn = None
        if self.idle:
            conn = self.idle.pop()
        elif self.open_count < self.max_size:
            self.open_count += 1
            conn = await self._connect_in_slot()
        else:
            self.waited += 1
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # handed a connection (or an open slot) just as we gave up
                    self._give_back(waiter.result())
                raise
            if conn is None:  # handed a free slot: open our own connection in it
                conn = await self._connect_in_slot()
        self.in_use += 1
        if self.in_use > self.peak_in_use:
            self.peak_in_use = self.in_use
        return conn

    async def _connect_in_slot(self):
        self.peak_open = max(self.peak_open, self.open_count)
        try:
            return await Connection.open(self.host, self.port)
        except BaseException:
            self.connect_errors += 1
            self._give_back(None)
            raise

    async def send(self, raw: bytes) -> Response:
        """One request on a pooled connection, kept for the next one if the answer allows it
        (a timeout cancelling the request closes the connection instead)."""
        conn = await self.acquire()
        reusable = False
        try:
            response = await conn.request(raw)
            reusable = response.keep_alive
        finally:
            self.release(conn, reusable)
        return response

    def release(self, conn: Connection, reusable: bool):
        self.in_use -= 1
        if reusable:
            self._give_back(conn)
        else:
            conn.close()
            self.discarded += 1
            self._give_back(None)

    def _give_back(self, conn):
        """Hand a connection (or, with None, a free slot) to the first waiter."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            self.idle.append(conn)
        else:
            self.open_count -= 1

    def close(self):
        """Close the idle connections (the pool can still open new ones later)."""
        while self.idle:
            self.idle.pop().close()
            self.open_count -= 1


def build_request(method, path, host_header, token=None, body=None) -> bytes:
    lines = [f'{method} {path} HTTP/1.1', f'Host: {host_header}', 'Accept: application/json']
    if token:
        lines.append(f'Authorization: Bearer {token}')
    payload = b''
    if body is not None:
        payload = json.dumps(body).encode()
        lines.append('Content-Type: application/json')
    if body is not None or method in ('POST', 'PUT', 'PATCH'):
        lines.append(f'Content-Length: {len(payload)}')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + payload


def split_base_url(base_url):
    parts = urlsplit(base_url)
    if parts.scheme != 'http':
        raise SetupError(f'only http:// base URLs are supported, not {base_url!r}')
    host = parts.hostname or '127.0.0.1'
    port = parts.port or 80
    return host, port, parts.netloc


# --------------------------------------------------------------------------
# Setup and read-back through the API
# --------------------------------------------------------------------------


@dataclasses.dataclass
class User:
    index: int
    email: str
    id: str
    token: str


def _parse_time(text):
    return datetime.fromisoformat(text.replace('Z', '+00:00'))


def _iso(moment: datetime):
    return moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


class Api:
    """Setup and read-back calls, over a small keep-alive pool of its own."""

    def __init__(self, base_url, connections=16, timeout=60.0):
        self.base_url = base_url
        self.host, self.port, self.host_header = split_base_url(base_url)
        self.pool = ConnectionPool(self.host, self.port, 0, connections)
        self.timeout = timeout

    async def call(self, method, path, token=None, body=None, expect=(200,), retries=8):
        """One request; retries 503/429 (honouring Retry-After) and broken connections."""
        raw = build_request(method, path, self.host_header, token, body)
        for attempt in range(retries + 1):
            try:
                async with asyncio.timeout(self.timeout):
                    response = await self.pool.send(raw)
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                if attempt == retries:
                    raise SetupError(f'{method} {path}: {exc!r}') from exc
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if response.status in (429, 503) and attempt < retries:
                await asyncio.sleep(min(float(response.headers.get('retry-after', 1) or 1), 5.0))
                continue
            if expect and response.status not in expect:
                raise SetupError(
                    f'{method} {path}: expected {"/".join(map(str, expect))}, got {response.status} '
                    f'{response.body[:300].decode("utf-8", "replace")}'
                )
            return response.status, response.json()
        raise AssertionError('unreachable')

    async def server_clock(self):
        """(server's now, local monotonic time it corresponds to)."""
        sent = time.monotonic()
        _, body = await self.call('GET', '/health')
        got = time.monotonic()
        return _parse_time(body['serverTime']), (sent + got) / 2

    async def login(self, email, password):
        _, body = await self.call('POST', '/api/auth/login', body={'email': email, 'password': password})
        return User(-1, email, body['user']['id'], body['token']), body['user']

    async def register(self, email, password, index=-1):
        _, body = await self.call(
            'POST', '/api/auth/register', body={'email': email, 'password': password}, expect=(201,)
        )
        return User(index, email, body['user']['id'], body['token'])

    async def register_users(self, count, prefix, concurrency=DEFAULT_REGISTER_CONCURRENCY,
                             first_index=0):
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i):
            async with semaphore:
                return await self.register(f'{prefix}-{i}@example.com', USER_PASSWORD, index=i)

        return list(await asyncio.gather(*(one(i) for i in range(first_index, first_index + count))))

    async def admin_token(self, admin_email=None, admin_password=None, grant_admin=False, flashsale_cmd=None,
                          database_url=None, run_id=None):
        if admin_email:
            if not admin_password:
                raise SetupError('--admin-email needs --admin-password')
            admin, user = await self.login(admin_email, admin_password)
            if not user.get('isAdmin'):
                raise SetupError(f'{admin_email} is not an admin (flashsale grant-admin {admin_email})')
            return admin.token
        if not grant_admin:
            raise SetupError('an admin is needed to create the sale: pass --admin-email/--admin-password '
                             'or --grant-admin')
        email = f'loadtest-admin-{run_id or uuid.uuid4().hex[:10]}@example.com'
        password = 'loadtest-admin-' + uuid.uuid4().hex
        await self.register(email, password)
        grant_admin_command(email, flashsale_cmd, database_url)
        # log in again: the token minted at registration may carry isAdmin=false
        admin, user = await self.login(email, password)
        if not user.get('isAdmin'):
            raise SetupError(f'flashsale grant-admin {email} ran, but the server still says isAdmin=false '
                             '(does the command use the same DATABASE_URL as the server?)')
        return admin.token

    async def create_sale(self, admin_token, total_stock, starts_at: datetime, length: timedelta, name):
        _, body = await self.call(
            'POST', '/api/flash-sales', token=admin_token, expect=(201,),
            body={'name': name, 'startDate': _iso(starts_at), 'endDate': _iso(starts_at + length),
                  'totalStock': total_stock},
        )
        return body['flashSale']

    async def purchase(self, user: User, sale_id):
        return await self.call('POST', f'/api/flash-sales/{sale_id}/purchase', token=user.token, expect=None)

    async def read_back(self, sale_id, users, concurrency=READ_BACK_CONCURRENCY):
        """The sale as the API sees it, and per user: the order of this sale and how many it has."""
        _, body = await self.call('GET', f'/api/flash-sales/{sale_id}')
        sale = body['flashSale']
        semaphore = asyncio.Semaphore(concurrency)

        async def orders_of(user):
            async with semaphore:
                status, one = await self.call('GET', f'/api/me/orders/{sale_id}', token=user.token, expect=(200, 404))
                _, every = await self.call('GET', '/api/me/orders', token=user.token)
            mine = [o for o in every['orders'] if o['flashSaleId'] == sale_id]
            return {
                'user': user.index,
                'order': one['order'] if status == 200 else None,
                'code': None if status == 200 else (one or {}).get('code'),
                'count': len(mine),
                'orders': mine,
            }

        per_user = await asyncio.gather(*(orders_of(u) for u in users))
        return sale, per_user

    def close(self):
        self.pool.close()


def grant_admin_command(email, flashsale_cmd=None, database_url=None):
    """Run `flashsale grant-admin EMAIL` (the app's CLI) with the server's DATABASE_URL."""
    if flashsale_cmd:
        command = shlex.split(flashsale_cmd)
    else:
        found = shutil.which('flashsale') or shutil.which('flashsale', path=os.path.dirname(sys.executable))
        if not found:
            raise SetupError('--grant-admin needs the `flashsale` command (pip install -e .) or --flashsale-cmd')
        command = [found]
    env = dict(os.environ)
    if database_url:
        env['DATABASE_URL'] = database_url
    # `flashsale` refuses to start without JWT_SECRET when DATABASE_URL is set, even for
    # grant-admin, which signs nothing: a throwaway value is enough for it.
    if env.get('DATABASE_URL') and not env.get('JWT_SECRET'):
        env['JWT_SECRET'] = 'grant-admin-only-' + uuid.uuid4().hex + uuid.uuid4().hex
    done = subprocess.run(command + ['grant-admin', email], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        hint = ''
        if not env.get('DATABASE_URL'):
            hint = ('\n(no DATABASE_URL: the command used the embedded database of the current directory; '
                    'pass --database-url with the server\'s DATABASE_URL, or run from the directory the '
                    'server was started in)')
        raise SetupError(f'{" ".join(command)} grant-admin {email} failed ({done.returncode}): '
                         f'{(done.stderr or done.stdout).strip()[-500:]}{hint}')


# --------------------------------------------------------------------------
# The load itself
# --------------------------------------------------------------------------

# One record per request: (scheduled start, actual start, end, label, user index, order's userId or None).
# Times are seconds since the run's t0 (monotonic). label is '201', '409 sold_out', 'timeout', 'error:...'.


class LoadRun:
    def __init__(self, base_url, connections, max_connections, timeout):
        self.host, self.port, self.host_header = split_base_url(base_url)
        self.pool = ConnectionPool(self.host, self.port, connections, max_connections)
        self.timeout = timeout
        self.records = []
        self.t0 = None
        self.max_lag = 0.0
        self.elapsed = None
        self.cpu = None
        self.started_at = None  # wall clock, for reports

    async def _fire(self, raw, user, scheduled):
        loop_time = asyncio.get_running_loop().time
        start = loop_time()
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.pool.send(raw)
        except TimeoutError:
            label, buyer = 'timeout', None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, ValueError) as exc:
            label, buyer = f'error:{type(exc).__name__}', None
        else:
            body = response.json() if response.body else None
            buyer = None
            if response.status < 300:
                label = str(response.status)
                if isinstance(body, dict) and isinstance(body.get('order'), dict):
                    buyer = body['order'].get('userId')
            else:
                code = body.get('code') if isinstance(body, dict) else None
                label = f'{response.status} {code}' if code else str(response.status)
        t0 = self.t0
        self.records.append((scheduled - t0, start - t0, loop_time() - t0, label, user, buyer))

    async def run_open(self, request_for, rate, duration):
        """Start request i at t0 + i/rate for duration seconds, finished or not."""
        loop = asyncio.get_running_loop()
        total = max(1, round(rate * duration))
        await self.pool.start()
        cpu_before = _cpu_seconds()
        self.t0 = loop.time() + 0.02
        self.started_at = datetime.now(timezone.utc)
        tasks = set()
        i = 0
        while i < total:
            now = loop.time()
            while i < total:
                scheduled = self.t0 + i / rate
                if scheduled > now:
                    break
                self.max_lag = max(self.max_lag, now - scheduled)
                raw, user = request_for(i)
                task = loop.create_task(self._fire(raw, user, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, self.t0 + i / rate - loop.time()))
        if tasks:
            await asyncio.gather(*tasks)
        self.elapsed = loop.time() - self.t0
        self.cpu = _cpu_seconds() - cpu_before
        self.pool.close()

    async def run_closed(self, request_for, connections, requests=None, duration=None):
        """`connections` workers, each one request at a time, until `requests` sent or `duration` passed."""
        loop = asyncio.get_running_loop()
        await self.pool.start()
        cpu_before = _cpu_seconds()
        self.t0 = loop.time()
        self.started_at = datetime.now(timezone.utc)
        deadline = self.t0 + duration if duration else math.inf
        counter = iter(range(requests)) if requests is not None else itertools.count()

        async def worker():
            for i in counter:
                now = loop.time()
                if now >= deadline:
                    return
                raw, user = request_for(i)
                await self._fire(raw, user, now)

        await asyncio.gather(*(worker() for _ in range(connections)))
        self.elapsed = loop.time() - self.t0
        self.cpu = _cpu_seconds() - cpu_before
        self.pool.close()


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------
# Summaries and checks
# --------------------------------------------------------------------------


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies):
    values = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        'p50': ms(percentile(values, 50)),
        'p90': ms(percentile(values, 90)),
        'p99': ms(percentile(values, 99)),
        'max': ms(values[-1] if values else None),
        'mean': ms(sum(values) / len(values) if values else None),
    }


def is_answer(label):
    return not (label == 'timeout' or label.startswith('error:'))


def summarize(run: LoadRun, model, bucket=None):
    records = run.records
    by_label = collections.Counter(r[3] for r in records)
    by_status = collections.Counter(r[3].split(' ', 1)[0] for r in records if is_answer(r[3]))
    errors = {label: n for label, n in by_label.items() if not is_answer(label)}
    # open model: from the scheduled start (what a customer waits); closed: from the send
    latencies = [r[2] - r[0] for r in records if is_answer(r[3])]
    answered = len(latencies)
    span = run.elapsed or 0.0
    starts = [r[1] for r in records]
    if model == 'open' and len(starts) > 1:
        # requests started per second, over the time it took to start them all
        start_span = max(starts) - min(starts)
        started_rate = round((len(starts) - 1) / start_span, 1) if start_span else None
    else:
        started_rate = round(len(records) / span, 1) if span else None
    if bucket is None:
        bucket = 1.0 if span >= 20 else 0.25
    return {
        'model': model,
        'requests': len(records),
        'answered': answered,
        'by_status': dict(sorted(by_status.items())),
        'by_code': dict(sorted(by_label.items(), key=lambda kv: (-kv[1], kv[0]))),
        'errors': errors,
        'timeouts': errors.get('timeout', 0),
        'elapsed_s': round(span, 3),
        'achieved_rate': started_rate,
        'answered_rate': round(answered / span, 1) if span else None,
        'latency_ms': latency_summary(latencies),
        'connections': {
            'initial': run.pool.size,
            'max': run.pool.max_size,
            'peak_open': run.pool.peak_open,
            'opened_beyond_initial': max(0, run.pool.peak_open - run.pool.size),
            'discarded': run.pool.discarded,
            'waited_for_connection': run.pool.waited,
            'peak_in_use': run.pool.peak_in_use,
            'connect_errors': run.pool.connect_errors,
        },
        'client': {
            'cpu_cores_used': round(run.cpu / span, 2) if span else None,
            'max_schedule_lag_ms': round(run.max_lag * 1000, 1),
        },
        'timeline': timeline(records, bucket),
    }


def timeline(records, bucket):
    """Per bucket of scheduled start time: p50/p99 latency and counts per label."""
    buckets = collections.defaultdict(list)
    for rec in records:
        buckets[int(rec[0] // bucket)].append(rec)
    out = []
    for index in range(max(buckets) + 1 if buckets else 0):
        recs = buckets.get(index, [])
        lat = sorted(r[2] - r[0] for r in recs if is_answer(r[3]))
        out.append({
            't': round(index * bucket, 3),
            'width': bucket,
            'p50_ms': None if not lat else round(percentile(lat, 50) * 1000, 2),
            'p99_ms': None if not lat else round(percentile(lat, 99) * 1000, 2),
            'counts': dict(collections.Counter(r[3] for r in recs)),
        })
    return out


def check(checks, name, ok, detail):
    checks.append({'name': name, 'ok': ok, 'detail': detail})


def check_invariants(records, sale, per_user, users_by_id, setup_orders=0, expected=None, database=None,
                     opening_at=None):
    """The outcome read back after the run against what the client saw.

    ok is True/False, or None when unanswered requests make it undecidable.
    """
    checks = []
    total = sale['totalStock']
    remaining = sale['remainingStock']
    with_order = [u for u in per_user if u['order'] is not None]
    api_orders = sum(u['count'] for u in per_user)
    created = sum(1 for r in records if r[3] == '201')
    unanswered = sum(1 for r in records if not is_answer(r[3]))

    check(checks, 'stock conserved: remaining + orders == total', remaining + api_orders == total,
          f'{remaining} + {api_orders} = {remaining + api_orders}, total {total}')
    check(checks, 'no oversell: 0 <= remaining, orders <= total', remaining >= 0 and api_orders <= total,
          f'remaining {remaining}, orders {api_orders}, total {total}')
    dupes = [u['user'] for u in per_user if u['count'] > 1]
    check(checks, 'at most one order per user', not dupes,
          f'{len(dupes)} users with several orders' if dupes else f'{len(with_order)} users with one order each')
    mismatched = [u['user'] for u in per_user if (u['order'] is not None) != (u['count'] == 1)]
    check(checks, 'GET /api/me/orders/{saleId} agrees with GET /api/me/orders', not mismatched,
          f'{len(mismatched)} users disagree' if mismatched else 'agree for every user')

    expected_orders = created + setup_orders
    ok = api_orders == expected_orders
    if not ok and unanswered and expected_orders <= api_orders <= expected_orders + unanswered:
        ok = None  # the difference can be requests whose answer never arrived
    check(checks, 'orders == 201 answers received', ok,
          f'{api_orders} orders, {created} 201s' + (f' + {setup_orders} bought in setup' if setup_orders else '')
          + (f', {unanswered} requests unanswered' if unanswered else ''))

    buyers = collections.Counter(r[5] for r in records if r[3] == '201')
    twice = [b for b, n in buyers.items() if n > 1]
    strangers = [r for r in records if r[3] == '201' and users_by_id.get(r[5]) != r[4]]
    check(checks, 'no user received two 201s, each 201 is the requester\'s order', not twice and not strangers,
          f'{len(twice)} users got two 201s, {len(strangers)} orders for someone else' if twice or strangers
          else f'{len(buyers)} distinct buyers')

    if opening_at is not None:
        early = [u for u in with_order if _parse_time(u['order']['createdAt']) < opening_at]
        check(checks, 'no order created before the sale started', not early,
              f'{len(early)} orders before {_iso(opening_at)}' if early else f'all after {_iso(opening_at)}')

    if database is not None:
        check(checks, 'database: remaining + orders == total',
              database['remaining'] + database['orders'] == database['total'],
              f'{database["remaining"]} + {database["orders"]}, total {database["total"]}')
        check(checks, 'database agrees with the API',
              database['orders'] == api_orders and database['remaining'] == remaining
              and database['duplicates'] == 0,
              f'database: {database["orders"]} orders, {database["remaining"]} remaining, '
              f'{database["duplicates"]} duplicate users; API: {api_orders} orders, {remaining} remaining')

    if expected is not None:
        name, ok, detail = expected
        if not ok and unanswered:
            ok = None
        check(checks, name, ok, detail)

    verdict = 'pass'
    if any(c['ok'] is False for c in checks):
        verdict = 'fail'
    elif any(c['ok'] is None for c in checks):
        verdict = 'inconclusive'
    return {'verdict': verdict, 'checks': checks, 'orders': api_orders, 'remaining': remaining, 'total': total,
            'created_201': created}


def read_database(database_url, sale_id):
    try:
        import psycopg
    except ImportError as exc:  # the only non-stdlib import, and only for this option
        raise SetupError('--database-url needs psycopg (pip install "psycopg[binary]")') from exc
    with psycopg.connect(database_url, autocommit=True) as conn:
        total, remaining = conn.execute(
            'SELECT total_stock, remaining_stock FROM flash_sales WHERE id = %s', (sale_id,)
        ).fetchone()
        orders, buyers = conn.execute(
            'SELECT count(*), count(DISTINCT user_id) FROM orders WHERE flash_sale_id = %s', (sale_id,)
        ).fetchone()
    return {'total': total, 'remaining': remaining, 'orders': orders, 'duplicates': orders - buyers}


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


def expected_outcome(scenario, records, stock, sent_users, opening_offset=None):
    """(check name, ok, detail) for what the scenario must produce, given who sent requests."""
    labels = collections.Counter(r[3] for r in records)
    created = labels.get('201', 0)
    if scenario == 'single-user':
        others = {k: v for k, v in labels.items() if k not in ('201', '409 already_purchased')}
        return ('single user: exactly one 201, every other answer 409 already_purchased',
                created == 1 and not others, f'{created} x 201, other answers {others or "none"}')
    if scenario == 'sold-out':
        others = {k: v for k, v in labels.items() if k != '409 sold_out'}
        return ('sold out: every request refused 409 sold_out', not others,
                f'{labels.get("409 sold_out", 0)} x 409 sold_out, others {others or "none"}')
    if scenario == 'throughput':
        # the stock covers every user: each user's first purchase must succeed
        want = len(sent_users)
        return ('throughput: one 201 per distinct user (the stock covers them all)', created == want,
                f'{created} x 201 for {want} distinct users; {dict(labels)}')
    if scenario == 'opening':
        # requests scheduled more than 100 ms before the start (by our estimate of the server's clock)
        # must all be sale_not_started; afterwards min(stock, buyers) orders
        margin = 0.1
        before = [r for r in records if r[0] < opening_offset - margin]
        bad = collections.Counter(r[3] for r in before if r[3] != '409 sale_not_started')
        after_users = {r[4] for r in records if r[0] >= opening_offset + margin}
        want = min(stock, len(after_users))
        ok = not bad and created == want
        return ('opening: sale_not_started before the start, then min(stock, buyers) orders', ok,
                f'{len(before)} requests before the start, unexpected answers {dict(bad) or "none"}; '
                f'{created} x 201, expected {want}')
    want = min(stock, len(sent_users))
    return (f'{scenario}: orders == min(stock, users who sent requests)', created == want,
            f'{created} x 201, stock {stock}, {len(sent_users)} users sent requests')


async def run_scenario_async(scenario, base_url=DEFAULT_BASE_URL, users=None, stock=None, rate=None,
                             duration=None, connections=None, max_connections=None, requests=None, model=None,
                             start_delay=None, timeout=10.0, admin_email=None, admin_password=None,
                             grant_admin=False, admin_token=None, flashsale_cmd=None, database_url=None,
                             seed=None, register_concurrency=DEFAULT_REGISTER_CONCURRENCY, prepared_users=None,
                             bucket=None, settle=1.0, probe=None, log=None):
    """Prepare users and a sale through the API, run the load, read back and check.

    prepared_users/admin_token let a caller (bench.py) register once and run many times.
    settle: seconds to wait after the last answer before reading back: the server may
    answer GET /api/flash-sales/{id} from its poll cache (POLL_CACHE_MS, 500 ms by default).
    probe: a function called right before and right after the load (not the setup or the
    read-back); the difference lands in result['probe_delta'] (bench.py: the server's CPU time).
    """
    if scenario not in SCENARIOS:
        raise SetupError(f'unknown scenario {scenario!r}; one of {", ".join(SCENARIOS)}')
    log = log or (lambda *_: None)
    defaults = SCENARIOS[scenario]
    users = users or (len(prepared_users) if prepared_users else defaults['users'])
    if scenario == 'single-user':
        users = 1
    model = model or defaults['model']
    rate = rate or defaults.get('rate', 1000)
    duration = duration if duration is not None else defaults.get('duration')
    connections = connections or defaults['connections']
    max_connections = max_connections or max(DEFAULT_MAX_CONNECTIONS, connections)
    start_delay = start_delay if start_delay is not None else defaults.get('start_delay', 0.0)
    if model == 'open' and not duration:
        duration = requests / rate if requests else 4.0
    if model == 'closed' and requests is None and not duration:
        requests = users
    planned = requests if requests is not None else (round(rate * duration) if model == 'open' else None)
    if stock is None:
        stock = defaults['stock'] if defaults['stock'] is not None else (planned or users)
        if scenario == 'throughput':
            stock = max(stock, users)
    rng = random.Random(seed)
    run_id = uuid.uuid4().hex[:10]

    api = Api(base_url, connections=max(READ_BACK_CONCURRENCY, register_concurrency))
    try:
        if admin_token is None:
            log(f'admin: {"log in as " + admin_email if admin_email else "register and grant-admin"}')
            admin_token = await api.admin_token(admin_email, admin_password, grant_admin, flashsale_cmd,
                                                database_url, run_id)
        if prepared_users:
            if len(prepared_users) < users:
                raise SetupError(f'{users} users wanted, {len(prepared_users)} prepared')
            crowd = list(prepared_users[:users])
        else:
            log(f'registering {users} users ({register_concurrency} at a time) ...')
            started = time.monotonic()
            crowd = await api.register_users(users, f'lt-{run_id}', register_concurrency)
            log(f'  {users} users in {time.monotonic() - started:.1f} s')
        early_birds = []
        if scenario == 'sold-out':
            early_birds = await api.register_users(stock, f'lt-{run_id}-early', register_concurrency,
                                                   first_index=users)
        server_now, local_ref = await api.server_clock()
        opening_at = None
        opening_loop_time = None
        if scenario == 'opening':
            # the run starts right after the sale is created: start the sale start_delay later
            starts_at = server_now + timedelta(seconds=start_delay + 0.25)
            # whole milliseconds: the API prints times to the millisecond, and the check
            # "no order before the start" compares printed times
            starts_at = starts_at.replace(microsecond=starts_at.microsecond // 1000 * 1000)
            opening_at = starts_at
        else:
            starts_at = server_now - timedelta(seconds=1)
        length = timedelta(seconds=max(120.0, (duration or 0) * 3 + start_delay + 60))
        sale = await api.create_sale(admin_token, stock, starts_at, length, f'loadtest {scenario} {run_id}')
        sale_id = sale['id']
        log(f'sale {sale_id}: stock {stock}, starts {sale["startDate"]}')
        setup_orders = 0
        for bird in early_birds:
            status, body = await api.purchase(bird, sale_id)
            if status != 201:
                raise SetupError(f'sold-out setup: buying the stock got {status} {body}')
            setup_orders += 1

        raws = [build_request('POST', f'/api/flash-sales/{sale_id}/purchase', api.host_header, u.token)
                for u in crowd]
        if scenario == 'single-user':
            def request_for(i):
                return raws[0], 0
        elif scenario == 'throughput':
            def request_for(i):
                return raws[i % users], i % users
        else:
            def request_for(i):
                u = rng.randrange(users)
                return raws[u], u

        # waitress serves at most 100 connections (connection_limit) and leaves the rest unanswered in the
        # listen backlog: do not hold the setup connections open through the run.
        api.pool.close()
        run = LoadRun(base_url, connections, max_connections if model == 'open' else connections, timeout)
        probe_before = probe() if probe else None
        if model == 'open':
            log(f'running {scenario}: open model, {rate:g} req/s for {duration:g} s over {connections} '
                f'connections (up to {max_connections})')
            # where the sale's start falls on the run's clock (seconds after t0), for the opening check
            if opening_at is not None:
                loop_now = asyncio.get_running_loop().time()
                until_start = (opening_at - server_now).total_seconds() - (time.monotonic() - local_ref)
                opening_loop_time = loop_now + until_start
            await run.run_open(request_for, rate, duration)
        else:
            log(f'running {scenario}: closed model, {connections} connections, '
                + (f'{requests} requests' if requests is not None else '')
                + (f' for at most {duration:g} s' if duration else ''))
            await run.run_closed(request_for, connections, requests, duration)
        result = summarize(run, model, bucket)
        result['probe_delta'] = probe() - probe_before if probe else None
        opening_offset = (opening_loop_time - run.t0) if opening_at is not None else None

        log('reading the outcome back from the API ...')
        await asyncio.sleep(settle)
        sent_users = {r[4] for r in run.records}
        checked = [crowd[i] for i in sorted(sent_users)] + early_birds
        sale_after, per_user = await api.read_back(sale_id, checked, concurrency=READ_BACK_CONCURRENCY)
        database = read_database(database_url, sale_id) if database_url else None
        users_by_id = {u.id: u.index for u in crowd}
        invariants = check_invariants(
            run.records, sale_after, per_user, users_by_id, setup_orders=setup_orders,
            expected=expected_outcome(scenario, run.records, stock, sent_users, opening_offset),
            database=database,
            opening_at=None if opening_at is None else _parse_time(sale_after['startDate']),
        )
    finally:
        api.close()

    result.update({
        'scenario': scenario,
        'base_url': base_url,
        'started_at': _iso(run.started_at),
        'params': {'users': users, 'stock': stock, 'rate': rate if model == 'open' else None,
                   'duration': duration, 'connections': connections,
                   'max_connections': max_connections if model == 'open' else connections,
                   'requests': planned, 'start_delay': start_delay if scenario == 'opening' else None,
                   'timeout': timeout, 'seed': seed},
        'sale': {'id': sale_id, 'totalStock': sale_after['totalStock'],
                 'remainingStock': sale_after['remainingStock'], 'startDate': sale_after['startDate']},
        'users_sent': len(sent_users),
        'opening_offset_s': None if opening_offset is None else round(opening_offset, 3),
        'database': database,
        'invariants': invariants,
        'ok': invariants['verdict'] == 'pass',
    })
    return result


async def run_plain_async(base_url, path, method='GET', token=None, model='closed', connections=32,
                          requests=None, duration=None, rate=None, max_connections=None, timeout=10.0,
                          probe=None):
    """The same request over and over, no setup and no checks (e.g. GET /health as a ceiling)."""
    host, port, host_header = split_base_url(base_url)
    raw = build_request(method, path, host_header, token)
    run = LoadRun(base_url, connections, max_connections or (connections if model == 'closed'
                                                               else max(DEFAULT_MAX_CONNECTIONS, connections)),
                  timeout)
    probe_before = probe() if probe else None
    if model == 'open':
        await run.run_open(lambda i: (raw, 0), rate, duration)
    else:
        await run.run_closed(lambda i: (raw, 0), connections, requests, duration)
    result = summarize(run, model)
    result['probe_delta'] = probe() - probe_before if probe else None
    return result


def run_scenario(scenario, **options):
    """Synchronous entry point: run_scenario('crowd', base_url=..., users=20, stock=5, rate=200, duration=1)."""
    return asyncio.run(run_scenario_async(scenario, **options))


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def format_report(result):
    lines = []
    p = result['params']
    lines.append(f'scenario {result["scenario"]} against {result["base_url"]} ({result["model"]} model)')
    if result['model'] == 'open':
        lines.append(f'  offered {p["rate"]:g} req/s for {p["duration"]:g} s = {result["requests"]} requests, '
                     f'{p["users"]} users, stock {p["stock"]}')
    else:
        lines.append(f'  {p["connections"]} connections, {result["requests"]} requests, {p["users"]} users, '
                     f'stock {p["stock"]}')
    lines.append(f'  achieved {result["achieved_rate"]} req/s started; {result["answered"]} answered in '
                 f'{result["elapsed_s"]} s = {result["answered_rate"]} answers/s')
    lines.append('answers:')
    for label, n in result['by_code'].items():
        lines.append(f'  {n:>8}  {label}')
    lines.append('by status: ' + ', '.join(f'{k}: {v}' for k, v in result['by_status'].items()))
    lat = result['latency_ms']
    lines.append(f'latency ms: p50 {lat["p50"]}  p90 {lat["p90"]}  p99 {lat["p99"]}  max {lat["max"]}'
                 + ('  (from the scheduled start)' if result['model'] == 'open' else ''))
    lines.append(f'errors: {sum(result["errors"].values())} (timeouts {result["timeouts"]})'
                 + (f' {result["errors"]}' if result['errors'] else ''))
    c = result['connections']
    lines.append(f'connections: {c["initial"]} opened up front, peak {c["peak_open"]} open '
                 f'({c["opened_beyond_initial"]} beyond the initial ones, cap {c["max"]}), '
                 f'{c["waited_for_connection"]} requests waited for a free one, '
                 f'{c["discarded"]} closed after a timeout, an error or "Connection: close"')
    cl = result['client']
    lines.append(f'client: {cl["cpu_cores_used"]} CPU cores used, fell behind schedule by at most '
                 f'{cl["max_schedule_lag_ms"]} ms')
    if cl['cpu_cores_used'] and cl['cpu_cores_used'] > 0.9:
        lines.append('  warning: the client used a whole core; it may be the bottleneck')
    inv = result['invariants']
    lines.append(f'sale {result["sale"]["id"]}: total {inv["total"]}, remaining {inv["remaining"]}, '
                 f'orders {inv["orders"]}, 201s received {inv["created_201"]}')
    for c in inv['checks']:
        mark = {True: 'ok  ', False: 'FAIL', None: '??  '}[c['ok']]
        lines.append(f'  {mark} {c["name"]}: {c["detail"]}')
    lines.append(f'verdict: {inv["verdict"].upper()}')
    return '\n'.join(lines)


PALETTE = ['#2e7d32', '#1565c0', '#ef6c00', '#6a1b9a', '#c62828', '#00838f', '#9e9d24', '#5d4037', '#455a64']


def _label_colour(label, order):
    if label == '201':
        return PALETTE[0]
    if label == 'timeout' or label.startswith('error:') or label.startswith('5'):
        return PALETTE[4] if label == 'timeout' else '#b71c1c'
    return PALETTE[1 + order.index(label) % 7] if label in order else PALETTE[-1]


def _svg_axes(width, height, pad, y_max, y_label, x_max, x_label):
    parts = [f'<rect x="{pad}" y="10" width="{width - pad - 10}" height="{height - pad - 10}" '
             'fill="none" stroke="#999"/>']
    for k in range(5):
        v = y_max * k / 4
        y = height - pad - (height - pad - 10) * k / 4
        parts.append(f'<line x1="{pad}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{pad - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{f"{v:,.0f}" if y_max >= 100 else f"{v:.3g}"}</text>')
    for k in range(6):
        v = x_max * k / 5
        x = pad + (width - pad - 10) * k / 5
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 16}" text-anchor="middle">{v:.3g}</text>')
    parts.append(f'<text x="{(width + pad) / 2}" y="{height - 4}" text-anchor="middle">{x_label}</text>')
    parts.append(f'<text x="12" y="{(height - pad) / 2}" transform="rotate(-90 12 {(height - pad) / 2})" '
                 f'text-anchor="middle">{y_label}</text>')
    return parts


def latency_svg(points, width=760, height=260, pad=56):
    if not points:
        return '<p>no data</p>'
    width_s = points[0]['width']
    x_max = (len(points)) * width_s
    y_max = max([p['p99_ms'] or 0 for p in points] + [1]) * 1.1
    sx = lambda t: pad + (width - pad - 10) * t / x_max  # noqa: E731
    sy = lambda v: height - pad - (height - pad - 10) * v / y_max  # noqa: E731
    parts = _svg_axes(width, height, pad, y_max, 'latency ms', x_max, 'seconds into the run (scheduled start)')
    for key, colour in (('p50_ms', '#1565c0'), ('p99_ms', '#c62828')):
        pts = ' '.join(f'{sx(p["t"] + width_s / 2):.1f},{sy(p[key]):.1f}' for p in points if p[key] is not None)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for p in points:
            if p[key] is not None:
                parts.append(f'<circle cx="{sx(p["t"] + width_s / 2):.1f}" cy="{sy(p[key]):.1f}" r="2.5" '
                             f'fill="{colour}"><title>{p["t"]:g} s: {key[:3]} {p[key]} ms</title></circle>')
    parts.append(f'<text x="{width - 120}" y="28" fill="#1565c0">p50</text>'
                 f'<text x="{width - 80}" y="28" fill="#c62828">p99</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" ' \
           f'font-family="sans-serif" font-size="11">{"".join(parts)}</svg>'


def counts_svg(points, labels, width=760, height=260, pad=56):
    if not points:
        return '<p>no data</p>'
    width_s = points[0]['width']
    x_max = len(points) * width_s
    y_max = max([sum(p['counts'].values()) / width_s for p in points] + [1]) * 1.1
    sx = lambda t: pad + (width - pad - 10) * t / x_max  # noqa: E731
    sy = lambda v: (height - pad - 10) * v / y_max  # noqa: E731
    parts = _svg_axes(width, height, pad, y_max, 'answers per second', x_max,
                      'seconds into the run (scheduled start)')
    bar_w = max(1.0, sx(width_s) - sx(0) - 1)
    for p in points:
        base = height - pad
        for label in labels:
            n = p['counts'].get(label, 0)
            if not n:
                continue
            h = sy(n / width_s)
            base -= h
            parts.append(f'<rect x="{sx(p["t"]):.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{_label_colour(label, labels)}"><title>{p["t"]:g} s: {n} x {html.escape(label)}'
                         '</title></rect>')
    legend = ''.join(
        f'<span style="color:{_label_colour(label, labels)}">&#9632; {html.escape(label)}</span> &nbsp; '
        for label in labels
    )
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" ' \
           f'font-family="sans-serif" font-size="11">{"".join(parts)}</svg><p>{legend}</p>'


def html_report(result):
    labels = list(result['by_code'])
    esc = html.escape
    lat = result['latency_ms']
    inv = result['invariants']
    rows = ''.join(f'<tr><td>{esc(k)}</td><td class="n">{v}</td></tr>' for k, v in result['by_code'].items())
    check_rows = ''.join(
        f'<tr class="{ {True: "ok", False: "fail", None: "unk"}[c["ok"]] }"><td>'
        f'{ {True: "ok", False: "FAIL", None: "??"}[c["ok"]] }</td><td>{esc(c["name"])}</td>'
        f'<td>{esc(c["detail"])}</td></tr>'
        for c in inv['checks']
    )
    width_s = result['timeline'][0]['width'] if result['timeline'] else 1
    return f'''<!doctype html>
<html><head><meta charset="utf-8"><title>flashsale load test: {esc(result["scenario"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 820px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.ok td:first-child {{ color: #2e7d32; }} tr.fail td {{ color: #c62828; font-weight: bold; }}
tr.unk td:first-child {{ color: #ef6c00; }}
.verdict {{ font-size: 1.4em; font-weight: bold; }}
</style></head><body>
<h1>flashsale load test: {esc(result["scenario"])}</h1>
<p>{esc(result["base_url"])}, started {esc(result["started_at"])}, {esc(result["model"])} model.
Parameters: {esc(json.dumps(result["params"]))}</p>
<p class="verdict">Verdict: {esc(inv["verdict"].upper())}</p>
<h2>Summary</h2>
<table>
<tr><th>requests</th><td class="n">{result["requests"]}</td></tr>
<tr><th>achieved rate (req/s started)</th><td class="n">{result["achieved_rate"]}</td></tr>
<tr><th>answers/s</th><td class="n">{result["answered_rate"]}</td></tr>
<tr><th>latency p50 / p90 / p99 / max (ms)</th>
<td class="n">{lat["p50"]} / {lat["p90"]} / {lat["p99"]} / {lat["max"]}</td></tr>
<tr><th>errors (timeouts)</th><td class="n">{sum(result["errors"].values())} ({result["timeouts"]})</td></tr>
<tr><th>connections: initial / peak open / requests that waited for one</th>
<td class="n">{result["connections"]["initial"]} / {result["connections"]["peak_open"]} /
{result["connections"]["waited_for_connection"]}</td></tr>
<tr><th>sale: total / remaining / orders</th><td class="n">{inv["total"]} / {inv["remaining"]} /
{inv["orders"]}</td></tr>
</table>
<h2>Answers</h2><table>{rows}</table>
<h2>Latency over time</h2>
<p>Per {width_s:g} s of scheduled start: p50 and p99 in milliseconds.</p>
{latency_svg(result["timeline"])}
<h2>Answers over time</h2>
<p>Per {width_s:g} s of scheduled start, as a rate per second, by status and code.</p>
{counts_svg(result["timeline"], labels)}
<h2>Invariants (read back after the run)</h2>
<table><tr><th></th><th>check</th><th>detail</th></tr>{check_rows}</table>
</body></html>
'''


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='For big runs start the server with BCRYPT_ROUNDS=4: every user of the run is registered.',
    )
    parser.add_argument('scenario', choices=list(SCENARIOS))
    parser.add_argument('--base-url', default=os.environ.get('FLASHSALE_URL', DEFAULT_BASE_URL))
    parser.add_argument('--users', type=int, help='users in the run (scenario default)')
    parser.add_argument('--stock', type=int, help='total stock of the sale (scenario default)')
    parser.add_argument('--rate', type=float, help='open model: requests started per second')
    parser.add_argument('--duration', type=float, help='seconds of load')
    parser.add_argument('--requests', type=int, help='closed model: requests to send (default: one per user)')
    parser.add_argument('--connections', type=int, help='keep-alive connections (open: initial; closed: workers)')
    parser.add_argument('--max-connections', type=int,
                        help=f'open model: most connections opened when none is free (default '
                             f'{DEFAULT_MAX_CONNECTIONS}: waitress serves at most 98 by default)')
    parser.add_argument('--model', choices=['open', 'closed'], help='override the scenario\'s load model')
    parser.add_argument('--start-delay', type=float, help='opening: seconds until the sale starts (default 2)')
    parser.add_argument('--timeout', type=float, default=10.0, help='per request, seconds (default 10)')
    parser.add_argument('--admin-email')
    parser.add_argument('--admin-password')
    parser.add_argument('--grant-admin', action='store_true',
                        help='register an admin and run `flashsale grant-admin EMAIL` (same DATABASE_URL)')
    parser.add_argument('--flashsale-cmd', help='command that runs the flashsale CLI (default: `flashsale`)')
    parser.add_argument('--database-url', default=None,
                        help='also count orders in this database (needs psycopg); passed to grant-admin')
    parser.add_argument('--register-concurrency', type=int, default=DEFAULT_REGISTER_CONCURRENCY,
                        help='registrations at once (default 4: the server\'s BCRYPT_SLOTS default; '
                             'more get 503 and are retried after Retry-After)')
    parser.add_argument('--settle', type=float, default=1.0,
                        help='seconds to wait before reading the outcome back (the server caches '
                             'GET /api/flash-sales/{id} for POLL_CACHE_MS, 500 ms by default)')
    parser.add_argument('--seed', type=int, help='seed for the random choice of users')
    parser.add_argument('--bucket', type=float, help='seconds per point of the timeline (default 0.25, 1 for '
                                                     'runs of 20 s or more)')
    parser.add_argument('--json', dest='json_file', help='write the result here')
    parser.add_argument('--html', dest='html_file', help='write an HTML report with charts here')
    parser.add_argument('--quiet', action='store_true')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = run_scenario(
            args.scenario, base_url=args.base_url, users=args.users, stock=args.stock, rate=args.rate,
            duration=args.duration, connections=args.connections, max_connections=args.max_connections,
            requests=args.requests, model=args.model, start_delay=args.start_delay, timeout=args.timeout,
            admin_email=args.admin_email, admin_password=args.admin_password, grant_admin=args.grant_admin,
            flashsale_cmd=args.flashsale_cmd, database_url=args.database_url, seed=args.seed,
            register_concurrency=args.register_concurrency, bucket=args.bucket, settle=args.settle, log=log,
        )
    except SetupError as exc:
        print(f'loadtest: {exc}', file=sys.stderr)
        return 3
    print(format_report(result))
    if args.json_file:
        with open(args.json_file, 'w') as fh:
            json.dump(result, fh, indent=2)
    if args.html_file:
        with open(args.html_file, 'w') as fh:
            fh.write(html_report(result))
    return {'pass': 0, 'fail': 1, 'inconclusive': 2}[result['invariants']['verdict']]


if __name__ == '__main__':
    sys.exit(main())
