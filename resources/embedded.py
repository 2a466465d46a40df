"""The embedded PostgreSQL for development: used only when DATABASE_URL is unset.

pgserver ships PostgreSQL 16 binaries in a wheel and runs a private server on a
unix socket inside our data directory (as root it runs it as a system user of
its own, since PostgreSQL refuses to run as root). It is never imported when
DATABASE_URL is set, so production never depends on it.
"""

import json
import os
import secrets
import warnings
from pathlib import Path


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


def jwt_secret(data_dir):
    """The development signing secret: generated once, kept in the data
    directory (mode 0600) so that tokens survive a restart."""
    path = Path(data_dir).resolve() / 'jwt_secret'
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, 'w') as f:
        f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()
