"""The password-hashing queue (resources/hashing.py): logins wait their turn,
first come first served, in low-priority processes; a full queue answers 503
with an honest Retry-After; the queue's threads and memory are bounded, and
everything else keeps its threads while logins wait."""

import collections
import functools
import http.client
import math
import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import LOOPBACK
from conftest import TEST_SECRET
from conftest import call
from conftest import clean_env
from conftest import free_port
from conftest import run_together
from conftest import start_serve
from conftest import timed
from conftest import wait_for
from resources import hashing
from resources.errors import APIError

SLOW = hashing.hash_password  # at cost 13: about half a second of a core


@pytest.fixture
def make_queue():
    queues = []

    def make(processes=1, capacity=8, max_wait=60.0, seconds_per_hash=0.5):
        queue = hashing.HashQueue(processes, capacity, max_wait, seconds_per_hash)
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        queue.close()


def in_background(function, *args):
    """Run function(*args) in a thread; returns (thread, outcome list)."""
    outcome = []

    def run():
        try:
            outcome.append(function(*args))
        except APIError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_jobs_are_served_first_come_first_served(make_queue):
    """One process busy with a slow hash; five more jobs queue behind it, one
    after another. Each stamps the time it ran in the hashing process: they
    ran in the order they came."""
    queue = make_queue()
    runs = [in_background(queue.run, SLOW, b'password123', 13)]
    wait_for(lambda: queue.in_flight == 1, timeout=60)
    for i in range(5):
        runs.append(in_background(queue.run, time.monotonic))
        wait_for(lambda: queue.in_flight == i + 2, timeout=60, message='the job to be queued')
    for thread, _ in runs:
        thread.join(timeout=60)
    stamps = [outcome[0] for _, outcome in runs[1:]]
    assert all(isinstance(stamp, float) for stamp in stamps)
    assert stamps == sorted(stamps)
    assert runs[0][1][0].startswith('$2b$13$')
    assert queue.in_flight == 0


@pytest.mark.parametrize(('niceness', 'policy'), [(19, os.SCHED_IDLE), (0, os.SCHED_OTHER)])
def test_hashes_run_at_the_lowest_priority_there_is_unless_told_otherwise(niceness, policy):
    """HASH_NICE=19 (the default): nice 19 and SCHED_IDLE, so a waking request
    thread takes the core from a hash at once; HASH_NICE=0: neither."""
    queue = hashing.HashQueue(1, 8, 60.0, 0.5, niceness=niceness)
    try:
        pid = queue.run(os.getpid)
        assert pid != os.getpid()
        assert os.sched_getscheduler(pid) == policy
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + niceness
    finally:
        queue.close()


def test_a_full_queue_answers_503_at_once_with_an_honest_retry_after(make_queue):
    queue = make_queue(processes=1, capacity=3)
    runs = [in_background(queue.run, SLOW, b'password123', 13) for _ in range(3)]
    wait_for(lambda: queue.in_flight == 3, timeout=60)
    with pytest.raises(APIError) as refused:
        queue.run(time.monotonic)
    assert queue.in_flight == 3  # refused without ever joining the queue
    assert refused.value.status.startswith('503') and refused.value.error_code == 'overloaded'
    # The three ahead, one process, the measured time of a hash.
    expected = max(1, math.ceil(3 * queue.seconds_per_hash))
    assert refused.value.headers['Retry-After'] == str(expected)
    for thread, outcome in runs:
        thread.join(timeout=60)
        assert outcome[0].startswith('$2b$13$')
    # The measured hash time took the real hashes in: cost 13 is far above 1 ms.
    assert queue.seconds_per_hash > 0.01
    queue.run(time.monotonic)  # room again


def test_a_job_not_served_within_the_wait_gets_503_and_its_slot_back(make_queue):
    """An estimate that is far too hopeful (1 ms a hash) admits a slow hash
    (cost 14, about a second) and a job queued behind it, with 0.3 s to wait:
    both are answered 503 at the deadline, and their slots come back once
    the hashing process is done with what it had started."""
    queue = make_queue(processes=1, capacity=8, max_wait=0.3, seconds_per_hash=0.001)
    slow, slow_outcome = in_background(queue.run, SLOW, b'password123', 14)
    wait_for(lambda: queue.in_flight == 1, timeout=60)
    with pytest.raises(APIError) as refused:
        queue.run(time.monotonic)
    slow.join(timeout=120)
    for error in (refused.value, slow_outcome[0]):
        assert error.error_code == 'overloaded'
        assert int(error.headers['Retry-After']) >= 1
    wait_for(lambda: queue.in_flight == 0, timeout=60, message='the queue to empty')
    assert queue.seconds_per_hash > 0.01  # the slow hash was measured when it ended


