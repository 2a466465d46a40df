#!/usr/bin/env python3
"""The load tool's scenarios: a sale's crowd over keep-alive HTTP/1.1,
prepared, run and checked (`scripts/load.py SCENARIO --help`).

Standard library only (``--database-url`` additionally needs psycopg, imported
only when that option is used). One process, one asyncio loop, raw HTTP/1.1 on
asyncio streams (scripts/loadclient.py), so on a small machine the server, not
this client, is what a run measures; the summary prints the client's own CPU
use and how far it fell behind schedule, so you can tell.

  crowd        100 users, stock 50, 1,000 req/s for 4 s, each request a
               purchase by a random one of the 100 users; with --start-delay
               S the sale opens S seconds into the run (the stampede at the
               start time: sale_not_started before it, then the stock)
  single-user  one user hammers one sale           -> exactly one order
  throughput   thousands of distinct users, stock that never runs out,
               closed model (N connections, each sends its next request as
               soon as the previous answer arrives): raw purchase throughput
  sold-out     the stock is bought before the run: everyone is refused
  watchers     the crowd, while --watchers pages (2,000) poll the sale with
               If-None-Match, each on a connection of its own

Two load models:

  open    requests start on a fixed schedule (--rate for --duration) whether or
          not earlier ones finished, the way real customers arrive. They are
          spread over --connections keep-alive connections; when none is free
          the client opens more, up to --max-connections (counted), and past
          that the request waits for a connection (counted). Latency is
          measured from the *scheduled* start, so a server that falls behind
          shows it (no coordinated omission). --connection-model per-arrival
          sends every request on a new connection of its own, left open
          after its answer, as a crowd of visitors (and Artillery) arrives.
  closed  --connections workers each send one request at a time, for
          --requests requests or --duration seconds: the most the server can
          do at that concurrency.

Every run prepares its own users and sale through the API, so it needs an
admin: --admin-email/--admin-password (log in), or --grant-admin (the client
registers an admin user and runs `flashsale grant-admin EMAIL`, which reads
the same DATABASE_URL as the server; --database-url is passed to it when
given; with none, the embedded database of the current directory, as
`flashsale serve` there uses). Registering costs the server one bcrypt hash
per user: start it with BCRYPT_ROUNDS=4 for load tests, and with loopback
(where this client runs) exempt from the rate limits, RATE_LIMIT_EXEMPT=
127.0.0.1,::1 (nothing is exempt by default).

After the run the client reads the outcome back from the API (the sale, and
for every user of the run GET /api/me/orders/{saleId} and GET /api/me/orders)
and checks the invariants (scripts/invariants.py). With --database-url it also
counts the orders in the database. Exit status: 0 when every check passed, 1
when one failed, 2 when a check could not be decided (requests that got no
answer may or may not have bought), 3 when the run could not be prepared.

Importable: run_scenario('crowd', base_url=..., users=20, stock=5, rate=200,
duration=1, grant_admin=True) returns the result dict that --json writes. It
is four steps, each usable alone: plan() resolves a scenario's defaults and the
options into a Plan; prepare() makes the admin, users and sale (Prepared);
run_load() sends the load through one of MODELS (Ran); check() reads the
outcome back and checks it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import math
import os
import random
import resource
import sys
import time
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from typing import Callable
from typing import NamedTuple

import invariants
from loadclient import DEFAULT_BASE_URL
from loadclient import DEFAULT_REGISTER_CONCURRENCY
from loadclient import READ_BACK_CONCURRENCY
from loadclient import Api
from loadclient import Connection
from loadclient import ConnectionPool
from loadclient import FreshConnections
from loadclient import ProtocolError
from loadclient import SetupError
from loadclient import UserOrders
from loadclient import build_request
from loadclient import iso
from loadclient import parse_time
from loadclient import split_base_url
from loadreport import deliver
from loadreport import format_report
from loadreport import html_report
from loadreport import latency_summary
from loadreport import percentile

__all__ = ['Api', 'SetupError', 'UserOrders', 'format_report', 'html_report', 'plan', 'prepare', 'run_load',
           'check', 'run_scenario', 'run_scenario_async', 'run_plain_async', 'check_outcome', 'latency_summary',
           'percentile', 'split_base_url']

# The open model opens more connections when every one is busy, up to this
# many: enough for the crowd at 1,000 req/s on a 2-core machine, and well
# under the server's CONNECTION_LIMIT (4000 by default).
DEFAULT_MAX_CONNECTIONS = 96


# --------------------------------------------------------------------------
# Scenarios: what a run sends, and what it must produce
# --------------------------------------------------------------------------


class Record(NamedTuple):
    """One request of the run. Times are seconds since the run's t0 (monotonic);
    label is '201', '409 sold_out', 'timeout', 'error:OSError', ..."""

    scheduled: float
    started: float
    ended: float
    label: str
    user: int  # User.index
    order: str | None = None  # the order id a 201 carried
    what: str = 'purchase'  # what the request was for; only purchases are checked

    @property
    def answered(self):
        return not (self.label == 'timeout' or self.label.startswith('error:'))

    @property
    def latency(self):
        """From the scheduled start (open model: what a customer waits; closed: the send)."""
        return self.ended - self.scheduled

    def answer(self):
        """The record as the shared checker reads it (scripts/invariants.py)."""
        status, _, code = self.label.partition(' ')
        if self.label == '201':
            kind = 'created'
        elif not self.answered:
            kind = 'timeout' if self.label == 'timeout' else 'error'
        else:
            kind = code or f'http_{status}'
        return invariants.Answer(self.user, kind, self.order)


class Expected(NamedTuple):
    """What the scenario must produce, as a check."""

    name: str
    ok: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A scenario's defaults (flags override them) and what it does differently.

    stock=None means "never runs out": one unit per request the run can send.
    pick(i, rng, users) is the index of the user who sends request i.
    expect(plan, records, sent_users, opening_offset) -> Expected.
    buy_out_first: the whole stock is bought in setup, by users of its own.
    opens_late: the sale starts start_delay seconds into the run.
    """

    users: int
    stock: int | None
    model: str
    duration: float | None
    expect: Callable
    pick: Callable = lambda i, rng, users: rng.randrange(users)
    rate: float = 1000
    connections: int = 32
    start_delay: float = 0.0
    single_user: bool = False
    covers_every_user: bool = False  # the stock is at least one unit per user
    buy_out_first: bool = False
    opens_late: bool = False
    watchers: int = 0  # pages polling the sale through the run, by default


