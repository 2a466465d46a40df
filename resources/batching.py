"""Natural batching (group commit) of one sale's purchases, in one process.

Every purchase of a sale updates the same row, and PostgreSQL holds that row's
lock until the purchase's commit is flushed: one sale sells at most one
statement per commit time (README.md, "Slow commits"). So the purchases of a
sale are sent as batches, one statement each (sql.PURCHASE_BATCH):

- A purchase that finds no statement in flight for its sale runs at once,
  alone, with the single-purchase statement (sql.PURCHASE): at low load a
  purchase costs what it always did.
- Purchases that arrive while a statement for their sale is in flight wait.
  When it returns, all of them (up to `max_batch`, in arrival order) go
  together in the next statement. There is no timer: a batch is whatever
  queued up during one round trip, so the slower the commit, the bigger the
  batch, and the rate per sale grows with it.

The statement is run by the first request of the batch, in its own thread (a
waitress thread, so a batch is never larger than the threads waiting), and
the others wait for its answer. No lock is held around the database: the
lock here only guards the queues.

Every wait has a deadline. A purchase waits in the queue at most the pool's
timeout, as it would wait for a connection, then gets the pool timeout's
answer (503 overloaded, or database_unavailable while the database is known
to be down): nothing was bought. Once in a statement it waits for that
statement, which the pool's watchdog ends at its hold limit.
"""

import collections
import threading
import time

import psycopg
import psycopg.errors
import psycopg_pool

from resources import metrics
from resources import sql
from resources.errors import refusal

# A leader's getconn() plus its statement's longest hold (the watchdog's
# limit), plus a margin: past this, a member stops waiting for its batch's
# answer (which cannot happen unless a thread died) and is told the outcome
# is unknown, since the statement may have run.
_ANSWER_MARGIN = 1.0


class _Request:
    __slots__ = ('user_id', 'generation', 'deadline', 'answer_by', 'wake', 'state', 'batch', 'row', 'error')

    def __init__(self, user_id, generation, deadline, lock):
        self.user_id = user_id
        self.generation = generation  # the token's, checked by the statement (sql.PURCHASE_BATCH, 0)
        self.deadline = deadline  # to be taken into a statement
        self.answer_by = None  # once taken: to have that statement's answer
        self.wake = threading.Condition(lock)
        self.state = 'queued'  # -> 'leading' | 'in_batch' -> 'done'
        self.batch = None  # the members, when this request leads a statement
        self.row = None
        self.error = None


class _Sale:
    __slots__ = ('waiting', 'busy')

    def __init__(self):
        self.waiting = collections.deque()
        self.busy = False  # a statement for this sale is in flight


