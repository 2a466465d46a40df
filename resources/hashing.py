"""bcrypt, off the request threads: a fair, bounded queue in front of a few
low-priority hashing processes.

Why processes, and why low priority (measured: `scripts/bench.py
--logins`): bcrypt 5 releases the interpreter lock while it hashes, so threads
would hash in parallel too. But a hash is ~0.25 s of a core at the default
cost, and on a 2-core machine two of them leave nothing for the purchase
threads and PostgreSQL. Processes can be niced, threads practically cannot:
a niced thread that has to take the interpreter lock back from a request
thread makes that thread wait until the scheduler gets round to the niced
one. So the hashes run in HASH_PROCESSES processes at HASH_NICE (19), each
in a session (and so a scheduler autogroup) of its own: they get the CPU
nothing else wants, and a purchase arriving while they hash preempts them.
The price: on a machine busy with other work at normal priority, logins get
only what that work leaves.

Why a queue: a burst of logins larger than the hashing processes is normal
at a sale's opening, and the machine can serve it in a few seconds. A login
waits its turn, first come, first served (ProcessPoolExecutor hands out work
in submission order), for at most max_wait. At most `capacity` logins are in
the queue or being hashed at once: so at most that many server threads wait
here (resources/serving.py gives waitress that many threads on top of THREADS), and
the memory of a flood is bounded. A login that could not be served in time
gets 503 overloaded with a Retry-After estimated from the queue's length and
the measured time of a hash.
"""

import concurrent.futures
import math
import multiprocessing
import os
import select
import threading
import time

import bcrypt

from resources.errors import refusal

# How often a login waiting for its hash looks whether a stop has brought
# its deadline forward.
_LOOK_EVERY = 0.25


def hash_password(password, rounds):
    """The bcrypt hash (text) of password (bytes), at cost `rounds`."""
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds)).decode()


def check_password(password, password_hash):
    """Whether password (bytes) matches password_hash (bytes)."""
    return bcrypt.checkpw(password, password_hash)


def _timed(function, *args):
    # Measured in the worker: the hash's own time (including any time the
    # scheduler gave the CPU to others), not its time in the queue.
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def _start_worker(niceness, server_pid, closing):
    _exit_with(server_pid)
    _exit_when_set(closing)
    _lower_priority(niceness)


def _exit_when_set(closing):
    """End this hashing process when its queue is closed, even in the
    middle of a hash: on a busy host a SCHED_IDLE hash may wait many
    seconds for the CPU, and the server's exit must not wait for it."""

    def wait():
        closing.wait()
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


def _exit_with(server_pid):
    """End this hashing process when the server process ends, however it
    ends. (A worker holds both ends of its own job pipe, so a SIGKILLed
    server would otherwise leave it, and the forkserver, waiting forever.)"""
    try:
        watched = os.pidfd_open(server_pid)
    except OSError:
        return  # already gone: the next job read fails and the worker ends

    def wait():
        select.select([watched], [], [])
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


def _lower_priority(niceness):
    os.nice(niceness)
    if niceness >= 19:
        # The lowest there is: SCHED_IDLE. A request thread (or PostgreSQL)
        # that wakes up takes the core from a hash at once, where a niced
        # hash keeps it until the scheduler's next tick. Measured with
        # scripts/bench.py --logins: purchase p99 during a login storm 4.8x
        # the calm p99 with nice 19 alone, 1.6x with SCHED_IDLE, and logins/s
        # the same (95% and 99% of bcrypt alone). When the cores are idle a
        # hash runs at full speed.
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            pass  # not Linux: nice alone
    # With autogroup scheduling (sched_autogroup_enabled, on in many Linux
    # distributions), nice only ranks processes within one session's group;
    # between groups the CPU is shared evenly, so a niced hash would still
    # take half the CPU from a PostgreSQL of another session. A session of
    # its own, niced as a group, ranks it below everything else (measured
    # here: 0.38 s of CPU in 6 s against 1.4 s with nice alone).
    try:
        os.setsid()
        with open('/proc/self/autogroup', 'w') as autogroup:
            autogroup.write(str(niceness))
    except OSError:
        pass  # no autogroups here: nice alone does it


def overloaded(retry_after):
    return refusal('overloaded', 'Many people are logging in right now; try again in a few seconds.',
                   retry_after=retry_after)