def _labels(records):
    return collections.Counter(r.label for r in records)


def expect_single_user(plan, records, sent_users, opening_offset):
    labels = _labels(records)
    created = labels.get('201', 0)
    others = {k: v for k, v in labels.items() if k not in ('201', '409 already_purchased')}
    return Expected('single user: exactly one 201, every other answer 409 already_purchased',
                    created == 1 and not others, f'{created} x 201, other answers {others or "none"}')


def expect_sold_out(plan, records, sent_users, opening_offset):
    labels = _labels(records)
    others = {k: v for k, v in labels.items() if k != '409 sold_out'}
    return Expected('sold out: every request refused 409 sold_out', not others,
                    f'{labels.get("409 sold_out", 0)} x 409 sold_out, others {others or "none"}')


def expect_one_per_user(plan, records, sent_users, opening_offset):
    # the stock covers every user: each user's first purchase must succeed
    labels = _labels(records)
    created = labels.get('201', 0)
    want = len(sent_users)
    return Expected('throughput: one 201 per distinct user (the stock covers them all)', created == want,
                    f'{created} x 201 for {want} distinct users; {dict(labels)}')


def expect_opening(plan, records, sent_users, opening_offset):
    # requests scheduled more than 100 ms before the start (by our estimate of the server's clock)
    # must all be sale_not_started; afterwards min(stock, buyers) orders
    margin = 0.1
    created = _labels(records).get('201', 0)
    before = [r for r in records if r.scheduled < opening_offset - margin]
    bad = collections.Counter(r.label for r in before if r.label != '409 sale_not_started')
    after_users = {r.user for r in records if r.scheduled >= opening_offset + margin}
    want = min(plan.stock, len(after_users))
    return Expected('opening: sale_not_started before the start, then min(stock, buyers) orders',
                    not bad and created == want,
                    f'{len(before)} requests before the start, unexpected answers {dict(bad) or "none"}; '
                    f'{created} x 201, expected {want}')


def expect_stock_sold(plan, records, sent_users, opening_offset):
    created = _labels(records).get('201', 0)
    want = min(plan.stock, len(sent_users))
    return Expected(f'{plan.scenario}: orders == min(stock, users who sent requests)', created == want,
                    f'{created} x 201, stock {plan.stock}, {len(sent_users)} users sent requests')


