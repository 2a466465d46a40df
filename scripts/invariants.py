"""What must hold for a sale after any storm of purchases, checked in one place.

The load tool's scenarios check what they read back through the API, its chaos
run and the tests what is in the database, and `scripts/load.py check` a sale
after any other tool; all describe the outcome the same way and get the same
checks:

- a SaleState (total, remaining, orders) and the orders by user;
- the answers the clients received, as Answer(user, kind, order): kind is
  'created' for a 201, else the answer's code ('sold_out', ...), or a kind in
  UNKNOWN when the client cannot know whether it bought.

Each Check's ok is True, False, or None when the answers cannot decide it.
Standard library only (the scenarios need no more); read_sale() takes a
psycopg connection its caller opened.
"""

from __future__ import annotations

import collections
from typing import Hashable
from typing import NamedTuple

# Answers after which the purchase may or may not have happened: the server
# said so (503 outcome_unknown), or no answer came at all.
UNKNOWN = frozenset({'outcome_unknown', 'no_answer', 'timeout', 'error'})


class SaleState(NamedTuple):
    total: int
    remaining: int
    orders: int


class Answer(NamedTuple):
    user: Hashable
    kind: str
    order: str | None = None  # the order id a 201 carried


class Check(NamedTuple):
    name: str
    ok: bool | None
    detail: str


SALE_ORDERS = (
    'SELECT s.total_stock, s.remaining_stock, o.id::text, o.user_id::text '
    'FROM flash_sales s LEFT JOIN orders o ON o.flash_sale_id = s.id WHERE s.id = %s'
)


def read_sale(conn, sale_id):
    """(SaleState, {user id: [order id, ...]}) straight from the database, on
    any psycopg connection whatever its row factory."""
    from psycopg.rows import tuple_row  # noqa: PLC0415 (the scenarios import this module without psycopg)

    rows = conn.cursor(row_factory=tuple_row).execute(SALE_ORDERS, (sale_id,)).fetchall()
    if not rows:
        raise LookupError(f'no sale {sale_id}')
    by_user = collections.defaultdict(list)
    for _, _, order, user in rows:
        if order is not None:
            by_user[user].append(order)
    total, remaining = rows[0][:2]
    return SaleState(total, remaining, sum(map(len, by_user.values()))), dict(by_user)


def sale_state(conn, sale_id):
    """SaleState(total, remaining, orders) straight from the database."""
    return read_sale(conn, sale_id)[0]


def stock_checks(state, prefix=''):
    total, remaining, orders = state
    return [
        Check(f'{prefix}stock conserved: remaining + orders == total', remaining + orders == total,
              f'{remaining} + {orders} = {remaining + orders}, total {total}'),
        Check(f'{prefix}no oversell: 0 <= remaining, orders <= total', remaining >= 0 and orders <= total,
              f'remaining {remaining}, orders {orders}, total {total}'),
    ]


def order_checks(orders_by_user, answers, unknown_ok=None):
    """The orders against the answers. An order whose user was never answered
    201, but was given an answer in UNKNOWN, is `unknown_ok`: None (cannot be
    decided) unless the caller knows the users settled it by buying again."""
    orders_by_user = {user: orders for user, orders in orders_by_user.items() if orders}
    by_user = collections.defaultdict(list)
    for answer in answers:
        by_user[answer.user].append(answer)
    created = [a for a in answers if a.kind == 'created']
    created_per_user = collections.Counter(a.user for a in created)

    several = [u for u, orders in orders_by_user.items() if len(orders) > 1]
    twice = [u for u, n in created_per_user.items() if n > 1]
    strangers = [a for a in created if a.order not in orders_by_user.get(a.user, ())]
    unexplained = [u for u in orders_by_user if not created_per_user[u]]
    unknown = [u for u in unexplained if any(a.kind in UNKNOWN for a in by_user[u])]
    claimed = {a.user for a in answers if a.kind == 'already_purchased'} - set(orders_by_user)

    if len(unknown) < len(unexplained):
        explained = False
    else:
        explained = unknown_ok if unknown else True
    orders = sum(map(len, orders_by_user.values()))
    return [
        Check('at most one order per user', not several,
              f'{orders} orders, {len(orders_by_user)} buyers'
              + (f', {len(several)} users with several orders' if several else '')),
        Check('every 201 has its order, for that user', not strangers,
              f'{len(created)} x 201' + (f', {len(strangers)} without their order' if strangers else '')),
        Check('no user answered 201 twice', not twice, f'{len(twice)} users with two 201s'),
        Check('no order without a 201 or an admitted unknown outcome', explained,
              f'{len(unexplained) - len(unknown)} orders without either' if explained is False
              else f'{len(unknown)} orders behind an unknown outcome'
              + (', settled by a retry' if unknown and unknown_ok else ', cannot tell' if unknown else '')),
        Check('every already_purchased has an order', not claimed, f'{len(claimed)} without one'),
    ]


def check_sale(state, orders_by_user, answers, unknown_ok=None):
    """Every invariant: the stock, then the orders against the answers."""
    return stock_checks(state) + order_checks(orders_by_user, answers, unknown_ok)


def verdict(checks):
    """'fail' if any check failed, else 'inconclusive' if one could not be decided, else 'pass'."""
    oks = [c.ok for c in checks]
    return 'fail' if False in oks else 'inconclusive' if None in oks else 'pass'


def failures(checks):
    """The checks that did not pass (for `assert not failures(checks)`)."""
    return [c for c in checks if c.ok is not True]


def check_after(conn, sale_id, created=None, in_flight=0):
    """The checks on a sale after a run of any tool (k6, Artillery, locust,
    wrk): the stock, one order per user, and, when the tool counted its 201
    answers (`created`), that every one is an order and no order is without
    one, but for up to `in_flight` requests it stopped without reading."""
    state, by_user = read_sale(conn, sale_id)
    several = [u for u, orders in by_user.items() if len(orders) > 1]
    checks = stock_checks(state) + [
        Check('at most one order per user', not several,
              f'{state.orders} orders, {len(by_user)} buyers'
              + (f', {len(several)} users with several orders' if several else '')),
    ]
    if created is not None:
        checks.append(Check(
            "the orders are the tool's 201s" + (f' (up to {in_flight} unread)' if in_flight else ''),
            0 <= state.orders - created <= in_flight,
            f'{state.orders} orders, {created} answered 201'))
    return checks


def main(argv, prog=None):
    """`scripts/load.py check`: a sale's invariants, straight from the database."""
    import argparse  # noqa: PLC0415
    import os  # noqa: PLC0415

    import psycopg  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog=prog, description='Check a sale after a load test by any tool: remaining + orders == total, stock '
        'never negative, one order per user, and (with --created) every 201 an order and no order without one.')
    parser.add_argument('--sale', required=True, help="the sale's id")
    parser.add_argument('--database-url', default=os.environ.get('DATABASE_URL'),
                        help="the server's database (default: DATABASE_URL)")
    parser.add_argument('--created', type=int, help='the 201 answers the tool counted')
    parser.add_argument('--in-flight', type=int, default=0,
                        help='requests the tool stopped without reading (wrk: its connections), which may have bought')
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error('--database-url (or DATABASE_URL) is needed')
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        checks = check_after(conn, args.sale, args.created, args.in_flight)
    for c in checks:
        print(f'  [{"PASS" if c.ok else "FAIL"}] {c.name}: {c.detail}')
    print('all invariants hold' if not failures(checks) else 'INVARIANT VIOLATED')
    return 1 if failures(checks) else 0
