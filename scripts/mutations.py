"""The mutation check: do the tests catch the bugs that matter?

Each mutation below is one deliberate bug, applied to a scratch copy of the
tree (never to the tree itself). The tests that should catch it run against
that copy; the script prints, per bug, the tests that failed (caught it) or
NOT CAUGHT, and exits 1 if any bug survives.

    .venv/bin/python scripts/mutations.py               # every bug, once
    .venv/bin/python scripts/mutations.py --repeat 10   # each bug's tests 10 times
    .venv/bin/python scripts/mutations.py on_conflict_do_nothing no_unique_constraint --repeat 10
    .venv/bin/python scripts/mutations.py batch_no_stock_guard batch_on_conflict_do_nothing --repeat 10

With --repeat N a bug counts as caught only if it was caught in every one of
the N runs (a race test that catches a bug by chance is not good enough).
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, the text as it is, the text with the bug, the tests to run)
MUTATIONS = {
    'on_conflict_do_nothing': (
        'resources/sql.py',
        "SELECT id, %(user_id)s FROM taken\n",
        "SELECT id, %(user_id)s FROM taken\n        ON CONFLICT DO NOTHING\n",
        ['tests/test_races.py'],
    ),
    'no_stock_guard': (
        'resources/sql.py',
        # The single purchase's guard (the batched statement's is batch_no_stock_guard).
        "           AND remaining_stock > 0\n           AND now() >= start_date AND now() < end_date\n"
        "           AND NOT (SELECT yes FROM bought_before)\n",
        "           AND now() >= start_date AND now() < end_date\n           AND NOT (SELECT yes FROM bought_before)\n",
        ['tests/test_races.py', 'tests/test_purchase.py'],
    ),
    # The batched statement (sql.PURCHASE_BATCH), which sells most units of a crowd:
    # orders for more members than the units the row gave up,
    'batch_no_stock_guard': (
        'resources/sql.py',
        "        SELECT least(wanted.units, sale.remaining_stock) AS units\n",
        "        SELECT wanted.units AS units\n",
        ['tests/test_batching.py::test_purchases_arriving_during_a_statement_go_in_the_next_one_and_the_earliest'
         '_arrivals_win', 'tests/test_batching.py::test_in_a_batch_that_sells_out_a_second_tab_of_a_refused_user_is'
         '_sold_out_too'],
    ),
    # a duplicate committed by another process skipped instead of aborting the
    # batch (its unit stays taken: stock lost),
    'batch_on_conflict_do_nothing': (
        'resources/sql.py',
        "         WHERE fresh.rank <= given.units\n        RETURNING id, user_id, flash_sale_id, created_at\n",
        "         WHERE fresh.rank <= given.units\n        ON CONFLICT DO NOTHING\n"
        "        RETURNING id, user_id, flash_sale_id, created_at\n",
        ['tests/test_batching.py::test_a_racing_duplicate_from_another_process_aborts_the_batch_and_every_member'
         '_settles'],
    ),
    # and a user's second tab in the batch told what the first was ("created").
    'batch_second_tab_answered_created': (
        'resources/sql.py',
        "                WHEN decided.outcome = 'created'     THEN 'already_purchased'\n",
        "",
        ['tests/test_batching.py::test_tabs_of_one_user_in_the_same_and_in_different_batches_make_one_order'],
    ),
    'no_unique_constraint': (
        'schema.sql',
        "    CONSTRAINT orders_one_per_user_per_sale UNIQUE (flash_sale_id, user_id)\n",
        "    CONSTRAINT orders_one_per_user_per_sale CHECK (true)\n",
        ['tests/test_races.py'],
    ),
    'no_stock_check_constraint': (
        'schema.sql',
        "    CONSTRAINT flash_sales_stock_in_range CHECK (remaining_stock BETWEEN 0 AND total_stock)\n",
        "    CONSTRAINT flash_sales_stock_in_range CHECK (true)\n",
        ['tests/test_races.py'],
    ),
    'alg_none_accepted': (
        'resources/credentials.py',
        "options={'require': ['exp', 'iat', 'sub']},",
        "options={'require': ['exp', 'iat', 'sub'], 'verify_signature': False},",
        ['tests/test_abuse.py'],
    ),
    'other_hmac_accepted': (
        'resources/credentials.py',
        "algorithms=['HS256'],",
        "algorithms=['HS256', 'HS384', 'HS512'],",
        ['tests/test_abuse.py'],
    ),
    'admin_check_always_passes': (
        'resources/sales.py',
        "if not current_user(conn, req)['isAdmin']:",
        "if not (current_user(conn, req)['isAdmin'] or True):",
        ['tests/test_abuse.py', 'tests/test_sales.py'],
    ),
    'order_looked_up_without_the_user': (
        'resources/sql.py',
        "     WHERE flash_sale_id = %(sale_id)s AND user_id = %(user_id)s\n'''",
        "     WHERE flash_sale_id = %(sale_id)s\n'''",
        ['tests/test_purchase.py', 'tests/test_abuse.py'],
    ),
    'sold_out_memory_set_on_an_error': (
        'resources/orders.py',
        "        row = self._batches.buy(sale_id, req.context.user_id, req.context.token_generation)\n",
        "        try:\n"
        "            row = self._batches.buy(sale_id, req.context.user_id, req.context.token_generation)\n"
        "        except Exception:\n"
        "            self._sold_out.add(sale_id)\n"
        "            raise\n",
        ['tests/test_races.py', 'tests/test_fast_paths.py'],
    ),
    'poll_cache_never_expires': (
        'resources/cache.py',
        "time.monotonic() - entry[0] < self._ttl",
        "True",
        ['tests/test_fast_paths.py'],
    ),
}

# What a scratch copy leaves out: the environment, git, caches, demo data.
IGNORE = shutil.ignore_patterns('.venv', '.git', '__pycache__', '.pytest_cache', '.hypothesis', '*.egg-info',
                                'data', 'flashsale-data')


def scratch_copy(name, workdir):
    """The tree with one bug in it; returns its path."""
    path, before, after, _ = MUTATIONS[name]
    copy = Path(workdir) / name
    shutil.copytree(ROOT, copy, ignore=IGNORE)
    target = copy / path
    text = target.read_text()
    if text.count(before) != 1:
        raise SystemExit(f'{name}: the text to change is not in {path} exactly once (the code moved on: '
                         'update scripts/mutations.py)')
    target.write_text(text.replace(before, after))
    return copy


def failed_tests(copy, tests, python):
    """Run the tests on the copy; return the ids of those that failed. A test
    that errored (in a fixture: the run itself broke) is no catch: the
    script stops and shows the run."""
    env = {k: v for k, v in os.environ.items() if k not in ('TEST_DATABASE_URL', 'CI')}
    # The copy's own modules first (the interpreter's editable install points at the real tree).
    env['PYTHONPATH'] = str(copy)
    # A temporary directory of the run's own: pytest's default one is shared by
    # every pytest of this user, and a concurrent run's clean-up of the oldest
    # ones deletes an embedded database in use.
    basetemp = tempfile.mkdtemp(prefix='pytest-', dir=copy.parent)
    run = subprocess.run(
        [python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rfE', '--tb=no', f'--basetemp={basetemp}',
         *tests],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600,
    )
    shutil.rmtree(basetemp, ignore_errors=True)
    failed = sorted(set(re.findall(r'^FAILED (\S+)', run.stdout, re.M)))
    if run.returncode not in (0, 1) or re.search(r'^ERROR ', run.stdout, re.M):
        raise SystemExit(f'pytest could not run on the copy (exit {run.returncode}):\n{run.stdout}{run.stderr}')
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', metavar='MUTATION',
                        help=f'which bugs (default: all): {", ".join(MUTATIONS)}')
    parser.add_argument('--repeat', type=int, default=1, help='runs of each bug\'s tests (default 1)')
    parser.add_argument('--tests', nargs='+', help='run these tests (paths or node ids) instead of each bug\'s own')
    args = parser.parse_args(argv)
    names = args.names or list(MUTATIONS)
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        parser.error(f'unknown mutation(s) {", ".join(unknown)}; choose from {", ".join(MUTATIONS)}')
    survivors = []
    with tempfile.TemporaryDirectory(prefix='flashsale-mutations-') as workdir:
        for name in names:
            copy = scratch_copy(name, workdir)
            # The copy must be what runs: check which resources package it imports.
            where = subprocess.run([sys.executable, '-c', 'import resources; print(resources.__file__)'],
                                   cwd=copy, env=dict(os.environ, PYTHONPATH=str(copy)),
                                   capture_output=True, text=True).stdout.strip()
            if not where.startswith(str(copy)):
                raise SystemExit(f'the copy imports resources from {where}, not from {copy}')
            tests = args.tests or MUTATIONS[name][3]
            caught_in, catchers = 0, collections.Counter()
            for _ in range(args.repeat):
                failed = failed_tests(copy, tests, sys.executable)
                caught_in += bool(failed)
                catchers.update(failed)
            runs = f' in {caught_in} of {args.repeat} runs' if args.repeat > 1 else ''
            if caught_in == args.repeat:
                print(f'{name}: caught{runs} by', flush=True)
                for test in sorted(catchers):
                    print(f'    {test}' + (f' ({catchers[test]} of {args.repeat})' if args.repeat > 1 else ''),
                          flush=True)
            else:
                survivors.append(name)
                print(f'{name}: NOT CAUGHT' + (f' (caught only{runs})' if caught_in else '')
                      + f' by {" ".join(tests)}', flush=True)
            shutil.rmtree(copy)
    print(f'{len(names) - len(survivors)} of {len(names)} bugs caught'
          + (f'; surviving: {", ".join(survivors)}' if survivors else ''))
    return 1 if survivors else 0


if __name__ == '__main__':
    sys.exit(main())