SCENARIOS = {
    'single-user': Scenario(users=1, stock=10, model='open', rate=500, duration=2.0, single_user=True,
                            pick=lambda i, rng, users: 0, expect=expect_single_user),
    'crowd': Scenario(users=100, stock=50, model='open', duration=4.0, expect=expect_stock_sold),
    'throughput': Scenario(users=2000, stock=None, model='closed', duration=None,
                           pick=lambda i, rng, users: i % users, covers_every_user=True,
                           expect=expect_one_per_user),
    'sold-out': Scenario(users=100, stock=1, model='open', duration=4.0, buy_out_first=True,
                         expect=expect_sold_out),
    'watchers': Scenario(users=100, stock=50, model='open', duration=4.0, watchers=2000, expect=expect_stock_sold),
}


# --------------------------------------------------------------------------
# Load models: how the requests arrive
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Load:
    """How much load, and how it arrives (MODELS[model])."""

    model: str
    connections: int
    max_connections: int
    rate: float | None = None
    duration: float | None = None
    requests: int | None = None  # closed model: None means until duration
    timeout: float = 10.0
    # 'per-arrival' (open model): every request on a new connection of its
    # own, left open after its answer for `linger` s (None: to the end of the
    # run), as a crowd of visitors arrives (FreshConnections).
    connection_model: str = 'pooled'
    linger: float | None = None
    # pages polling GET /api/flash-sales/current through the run (Watchers)
    watchers: int = 0
    watch_interval: float = 1.5


class LoadRun:
    """The requests of one run over one pool, and what it took: records, elapsed, CPU."""

    def __init__(self, base_url, load: Load):
        self.host, self.port, self.host_header = split_base_url(base_url)
        if load.connection_model == 'per-arrival':
            self.pool = FreshConnections(self.host, self.port, load.linger)
        else:
            self.pool = ConnectionPool(self.host, self.port, load.connections, load.max_connections)
        self.timeout = load.timeout
        self.records = []
        self.t0 = None
        self.max_lag = 0.0
        self.elapsed = None
        self.cpu = None
        self.started_at = None  # wall clock, for reports
        self._cpu_before = None

    async def start(self, t0):
        await self.pool.start()
        self._cpu_before = _cpu_seconds()
        self.t0 = t0
        self.started_at = datetime.now(timezone.utc)

    def finish(self):
        self.elapsed = asyncio.get_running_loop().time() - self.t0
        self.cpu = _cpu_seconds() - self._cpu_before
        self.pool.close()

    async def fire(self, raw, user, scheduled, send=None, what='purchase'):
        """One request, recorded. send(raw) -> Response defaults to the pool's
        (a model with connections of its own passes theirs)."""
        loop_time = asyncio.get_running_loop().time
        start = loop_time()
        order = None
        try:
            async with asyncio.timeout(self.timeout):
                response = await (send or self.pool.send)(raw)
        except TimeoutError:
            label = 'timeout'
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, ValueError) as exc:
            label = f'error:{type(exc).__name__}'
        else:
            body = response.json() if response.body else None
            if response.status < 300:
                label = str(response.status)
                if isinstance(body, dict) and isinstance(body.get('order'), dict):
                    order = body['order'].get('id')
            else:
                code = body.get('code') if isinstance(body, dict) else None
                label = f'{response.status} {code}' if code else str(response.status)
        t0 = self.t0
        self.records.append(Record(scheduled - t0, start - t0, loop_time() - t0, label, user, order, what))


class OpenModel:
    """Request i starts at t0 + i/rate for duration seconds, finished or not.
    Latency counts from the scheduled start (no coordinated omission)."""

    scheduled = True

    def describe(self, load):
        return (f'open model, {load.rate:g} req/s for {load.duration:g} s over {load.connections} '
                f'connections (up to {load.max_connections})')

    async def run(self, run: LoadRun, load: Load, visit):
        loop = asyncio.get_running_loop()
        rate = load.rate
        total = max(1, round(rate * load.duration))
        await run.start(loop.time() + 0.02)
        tasks = set()
        i = 0
        while i < total:
            now = loop.time()
            while i < total:
                scheduled = run.t0 + i / rate
                if scheduled > now:
                    break
                run.max_lag = max(run.max_lag, now - scheduled)
                task = loop.create_task(visit(i, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, run.t0 + i / rate - loop.time()))
        if tasks:
            await asyncio.gather(*tasks)
        run.finish()


class ClosedModel:
    """`connections` workers, each one request at a time, until `requests` sent or `duration` passed."""

    scheduled = False

    def describe(self, load):
        return (f'closed model, {load.connections} connections, '
                + (f'{load.requests} requests' if load.requests is not None else '')
                + (f' for at most {load.duration:g} s' if load.duration else ''))

    async def run(self, run: LoadRun, load: Load, visit):
        loop = asyncio.get_running_loop()
        await run.start(loop.time())
        deadline = run.t0 + load.duration if load.duration else math.inf
        counter = iter(range(load.requests)) if load.requests is not None else itertools.count()

        async def worker():
            for i in counter:
                now = loop.time()
                if now >= deadline:
                    return
                await visit(i, now)

        await asyncio.gather(*(worker() for _ in range(load.connections)))
        run.finish()


