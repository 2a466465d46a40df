"""The documents (README.md and docs/*.md) against the tree they describe.

Every code fence says what it holds by its info string:

- ```bash: commands run as printed, against the real server and database
  (the README's curl walk-through, and what a docs page means to be run);
- ```sh: commands for the reader to type, checked here without running them:
  the program exists, its subcommand and every --option it is given are in
  its --help, every path it names exists, every VAR= it sets is read
  somewhere in the code;
- anything else (text, sql, json, nginx, ...): not a command.

An indented code block would be neither, so there is one: the test command
after `<!-- test-command -->`, which .ci/run reads as the line after the
marker (and which is checked like ```sh).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flashsale
from private_postgres import server_version

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCUMENTS = [README, *sorted((ROOT / 'docs').glob('*.md'))]
TEST_COMMAND_MARKER = '<!-- test-command -->'

FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```\s*$', re.S | re.M)


def fences(path, kind=None):
    """(info string, body) of every fenced block of a document."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(path.read_text())
            if kind is None or m.group(1).strip() == kind]


def prose(path):
    """The document without its fenced blocks."""
    return FENCE.sub('', path.read_text())


def relative(path):
    return path.relative_to(ROOT).as_posix()


# --- ```bash: run as printed ---------------------------------------------------------------


def as_run_here(script, base_url):
    # The documents run commands from the quick start's virtual environment;
    # here they are this interpreter's.
    script = script.replace('BASE=http://127.0.0.1:8000', f'BASE={base_url}')
    script = re.sub(r'(?<![\w/])\.venv/bin/flashsale\b', f'{sys.executable} -m flashsale', script)
    return re.sub(r'(?<![\w/])\.venv/bin/python\b', sys.executable, script)


