"""scripts/ as a whole: every module imports, none imports the tests, their
imports form no cycle, the one entry point knows every command, and its
`check` and `bench` commands work against the real server and database."""

import ast
import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import servers

from conftest import sale_state

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / 'scripts').glob('*.py'))
TESTS = {p.stem for p in (ROOT / 'tests').glob('*.py')}


def imported(path):
    """The top-level names of every module `path` imports (anywhere in it)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split('.')[0])
    return names


def test_every_script_module_imports():
    for path in SCRIPTS:
        importlib.import_module(path.stem)


def test_no_script_imports_the_tests_and_no_import_cycle():
    modules = {p.stem for p in SCRIPTS}
    graph = {p.stem: imported(p) & modules for p in SCRIPTS}
    for path in SCRIPTS:
        assert not imported(path) & TESTS, f'{path.name} imports {imported(path) & TESTS} from tests/'

    def visit(module, trail):
        assert module not in trail, 'import cycle: ' + ' -> '.join([*trail, module])
        for dep in sorted(graph[module]):
            visit(dep, [*trail, module])

    for module in sorted(graph):
        visit(module, [])


def load(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / 'scripts' / 'load.py'), *args], capture_output=True,
                          text=True, timeout=kwargs.pop('timeout', 60), **kwargs)


def test_the_entry_point_lists_and_runs_every_command():
    import load as entry  # noqa: PLC0415

    listing = load('--help')
    assert listing.returncode == 0
    for command in entry.COMMANDS:
        assert f'  {command} ' in listing.stdout, f'load.py --help does not list {command}'
        assert load(command, '--help').returncode == 0, command
    assert load('no-such-command').returncode == 2


def test_check_passes_a_sale_that_holds_and_fails_one_that_does_not(db, database_url, make_sale, make_users):
    sale_id = make_sale(stock=3)
    (first, _), (second, _) = make_users(2)
    for user in (first, second):
        db.execute('INSERT INTO orders (user_id, flash_sale_id) VALUES (%s, %s)', (user, sale_id))
    db.execute('UPDATE flash_sales SET remaining_stock = 1 WHERE id = %s', (sale_id,))
    held = load('check', '--sale', str(sale_id), '--database-url', database_url, '--created', '2')
    assert held.returncode == 0, held.stdout + held.stderr
    assert 'all invariants hold' in held.stdout
    # wrk stops with answers unread: an order may have no 201, never the other way round.
    assert load('check', '--sale', str(sale_id), '--database-url', database_url, '--created', '1',
                '--in-flight', '1').returncode == 0
    short = load('check', '--sale', str(sale_id), '--database-url', database_url, '--created', '1')
    assert short.returncode == 1 and "[FAIL] the orders are the tool's 201s" in short.stdout
    db.execute('UPDATE flash_sales SET remaining_stock = 2 WHERE id = %s', (sale_id,))
    leaked = load('check', '--sale', str(sale_id), '--database-url', database_url)
    assert leaked.returncode == 1 and '[FAIL] stock conserved' in leaked.stdout
    assert sale_state(db, sale_id) == (3, 2, 2)


def test_bench_writes_a_report_that_says_where_and_how_its_figures_were_made(database_url, tmp_path):
    """A short bench (the Python client, no wrk: CI has no wrk): the report's
    header, a row per run and server shape, every check passed."""
    if servers.nginx_binary() is None:
        if os.environ.get('CI'):
            pytest.fail('nginx is missing in CI (.ci/run installs it)')
        pytest.skip('nginx is not installed (apt-get install nginx-light)')
    report = tmp_path / 'bench.json'
    markdown = tmp_path / 'bench.md'
    args = ['bench', '--database-url', database_url, '--runs', 'purchases,crowd', '--client', 'python',
            '--behind', 'plain,nginx', '--users', '60', '--connections', '8', '--crowd-rate', '100',
            '--crowd-seconds', '1', '--crowd-users', '20', '--crowd-stock', '5',
            '--json', str(report), '--markdown', str(markdown)]
    done = load(*args, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    header = result['header']
    assert header['commit'].split()[0] == subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                                                         capture_output=True, text=True).stdout.strip()
    assert header['cores'] >= 1 and 'the Python client' in header['client']
    # The command, as it re-runs the bench.
    assert shlex.split(header['command'])[1:] == ['scripts/load.py', *args]
    rows = [(r['run'], r['behind']) for r in result['rows']]
    assert rows == [('purchases', 'plain'), ('purchases', 'nginx'), ('crowd', 'plain'), ('crowd', 'nginx')]
    assert all(r['ok'] for r in result['rows']), result['rows']
    assert all(r['rate'] > 0 for r in result['rows'])
    text = markdown.read_text()
    for field in ('- date: ', '- commit: ', '- cores: ', '- client: ', '```sh\n'):
        assert field in text, field