# A model is how arrivals come: describe(load), and run(run, load, visit) that
# calls run.start(t0), then visit(i, scheduled) for arrival i, then run.finish().
# A visit sends its requests with run.fire (one purchase by default; a
# scenario whose users first register or log in sends those too, with
# what='register', ...), through the pool or a connection of the model's own.
MODELS = {'open': OpenModel(), 'closed': ClosedModel()}


class Watchers:
    """`count` open pages watching a sale: each holds its own keep-alive
    connection and polls `path` every `interval` seconds with If-None-Match,
    as resources/static/app.js does. The first polls are spread over one
    interval, as pages opened at different moments are."""

    def __init__(self, base_url, count, interval=1.5, timeout=10.0, path='/api/flash-sales/current'):
        self.host, self.port, self.host_header = split_base_url(base_url)
        self.count = count
        self.interval = interval
        self.timeout = timeout
        self.path = path
        self.tasks = []
        self.answered = 0
        self.by_status = collections.Counter()
        self.errors = collections.Counter()
        self.latencies = []
        self.stopping = False

    async def start(self):
        self.t0 = asyncio.get_running_loop().time()
        self.tasks = [asyncio.create_task(self._watch(k)) for k in range(self.count)]

    async def _watch(self, k):
        loop = asyncio.get_running_loop()
        next_at = self.t0 + self.interval * k / self.count
        etag = None
        conn = None
        try:
            while not self.stopping:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                lines = [f'GET {self.path} HTTP/1.1', f'Host: {self.host_header}', 'Accept: application/json']
                if etag:
                    lines.append(f'If-None-Match: {etag}')
                raw = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
                started = loop.time()
                try:
                    async with asyncio.timeout(self.timeout):
                        if conn is None:
                            conn = await Connection.open(self.host, self.port)
                        response = await conn.request(raw)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as exc:
                    self.errors['timeout' if isinstance(exc, TimeoutError) else f'error:{type(exc).__name__}'] += 1
                    if conn is not None:
                        conn.close()
                        conn = None
                else:
                    self.answered += 1
                    self.by_status[response.status] += 1
                    self.latencies.append(loop.time() - started)
                    etag = response.headers.get('etag', etag)
                    if not response.keep_alive:
                        conn.close()
                        conn = None
                next_at += self.interval
        except asyncio.CancelledError:
            pass
        finally:
            if conn is not None:
                conn.close()

    async def stop(self):
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return {'watchers': self.count, 'interval_s': self.interval, 'answered': self.answered,
                'by_status': dict(sorted(self.by_status.items())), 'errors': dict(self.errors),
                'latency_ms': latency_summary(self.latencies)}


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------
# 1. Plan: the scenario's defaults and the flags, resolved
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    scenario: str
    base_url: str
    users: int
    stock: int
    load: Load
    planned: int | None  # requests the run will send (None: as many as fit in the duration)
    start_delay: float
    seed: int | None
    settle: float
    bucket: float | None
    kind: Scenario  # SCENARIOS[scenario], opening late with a start delay

    def params(self):
        load = self.load
        return {'users': self.users, 'stock': self.stock, 'rate': load.rate if load.model == 'open' else None,
                'duration': load.duration, 'connections': load.connections,
                'max_connections': load.max_connections, 'requests': self.planned,
                'start_delay': self.start_delay if self.kind.opens_late else None,
                'timeout': load.timeout, 'seed': self.seed}