def test_stopping_answers_every_queued_job_503_at_once_and_refuses_new_ones(make_queue):
    """SIGTERM (the server calls stop()): the jobs still queued are answered
    503 overloaded at once, while the server can still send the answer (left
    to the shutdown, they would be cancelled into a 500 after the grace), new
    jobs are refused, and the hash already running finishes. The executor
    hands at most processes + 1 jobs to its processes ahead of time; those
    run to the end."""
    queue = make_queue(processes=1)
    slow, slow_outcome = in_background(queue.run, SLOW, b'password123', 14)
    wait_for(lambda: queue.in_flight == 1, timeout=60)
    queued = []
    for i in range(6):
        queued.append(in_background(queue.run, time.monotonic))
        wait_for(lambda: queue.in_flight == i + 2, timeout=60, message='the job to be queued')
    queue.stop()
    with pytest.raises(APIError) as refused:
        queue.run(time.monotonic)
    assert refused.value.error_code == 'overloaded' and refused.value.headers['Retry-After'] == '1'
    for thread, _ in queued:
        thread.join(timeout=120)
    answers = [outcome[0] for _, outcome in queued]
    assert all(isinstance(answer, float) or answer.error_code == 'overloaded' for answer in answers), answers
    assert sum(isinstance(answer, APIError) for answer in answers) >= 4, answers
    slow.join(timeout=120)
    assert slow_outcome[0].startswith('$2b$14$')
    wait_for(lambda: queue.in_flight == 0, timeout=60, message='the queue to empty')


def post_all(port, requests, timeout=120, results=None):
    """Send every (path, body) at once, one thread and connection each;
    returns [(status, headers, body, seconds)] in order (filled into
    `results` as the answers come, if given)."""
    results = [None] * len(requests) if results is None else results

    def post(index, path, body):
        answer, seconds = timed(lambda: call(f'http://127.0.0.1:{port}', 'POST', path, body, timeout=timeout))
        results[index] = (answer.status, answer.headers, answer.json, seconds)

    run_together([functools.partial(post, i, *r) for i, r in enumerate(requests)], timeout=timeout + 60,
                 released_together=True)
    return results


def serve(database_url, tmp_path, **env):
    port = free_port()
    # One process (WORKERS defaults to one per core): the tests count one
    # process's queue, threads and hashing processes.
    proc = start_serve(clean_env(DATABASE_URL=database_url, JWT_SECRET=TEST_SECRET, PORT=str(port),
                                 LOG_LEVEL='INFO', RATE_LIMIT_EXEMPT=','.join(LOOPBACK), **{'WORKERS': '1', **env}),
                       tmp_path / 'serve.log')
    return proc, port


def stop(proc):
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_48_concurrent_registrations_at_the_default_cost_all_succeed(database_url, tmp_path):
    """A burst of registrations: the default settings, the default cost (12),
    48 at once. None is refused: all wait their turn.
    Except two: the machine running the tests is shared with other work at
    normal priority, which nice-19 hashing would leave the crumbs of (seen:
    load 9.6 on 2 cores, 1.3 hashes/s); and the wait is as long as that may
    take."""
    proc, port = serve(database_url, tmp_path, HASH_NICE='0', HASH_WAIT_MS='120000')
    try:
        results = post_all(port, [('/api/auth/register', {'email': f'burst-{i}@example.com', 'password': 'password123'})
                                  for i in range(48)])
    finally:
        stop(proc)
    print('slowest registration: %.1f s' % max(seconds for *_, seconds in results))
    assert [status for status, *_ in results] == [201] * 48
    # (A connection of its own: the test's `db` one is cut off by the pool's
    # watchdog when a test runs this long.)
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        hashes = [row['password_hash'] for row in conn.execute("SELECT password_hash FROM users WHERE email LIKE 'burst-%'")]
    assert len(hashes) == 48 and all(h.startswith('$2b$12$') for h in hashes)


def server_threads_and_rss(pid):
    status = Path(f'/proc/{pid}/status').read_text()
    fields = dict(line.split(':', 1) for line in status.splitlines() if ':' in line)
    return int(fields['Threads']), int(fields['VmRSS'].split()[0])


def children(pid):
    # Each thread's children: the forkserver is started by whichever
    # request thread hashes first.
    return [int(p) for task in Path(f'/proc/{pid}/task').iterdir() for p in (task / 'children').read_text().split()]


