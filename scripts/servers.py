"""The processes under test, for the tests and the load tool alike: a free
port, `flashsale serve` started and waited for, nginx in front of it with the
shipped scripts/nginx.conf, and what those processes cost (CPU, memory) read
from /proc. Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / 'scripts' / 'nginx.conf'
# The addresses scripts/nginx.conf ships with: two app processes and its own.
NGINX_UPSTREAMS = ('127.0.0.1:8001', '127.0.0.1:8002')
NGINX_FRONT = '127.0.0.1:8080'


class StartError(RuntimeError):
    """A process did not start; the message carries its log's tail."""


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def flashsale_command(checkout=ROOT):
    """The command that runs `flashsale` from a checkout: its flashsale.py
    with this interpreter, so a run measures the code beside it (or another
    checkout's, for an A/B), whatever an installed `flashsale` points at."""
    return [sys.executable, str(Path(checkout) / 'flashsale.py')]


def start_serve(env, log_path, timeout=60, command=None, cwd=None, stderr=subprocess.STDOUT):
    """`flashsale serve` as a process with `env`, its output in log_path
    (truncated first; its log lines too, unless `stderr` is another file);
    returns the process once it says it is listening. Raises StartError
    (with the log) if it exits or takes longer."""
    command = command or [sys.executable, '-m', 'flashsale']
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([*command, 'serve'], env=env, stdout=log, stderr=stderr,
                                stdin=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + timeout
    while 'listening on' not in Path(log_path).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise StartError('flashsale serve did not start:\n' + Path(log_path).read_text()[-3000:])
        time.sleep(0.05)
    return proc


def listening_url(log_path):
    """The base URL a `flashsale serve` printed (PORT=0: the port it got)."""
    found = re.search(r'listening on (http://\S+)', Path(log_path).read_text())
    if not found:
        raise StartError(f'no "listening on" line in {log_path}')
    return found.group(1)


def stop(proc, timeout=30):
    """SIGTERM, then SIGKILL after `timeout`: the process' exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def nginx_binary():
    return shutil.which('nginx') or ('/usr/sbin/nginx' if os.path.exists('/usr/sbin/nginx') else None)


def nginx_conf(upstream_ports, front_port, changes=(), conf_path=NGINX_CONF):
    """scripts/nginx.conf (or a variant of it) in front of `upstream_ports`,
    listening on `front_port`. `changes`: more (text, replacement) pairs,
    each of whose text must be in the file exactly once."""
    conf = Path(conf_path).read_text()
    for text, replacement in changes:
        if conf.count(text) != 1:
            raise ValueError(f'{text!r} is not in {conf_path} exactly once')
        conf = conf.replace(text, replacement)
    for shipped, port in zip(NGINX_UPSTREAMS, upstream_ports, strict=True):
        conf = conf.replace(shipped, f'127.0.0.1:{port}')
    return conf.replace(NGINX_FRONT, f'127.0.0.1:{front_port}')


def start_nginx(workdir, upstream_ports, front_port, changes=(), conf_path=NGINX_CONF):
    """nginx with nginx_conf(...) in `workdir` (its cache and temporary
    files there too), in the foreground of its own process; returns it."""
    nginx = nginx_binary()
    if nginx is None:
        raise StartError('nginx is not installed (apt-get install nginx-light)')
    workdir = Path(workdir)
    (workdir / 'nginx.conf').write_text(nginx_conf(upstream_ports, front_port, changes, conf_path))
    (workdir / 'nginx-tmp').mkdir(exist_ok=True)
    # As root, nginx's workers would run as nobody, who cannot write the
    # cache under a private temporary directory.
    globals_ = 'daemon off;' + (' user root;' if os.geteuid() == 0 else '')
    with open(workdir / 'nginx.log', 'w') as log:
        return subprocess.Popen([nginx, '-p', str(workdir), '-c', 'nginx.conf', '-g', globals_], stderr=log)


# --- what the processes cost, from /proc (Linux) ----------------------------------


def _stat_fields(pid):
    return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()


def process_tree(pid):
    """pid and its children (a server's workers, a postmaster's backends)."""
    pids = [pid]
    for proc_dir in Path('/proc').iterdir():
        if proc_dir.name.isdigit():
            try:
                if int(_stat_fields(proc_dir.name)[1]) == pid:
                    pids.append(int(proc_dir.name))
            except (OSError, IndexError):
                continue
    return pids


def cpu_seconds(*pids):
    """User + system CPU seconds of these processes and their children."""
    total = 0
    for pid in pids:
        for one in process_tree(pid):
            try:
                fields = _stat_fields(one)
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf('SC_CLK_TCK')


def memory_mib(pid):
    """{'rss', 'peak_rss'} of the largest process of pid's tree, and 'pss'
    of all of them (shared pages counted once, in proportion), in MiB."""
    rss, peak, pss = [0.0], [0.0], 0.0
    for one in process_tree(pid):
        try:
            for line in Path(f'/proc/{one}/status').read_text().splitlines():
                key, _, rest = line.partition(':')
                if key == 'VmRSS':
                    rss.append(int(rest.split()[0]) / 1024)
                elif key == 'VmHWM':
                    peak.append(int(rest.split()[0]) / 1024)
            for line in Path(f'/proc/{one}/smaps_rollup').read_text().splitlines():
                if line.startswith('Pss:'):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            continue
    return {'rss': round(max(rss), 1), 'peak_rss': round(max(peak), 1), 'pss': round(pss, 1)}