def plan(scenario, base_url=DEFAULT_BASE_URL, users=None, stock=None, rate=None, duration=None, connections=None,
         max_connections=None, requests=None, model=None, start_delay=None, timeout=10.0, seed=None, settle=1.0,
         bucket=None, prepared_users=None, connection_model='pooled', linger=None, watchers=None,
         watch_interval=1.5):
    """The run to do: the scenario's defaults where no option is given."""
    if scenario not in SCENARIOS:
        raise SetupError(f'unknown scenario {scenario!r}; one of {", ".join(SCENARIOS)}')
    kind = SCENARIOS[scenario]
    if start_delay:
        if scenario not in ('crowd', 'watchers'):
            raise SetupError('--start-delay: the crowd (or watchers) scenario only')
        kind = dataclasses.replace(kind, opens_late=True, start_delay=start_delay, expect=expect_opening)
    watchers = kind.watchers if watchers is None else watchers
    users = 1 if kind.single_user else users or (len(prepared_users) if prepared_users else kind.users)
    model = model or kind.model
    rate = rate or kind.rate
    duration = duration if duration is not None else kind.duration
    connections = connections or kind.connections
    start_delay = start_delay if start_delay is not None else kind.start_delay
    if model == 'open':
        max_connections = max_connections or max(DEFAULT_MAX_CONNECTIONS, connections)
        if not duration:
            duration = requests / rate if requests else 4.0
    else:
        max_connections = connections
        if requests is None and not duration:
            requests = users
    planned = requests if requests is not None else (round(rate * duration) if model == 'open' else None)
    if stock is None:
        stock = kind.stock if kind.stock is not None else (planned or users)
        if kind.covers_every_user:
            stock = max(stock, users)
    load = Load(model, connections, max_connections, rate if model == 'open' else None, duration, requests,
                timeout, connection_model, linger, watchers, watch_interval)
    return Plan(scenario, base_url, users, stock, load, planned, start_delay, seed, settle, bucket, kind)


# --------------------------------------------------------------------------
# 2. Prepare: admin, users and the sale, through the API
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    admin_token: str
    crowd: list  # the run's users (loadclient.User), index = position
    sale: dict
    opening_at: datetime | None  # when the sale starts, if it starts during the run
    clock: tuple  # (server's now, the local monotonic time it corresponds to)
    request_for: Callable  # i -> (raw request, user index)
    early_birds: list = dataclasses.field(default_factory=list)  # bought the stock in setup
    setup_answers: list = dataclasses.field(default_factory=list)  # their 201s (invariants.Answer)


