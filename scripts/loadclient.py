"""The load tool's HTTP: raw HTTP/1.1 on asyncio streams (keep-alive
connections and a pool of them), and the API calls that prepare a run and read
its outcome back. Standard library only.

About 75 us of client CPU per request (0.15 of a core at 2,000 req/s): on a
2-core machine the server, not this client, is what a run measures.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
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
from typing import NamedTuple
from urllib.parse import urlsplit

DEFAULT_BASE_URL = 'http://127.0.0.1:8000'
USER_PASSWORD = 'loadtest-password'

# The server queues registrations (resources/hashing.py) and serves them in
# turn; more at once than its queue holds (HASH_QUEUE, 64) would be answered 503.
DEFAULT_REGISTER_CONCURRENCY = 32
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

    def closed_by_server(self):
        """True once the server's FIN has arrived (nothing is left unread on a
        connection that sat idle), or the transport is closing."""
        return self.reader.at_eof() or self.writer.is_closing()

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


class PoolFigures:
    """What a run's summary reads from its connections, whichever kind."""

    def __init__(self, size=0, max_size=0):
        self.size = size
        self.max_size = max_size
        self.in_use = self.peak_in_use = self.peak_open = 0
        self.discarded = self.waited = self.connect_errors = 0


class ConnectionPool(PoolFigures):
    """Keep-alive connections to one server.

    ``size`` connections are opened up front; when none is idle a new one is
    opened, up to ``max_size`` (``peak_open`` says how far it grew); past that
    the request waits for one to come back (counted in ``waited``).

    ``open_count`` counts slots: a connection open or being opened. A slot
    freed by a closed connection passes straight to the first waiter, which
    then opens its own connection in it.
    """

    def __init__(self, host, port, size, max_size):
        super().__init__(size, max(size, max_size))
        self.host = host
        self.port = port
        self.idle = collections.deque()
        self.waiters = collections.deque()
        self.open_count = 0

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
        if conn.closed_by_server():
            # It sat in the pool past the server's idle timeout (IDLE_TIMEOUT_MS)
            # and the server closed it: a new connection in its place, never
            # a request sent into a closed one.
            conn.close()
            self.discarded += 1
            self.in_use -= 1
            conn = await self._connect_in_slot()  # which frees the slot if it fails
            self.in_use += 1
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


class FreshConnections(PoolFigures):
    """In place of a ConnectionPool: every request on a new connection of its
    own, left open after the answer, as a crowd arrives (each visitor a new
    client; Artillery's virtual users and browsers keep theirs open). Closed
    `linger` seconds after the answer, or (None) when the run ends."""

    def __init__(self, host, port, linger=None):
        super().__init__()
        self.host = host
        self.port = port
        self.linger = linger
        self.open = set()

    async def start(self):
        pass

    async def send(self, raw: bytes) -> Response:
        try:
            conn = await Connection.open(self.host, self.port)
        except BaseException:
            self.connect_errors += 1
            raise
        self.open.add(conn)
        self.peak_open = self.max_size = max(self.peak_open, len(self.open))
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        keep = False
        try:
            response = await conn.request(raw)
            keep = response.keep_alive
        finally:
            self.in_use -= 1
            if not keep:
                self._close(conn)
            elif self.linger is not None:
                asyncio.get_running_loop().call_later(self.linger, self._close, conn)
        return response

    def _close(self, conn):
        if conn in self.open:
            self.open.discard(conn)
            conn.close()

    def close(self):
        for conn in list(self.open):
            self._close(conn)


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


def parse_time(text):
    return datetime.fromisoformat(text.replace('Z', '+00:00'))


def iso(moment: datetime):
    return moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


class UserOrders(NamedTuple):
    """One user's orders of the sale, read back two ways."""

    user: int  # User.index
    order: dict | None  # GET /api/me/orders/{saleId}
    orders: list  # GET /api/me/orders, this sale's


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
        return parse_time(body['serverTime']), (sent + got) / 2

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
        admin = await self.register(email, password)
        grant_admin_command(email, flashsale_cmd, database_url)
        _, body = await self.call('GET', '/api/me', token=admin.token)
        if not body['user'].get('isAdmin'):
            raise SetupError(f'flashsale grant-admin {email} ran, but the server still says isAdmin=false '
                             '(does the command use the same DATABASE_URL as the server?)')
        return admin.token

    async def create_sale(self, admin_token, total_stock, starts_at: datetime, length: timedelta, name):
        _, body = await self.call(
            'POST', '/api/flash-sales', token=admin_token, expect=(201,),
            body={'name': name, 'startDate': iso(starts_at), 'endDate': iso(starts_at + length),
                  'totalStock': total_stock},
        )
        return body['flashSale']

    async def purchase(self, user: User, sale_id):
        return await self.call('POST', f'/api/flash-sales/{sale_id}/purchase', token=user.token, expect=None)

    async def read_back(self, sale_id, users, concurrency=READ_BACK_CONCURRENCY):
        """The sale as the API sees it, and a UserOrders for every user given."""
        _, body = await self.call('GET', f'/api/flash-sales/{sale_id}')
        sale = body['flashSale']
        semaphore = asyncio.Semaphore(concurrency)

        async def orders_of(user):
            async with semaphore:
                status, one = await self.call('GET', f'/api/me/orders/{sale_id}', token=user.token, expect=(200, 404))
                _, every = await self.call('GET', '/api/me/orders', token=user.token)
            mine = [o for o in every['orders'] if o['flashSaleId'] == sale_id]
            return UserOrders(user.index, one['order'] if status == 200 else None, mine)

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
    done = subprocess.run(command + ['grant-admin', email], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        hint = ''
        if not env.get('DATABASE_URL'):
            hint = ('\n(no DATABASE_URL: the command used the embedded database of the current directory; '
                    'pass --database-url with the server\'s DATABASE_URL, or run from the directory the '
                    'server was started in)')
        raise SetupError(f'{" ".join(command)} grant-admin {email} failed ({done.returncode}): '
                         f'{(done.stderr or done.stdout).strip()[-500:]}{hint}')


