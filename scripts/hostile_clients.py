"""How long a fresh client waits while hostile sockets hold the server.

    .venv/bin/python scripts/load.py hostile [--sockets 1100] [--tries 10]

Starts `flashsale serve` on a free port with its defaults (settings such as
CONNECTION_LIMIT pass through from the environment; with no DATABASE_URL it
starts a throwaway embedded PostgreSQL), then for each kind of attack opens
--sockets connections that hold the server: `idle` (one keep-alive answer,
then silence) and `trickle` (a request line started, one more byte every half
second, never finished). Meanwhile a fresh client sends GET /health --tries
times; it prints how long each took, and how many of the hostile
connections the server still holds (docs/security.md, "Connections").
tests/test_edge.py opens its attackers with hostile_sockets() and trickle().
"""

import argparse
import http.client
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import servers

ROOT = Path(__file__).resolve().parent.parent


def start_server(database_url, log_path):
    env = {**os.environ, 'DATABASE_URL': database_url, 'JWT_SECRET': secrets.token_urlsafe(48), 'PORT': '0',
           'LOG_LEVEL': 'WARNING', 'WORKERS': '1'}
    proc = servers.start_serve(env, log_path, cwd=ROOT)
    return proc, int(servers.listening_url(log_path).rsplit(':', 1)[1])


def held_by_server(port):
    out = subprocess.run(['ss', '-Htn', 'state', 'established', f'( sport = :{port} )'], capture_output=True,
                         text=True).stdout
    return len(out.splitlines())


def hostile_sockets(port, count, kind):
    """`count` connections that hold the server: 'idle' (one answer, then
    silence) or 'trickle' (a request line started and never finished; see
    trickle()). tests/test_edge.py opens its attackers with this too."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(('127.0.0.1', port), timeout=10)
        sock.sendall(b'GET /nothing HTTP/1.1\r\nHost: test\r\n\r\n' if kind == 'idle' else b'G')
        socks.append(sock)
    return socks


def trickle(socks, stop):
    """One more byte on every open socket every half second, until stop is set."""
    while not stop.wait(0.5):
        for sock in socks:
            try:
                sock.send(b'E')
            except OSError:
                pass


def attack(port, count, kind, tries):
    socks = hostile_sockets(port, count, kind)
    stop = threading.Event()
    if kind == 'trickle':
        threading.Thread(target=trickle, args=(socks, stop), daemon=True).start()
    waits = []
    for _ in range(tries):
        started = time.monotonic()
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        conn.request('GET', '/health')
        conn.getresponse().read()
        conn.close()
        waits.append((time.monotonic() - started) * 1000)
        time.sleep(0.2)
    held = held_by_server(port)
    stop.set()
    for sock in socks:
        sock.close()
    return sorted(waits), held


def main(argv, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                     epilog=__doc__.split('\n\n', 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sockets', type=int, default=1100)
    parser.add_argument('--tries', type=int, default=10)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.sockets + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.sockets + 100), hard))
    database_url = os.environ.get('DATABASE_URL')
    if not database_url:
        from resources import embedded  # noqa: PLC0415

        print('hostile: no DATABASE_URL: starting a throwaway embedded PostgreSQL', file=sys.stderr)
        database_url = embedded.start(tempfile.mkdtemp(prefix='flashsale-hostile-'), delete_on_exit=True)
    for kind in ('idle', 'trickle'):
        proc, port = start_server(database_url, Path(tempfile.gettempdir()) / f'flashsale-hostile-{os.getpid()}.log')
        try:
            waits, held = attack(port, args.sockets, kind, args.tries)
        finally:
            servers.stop(proc)
        print(f'{args.sockets} {kind} sockets: GET /health from a fresh client took '
              f'{", ".join(f"{w:.1f}" for w in waits)} ms (median {waits[len(waits) // 2]:.1f}); '
              f'the server held {held} of those connections')
    return 0
