"""Prometheus metrics: GET /metrics, and the counting behind it.

docs/metrics.md lists the series and the operator questions they answer.

A process exports one set of numbers, as Prometheus expects, so the
instruments are this module's, made once per process by the first app that
has METRICS=on (instruments()). The places where a thing happens count it
with one call here (sold_out_remembered() in resources/orders.py, ...), which
does nothing while no app of this process counts.

Several processes serving one port (WORKERS, or any server that runs
create_app in processes of its own) must answer a scrape with one set, which
ever process takes it: prometheus_client's multiprocess mode. Each process
writes its values into files of its own (named by pid) in
PROMETHEUS_MULTIPROC_DIR, and a scrape adds up every process' files.
prepare() makes that directory, empty, in the server's first process before
any worker exists; the workers inherit it through the environment. Each
process keeps its counts in memory and writes them there once a second
(_Tally, which is what keeps their cost down), and the one answering a scrape
writes its own first: another process' counts arrive up to a second late. A
worker that exits writes its last counts (flush()) and keeps them (a counter
never goes back) but not its gauges: whoever reaps it calls
process_exited(pid), and a scrape also forgets the gauges of any process that
no longer exists, so that no server's reaping has to call us. Without that
directory (create_app alone, as in the tests) the values are this process'
own, and written at each scrape.

Who may read them: metrics are business figures (purchases per second, stock
sold). Only the client addresses in METRICS_ALLOW (default: this host's
loopback) are answered; judged by the address the app believes (behind
TRUSTED_PROXY, the client's, as for the rate limits). A proxy in front must
not pass /metrics on at all (scripts/nginx.conf denies it): without
TRUSTED_PROXY, every request it passes comes from loopback.

Cardinality is bounded by construction: a route label is the route
*template* the request matched (Falcon's req.uri_template, never the path),
an unmatched path is one label, a method outside the standard ones is
"other", and every other label is one of a fixed set (statuses, the error
catalogue's codes, the purchase statement's outcomes).
"""

import atexit
import bisect
import glob
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import disable_created_metrics
from prometheus_client import exposition
from prometheus_client import multiprocess
from prometheus_client import values

from resources.errors import CATALOGUE
from resources.errors import refusal
from resources.ratelimit import PURCHASE_ROUTE

log = logging.getLogger('flashsale')

MULTIPROC_DIR = 'PROMETHEUS_MULTIPROC_DIR'
# Beside the values' files in the directory (a scrape reads only *.db): one
# id for every process of one server start, so that a page reading
# several servers behind a proxy tells their counts apart.
_INSTANCE_FILE = 'instance'

# Request latency: from 1 ms (a sold-out answer from memory, a cached poll)
# to 5 s (POOL_TIMEOUT_MS, STATEMENT_TIMEOUT_MS); slower is +Inf.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Purchases per statement: 1 (no contention) to PURCHASE_BATCH_MAX (at most 1000).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
# A login's wait for its hash: a hash is ~0.25 s, HASH_WAIT_MS is 20 s by default.
LOGIN_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)

