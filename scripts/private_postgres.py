"""A PostgreSQL cluster of one's own, to stop, start and crash on purpose.

The fault tests (tests/test_faults.py) and the load tool's chaos run take a database
away from a running service and give it back. They must never do that to a
database anyone else uses, so each makes a private cluster here: `initdb` in a
directory of its own, listening on 127.0.0.1 on a port of its own (TCP only),
so that a restarted server is at the same address and the service's pool can
find it again. The binaries are pgserver's (already a dependency, for the
embedded development database).

A cluster can also get a streaming standby of its own (`add_standby`: a
pg_basebackup of the running primary, synchronous or not), which can be paused
(its walsenders stopped), promoted, and an old primary rewound to follow the
new one (`rejoin_as_standby_of`): what tests/test_failover.py and the chaos
run's db:failover need to lose a primary on purpose.

PostgreSQL refuses to run as root. As root, the cluster runs as the system user
`pgserver`, the same one pgserver itself uses.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

from servers import free_port

SYSTEM_USER = 'pgserver'


def _binaries():
    spec = importlib.util.find_spec('pgserver')
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('pgserver is not installed (pip install pgserver)')
    return Path(next(iter(spec.submodule_search_locations))) / 'pginstall' / 'bin'


def server_version():
    """The clusters' PostgreSQL version, as `postgres --version` says it (e.g. 16.2)."""
    out = subprocess.run([str(_binaries() / 'postgres'), '--version'], capture_output=True, text=True).stdout
    return out.split()[-1] if out else '?'


