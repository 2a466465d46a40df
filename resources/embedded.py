"""The embedded PostgreSQL for development: used only when DATABASE_URL is unset.

pgserver ships PostgreSQL 16 binaries in a wheel and runs a private server on a
unix socket inside our data directory (as root it runs it as a system user of
its own, since PostgreSQL refuses to run as root). It is never imported when
DATABASE_URL is set, so production never depends on it.
"""

import fcntl
import json
import logging
import os
import secrets
import warnings
from pathlib import Path

log = logging.getLogger('flashsale')


def _prune_dead_handles(pgdata):
    """pgserver counts the processes using a server in .handle_pids.json and
    stops the server when the last one exits. A process killed with SIGKILL
    never removes its PID, and the server would then never be stopped again:
    forget the PIDs of processes that no longer exist before we join."""
    handles = pgdata / '.handle_pids.json'
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if _process_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(data_dir, *, delete_on_exit=False):
    """Start (or join) the embedded server in data_dir/pgdata and return its
    connection URL. It stops when the last process using it exits."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (it is, under root
        # and in CI) and falls back to /tmp, which is what we want anyway.
        warnings.simplefilter('ignore')
        import pgserver  # noqa: PLC0415 (development only; see the module docstring)

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / 'pgdata'
    _prune_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode='delete' if delete_on_exit else 'stop')
    return server.get_uri()


def jwt_secret(data_dir, min_bytes):
    """The development signing secret: generated once, kept in the data
    directory (mode 0600) so that tokens survive a restart.

    One that is unusable (empty, blank or under `min_bytes`: a crash or a
    full disk while it was written, an edit) is replaced, and the
    replacement said in the log, rather than refused: it is ours alone, and
    it can have signed no token worth keeping (a server with it answered 500
    to every login). A new one is written to a file beside it, synced, then
    renamed over it, so that a crash leaves the old file or the new one,
    never half of one; processes starting at once take turns (a lock file),
    so they keep one secret. OSError if the directory cannot be written."""
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / 'jwt_secret'
    with open(directory / 'jwt_secret.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            secret = path.read_text().strip()
        except FileNotFoundError:
            secret = None
        if secret is not None and len(secret.encode()) >= min_bytes:
            return secret
        new = secrets.token_urlsafe(48)
        written = directory / 'jwt_secret.new'
        with open(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'w') as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(written, path)
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # the rename itself survives a crash
        finally:
            os.close(directory_fd)
    if secret is not None:
        log.warning('%s was unusable (%s): replaced with a new secret; tokens signed with the old one fail',
                    path, 'empty' if not secret else f'{len(secret.encode())} bytes, under {min_bytes}')
    return new
