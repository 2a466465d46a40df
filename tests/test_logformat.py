"""LOG_FORMAT=json (resources/logformat.py): a real `flashsale serve` writes
one JSON object per line, with the access line's values by name and the id
of the request a line was written for; a traceback stays on its line."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import call
from conftest import clean_env
from conftest import free_port
from conftest import hold_sale_row
from conftest import serve_env
from conftest import start_serve


def json_lines(text):
    """(objects, lines that are not one JSON object)."""
    objects, others = [], []
    for line in text.splitlines():
        try:
            objects.append(json.loads(line))
        except ValueError:
            others.append(line)
    return objects, others


def test_every_line_of_a_json_log_is_an_object_with_its_request_id(database_url, tmp_path, make_sale, make_users):
    port = free_port()
    log_path = tmp_path / 'serve.log'
    # Two workers: each sets up its own logging after the fork.
    proc = start_serve(serve_env(database_url, WORKERS='2', PORT=str(port), LOG_FORMAT='json',
                                 LOCK_TIMEOUT_MS='200'), log_path)
    base = f'http://127.0.0.1:{port}'
    try:
        sale_id = make_sale(stock=5)
        [(_, token)] = make_users(1)
        assert call(base, 'GET', '/health', headers={'X-Request-ID': 'json-health'}).status == 200
        assert call(base, 'GET', '/no/such%0Apath', headers={'X-Request-ID': 'json-404'}).status == 404
        # A purchase waiting on a row held elsewhere past LOCK_TIMEOUT_MS: a
        # warning written while the request runs (psycopg's message runs over
        # several lines), then its access line.
        holder = hold_sale_row(database_url, sale_id)
        try:
            answer = call(base, 'POST', f'/api/flash-sales/{sale_id}/purchase', token=token,
                          headers={'X-Request-ID': 'json-busy'})
        finally:
            holder.close()
        assert (answer.status, answer.json['code']) == (503, 'overloaded')
    finally:
        proc.terminate()  # each process writes out its lines before it exits
        proc.wait(timeout=30)
    assert proc.returncode == 0
    objects, others = json_lines(Path(log_path).read_text())
    # Only the announcement on stdout is not a log line.
    assert len(others) == 1 and others[0].startswith(f'flashsale listening on http://127.0.0.1:{port} '), others
    assert all({'time', 'level', 'logger', 'message', 'request_id'} <= entry.keys() for entry in objects)
    by_id = {}
    for entry in objects:
        by_id.setdefault(entry['request_id'], []).append(entry)
    [health] = by_id['json-health']
    assert {k: health[k] for k in ('level', 'logger', 'method', 'path', 'status')} == {
        'level': 'INFO', 'logger': 'flashsale.access', 'method': 'GET', 'path': '/health', 'status': 200}
    assert health['message'].startswith('GET /health 200 ') and health['message'].endswith('ms id=json-health')
    assert isinstance(health['duration_ms'], float)
    [missing] = by_id['json-404']
    assert (missing['path'], missing['status']) == ('/no/such\\x0apath', 404)  # escaped, as in the text format
    warning, access = by_id['json-busy']
    assert (warning['level'], warning['logger']) == ('WARNING', 'flashsale')
    assert warning['message'].startswith('overloaded: LockNotAvailable')
    assert (access['status'], access['path']) == (503, f'/api/flash-sales/{sale_id}/purchase')
    # Start-up and shutdown lines belong to no request.
    assert any(entry['message'].startswith('SIGTERM: stopping') and entry['request_id'] is None for entry in objects)


def test_a_traceback_is_one_line_of_a_json_log():
    """The logging `flashsale` sets up, in a process of its own."""
    script = (
        'import logging, flashsale\n'
        "flashsale._configure_logging('INFO', log_format='json')\n"
        'try:\n'
        "    {}['missing']\n"
        'except KeyError:\n'
        "    logging.getLogger('flashsale').exception('it failed')\n"
        "logging.getLogger('flashsale').warning('after it')\n"
    )
    result = subprocess.run([sys.executable, '-c', script], env=clean_env(), capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    objects, others = json_lines(result.stderr)
    assert others == []
    failed, after = objects
    assert (failed['level'], failed['message'], failed['request_id']) == ('ERROR', 'it failed', None)
    assert failed['exception'].startswith('Traceback (most recent call last):\n')
    assert failed['exception'].endswith("KeyError: 'missing'")
    assert after['message'] == 'after it'