async def prepare(api: Api, the_plan: Plan, admin_token=None, admin_email=None, admin_password=None,
                  grant_admin=False, flashsale_cmd=None, database_url=None, prepared_users=None,
                  register_concurrency=DEFAULT_REGISTER_CONCURRENCY, log=None):
    """The admin, users and sale the plan needs. admin_token/prepared_users let a
    caller (bench.py) register once and run many times."""
    log = log or (lambda *_: None)
    kind, users, stock = the_plan.kind, the_plan.users, the_plan.stock
    run_id = uuid.uuid4().hex[:10]
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
    if kind.buy_out_first:
        early_birds = await api.register_users(stock, f'lt-{run_id}-early', register_concurrency,
                                               first_index=users)
    server_now, local_ref = await api.server_clock()
    opening_at = None
    if kind.opens_late:
        # the run starts right after the sale is created: start the sale start_delay later
        starts_at = server_now + timedelta(seconds=the_plan.start_delay + 0.25)
        # whole milliseconds: the API prints times to the millisecond, and the check
        # "no order before the start" compares printed times
        starts_at = starts_at.replace(microsecond=starts_at.microsecond // 1000 * 1000)
        opening_at = starts_at
    else:
        starts_at = server_now - timedelta(seconds=1)
    length = timedelta(seconds=max(120.0, (the_plan.load.duration or 0) * 3 + the_plan.start_delay + 60))
    sale = await api.create_sale(admin_token, stock, starts_at, length,
                                 f'loadtest {the_plan.scenario} {run_id}')
    log(f'sale {sale["id"]}: stock {stock}, starts {sale["startDate"]}')
    setup_answers = []
    for bird in early_birds:
        status, body = await api.purchase(bird, sale['id'])
        if status != 201:
            raise SetupError(f'sold-out setup: buying the stock got {status} {body}')
        setup_answers.append(invariants.Answer(bird.index, 'created', body['order']['id']))

    raws = [build_request('POST', f'/api/flash-sales/{sale["id"]}/purchase', api.host_header, u.token)
            for u in crowd]
    rng = random.Random(the_plan.seed)

    def request_for(i):
        u = kind.pick(i, rng, users)
        return raws[u], u

    return Prepared(admin_token, crowd, sale, opening_at, (server_now, local_ref), request_for, early_birds,
                    setup_answers)


# --------------------------------------------------------------------------
# 3. Run: the load, and its summary
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Ran:
    run: LoadRun
    summary: dict  # what summarize() returns
    opening_offset: float | None  # where the sale's start fell, in seconds after the run's t0


async def run_load(the_plan: Plan, prepared: Prepared, probe=None, log=None):
    """The load itself. probe: a function called right before and right after
    the load (not the setup or the read-back); the difference lands in
    summary['probe_delta'] (bench.py: the server's CPU time)."""
    log = log or (lambda *_: None)
    load, model = the_plan.load, MODELS[the_plan.load.model]
    run = LoadRun(the_plan.base_url, load)
    probe_before = probe() if probe else None
    log(f'running {the_plan.scenario}: {model.describe(load)}')
    opening_loop_time = None
    if prepared.opening_at is not None:
        server_now, local_ref = prepared.clock
        until_start = (prepared.opening_at - server_now).total_seconds() - (time.monotonic() - local_ref)
        opening_loop_time = asyncio.get_running_loop().time() + until_start

    async def visit(i, scheduled):
        raw, user = prepared.request_for(i)
        await run.fire(raw, user, scheduled)

    watch = None
    if load.watchers:
        watch = Watchers(the_plan.base_url, load.watchers, load.watch_interval, load.timeout)
    if watch:
        log(f'{load.watchers} watchers polling every {load.watch_interval:g} s ...')
        await watch.start()
        await asyncio.sleep(load.watch_interval)  # every watcher has polled once
    await model.run(run, load, visit)
    summary = summarize(run, load.model, the_plan.bucket)
    summary['probe_delta'] = probe() - probe_before if probe else None
    summary['watchers'] = await watch.stop() if watch else None
    return Ran(run, summary, None if opening_loop_time is None else opening_loop_time - run.t0)


def summarize(run: LoadRun, model, bucket=None):
    records = run.records
    by_label = collections.Counter(r.label for r in records)
    by_status = collections.Counter(r.label.split(' ', 1)[0] for r in records if r.answered)
    errors = {label: n for label, n in by_label.items() if label == 'timeout' or label.startswith('error:')}
    latencies = [r.latency for r in records if r.answered]
    answered = len(latencies)
    span = run.elapsed or 0.0
    starts = [r.started for r in records]
    if MODELS[model].scheduled and len(starts) > 1:
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
        buckets[int(rec.scheduled // bucket)].append(rec)
    out = []
    for index in range(max(buckets) + 1 if buckets else 0):
        recs = buckets.get(index, [])
        lat = sorted(r.latency for r in recs if r.answered)
        out.append({
            't': round(index * bucket, 3),
            'width': bucket,
            'p50_ms': None if not lat else round(percentile(lat, 50) * 1000, 2),
            'p99_ms': None if not lat else round(percentile(lat, 99) * 1000, 2),
            'counts': dict(collections.Counter(r.label for r in recs)),
        })
    return out


# --------------------------------------------------------------------------
# 4. Check: the outcome read back, against what the client saw
# --------------------------------------------------------------------------


def check_outcome(records, sale, per_user, setup_answers=(), expected=None, database=None, opening_at=None):
    """The invariants (scripts/invariants.py) on the sale and the orders read back
    (per_user: UserOrders), and what only the API can show, the database when
    read, the opening time and the scenario's Expected. A check's ok is None when
    requests that got no answer make it undecidable."""
    state = invariants.SaleState(sale['totalStock'], sale['remainingStock'], sum(len(u.orders) for u in per_user))
    orders_by_user = {u.user: [o['id'] for o in u.orders] for u in per_user}
    records = [r for r in records if r.what == 'purchase']
    answers = [r.answer() for r in records] + list(setup_answers)
    checks = invariants.check_sale(state, orders_by_user, answers)
    mismatched = [u.user for u in per_user if (u.order is not None) != (len(u.orders) == 1)]
    checks.append(invariants.Check('GET /api/me/orders/{saleId} agrees with GET /api/me/orders', not mismatched,
                                   f'{len(mismatched)} users disagree' if mismatched else 'agree for every user'))
    if opening_at is not None:
        early = [u for u in per_user if u.order is not None and parse_time(u.order['createdAt']) < opening_at]
        checks.append(invariants.Check(
            'no order created before the sale started', not early,
            f'{len(early)} orders before {iso(opening_at)}' if early else f'all after {iso(opening_at)}'))
    if database is not None:
        in_db = invariants.SaleState(database['total'], database['remaining'], database['orders'])
        checks += invariants.stock_checks(in_db, prefix='database: ')
        checks.append(invariants.Check(
            'database agrees with the API',
            in_db.orders == state.orders and in_db.remaining == state.remaining and database['duplicates'] == 0,
            f'database: {in_db.orders} orders, {in_db.remaining} remaining, {database["duplicates"]} duplicate '
            f'users; API: {state.orders} orders, {state.remaining} remaining'))
    if expected is not None:
        unanswered = any(not r.answered for r in records)
        checks.append(invariants.Check(expected.name, None if not expected.ok and unanswered else expected.ok,
                                       expected.detail))
    return {'verdict': invariants.verdict(checks), 'checks': [c._asdict() for c in checks],
            'orders': state.orders, 'remaining': state.remaining, 'total': state.total,
            'created_201': sum(1 for r in records if r.label == '201')}


def read_database(database_url, sale_id):
    try:
        import psycopg  # noqa: PLC0415 (the only non-stdlib import, and only for this option)
    except ImportError as exc:
        raise SetupError('--database-url needs psycopg (pip install "psycopg[binary]")') from exc
    with psycopg.connect(database_url, autocommit=True) as conn:
        state, by_user = invariants.read_sale(conn, sale_id)
    return {'total': state.total, 'remaining': state.remaining, 'orders': state.orders,
            'duplicates': state.orders - len(by_user)}


async def check(api: Api, the_plan: Plan, prepared: Prepared, ran: Ran, database_url=None, log=None):
    """Read the outcome back (after the_plan.settle seconds: the server may answer
    GET /api/flash-sales/{id} from its poll cache, POLL_CACHE_MS) and check it.
    Returns (the sale read back, the database's counts or None, the invariants)."""
    log = log or (lambda *_: None)
    log('reading the outcome back from the API ...')
    await asyncio.sleep(the_plan.settle)
    records = [r for r in ran.run.records if r.what == 'purchase']
    sale_id = prepared.sale['id']
    sent_users = {r.user for r in records}
    checked = [prepared.crowd[i] for i in sorted(sent_users)] + prepared.early_birds
    sale, per_user = await api.read_back(sale_id, checked, concurrency=READ_BACK_CONCURRENCY)
    database = read_database(database_url, sale_id) if database_url else None
    outcome = check_outcome(
        records, sale, per_user, prepared.setup_answers,
        expected=the_plan.kind.expect(the_plan, records, sent_users, ran.opening_offset),
        database=database,
        opening_at=None if prepared.opening_at is None else parse_time(sale['startDate']),
    )
    return sale, database, outcome


# --------------------------------------------------------------------------
# The four together
# --------------------------------------------------------------------------


async def run_scenario_async(scenario, base_url=DEFAULT_BASE_URL, *, admin_token=None, admin_email=None,
                             admin_password=None, grant_admin=False, flashsale_cmd=None, database_url=None,
                             register_concurrency=DEFAULT_REGISTER_CONCURRENCY, prepared_users=None, probe=None,
                             log=None, **options):
    """plan -> prepare -> run -> check; returns the result dict that --json writes.

    options are plan()'s (users, stock, rate, duration, connections, ...);
    the rest are prepare()'s, probe is run_load()'s.
    """
    the_plan = plan(scenario, base_url, prepared_users=prepared_users, **options)
    api = Api(base_url, connections=max(READ_BACK_CONCURRENCY, register_concurrency))
    try:
        prepared = await prepare(api, the_plan, admin_token, admin_email, admin_password, grant_admin,
                                 flashsale_cmd, database_url, prepared_users, register_concurrency, log)
        # the run's connections are the only ones open during the load
        api.pool.close()
        ran = await run_load(the_plan, prepared, probe, log)
        sale, database, outcome = await check(api, the_plan, prepared, ran, database_url, log)
    finally:
        api.close()
    result = dict(ran.summary)
    result.update({
        'scenario': scenario,
        'base_url': base_url,
        'started_at': iso(ran.run.started_at),
        'params': the_plan.params(),
        'sale': {'id': sale['id'], 'totalStock': sale['totalStock'],
                 'remainingStock': sale['remainingStock'], 'startDate': sale['startDate']},
        'users_sent': len({r.user for r in ran.run.records}),
        'opening_offset_s': None if ran.opening_offset is None else round(ran.opening_offset, 3),
        'database': database,
        'invariants': outcome,
        'ok': outcome['verdict'] == 'pass',
    })
    return result


def run_scenario(scenario, **options):
    """Synchronous entry point: run_scenario('crowd', base_url=..., users=20, stock=5, rate=200, duration=1)."""
    return asyncio.run(run_scenario_async(scenario, **options))


async def run_plain_async(base_url, path, method='GET', token=None, model='closed', connections=32,
                          requests=None, duration=None, rate=None, max_connections=None, timeout=10.0,
                          probe=None):
    """The same request over and over, no setup and no checks (e.g. GET /health as a ceiling)."""
    host_header = split_base_url(base_url)[2]
    raw = build_request(method, path, host_header, token)
    if not max_connections:
        max_connections = connections if model == 'closed' else max(DEFAULT_MAX_CONNECTIONS, connections)
    load = Load(model, connections, max_connections, rate, duration, requests, timeout)
    run = LoadRun(base_url, load)
    probe_before = probe() if probe else None
    await MODELS[model].run(run, load, lambda i, scheduled: run.fire(raw, 0, scheduled))
    result = summarize(run, model)
    result['probe_delta'] = probe() - probe_before if probe else None
    return result


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv, scenario, prog=None):
    kind = SCENARIOS[scenario]
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='For big runs start the server with BCRYPT_ROUNDS=4 (every user of the run is registered) '
               'and RATE_LIMIT_EXEMPT=127.0.0.1,::1 (nothing is exempt by default).',
    )
    parser.add_argument('--base-url', default=os.environ.get('FLASHSALE_URL', DEFAULT_BASE_URL))
    parser.add_argument('--users', type=int, help='users in the run (scenario default)')
    parser.add_argument('--stock', type=int, help='total stock of the sale (scenario default)')
    parser.add_argument('--rate', type=float, help='open model: requests started per second')
    parser.add_argument('--duration', type=float, help='seconds of load')
    parser.add_argument('--requests', type=int, help='closed model: requests to send (default: one per user)')
    parser.add_argument('--connections', type=int, help='keep-alive connections (open: initial; closed: workers)')
    parser.add_argument('--max-connections', type=int,
                        help=f'open model: most connections opened when none is free (default '
                             f'{DEFAULT_MAX_CONNECTIONS})')
    parser.add_argument('--model', choices=list(MODELS), help='override the scenario\'s load model')
    parser.add_argument('--connection-model', choices=['pooled', 'per-arrival'], default='pooled',
                        help='open model: pooled keep-alive connections (default), or every request on a new '
                             'connection of its own, left open after the answer (a crowd arriving)')
    parser.add_argument('--linger', type=float,
                        help='per-arrival: seconds a connection stays open after its answer (default: to the end)')
    parser.add_argument('--watchers', type=int, default=kind.watchers,
                        help=f'(default {kind.watchers}) ''also keep this many pages polling GET /api/flash-sales/current with '
                             'If-None-Match, each on its own connection, through the run')
    parser.add_argument('--watch-interval', type=float, default=1.5, help='seconds between a watcher\'s polls')
    parser.add_argument('--start-delay', type=float,
                        help='crowd: the sale opens this many seconds into the run (default: open from the start)')
    parser.add_argument('--timeout', type=float, default=10.0, help='per request, seconds (default 10)')
    parser.add_argument('--admin-email')
    parser.add_argument('--admin-password')
    parser.add_argument('--grant-admin', action='store_true',
                        help='register an admin and run `flashsale grant-admin EMAIL` (same DATABASE_URL; with none, '
                             'the embedded database of the current directory, as `flashsale serve` there uses)')
    parser.add_argument('--flashsale-cmd', help='command that runs the flashsale CLI (default: `flashsale`)')
    parser.add_argument('--database-url', default=None,
                        help='also count orders in this database (needs psycopg); passed to grant-admin')
    parser.add_argument('--register-concurrency', type=int, default=DEFAULT_REGISTER_CONCURRENCY,
                        help=f'registrations at once (default {DEFAULT_REGISTER_CONCURRENCY}; beyond the '
                             'server\'s HASH_QUEUE they get 503 and are retried after Retry-After)')
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


def main(argv, scenario, prog=None):
    """`scripts/load.py SCENARIO ...`: run it, print the report, exit status by the verdict."""
    args = parse_args(argv, scenario, prog)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = run_scenario(
            scenario, base_url=args.base_url, users=args.users, stock=args.stock, rate=args.rate,
            duration=args.duration, connections=args.connections, max_connections=args.max_connections,
            requests=args.requests, model=args.model, start_delay=args.start_delay, timeout=args.timeout,
            admin_email=args.admin_email, admin_password=args.admin_password, grant_admin=args.grant_admin,
            flashsale_cmd=args.flashsale_cmd, database_url=args.database_url, seed=args.seed,
            register_concurrency=args.register_concurrency, bucket=args.bucket, settle=args.settle, log=log,
            connection_model=args.connection_model, linger=args.linger, watchers=args.watchers,
            watch_interval=args.watch_interval,
        )
    except SetupError as exc:
        print(f'{prog or scenario}: {exc}', file=sys.stderr)
        return 3
    deliver(format_report(result), result, args.json_file, args.html_file)
    return {'pass': 0, 'fail': 1, 'inconclusive': 2}[result['invariants']['verdict']]