class CommandFailed(subprocess.CalledProcessError):
    """A PostgreSQL program failed; its message says why."""

    def __str__(self):
        return f'{super().__str__()}\n{(self.stderr or "")[-2000:]}'


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

    def __init__(self, directory, port=None, initdb=True):
        self.directory = Path(directory).resolve()
        self.pgdata = self.directory / 'pgdata'
        self.log_file = self.directory / 'postgres.log'
        self.port = port or free_port()
        self.name = None  # a standby's application_name
        self.url = f'postgresql://postgres@127.0.0.1:{self.port}/postgres'
        self._bin = _binaries()
        self._user = SYSTEM_USER if os.geteuid() == 0 else None
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._user:
            self._let_system_user_in()
        if initdb and not (self.pgdata / 'PG_VERSION').exists():
            self._run('initdb', '-D', self.pgdata, '-U', 'postgres', '--auth=trust', '--encoding=UTF8',
                      '--no-sync')
            with open(self.pgdata / 'postgresql.conf', 'a') as conf:
                # pg_rewind (an old primary rejoining as a standby) needs every
                # page change logged, and the old primary's WAL back to the
                # checkpoint before the two diverged; it reads the settings
                # from this file, not from the command line.
                conf.write('wal_log_hints = on\nwal_keep_size = 64MB\n')

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
        done = subprocess.run(
            [str(self._bin / program), *map(str, args)],
            user=self._user, timeout=timeout,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        if done.returncode:
            raise CommandFailed(done.returncode, done.args, stderr=done.stdout)

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
        self._wait_gone(pid, family)

    def _wait_gone(self, pid, family):
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

    def clone(self, directory):
        """A stopped copy of this stopped cluster in `directory`, on a port of
        its own: a cluster for each test without an initdb for each."""
        copy = PrivatePostgres(directory, initdb=False)
        subprocess.run(['cp', '-a', str(self.pgdata), str(copy.pgdata)], check=True, timeout=60)
        return copy

    # --- replication ---------------------------------------------------------

    def connect(self):
        import psycopg  # noqa: PLC0415 (test support; the module itself needs only the binaries)

        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def query(self, statement, params=None):
        """The first column of the first row of one statement (None if it
        returns none), on a new connection."""
        with self.connect() as conn:
            cur = conn.execute(statement, params)
            row = cur.fetchone() if cur.description else None
        return None if row is None else row[0]

    def add_standby(self, directory, synchronous=True, name='standby', timeout=30):
        """A streaming standby of this (running) primary, started, and
        returned once it streams: a pg_basebackup of this cluster into
        `directory`, following it as `name`. Synchronous: this primary's
        commits wait until the standby has the commit record on disk
        (synchronous_commit=on, the default), so a commit it acknowledges
        survives losing the primary. Asynchronous: commits do not wait."""
        standby = PrivatePostgres(directory, initdb=False)
        standby.name = name
        # -R writes standby.signal and a primary_conninfo with the connection
        # used, application_name included: the name synchronous_standby_names
        # refers to.
        self._run('pg_basebackup', '-D', standby.pgdata, '-R', '-X', 'stream', '-c', 'fast', '--no-sync',
                  '-d', f'host=127.0.0.1 port={self.port} user=postgres application_name={name}',
                  timeout=timeout)
        standby.start()
        self.set_synchronous(standby if synchronous else None, timeout=timeout)
        return standby

    def set_synchronous(self, standby, timeout=30):
        """Make `standby` this primary's synchronous standby (None: every
        standby asynchronous), and return once pg_stat_replication says so."""
        names = standby.name if standby else ''
        with self.connect() as conn:
            conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
            conn.execute('SELECT pg_reload_conf()')
        wanted = 'sync' if standby else 'async'
        self.wait_for(
            "SELECT count(*) > 0 FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = %s",
            (wanted,), timeout=timeout, what=f'an {wanted} standby streaming')

    def wait_for(self, statement, params=(), timeout=30, what='a state'):
        """Poll a boolean query on this server until it is true."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.query(statement, params):
                    return
            except Exception:  # noqa: BLE001 (a server still starting up answers with errors)
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f'{self.directory}: timed out waiting for {what}')
            time.sleep(0.02)

    def in_recovery(self):
        return self.query('SELECT pg_is_in_recovery()')

    def promote(self, timeout=30):
        """Make this standby a primary; return once it takes writes."""
        self._run('pg_ctl', '-D', self.pgdata, '-w', '-t', timeout, 'promote', timeout=timeout + 5)
        self.wait_for('SELECT NOT pg_is_in_recovery()', timeout=timeout, what='the promotion')

    def pause_replication(self):
        """SIGSTOP this primary's walsenders: from now on its standbys
        receive nothing (a broken link), until resume_replication(). (Not
        the standby's walreceiver: what the walsender has already sent waits
        in the receiver's socket buffer, and would still arrive after a
        SIGCONT, even after this primary is killed.)"""
        with self.connect() as conn:
            self._paused = [row[0] for row in conn.execute('SELECT pid FROM pg_stat_replication')]
        if not self._paused:
            raise RuntimeError('no walsender: this server has no streaming standby')
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume_replication(self):
        for pid in getattr(self, '_paused', None) or ():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._paused = []

    def kill(self):
        """SIGKILL every process of this cluster at once: the machine is gone,
        nothing more is sent or written by any of them. (crash() kills only
        the postmaster, whose children then quit by themselves.)"""
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        # Stopped first, all of them, so that none runs on (a walsender
        # sending more WAL, the postmaster forking) while the others die.
        family = [pid, *_children(pid)]
        for signum in (signal.SIGSTOP, signal.SIGKILL):
            for one in family:
                try:
                    os.kill(one, signum)
                except ProcessLookupError:
                    pass
        self._wait_gone(pid, family)

    def rejoin_as_standby_of(self, primary, name='old-primary', timeout=60):
        """This stopped (or killed) old primary, rewound with pg_rewind to
        where `primary` (its promoted standby) took over, started as that
        one's standby: a read-only server, which must never take a write."""
        self.name = name
        self._run('pg_rewind', '-D', self.pgdata, '--no-sync',
                  f'--source-server=host=127.0.0.1 port={primary.port} user=postgres', '-R', timeout=timeout)
        with open(self.pgdata / 'postgresql.auto.conf', 'a') as conf:
            # Appended: the last setting of a name wins. Its own name, for pg_stat_replication.
            conf.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                       f"application_name={name}'\n")
        self.start()
        primary.wait_for("SELECT count(*) > 0 FROM pg_stat_replication WHERE application_name = %s "
                         "AND state = 'streaming'", (name,), timeout=timeout, what=f'{name} streaming')

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
        self.resume_replication()
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
