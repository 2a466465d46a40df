"""Applying schema.sql: only when it changed, so that a start or an operator's
command takes no table lock while a backup or a crowd holds the tables; and
when it did change, a bounded wait and one line that says why."""

import hashlib
import re
import signal
import threading

import psycopg
import pytest

from conftest import backends_waiting_on_a_lock
from conftest import call
from conftest import clean_env
from conftest import run_cli
from conftest import serve_env
from conftest import start_serve
from conftest import timed
from conftest import wait_for
from resources import database
from resources import sql


def schema_digest():
    return hashlib.sha256(database.schema_path().read_bytes()).hexdigest()


@pytest.fixture
def backup(database_url):
    """A session in the transaction pg_dump holds for a whole dump:
    REPEATABLE READ, an ACCESS SHARE lock on every table, open until the test
    closes it (or ends)."""
    with psycopg.connect(database_url, autocommit=True) as reader:
        reader.execute('BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY')
        reader.execute('LOCK TABLE users, flash_sales, orders, schema_applied IN ACCESS SHARE MODE')
        reader.execute('SELECT count(*) FROM users')
        yield reader


@pytest.fixture
def changed_schema(db):
    """The database as a release older than this schema.sql left it: its
    recorded digest is another one. Applied for real at the end."""
    db.execute("UPDATE schema_applied SET sha256 = 'the digest of an older schema.sql'")
    yield
    database.apply_schema(db)


def session_generation(db, user_id):
    return db.execute('SELECT token_generation FROM users WHERE id = %s', (user_id,)).fetchone()['token_generation']


def test_serve_starts_and_revoke_sessions_works_while_a_backup_reads_every_table(
        database_url, make_user, make_sale, db, backup, tmp_path):
    victim_id, victim_token = make_user(email='victim@example.com')
    _, buyer_token = make_user()
    sale_id = make_sale(stock=5)
    proc = start_serve(serve_env(database_url, PORT='0', WORKERS='2'), tmp_path / 'serve.log')
    try:
        base_url = re.search(r'listening on (\S+)', (tmp_path / 'serve.log').read_text()).group(1)
        assert call(base_url, 'GET', '/api/me', token=victim_token).status == 200
        result = run_cli('revoke-sessions', 'victim@example.com', env=clean_env(DATABASE_URL=database_url))
        assert result.returncode == 0, result.stderr
        assert 'every session of victim@example.com is ended' in result.stdout
        assert session_generation(db, victim_id) == 1
        status, _, body = call(base_url, 'GET', '/api/me', token=victim_token)
        assert (status, body['code']) == (401, 'session_revoked')
        status, _, body = call(base_url, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=buyer_token)
        assert status == 201, body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    # The backup was never in anyone's way, nor anyone in its.
    assert backup.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


def test_a_schema_change_during_a_backup_waits_the_lock_timeout_and_says_so_in_one_line(
        database_url, make_user, db, changed_schema, backup):
    user_id, _ = make_user(email='victim@example.com')
    env = clean_env(DATABASE_URL=database_url, LOCK_TIMEOUT_MS='300')
    result, took = timed(lambda: run_cli('revoke-sessions', 'victim@example.com', env=env))
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith('flashsale: schema.sql has changed, and applying it waited over 300ms (LOCK_TIMEOUT_MS)')
    assert 'a backup' in line and 'nothing was changed' in line
    assert took < 15  # the interpreter's start and one lock wait, not an unbounded one
    assert session_generation(db, user_id) == 0
    assert sql.value(db, sql.APPLIED_SCHEMA) != schema_digest()

    backup.close()  # the backup ends: the change goes through
    result = run_cli('revoke-sessions', 'victim@example.com', env=env)
    assert result.returncode == 0, result.stderr
    assert session_generation(db, user_id) == 1
    assert sql.value(db, sql.APPLIED_SCHEMA) == schema_digest()


def test_init_db_applies_a_changed_schema_once_and_then_finds_nothing_to_change(database_url, changed_schema):
    env = clean_env(DATABASE_URL=database_url)
    first = run_cli('init-db', env=env)
    assert (first.returncode, first.stdout) == (0, 'schema applied\n'), first.stderr
    again = run_cli('init-db', env=env)
    assert (again.returncode, again.stdout) == (0, 'schema.sql is already applied: nothing to change\n'), again.stderr


def test_a_process_that_waited_for_another_ones_apply_finds_it_done(settings, database_url, db, changed_schema):
    """Two processes applying at once (servers starting together): the
    second waits for the first's advisory lock, then reads the digest the
    first recorded and applies nothing."""
    outcome = []
    with database.connect(settings, database_url) as first, database.connect(settings, database_url) as second:
        with first.transaction():
            first.execute(sql.LOCK_SCHEMA)
            waiter = threading.Thread(target=lambda: outcome.append(database.apply_schema(second)))
            waiter.start()
            wait_for(lambda: backends_waiting_on_a_lock(database_url) == 1, message='the second to wait')
            first.execute(database.schema_path().read_text())
            first.execute(sql.RECORD_SCHEMA, {'sha256': schema_digest()})
        waiter.join(timeout=30)
    assert outcome == [False]
    assert sql.value(db, sql.APPLIED_SCHEMA) == schema_digest()