class Batches:
    """buy(sale_id, user_id, generation) -> the purchase statement's row for
    this request (generation: the token's, so a revoked one buys nothing)
    ({'outcome': ..., order columns}); raises what running the single
    purchase would have raised (psycopg errors, PoolTimeout, outcome_unknown)."""

    def __init__(self, pool, max_batch, queue_wait, answer_wait):
        self._pool = pool
        self._max_batch = max_batch
        self._queue_wait = queue_wait
        self._answer_wait = answer_wait + _ANSWER_MARGIN
        self._lock = threading.Lock()
        self._sales = {}
        self._stop_deadline = None
        # Batches run again because another process's racing order aborted
        # them (sql.PURCHASE_BATCH, 3): rare, and counted for the tests.
        self.reruns = 0
        # Statements sent (scripts/race_demo.py prints it).
        self.statements = 0

    def stop(self, within):
        """Shutdown: from now on no purchase waits in a queue longer than
        `within` seconds, so every one is answered while the server still
        sends answers."""
        with self._lock:
            self._stop_deadline = time.monotonic() + within
            for sale in self._sales.values():
                for request in sale.waiting:
                    request.wake.notify()

    def queued(self, sale_id):
        """How many purchases of this sale wait for the next statement."""
        with self._lock:
            sale = self._sales.get(sale_id)
            return 0 if sale is None else len(sale.waiting)

    def waiting(self):
        """How many purchases, of every sale, wait for their sale's next statement."""
        with self._lock:
            return sum(len(sale.waiting) for sale in self._sales.values())

    def buy(self, sale_id, user_id, generation):
        request = _Request(user_id, generation, time.monotonic() + self._queue_wait, self._lock)
        with self._lock:
            sale = self._sales.get(sale_id)
            if sale is None:
                sale = self._sales[sale_id] = _Sale()
            if sale.busy:
                sale.waiting.append(request)
                self._wait(sale, request)
            else:
                sale.busy = True
                request.state = 'leading'
                request.batch = [request]
        if request.state == 'leading':
            self._lead(sale_id, sale, request)
        if request.error is not None:
            raise request.error
        return request.row

    def _wait(self, sale, request):
        """Wait (holding the lock between wake-ups) until this request leads
        a statement or has its answer; raise the pool's timeout if it is
        still queued at its deadline."""
        while request.state in ('queued', 'in_batch'):
            if request.state == 'queued':
                deadline = request.deadline
                if self._stop_deadline is not None:
                    deadline = min(deadline, self._stop_deadline)
            else:
                deadline = request.answer_by
            left = deadline - time.monotonic()
            if left <= 0:
                if request.state == 'queued':
                    sale.waiting.remove(request)
                    # The same answer as a request that found no free
                    # connection in time (resources/errors.py).
                    raise psycopg_pool.PoolTimeout('waited too long for a purchase statement')
                request.state = 'done'
                request.error = refusal('outcome_unknown')
                return
            request.wake.wait(left)

    def _lead(self, sale_id, sale, request):
        """Run statements for this sale until this request has its answer,
        then hand the next batch to its first member."""
        batch = request.batch
        while True:
            retry = self._run(sale_id, batch)
            metrics.purchase_statement(len(batch))  # not under the lock the sale's purchases queue on
            with self._lock:
                self.statements += 1
                for member in batch:
                    if member not in retry:
                        member.state = 'done'
                        if member is not request:
                            member.wake.notify()
                # Members to run again go first: they arrived first, and
                # they all fit in the next batch (they came from one).
                for member in reversed(retry):
                    member.state = 'queued'
                    sale.waiting.appendleft(member)
                batch = []
                while sale.waiting and len(batch) < self._max_batch:
                    member = sale.waiting.popleft()
                    member.state = 'in_batch'
                    member.answer_by = time.monotonic() + self._answer_wait
                    batch.append(member)
                if not batch:
                    sale.busy = False
                    del self._sales[sale_id]
                    return
                leader = batch[0]
                if leader is request:
                    request.state = 'leading'
                else:
                    leader.state = 'leading'
                    leader.batch = batch
                    leader.wake.notify()
                    if request.state == 'done':
                        return
                    # This request must run again, in a batch led by another.
                    self._wait(sale, request)
                    if request.state != 'leading':
                        return
                    batch = request.batch

    def _run(self, sale_id, batch):
        """One statement for the batch: sets each member's row or error, and
        returns the members to run again."""
        try:
            with self._pool.connection() as conn:
                try:
                    if len(batch) == 1:
                        # Alone: exactly the single purchase, and its
                        # unique violation is its answer (already_purchased).
                        batch[0].row = _purchase(conn, sale_id, batch[0])
                        return []
                    rows = sql.many(conn, sql.PURCHASE_BATCH, {
                        'sale_id': sale_id,
                        'user_ids': [m.user_id for m in batch],
                        'generations': [m.generation for m in batch],
                    }, prepare=True)
                except psycopg.errors.UniqueViolation as exc:
                    if exc.diag.constraint_name != 'orders_one_per_user_per_sale':
                        raise
                    # Another process's order, committed after this
                    # statement's snapshot, for a member: nothing was bought.
                    # The next statement's snapshot sees that order
                    # (sql.PURCHASE_BATCH, 3).
                    self.reruns += 1
                    metrics.purchase_batch_rerun()
                    return list(batch)
                except psycopg.errors.ForeignKeyViolation:
                    # A member's user was deleted while the statement waited
                    # (one already gone is answered invalid_token by it): the
                    # whole batch failed for one member. Each runs alone, for
                    # its own answer.
                    for member in batch:
                        try:
                            member.row = _purchase(conn, sale_id, member)
                        except psycopg.Error as exc:
                            member.error = exc
                            if conn.broken:
                                for rest in batch[batch.index(member):]:
                                    rest.error = refusal('outcome_unknown')
                                break
                    return []
                except psycopg.OperationalError:
                    # An error the server reports for the statement (a
                    # statement or lock timeout) leaves the connection
                    # working and means the statement rolled back. A
                    # connection that broke instead (the database shut down
                    # or crashed, the network went) may have lost only the
                    # answer to a commit that happened: say so, rather than
                    # "failed" (README.md: "When things go wrong").
                    if conn.broken:
                        for member in batch:
                            member.error = refusal('outcome_unknown')
                        return []
                    raise
            retry = []
            for member, row in zip(batch, rows, strict=True):
                del row['request']  # the rows come in the batch's order
                if row['outcome'] == 'retry':
                    retry.append(member)
                else:
                    member.row = row
            return retry
        except Exception as exc:  # noqa: BLE001 (every member gets what the single purchase would have raised)
            for member in batch:
                if member.row is None and member.error is None:
                    member.error = exc
            return []


def _purchase(conn, sale_id, request):
    """The single-purchase statement for one request."""
    return sql.one(conn, sql.PURCHASE, {
        'sale_id': sale_id, 'user_id': request.user_id, 'generation': request.generation,
    }, prepare=True)