class HashQueue:
    def __init__(self, processes, capacity, max_wait, seconds_per_hash=None, niceness=19):
        self.processes = processes
        self.niceness = niceness
        self.capacity = capacity
        self.max_wait = max_wait
        self._lock = threading.Lock()
        self._in_flight = 0  # queued or being hashed
        # A moving average of one hash's time in a worker, first measured by
        # the caller (credentials.Credentials: the decoy hash at start-up).
        self.seconds_per_hash = seconds_per_hash
        self._executor = None
        self._waiting = set()  # futures of jobs admitted and not yet done
        self._stopping = False
        self._give_up_at = None  # stop(): a login not answered by then gets 503
        self._closing = None  # set by close(): the hashing processes exit

    def run(self, function, *args):
        """function(*args) in a hashing process, after the ones queued
        before it; 503 overloaded if that cannot happen within max_wait."""
        with self._lock:
            if self._stopping:
                # Shutting down: another process (or this one restarted) can serve it.
                raise overloaded(1)
            ahead = self._in_flight
            if ahead >= self.capacity or self._wait(ahead) > self.max_wait:
                # Refused at once: holding a thread until the deadline would
                # only tell the same thing later.
                raise overloaded(self._retry_after(ahead))
            executor = self._started()
            # Submitted under the lock: the order of admission is the order
            # of the executor's queue, which it serves first in, first out.
            try:
                future = executor.submit(_timed, function, *args)
            except concurrent.futures.BrokenExecutor:
                # A hashing process died (killed, out of memory): start afresh.
                self._executor = None
                raise overloaded(1) from None
            self._in_flight += 1
            self._waiting.add(future)
        future.add_done_callback(self._finished)
        deadline = time.monotonic() + self.max_wait
        try:
            while True:
                # In slices: a stop may bring the deadline forward.
                limit = deadline if self._give_up_at is None else min(deadline, self._give_up_at)
                left = limit - time.monotonic()
                try:
                    result, _ = future.result(timeout=max(0.0, min(left, _LOOK_EVERY)))
                    break
                except concurrent.futures.TimeoutError:
                    if left > _LOOK_EVERY:
                        continue
                    # Not served in time. If it is still queued it never
                    # runs; if it was already handed to a process (the
                    # executor hands one job more than it has processes),
                    # its answer is dropped. Either way its slot is freed
                    # when it ends.
                    future.cancel()
                    if self._stopping:
                        raise overloaded(1) from None
                    raise overloaded(self._retry_after(self._in_flight)) from None
        except concurrent.futures.CancelledError:
            raise overloaded(1) from None  # by stop(): the server is shutting down
        except concurrent.futures.BrokenExecutor:
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            raise overloaded(1) from None
        return result

    def start(self):
        """Start the hashing processes now (they start at the first hash
        otherwise): the first logins of an opening should not wait for them.
        Not waited for: on a busy machine a SCHED_IDLE process may take
        seconds to run its first job, and start-up (and a SIGTERM during it)
        must not wait on that."""
        with self._lock:
            executor = self._started()
            for _ in range(self.processes):
                executor.submit(os.getpid)

    def _wait(self, ahead):
        """Seconds until a job with `ahead` jobs before it is done."""
        return (ahead // self.processes + 1) * self.seconds_per_hash

    def _retry_after(self, ahead):
        # When the jobs already queued will have been served.
        return max(1, math.ceil(ahead / self.processes * self.seconds_per_hash))

    def _started(self):
        if self._executor is None:
            # forkserver: a process forked from this one (which has threads)
            # could inherit a lock some other thread held at the fork.
            context = multiprocessing.get_context('forkserver')
            context.set_forkserver_preload(['resources.hashing'])
            self._closing = context.Event()
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=context, initializer=_start_worker,
                initargs=(self.niceness, os.getpid(), self._closing),
            )
        return self._executor

    def _finished(self, future):
        with self._lock:
            self._in_flight -= 1
            self._waiting.discard(future)
            if future is not None and not future.cancelled() and future.exception() is None:
                _, seconds = future.result()
                self.seconds_per_hash = 0.8 * self.seconds_per_hash + 0.2 * seconds

    @property
    def in_flight(self):
        return self._in_flight

    def stop(self, answer_within=None):
        """SIGTERM: every login still queued is answered 503 overloaded now
        (while the server can still send it), and so is every new one; a
        hash already running is answered as usual if it ends within
        `answer_within` seconds, else 503 too: on a busy host a SCHED_IDLE
        hash may get no CPU for many seconds, and the stop must not wait."""
        with self._lock:
            self._stopping = True
            if answer_within is not None:
                self._give_up_at = time.monotonic() + answer_within
            waiting = list(self._waiting)
        for future in waiting:
            future.cancel()  # fails, harmlessly, for a job a process has started

    def close(self):
        """End the hashing processes now, a hash in the middle or not."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            self._closing.set()
            executor.shutdown(wait=True, cancel_futures=True)