def test_a_login_flood_is_refused_with_retry_after_in_bounded_threads_and_memory(database_url, tmp_path, make_sale):
    """A queue of 4 and one hashing process: 4 of 300 logins arriving at once
    are queued, the rest get 503 overloaded with Retry-After at once. While
    the queued ones wait, every other request is served: with THREADS=2, both
    threads would be taken if the waiting logins used them. Threads, memory
    and hashing processes stay where they were.

    The hashing process is stopped (SIGSTOP) for the whole flood, so no queued
    login can finish and free its place while the 300 are still arriving: on
    a busy machine, sending them takes longer than a hash."""
    make_sale(stock=5)
    proc, port = serve(database_url, tmp_path, THREADS='2', POOL_SIZE='2', HASH_QUEUE='4', HASH_PROCESSES='1',
                       HASH_WAIT_MS='120000')
    try:
        # One login first: the executor's two threads start with the first job.
        [(status, *_)] = post_all(port, [('/api/auth/login', {'email': 'first@example.com', 'password': 'password123'})])
        assert status == 401
        threads_before, rss_before = server_threads_and_rss(proc.pid)
        hashers = [pid for child in children(proc.pid) for pid in children(child)]  # the forkserver's children
        assert len(hashers) == 1, hashers
        served_meanwhile = [None] * 300
        os.kill(hashers[0], signal.SIGSTOP)
        try:
            flood = threading.Thread(target=post_all, args=(
                port, [('/api/auth/login', {'email': f'flood-{i}@example.com', 'password': 'password123'})
                       for i in range(300)]), kwargs={'results': served_meanwhile})
            flood.start()
            # While the queued logins wait, polls answer.
            polls = []
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
            for _ in range(50):
                conn.request('GET', '/api/flash-sales/current')
                resp = conn.getresponse()
                resp.read()
                polls.append(resp.status)
            conn.close()
            wait_for(lambda: sum(1 for r in served_meanwhile if r is not None) == 296, timeout=120,
                     message='every login that found the queue full to be answered')
        finally:
            os.kill(hashers[0], signal.SIGCONT)
        flood.join(timeout=120)
        assert not flood.is_alive(), 'the four queued logins were not answered'
        threads_after, rss_after = server_threads_and_rss(proc.pid)
        hashing_processes = children(proc.pid)
    finally:
        stop(proc)
    statuses = [status for status, *_ in served_meanwhile]
    refused = [(headers, body) for status, headers, body, _ in served_meanwhile if status == 503]
    assert statuses.count(401) == 4, statuses  # served: no such user, after a real (decoy) hash each
    assert len(refused) == 296
    assert all(body['code'] == 'overloaded' and int(headers['Retry-After']) >= 1 for headers, body in refused)
    assert polls == [200] * 50  # 50 polls answered while the logins waited
    assert threads_after == threads_before
    assert rss_after - rss_before < 20 * 1024  # kB
    # The forkserver and multiprocessing's resource tracker (the hashing
    # process is the forkserver's child).
    assert len(hashing_processes) == 2


def test_at_sigterm_the_queued_logins_are_answered_503_and_none_is_a_500(database_url, tmp_path):
    """A real `flashsale serve` whose one hashing process is stopped (SIGSTOP):
    of 10 logins, 6 find the queue of 4 full. Then SIGTERM: the logins still
    waiting in the queue are answered 503 overloaded at once, those the
    executor had already handed to the process finish once it runs again
    (SIGCONT) and are answered as usual, the server exits 0, and nothing is
    a 500 or an ERROR in the log."""
    proc, port = serve(database_url, tmp_path, HASH_QUEUE='4', HASH_PROCESSES='1', HASH_WAIT_MS='120000')
    hasher = None
    try:
        [(status, *_)] = post_all(port, [('/api/auth/login', {'email': 'first@example.com', 'password': 'password123'})])
        assert status == 401
        [hasher] = [pid for child in children(proc.pid) for pid in children(child)]
        os.kill(hasher, signal.SIGSTOP)
        results = [None] * 10
        logins = threading.Thread(target=post_all, args=(
            port, [('/api/auth/login', {'email': f'late-{i}@example.com', 'password': 'password123'})
                   for i in range(10)]), kwargs={'results': results})
        logins.start()
        wait_for(lambda: sum(r is not None for r in results) == 6, timeout=120,
                 message='the six logins that found the queue full to be answered')
        proc.send_signal(signal.SIGTERM)
        # The two the queue still held (the executor hands one process two
        # jobs ahead of time: those two are its own).
        wait_for(lambda: sum(r is not None for r in results) == 8, timeout=60,
                 message='the queued logins to be answered at SIGTERM')
        os.kill(hasher, signal.SIGCONT)
        hasher = None
        logins.join(timeout=120)
        assert proc.wait(timeout=60) == 0
    finally:
        if hasher is not None:
            os.kill(hasher, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    statuses = collections.Counter(status for status, *_ in results)
    assert statuses == {503: 8, 401: 2}, statuses
    assert all(body['code'] == 'overloaded' for status, _, body, _ in results if status == 503)
    log = (tmp_path / 'serve.log').read_text()
    assert ' 500 ' not in log and 'ERROR' not in log, log[-3000:]


def descendants(pid):
    found = []
    for child in children(pid):
        found += [child] + descendants(child)
    return found


def test_a_killed_server_leaves_no_hashing_process_behind(database_url, tmp_path):
    """SIGKILL, out of memory: the hashing processes (and multiprocessing's
    forkserver and resource tracker) end with the server, not never."""
    proc, port = serve(database_url, tmp_path, HASH_PROCESSES='2')
    [(status, *_)] = post_all(port, [('/api/auth/login', {'email': 'x@example.com', 'password': 'password123'})])
    assert status == 401
    helpers = descendants(proc.pid)
    assert len(helpers) >= 3  # the forkserver, its hashing processes, the resource tracker
    proc.kill()
    proc.wait(timeout=30)

    def gone(pid):
        try:
            return Path(f'/proc/{pid}/stat').read_text().split(')')[1].split()[0] == 'Z'
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(pid) for pid in helpers), timeout=30, message='the hashing processes to end')
