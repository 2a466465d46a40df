"""A PostgreSQL cluster of one's own, to stop, start and crash on purpose.

The fault tests (tests/test_faults.py) and scripts/chaos.py take a database
away from a running service and give it back. They must never do that to a
database anyone else uses, so each makes a private cluster here: `initdb` in a
directory of its own, listening on 127.0.0.1 on a port of its own (TCP only),
so that a restarted server is at the same address and the service's pool can
find it again. The binaries are pgserver's (already a dependency, for the
embedded development database).

PostgreSQL refuses to run as root. As root, the cluster runs as the system user
`pgserver`, the same one pgserver itself uses.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

SYSTEM_USER = 'pgserver'


def _binaries():
    spec = importlib.util.find_spec('pgserver')
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('pgserver is not installed (pip install pgserver)')
    return Path(next(iter(spec.submodule_search_locations))) / 'pginstall' / 'bin'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _stat(pid):
    """(state, parent pid) from /proc, or None if there is no such process."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pid):
    # A zombie has exited; in a container nobody may ever reap it.
    stat = _stat(pid)
    return stat is not None and stat[0] != 'Z'


def _children(pid):
    found = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            stat = _stat(entry.name)
            if stat is not None and stat[1] == pid:
                found.append(int(entry.name))
    return found


class PrivatePostgres:
    """PrivatePostgres(directory) -> a stopped, empty cluster; start() it.

    As a context manager it is started on entry, and stopped and deleted on
    exit. `url` stays the same across stop(), start() and crash().
    """

    def __init__(self, directory, port=None):
        self.directory = Path(directory).resolve()
        self.pgdata = self.directory / 'pgdata'
        self.log_file = self.directory / 'postgres.log'
        self.port = port or free_port()
        self.url = f'postgresql://postgres@127.0.0.1:{self.port}/postgres'
        self._bin = _binaries()
        self._user = SYSTEM_USER if os.geteuid() == 0 else None
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._user:
            self._let_system_user_in()
        if not (self.pgdata / 'PG_VERSION').exists():
            self._run('initdb', '-D', self.pgdata, '-U', 'postgres', '--auth=trust', '--encoding=UTF8',
                      '--no-sync')

    def _let_system_user_in(self):
        with warnings.catch_warnings():
            # platformdirs, imported by pgserver, warns that XDG_RUNTIME_DIR is unset.
            warnings.simplefilter('ignore')
            from pgserver.utils import ensure_folder_permissions  # noqa: PLC0415 (root only)
            from pgserver.utils import ensure_prefix_permissions  # noqa: PLC0415
            from pgserver.utils import ensure_user_exists  # noqa: PLC0415

        entry = ensure_user_exists(self._user)
        ensure_prefix_permissions(self.directory)
        ensure_prefix_permissions(self._bin)
        ensure_folder_permissions(self._bin, 0o055)
        ensure_folder_permissions(self._bin.parent / 'lib', 0o044)
        os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    def _run(self, program, *args, timeout=60):
        subprocess.run(
            [str(self._bin / program), *map(str, args)],
            check=True, user=self._user, timeout=timeout,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self, timeout=30, options=''):
        """Start the server and return once it accepts connections. `options`:
        more `-c name=value` settings, after (so over) the defaults here."""
        options = (
            f'-h 127.0.0.1 -p {self.port} -c unix_socket_directories= '
            # Only a process crash is ever simulated here, never a machine's:
            # the operating system keeps what was written, so skipping fsync
            # loses nothing a test could notice and makes each commit cheap.
            '-c fsync=off -c max_connections=100 ' + options
        )
        self._run('pg_ctl', '-D', self.pgdata, '-l', self.log_file, '-o', options, '-w', '-t', timeout, 'start',
                  timeout=timeout + 5)

    def stop(self, mode='fast'):
        """Stop the server. `fast` (what `docker stop` and systemd do) rolls
        back open transactions and tells every client it is going away;
        `immediate` is a crash: every process quits at once and the next start
        runs crash recovery."""
        self._run('pg_ctl', '-D', self.pgdata, '-m', mode, '-w', 'stop')

    def crash(self):
        """SIGKILL the postmaster. Its children notice and quit; the next
        start runs crash recovery."""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        family = [pid, *_children(pid)]
        os.kill(pid, signal.SIGKILL)
        # The next start refuses to run while any backend still holds the
        # old shared memory: wait until they have all gone.
        deadline = time.monotonic() + 10
        while any(map(_alive, family)) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Until someone reaps it, the dead postmaster is a zombie whose PID
        # still exists, and the next postmaster would take its lock file as a
        # sign that it runs. After a real crash the PID is gone.
        if self.pid() == pid:
            (self.pgdata / 'postmaster.pid').unlink()

    def freeze(self):
        """SIGSTOP the server and every backend: connections stay open (the
        kernel keeps answering TCP) but nothing answers on them, the way a
        stalled disk or a paused machine looks from outside. thaw() undoes it."""
        self._frozen = [self.pid(), *_children(self.pid())]
        for pid in self._frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self):
        for pid in getattr(self, '_frozen', ()):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._frozen = []

    def restart(self, mode='fast', down_for=0.0):
        """Stop (`fast`, `immediate`) or crash (`kill`) the server, wait, start
        it again. (`freeze`: freeze it, wait, thaw it.)"""
        if mode == 'freeze':
            self.freeze()
            time.sleep(down_for)
            self.thaw()
            return
        self.stop(mode) if mode != 'kill' else self.crash()
        time.sleep(down_for)
        self.start()

    def pid(self):
        try:
            return int((self.pgdata / 'postmaster.pid').read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self):
        pid = self.pid()
        return pid is not None and _alive(pid)

    def close(self):
        """Stop (if running) and delete the cluster."""
        self.thaw()
        if self.running():
            try:
                self.stop('immediate')
            except subprocess.CalledProcessError:
                self.crash()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc_info):
        self.close()
