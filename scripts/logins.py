"""The benchmark's `logins` run (scripts/bench.py): bcrypt, the hashing
queue, and what a login storm does to purchases, against a server at the
default bcrypt cost (12):

  1. whether bcrypt releases the interpreter lock: how fast a pure-Python
     thread runs while another thread hashes, against while it sleeps;
  2. bcrypt alone in HASH_PROCESSES processes at nice 19 (what the server's
     queue can do at most), measured before and after 3;
  3. logins/s through the server, and login p50/p99, with 50 clients
     logging in at once; the ratio to 2;
  4. purchase p50/p99 by logged-in users (an open model, distinct users)
     calm, while 200 clients log in without pause (each logs in again as soon
     as it is answered, after the Retry-After it is told), and calm again;
  5. the opening-crowd scenario: 1,000 people over 20 s, stock 100, 200 of
     them must log in, the rest renew their token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import threading
import time
import uuid
from datetime import timedelta

import bcrypt

import loadclient
import opening
from loadreport import latency_summary
from resources import hashing

COST = 12


def _hash(rounds):
    bcrypt.hashpw(b'password123', bcrypt.gensalt(rounds))


def gil_release(rounds=COST, hashes=3):
    """Whether bcrypt lets other Python threads run while it hashes: how far
    a pure-Python counting thread gets per second while this thread is
    inside hashpw, against per second while this thread sleeps. A hash that
    held the interpreter lock would leave it at (about) 0, however busy the
    machine; CPU contention from elsewhere lowers both alike."""
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        before, started = count[0], time.perf_counter()
        time.sleep(0.5)
        idle_rate = (count[0] - before) / (time.perf_counter() - started)
        before, started = count[0], time.perf_counter()
        for _ in range(hashes):
            _hash(rounds)
        hashing_rate = (count[0] - before) / (time.perf_counter() - started)
    finally:
        stop.set()
        spinner.join()
    return {'idle_per_s': idle_rate, 'while_hashing_per_s': hashing_rate, 'ratio': hashing_rate / idle_rate}


def bcrypt_alone(processes, hashes, rounds=COST, niceness=19):
    """Hashes per second by `processes` processes set up as the server's
    queue sets up its own (nice, and a niced autogroup of their own)."""
    with concurrent.futures.ProcessPoolExecutor(processes, initializer=hashing._start_worker,
                                                initargs=(niceness, os.getpid())) as pool:
        list(pool.map(_hash, [4] * processes))  # started and warm
        started = time.perf_counter()
        list(pool.map(_hash, [rounds] * hashes))
        return hashes / (time.perf_counter() - started)


async def logins(api, email, concurrency, total):
    """Closed model: `concurrency` clients log in until `total` logins are answered 200."""
    raw = loadclient.build_request('POST', '/api/auth/login', api.host_header,
                                 body={'email': email, 'password': loadclient.USER_PASSWORD})
    latencies, refused = [], 0
    left = [total]

    async def client():
        nonlocal refused
        while left[0] > 0:
            left[0] -= 1
            sent = time.perf_counter()
            while True:
                response = await api.pool.send(raw)
                if response.status == 200:
                    break
                refused += 1
                await asyncio.sleep(float(response.headers.get('retry-after') or 1))
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {'logins_per_s': total / elapsed, 'refused': refused, **latency_summary(latencies)}


async def login_storm(api, email, clients, stop):
    """`clients` clients logging in without pause until stop is set: (answers by status)."""
    raw = loadclient.build_request('POST', '/api/auth/login', api.host_header,
                                 body={'email': email, 'password': loadclient.USER_PASSWORD})
    statuses = {}

    async def client():
        while not stop.is_set():
            response = await api.pool.send(raw)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status in (429, 503):
                wait = float(response.headers.get('retry-after') or 1)
                try:
                    await asyncio.wait_for(stop.wait(), wait + random.uniform(0, min(1.0, wait / 4)))
                except TimeoutError:
                    pass

    await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


async def purchases(api, sale_id, users, rate):
    """Open model: one purchase per user, `rate` a second; latency from the schedule."""
    latencies, statuses = [], {}
    t0 = time.perf_counter()

    async def one(i, user):
        at = t0 + i / rate
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        response = await api.pool.send(loadclient.build_request(
            'POST', f'/api/flash-sales/{sale_id}/purchase', api.host_header, user.token))
        latencies.append(time.perf_counter() - at)
        statuses[response.status] = statuses.get(response.status, 0) + 1

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    return {'statuses': statuses, **latency_summary(latencies)}


async def run(base_url, database_url, jwt_secret, processes, log, crowd_users=1000):
    results = {'hash_processes': processes}
    log('bcrypt and the interpreter lock ...')
    results['gil'] = gil_release()
    log(f'bcrypt alone in {processes} nice-19 processes ...')
    alone_before = bcrypt_alone(processes, 8 * processes)
    api = loadclient.Api(base_url, connections=400, timeout=120)
    try:
        run_id = uuid.uuid4().hex[:8]
        admin = await api.admin_token(grant_admin=True, database_url=database_url, run_id=run_id)
        people = await opening.prepare_people(api, 1800, run_id, database_url, jwt_secret, log)
        email = people[0].email
        log('50 clients logging in at once ...')
        results['logins'] = await logins(api, email, 50, 100)
        alone_after = bcrypt_alone(processes, 8 * processes)
        results['bcrypt_alone_per_s'] = (alone_before, alone_after)
        results['logins']['ratio_to_bcrypt_alone'] = results['logins']['logins_per_s'] / (
            (alone_before + alone_after) / 2)

        now, _ = await api.server_clock()
        sale = await api.create_sale(admin, 100_000, now - timedelta(seconds=1), timedelta(hours=1), 'storm')
        rate, per_run = 100, 600
        groups = [people[i * per_run:(i + 1) * per_run] for i in range(3)]
        log(f'purchases at {rate}/s: calm ...')
        results['calm_before'] = await purchases(api, sale['id'], groups[0], rate)
        log('purchases while 200 clients log in without pause ...')
        stop = asyncio.Event()
        storm = asyncio.create_task(login_storm(api, email, 200, stop))
        await asyncio.sleep(2)  # the queue is full by now
        results['storm'] = await purchases(api, sale['id'], groups[1], rate)
        stop.set()
        results['storm']['logins'] = await storm
        await asyncio.sleep(3)  # the queue drains
        log('purchases: calm again ...')
        results['calm_after'] = await purchases(api, sale['id'], groups[2], rate)
    finally:
        api.close()
    log(f'opening-crowd: {crowd_users} people over 20 s, stock 100 ...')
    results['opening_crowd'] = await opening.run_async(
        base_url, users=crowd_users, stock=100, duration=20.0, tokenless=crowd_users // 5, grant_admin=True,
        database_url=database_url, jwt_secret=jwt_secret, log=log)
    return results


def format_table(r):
    gil = r['gil']
    alone = r['bcrypt_alone_per_s']
    lg = r['logins']
    lines = [
        f'bcrypt cost {COST} and the GIL: a Python thread counts {gil["while_hashing_per_s"]:,.0f}/s while another '
        f'thread is inside hashpw, {gil["idle_per_s"]:,.0f}/s while it sleeps ({gil["ratio"]:.0%}; a held lock: ~0%)',
        f'bcrypt alone, {r["hash_processes"]} processes set up as the server\'s (nice 19, own autogroup): {alone[0]:.1f} / {alone[1]:.1f} hashes/s '
        '(before / after the logins)',
        f'logins through the server, 50 at once: {lg["logins_per_s"]:.1f}/s = {lg["ratio_to_bcrypt_alone"]:.0%} '
        f'of bcrypt alone; login p50 {lg["p50"]:.0f} ms, p99 {lg["p99"]:.0f} ms ({lg["refused"]} answers 503)',
    ]
    for name in ('calm_before', 'storm', 'calm_after'):
        p = r[name]
        extra = f'  logins meanwhile: {p["logins"]}' if 'logins' in p else ''
        lines.append(f'purchases, {name:11}: p50 {p["p50"]:6.1f} ms  p99 {p["p99"]:6.1f} ms  {p["statuses"]}{extra}')
    calm_p99 = max(r['calm_before']['p99'], r['calm_after']['p99'])
    lines.append(f'storm p99 / calm p99 (the worse calm run): {r["storm"]["p99"] / calm_p99:.2f}')
    lines.append(opening.format_report(r['opening_crowd']))
    return '\n'.join(lines)
