"""Buying, and reading one's own orders."""

import falcon
import psycopg

from resources import sql
from resources.accounts import existing_user
from resources.errors import already_purchased
from resources.errors import conflict
from resources.errors import not_found
from resources.errors import outcome_unknown
from resources.parsing import path_uuid
from resources.sales import sale_not_found

# What the purchase statement's `outcome` column means for the caller.
_REFUSALS = {
    'sale_not_found': sale_not_found,
    'sale_not_started': lambda: conflict('sale_not_started', 'This sale has not started yet.'),
    'sale_ended': lambda: conflict('sale_ended', 'This sale has ended.'),
    'sold_out': lambda: conflict('sold_out', 'Sold out: every item in this sale is taken.'),
    'already_purchased': already_purchased,
}


def order_not_found():
    return not_found('order_not_found', 'You have no order in that sale.')


class Purchase:
    """POST /api/flash-sales/{sale_id}/purchase. Takes no body and ignores one
    if sent (the reference's load-test clients send {"productId": ...})."""

    def __init__(self, pool, credentials):
        self._pool = pool
        self._credentials = credentials
        # Sales the database has answered sold_out for. Stock never comes
        # back (there is no restock), so from then on every purchase of them
        # is refused from memory, without a round trip: after the first few
        # seconds of a flash sale that is nearly every request. Only a real
        # sold_out outcome adds to it, never an error, so a failure cannot
        # poison it. Each process learns it on its own.
        self._sold_out = set()

    def on_post(self, req, resp, sale_id):
        user_id = self._credentials.user_id(req)
        sale_id = path_uuid(sale_id, sale_not_found)
        if sale_id in self._sold_out:
            raise _REFUSALS['sold_out']()
        with self._pool.connection() as conn:
            # A racing duplicate raises UniqueViolation here; resources/errors.py
            # maps it to 409 already_purchased (see sql.PURCHASE).
            try:
                row = sql.one(conn, sql.PURCHASE, {'sale_id': sale_id, 'user_id': user_id}, prepare=True)
            except psycopg.OperationalError as exc:
                # An error the server reports for the statement (a statement or
                # lock timeout) leaves the connection working and means the
                # statement rolled back. A connection that broke instead (the
                # database shut down or crashed, the network went) may have
                # lost only the answer to a commit that happened: say so,
                # rather than "failed" (README.md: "When things go wrong").
                if conn.broken:
                    raise outcome_unknown() from exc
                raise
        outcome = row.pop('outcome')
        if outcome == 'sold_out' and len(self._sold_out) < 100_000:
            self._sold_out.add(sale_id)
        if outcome != 'created':
            raise _REFUSALS[outcome]()
        resp.status = falcon.HTTP_201
        resp.media = {'order': row}


class MyOrder:
    def __init__(self, pool, credentials):
        self._pool = pool
        self._credentials = credentials

    def on_get(self, req, resp, sale_id):
        user_id = self._credentials.user_id(req)
        sale_id = path_uuid(sale_id, order_not_found)
        with self._pool.connection() as conn:
            existing_user(conn, user_id)
            row = sql.one(conn, sql.FIND_MY_ORDER, {'sale_id': sale_id, 'user_id': user_id})
        if row is None:
            raise order_not_found()
        resp.media = {'order': row}


class MyOrders:
    def __init__(self, pool, credentials):
        self._pool = pool
        self._credentials = credentials

    def on_get(self, req, resp):
        user_id = self._credentials.user_id(req)
        with self._pool.connection() as conn:
            # A deleted user's token is refused (401), not answered "no orders".
            existing_user(conn, user_id)
            resp.media = {'orders': sql.many(conn, sql.LIST_MY_ORDERS, {'user_id': user_id})}