METHODS = frozenset({'GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'TRACE', 'CONNECT'})
UNMATCHED = 'unmatched'
STATIC_ROUTE = '/static/{path}'  # Falcon's static routes have no uri_template (resources/page.py)

# How often each process writes its gauges (pool, queues) and its counts
# (_Tally) in multiprocess mode; a scrape also writes those of the process
# that answers it.
SAMPLE_SECONDS = 1.0


class _Tally:
    """Counts and observations kept in this process, and added to their
    instruments by flush(). In multiprocess mode each inc() of a value writes
    it into this process' file, under a lock all of its values share: 1.2 us
    a counter, 2 us a histogram's observation (measured), and a sold-out
    answer made six of them, more than half of what it cost the app with
    metrics off (docs/metrics.md, "What it costs"). Here a request takes one
    lock and adds to a dict; each value's file is written once per flush. So
    another process' counts reach a scrape up to SAMPLE_SECONDS late; the
    answering process' are flushed first."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = {}  # a counter (child), or a histogram's bucket or sum value -> what to add

    def add(self, *counters):
        """One more of each."""
        with self._lock:
            pending = self._pending
            for counter in counters:
                pending[counter] = pending.get(counter, 0) + 1

    def observe(self, histogram, amount):
        """histogram.observe(amount) (a child without labels left to set), at
        the next flush. Through the child's own bucket and sum values:
        prometheus_client's Histogram has no way to observe many at once.
        Those attributes are its own (setup.cfg pins the major version), and
        the tests' exact bucket counts would see them change."""
        bucket = histogram._buckets[bisect.bisect_left(histogram._upper_bounds, amount)]
        total = histogram._sum
        with self._lock:
            pending = self._pending
            pending[bucket] = pending.get(bucket, 0) + 1
            pending[total] = pending.get(total, 0) + amount

    def flush(self):
        with self._lock:
            pending, self._pending = self._pending, {}
        for counter, n in pending.items():
            counter.inc(n)


class _Instruments:
    def __init__(self, registry):
        def counter(name, documentation, labels=()):
            return Counter(name, documentation, labels, registry=registry)

        def gauge(name, documentation):
            # Summed over the processes alive: each has its own pool and queues.
            return Gauge(name, documentation, registry=registry, multiprocess_mode='livesum')

        self.requests = counter('flashsale_http_requests', 'Requests answered by the app, by route template, '
                                'method and status', ('route', 'method', 'status'))
        self.duration = Histogram('flashsale_http_request_duration_seconds', 'Time from the request read to '
                                  'its answer, by route template', ('route',), buckets=LATENCY_BUCKETS,
                                  registry=registry)
        self.errors = counter('flashsale_http_errors', 'Error answers by route template and error code '
                              '(resources/errors.py)', ('route', 'code'))
        self.purchases = counter('flashsale_purchases', 'Purchase answers by outcome: created, or the error '
                                 'code', ('outcome',))
        self.sold_out_remembered = counter('flashsale_purchases_sold_out_remembered', 'Purchases answered '
                                           'sold_out from memory, without the database (also in '
                                           'flashsale_purchases_total{outcome="sold_out"})')
        self.statements = counter('flashsale_purchase_statements', 'Purchase statements run (one per batch)')
        self.batch_size = Histogram('flashsale_purchase_batch_size', 'Purchases per purchase statement',
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.batch_reruns = counter('flashsale_purchase_batch_reruns', 'Batches run again because another '
                                    "process' order for a member committed meanwhile")
        self.purchases_waiting = gauge('flashsale_purchases_waiting', "Purchases waiting for their sale's "
                                       'next statement')
        self.pool_connections = gauge('flashsale_pool_connections', 'Database connections open')
        self.pool_max = gauge('flashsale_pool_max_connections', 'Database connections the pools may open '
                              '(POOL_SIZE per process)')
        self.pool_in_use = gauge('flashsale_pool_connections_in_use', 'Database connections lent to a request')
        self.pool_waiting = gauge('flashsale_pool_requests_waiting', 'Requests waiting for a database connection')
        self.login_queue = gauge('flashsale_login_queue_depth', 'Logins, registrations and password changes '
                                 'queued for a hash or hashing')
        self.login_capacity = gauge('flashsale_login_queue_capacity', 'Room in the hashing queues (HASH_QUEUE '
                                    'per process); beyond it, 503 at once')
        self.login_wait = Histogram('flashsale_login_queue_wait_seconds', 'How long a login waited for its hash '
                                    'to start', buckets=LOGIN_WAIT_BUCKETS, registry=registry)
        self.login_refused = counter('flashsale_login_queue_refusals', 'Logins (and registrations, password '
                                     'changes) answered 503 by the hashing queue, by reason', ('reason',))
        self.processes = gauge('flashsale_processes', 'Server processes reporting')
        self.tally = _Tally()
        # Made now, so each series exists (at 0) from the start: a rate()
        # over a series that appears only with its first event misses it.
        self.purchase_outcomes = {outcome: self.purchases.labels(outcome)
                                  for outcome in ('created', *PURCHASE_REFUSALS)}
        self.login_refusals = {reason: self.login_refused.labels(reason) for reason in LOGIN_REFUSALS}
        self.processes.set(1)


# The purchase's answers other than 201, as error codes (sql.PURCHASE's
# outcomes and what may happen on the way): made at start, others as they come.
PURCHASE_REFUSALS = ('sold_out', 'already_purchased', 'sale_not_started', 'sale_ended', 'sale_not_found',
                     'rate_limited', 'overloaded', 'database_unavailable', 'outcome_unknown')
# Why resources/hashing.py refuses a login: its queue is full, the wait it
# predicts is longer than HASH_WAIT_MS, it waited that long, the server is
# stopping, or a hashing process died.
LOGIN_REFUSALS = ('full', 'too_slow', 'timed_out', 'stopping', 'process_died')

_instruments = None
_instruments_lock = threading.Lock()
_registry = None  # this process' own, without PROMETHEUS_MULTIPROC_DIR
_instance = uuid.uuid4().hex  # without the directory; with it, the server's (_INSTANCE_FILE)


def _directory():
    return os.environ.get(MULTIPROC_DIR)


def instruments():
    """This process' instruments, made at the first call."""
    global _instruments, _registry, _instance
    with _instruments_lock:
        if _instruments is None:
            directory = _directory()
            if directory:
                # Not registered anywhere: they write files, which a scrape reads.
                registry = None
                try:
                    with open(os.path.join(directory, _INSTANCE_FILE)) as file:
                        _instance = file.read().strip() or _instance
                except OSError:
                    pass
            else:
                registry = _registry = CollectorRegistry()
            # No *_created series (when each counter started): multiprocess
            # mode has none, and one server says the same in either mode.
            disable_created_metrics()
            _instruments = _Instruments(registry)
        return _instruments


def prepare(settings):
    """In the server's first process, before any worker exists: the
    directory every process of this server writes its metrics in, empty, in
    the environment its workers inherit (forked or spawned, by any server).
    PROMETHEUS_MULTIPROC_DIR when the operator set one (emptied here, as
    prometheus_client asks), else a new temporary directory, removed when
    this process exits."""
    if settings.metrics != 'on':
        return
    directory = _directory()
    if directory:
        os.makedirs(directory, exist_ok=True)
        for path in glob.glob(os.path.join(directory, '*.db')):
            os.remove(path)
    else:
        directory = tempfile.mkdtemp(prefix='flashsale-metrics-')
        os.environ[MULTIPROC_DIR] = directory
        atexit.register(_remove, directory, os.getpid())
    with open(os.path.join(directory, _INSTANCE_FILE), 'w') as file:
        file.write(uuid.uuid4().hex)
    # prometheus_client chose where values go when it was imported, from the
    # environment, and this process imported it before the directory existed.
    values.ValueClass = values.MultiProcessValue()


def _remove(directory, owner):
    # A worker forked from this process inherits this exit handler: only the
    # process that made the directory removes it.
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def process_exited(pid):
    """A server process has exited: its gauges no longer count."""
    directory = _directory()
    if directory:
        multiprocess.mark_process_dead(pid, directory)


def _forget_dead_processes(directory):
    for path in glob.glob(os.path.join(directory, 'gauge_live*_*.db')):
        pid = int(path.rsplit('_', 1)[1][:-3])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass  # alive, someone else's: not ours, but not dead


def _scraped_registry():
    instruments().tally.flush()
    directory = _directory()
    if not directory:
        return _registry
    _forget_dead_processes(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, directory)
    return registry


# --- the hooks: one call where a thing happens ------------------------------------


def sold_out_remembered():
    if _instruments is not None:
        _instruments.tally.add(_instruments.sold_out_remembered)


def purchase_statement(size):
    if _instruments is not None:
        _instruments.tally.add(_instruments.statements)
        _instruments.tally.observe(_instruments.batch_size, size)


def purchase_batch_rerun():
    if _instruments is not None:
        _instruments.tally.add(_instruments.batch_reruns)


def login_waited(seconds):
    if _instruments is not None:
        _instruments.login_wait.observe(seconds)


def login_refused(reason):
    if _instruments is not None:
        _instruments.tally.add(_instruments.login_refusals[reason])


def flush():
    """Write this process' counts now (a server process about to exit)."""
    if _instruments is not None:
        _instruments.tally.flush()


# --- the app's side -------------------------------------------------------------------


class RequestMetrics:
    """Falcon middleware: every answer counted by route template, method and
    status, and by its error code, and timed. After middleware.RequestLog,
    whose start time it reads. What to count for each kind of answer is
    looked up once, then kept here: prometheus_client's labels() takes a
    lock and builds a tuple of strings on every call."""

    def __init__(self):
        self._instruments = instruments()
        self._tally = self._instruments.tally
        # (route, method, status line, error code) -> (counters, latency histogram)
        self._kinds = {}

    def process_response(self, req, resp, resource, req_succeeded):
        elapsed = time.perf_counter() - req.context.started
        route = req.uri_template
        if route is None:
            route = STATIC_ROUTE if resource is None and req.path.startswith('/static/') else UNMATCHED
        key = (route, req.method if req.method in METHODS else 'other', resp.status, resp.context.get('error_code'))
        kind = self._kinds.get(key)
        if kind is None:
            kind = self._kinds[key] = self._kind(*key)
        counters, latency = kind
        self._tally.add(*counters)
        self._tally.observe(latency, elapsed)

    def _kind(self, route, method, status_line, code):
        meters = self._instruments
        status = str(status_line)[:3]
        counters = [meters.requests.labels(route, method, status)]
        if code is not None:
            code = code if code in CATALOGUE else 'other'
            counters.append(meters.errors.labels(route, code))
        if route == PURCHASE_ROUTE and method == 'POST':
            outcome = 'created' if status == '201' else code or status
            counters.append(meters.purchase_outcomes.get(outcome) or meters.purchases.labels(outcome))
        return tuple(counters), meters.duration.labels(route)


class Watched:
    """What the gauges say, read from one app's pool, purchase batches and
    hashing queue; written at each scrape, and every SAMPLE_SECONDS by each
    process in multiprocess mode (a scrape reaches one process only)."""

    def __init__(self, pool, batches, hash_queue):
        self._pool = pool
        self._batches = batches
        self._hash_queue = hash_queue
        if _directory():
            threading.Thread(target=self._keep_sampling, name='metrics-sampler', daemon=True).start()

    def sample(self):
        meters = instruments()
        stats = self._pool.get_stats()
        meters.pool_connections.set(stats['pool_size'])
        meters.pool_max.set(stats['pool_max'])
        meters.pool_in_use.set(stats['pool_size'] - stats['pool_available'])
        meters.pool_waiting.set(stats.get('requests_waiting', 0))
        meters.purchases_waiting.set(self._batches.waiting())
        meters.login_queue.set(self._hash_queue.in_flight)
        meters.login_capacity.set(self._hash_queue.capacity)

    def _keep_sampling(self):
        while True:
            try:
                instruments().tally.flush()
                self.sample()
            except Exception:  # noqa: BLE001 (a second later it tries again: the counts wait in memory)
                log.exception('metrics: could not write this process\' metrics')
            time.sleep(SAMPLE_SECONDS)


def allowed_networks(entries):
    """METRICS_ALLOW's addresses and networks (ValueError for one that is neither)."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f'{entry!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8)') from None
    return tuple(networks)


def _is_allowed(address, networks):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:  # an IPv4 client of a dual-stack socket
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


class Scrape:
    """GET /metrics: every process' metrics, in the Prometheus text format,
    for the clients METRICS_ALLOW names; 403 for anyone else."""

    def __init__(self, settings, watched):
        self._networks = allowed_networks(settings.metrics_allow)
        self._watched = watched

    def on_get(self, req, resp):
        if not _is_allowed(req.remote_addr, self._networks):
            raise refusal('forbidden', 'Metrics are served only to the addresses in METRICS_ALLOW.')
        self._watched.sample()
        resp.content_type = exposition.CONTENT_TYPE_LATEST
        resp.data = exposition.generate_latest(_scraped_registry())


def purchase_counts():
    """{outcome: purchase answers} given by this server's processes since it
    started, and the id of this server start (the same in every process of it)."""
    counts = {}
    for family in _scraped_registry().collect():
        if family.name == 'flashsale_purchases':
            for sample in family.samples:
                if sample.name == 'flashsale_purchases_total':
                    counts[sample.labels['outcome']] = int(sample.value)
    return counts, _instance
