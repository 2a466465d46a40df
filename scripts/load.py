#!/usr/bin/env python3
"""flashsale's load tool: load tests, benchmarks and checks of a sale.

    python scripts/load.py COMMAND --help

Load tests against a running server (it prepares its own users and sale
through the API, runs the load, reads the outcome back and checks the
invariants; start the server with BCRYPT_ROUNDS=4 and
RATE_LIMIT_EXEMPT=127.0.0.1,::1):

  crowd        100 users, stock 50, 1,000 purchases/s for 4 s (--start-delay:
               the sale opens during the run)
  single-user  one user hammering one sale: exactly one order
  throughput   thousands of distinct users, stock that never runs out
  sold-out     everyone refused
  watchers     the crowd while thousands of pages poll the sale
  opening      people who are not logged in arrive at the opening: each logs
               in, registers or renews a token, then buys

With servers of its own:

  bench        the benchmark: servers (--server waitress,granian), plain and
               behind nginx, wrk, Artillery or the Python client; a report
               with the date, commit, cores, command and client
  chaos        a purchase storm while the database or the server is restarted,
               killed, frozen or failed over; then the invariants
  hostile      how long a fresh client waits while hostile sockets hold the
               server

After any other tool (k6, Artillery, locust, wrk):

  check        a sale's invariants, from the database

Exit status: 0 when every check passed, 1 when one failed, 2 when one could not
be decided, 3 when the run could not be prepared.
"""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The app's own modules (resources/, flashsale.py), for a checkout without an install.
sys.path.insert(1, str(ROOT))

SCENARIOS = ('crowd', 'single-user', 'throughput', 'sold-out', 'watchers')
# command -> (module, its main's name); every main takes (argv, prog).
COMMANDS = {
    **{name: ('scenarios', 'main') for name in SCENARIOS},
    'opening': ('opening', 'main'),
    'bench': ('bench', 'main'),
    'chaos': ('chaos', 'main'),
    'hostile': ('hostile_clients', 'main'),
    'check': ('invariants', 'main'),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if sys.version_info < (3, 11):
        sys.exit('load.py needs Python 3.11 or newer (asyncio.timeout)')
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    command, rest = argv[0], argv[1:]
    # Only the command's module is imported: the load tests need the standard
    # library alone, the rest psycopg and the app.
    module_name, function = COMMANDS[command]
    run = getattr(importlib.import_module(module_name), function)
    prog = f'load.py {command}'
    if module_name == 'scenarios':
        return run(rest, command, prog)
    return run(rest, prog)


if __name__ == '__main__':
    sys.exit(main())
