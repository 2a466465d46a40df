"""Run tests/test_waitress_contract.py against another waitress than the one
installed, to see what an upgrade would break in resources/serving.py:

  # waitress' development branch, from a clone (or the fetched mirror)
  python scripts/waitress_contract.py --git /path/to/waitress/.git --ref main
  # a source tree: the directory holding waitress/ (a checkout's src/)
  python scripts/waitress_contract.py --source /path/to/waitress/src
  # the installed waitress, with identifiers renamed in a copy (FILE:OLD:NEW,
  # every whole-word OLD in waitress/FILE, so waitress itself still works)
  python scripts/waitress_contract.py --rename channel.py:total_outbufs_len:outbufs_len

The copy goes to a temporary directory, put first on PYTHONPATH; nothing is
installed or changed. Arguments after `--` go to pytest. Prints the test's
report; the exit status is pytest's (1: the contract is broken).
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = 'tests/test_waitress_contract.py'


def _copy(args, into):
    """The directory holding the waitress package to test, under `into`."""
    if args.git:
        archive = subprocess.run(['git', '--git-dir', args.git, 'archive', args.ref], check=True,
                                 capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', str(into)], input=archive, check=True)
        return into / 'src' if (into / 'src' / 'waitress').is_dir() else into
    source = Path(args.source) if args.source else Path(importlib.util.find_spec('waitress').origin).parent.parent
    shutil.copytree(source / 'waitress', into / 'waitress', ignore=shutil.ignore_patterns('__pycache__'))
    return into


def _rename(package, rename):
    path_name, old, new = rename.split(':')
    path = package / path_name
    text = path.read_text()
    changed, count = re.subn(rf'\b{re.escape(old)}\b', new, text)
    if not count:
        sys.exit(f'{old!r} is not in {path}')
    path.write_text(changed)
    print(f'renamed {old} to {new} in waitress/{path_name} ({count} places)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--git', help="a waitress repository's git directory")
    where.add_argument('--source', help='a directory holding the waitress package')
    parser.add_argument('--ref', default='HEAD', help='with --git: the commit or branch (default HEAD)')
    parser.add_argument('--rename', action='append', default=[], metavar='FILE:OLD:NEW')
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != '--']
    with tempfile.TemporaryDirectory(prefix='waitress-contract-') as scratch:
        path = _copy(args, Path(scratch))
        for rename in args.rename:
            _rename(path / 'waitress', rename)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(path), os.environ.get('PYTHONPATH')])))
        where = subprocess.run([sys.executable, '-c', 'import waitress; print(waitress.__file__)'],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(scratch):
            sys.exit(f'the copy is not the waitress imported: {where}')
        print(f'waitress under test: {where}', flush=True)
        return subprocess.run([sys.executable, '-m', 'pytest', TEST, '-n', '0', '-q', '-p', 'no:cacheprovider',
                               *pytest_args], cwd=ROOT, env=env).returncode


if __name__ == '__main__':
    sys.exit(main())