def run_bash(script, database_url):
    if shutil.which('curl') is None:
        if os.environ.get('CI'):
            pytest.fail('curl is missing in CI (.ci/run installs it)')
        pytest.skip('curl is not installed (apt-get install curl)')
    env = dict(os.environ, DATABASE_URL=database_url, JWT_SECRET='s' * 40)
    return subprocess.run(['bash', '-euo', 'pipefail', '-c', script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_readme_curl_examples_work(live_server, database_url, make_sale, db):
    make_sale(name='Demo sale', stock=50)
    (script,) = [body for _, body in fences(README, 'bash')]
    result = run_bash(as_run_here(script, live_server), database_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"status":"ok"' in out
    assert out.count('"order":{') == 2  # the purchase, then "my order"
    assert '"code":"already_purchased"' in out
    assert '"name":"Winter boots"' in out
    assert db.execute("SELECT is_admin FROM users WHERE email = 'me@example.com'").fetchone()['is_admin']


DOCS_BASH = [(path, n, body) for path in DOCUMENTS[1:] for n, (_, body) in enumerate(fences(path, 'bash'))]


@pytest.mark.parametrize(('path', 'n', 'script'), DOCS_BASH,
                         ids=[f'{relative(p)}#{n}' for p, n, _ in DOCS_BASH])
def test_docs_commands_meant_to_be_run_run(path, n, script, live_server, database_url):
    result = run_bash(as_run_here(script, live_server), database_url)
    assert result.returncode == 0, f'{relative(path)}, block {n}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'


# --- ```sh and the test command: checked against what they name ------------------------------

SHELL_OPERATORS = {'&&', '||', '|', ';', '&'}
# Programs from outside the tree: only the paths they are given are checked.
EXTERNAL = {'python3', 'nginx', 'mkdir', 'curl', 'docker', 'apt-get', 'npm', 'wrk', 'git', 'tar', 'k6'}


def commands(text):
    """The simple commands of a shell text, each a list of words."""
    text = text.replace('\\\n', ' ')
    found = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = '#'
        words = []
        for word in lexer:
            if word in SHELL_OPERATORS:
                found.append(words)
                words = []
            else:
                words.append(word)
        found.append(words)
    return [words for words in found if words]


def the_test_command():
    lines = README.read_text().splitlines()
    return lines[lines.index(TEST_COMMAND_MARKER) + 1].strip()


SH_COMMANDS = [(path, words) for path in DOCUMENTS for _, body in fences(path, 'sh') for words in commands(body)]
SH_COMMANDS += [(README, words) for words in commands(the_test_command())]


def names_read_in_code():
    text = ''.join(p.read_text() for p in [ROOT / 'flashsale.py', *ROOT.glob('scripts/*.py'),
                                           *ROOT.glob('tests/*.py'), *ROOT.glob('resources/*.py')])
    return set(re.findall(r"""['"]([A-Z][A-Z0-9_]+)['"]""", text)) | {v.name for v in flashsale.VARIABLES}


def help_text(argv):
    result = subprocess.run([*argv, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f'{shlex.join(argv)} --help: {result.stderr[-2000:]}'
    return result.stdout


# Options whose value is a file the command writes: it need not exist yet.
OUTPUT_OPTIONS = {'--markdown', '--json', '--html'}


def check_paths(words):
    for before, word in zip([None, *words], words):
        if before in OUTPUT_OPTIONS:
            continue
        if '/' in word and not word.startswith(('-', '$', '/')) and '://' not in word and '=' not in word:
            assert (ROOT / word.strip("'\"")).exists(), f'{word} does not exist'


@pytest.mark.parametrize(('path', 'words'), SH_COMMANDS,
                         ids=[f'{relative(p)}: {shlex.join(w)[:60]}' for p, w in SH_COMMANDS])
def test_commands_name_what_exists(path, words):
    settings = []
    while words and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', words[0]):
        settings.append(words.pop(0).split('=', 1)[0])
    program, args = words[0], words[1:]
    if program not in EXTERNAL:  # (another program's variables are its own business)
        known = names_read_in_code()
        for name in settings:
            assert name in known, f'{relative(path)} sets {name}, which nothing reads'
    options = [w.split('=', 1)[0] for w in args if w.startswith('--')]
    if program == '.venv/bin/flashsale':
        argv = [sys.executable, '-m', 'flashsale', *args[:1]]
    elif program in ('.venv/bin/python', 'python3') and args[:1] and args[0].endswith('.py'):
        argv = [sys.executable, *[a for a in args if not a.startswith('-')][:2]]
        if not (ROOT / args[0]).exists():
            pytest.fail(f'{relative(path)}: {args[0]} does not exist')
        # Only a subcommand, never a positional value, goes before --help.
        if len(argv) == 3 and not re.fullmatch(r'[a-z][a-z-]*', argv[2]):
            argv.pop()
    elif program == '.venv/bin/python' and args[:2] == ['-m', 'pytest']:
        check_paths(args[2:])
        return
    elif program == '.venv/bin/pip' and args[:1] == ['install']:
        assert set(options) <= {'--prefix'}, options
        return
    elif program in EXTERNAL:
        check_paths(args)
        return
    else:
        pytest.fail(f'{relative(path)}: a command this test does not know: {shlex.join(words)}')
    shown = help_text(argv)
    for option in options:
        assert re.search(rf'(^|[\s,\[]){re.escape(option)}\b', shown), \
            f'{relative(path)}: {shlex.join(argv[1:])} has no option {option}'
    check_paths(args[1:])


def test_every_code_block_says_what_it_holds():
    for path in DOCUMENTS:
        assert all(info for info, _ in fences(path)), f'{relative(path)}: a ``` fence without an info string'
        lines = prose(path).splitlines()
        for i, line in enumerate(lines[1:], 1):
            if line.startswith('    ') and lines[i - 1].strip() in ('', TEST_COMMAND_MARKER):
                assert path == README and lines[i - 1] == TEST_COMMAND_MARKER, \
                    f'{relative(path)}: an indented code block ({line.strip()[:60]}); fence it with an info string'


# --- links ------------------------------------------------------------------------------------

LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
URL = re.compile(r'\bhttps?://[^\s)`\'">]+')


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r'[`*]', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path):
    return {slug(m.group(1)) for m in re.finditer(r'^#+\s+(.*)$', prose(path), re.M)}


def test_no_link_leaves_the_repository_and_every_link_resolves():
    for path in DOCUMENTS:
        for url in URL.findall(path.read_text()):
            assert re.match(r'https?://(127\.0\.0\.1|localhost)[:/]', url), \
                f'{relative(path)} links out of the repository: {url}'
        for target in LINK.findall(prose(path)):
            where, _, fragment = target.partition('#')
            assert '://' not in where, f'{relative(path)}: {target} leaves the repository'
            resolved = (path.parent / where).resolve() if where else path
            assert resolved == ROOT or ROOT in resolved.parents, f'{relative(path)}: {target} leaves the repository'
            assert resolved.exists(), f'{relative(path)}: {target} does not exist'
            if fragment:
                assert resolved.suffix == '.md' and fragment in anchors(resolved), \
                    f'{relative(path)}: no heading for #{fragment} in {relative(resolved)}'


def test_every_path_named_exists():
    for path in DOCUMENTS:
        for named in re.findall(r'`((?:scripts|tests|resources|docs)/[\w./-]*)', path.read_text()):
            assert (ROOT / named).exists(), f'{relative(path)} names {named}, which does not exist'


def test_every_setting_has_one_row_in_the_readme():
    rows = re.findall(r'^\| `([A-Z][A-Z0-9_]+)` \|', README.read_text(), re.M)
    assert sorted(rows) == sorted(v.name for v in flashsale.VARIABLES)


def test_every_benchmark_figure_carries_the_header_of_the_report_it_came_from():
    """A table of figures in docs/benchmarks.md is a report of `scripts/load.py
    bench`, pasted whole: the date, the commit, the cores, the client and the
    command that re-runs it come before it."""
    text = (ROOT / 'docs' / 'benchmarks.md').read_text()
    figures = text[text.index('\n## Figures\n'):]
    before = ''
    for block in re.split(r'((?:^\|.*\n)+)', figures, flags=re.M):
        if block.startswith('|'):
            for field in ('- date: ', '- commit: ', '- cores: ', '- client: ', '```sh\n.venv/bin/python scripts/load.py bench'):
                assert field in before, f'a table in docs/benchmarks.md has no {field.strip()!r} before it'
            assert '(with uncommitted changes)' not in before, 'a figure from a tree that is no commit'
            before = ''
        else:
            before += block


def test_docker_compose_is_the_postgresql_the_documents_and_tests_use():
    """No Docker here: what can be checked is that the compose file's
    PostgreSQL is the major version the tests run on, and that the
    DATABASE_URL its comment gives is its user, password, database and port."""
    text = (ROOT / 'docker-compose.yml').read_text()
    assert re.findall(r'^\s*image: postgres:(\d+)$', text, re.M) == [server_version().split('.')[0]]
    env = dict(re.findall(r'^\s+(POSTGRES_\w+): (\S+)$', text, re.M))
    (host_port,) = re.findall(r'"127\.0\.0\.1:(\d+):5432"', text)
    (url,) = re.findall(r'export DATABASE_URL=(\S+)', text)
    assert url == (f'postgresql://{env["POSTGRES_USER"]}:{env["POSTGRES_PASSWORD"]}@127.0.0.1:{host_port}/'
                   f'{env["POSTGRES_DB"]}')
    assert not re.search(r'^#\s+(services|volumes|image):', text, re.M), 'configuration in comments is untested'
