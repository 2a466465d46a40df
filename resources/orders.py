"""Buying, and reading one's own orders."""

import falcon

from resources import metrics
from resources import sql
from resources.credentials import UserReader
from resources.credentials import current_user
from resources.errors import ACCOUNT_GONE
from resources.errors import refusal
from resources.parsing import path_uuid


class Purchase:
    """POST /api/flash-sales/{sale_id}/purchase. Takes no body and ignores one
    if sent (the reference's load-test clients send {"productId": ...})."""

    login_required = frozenset({'POST'})

    def __init__(self, batches):
        self._batches = batches
        # Sales the database has answered sold_out for. Stock never comes
        # back (there is no restock), so from then on every purchase of them
        # is refused from memory, without a round trip: after the first few
        # seconds of a flash sale that is nearly every request. Only a real
        # sold_out outcome adds to it, never an error, so a failure cannot
        # poison it. Each process learns it on its own.
        self._sold_out = set()

    def on_post(self, req, resp, sale_id):
        sale_id = path_uuid(sale_id, 'sale_not_found')
        # A sold-out answer from memory does not look the user up, so a
        # revoked token may be told sold_out here: it changes nothing.
        if sale_id in self._sold_out:
            metrics.sold_out_remembered()
            raise refusal('sold_out')
        # One statement per batch of this sale's concurrent purchases
        # (resources/batching.py), which also checks the token's generation
        # against revocation. A racing duplicate raises UniqueViolation here,
        # which resources/errors.py maps to 409 already_purchased (see
        # sql.PURCHASE); a connection lost mid-statement is outcome_unknown.
        row = self._batches.buy(sale_id, req.context.user_id, req.context.token_generation)
        outcome = row.pop('outcome')
        if outcome == 'sold_out' and len(self._sold_out) < 100_000:
            self._sold_out.add(sale_id)
        if outcome != 'created':
            # Every other outcome is an error code of the catalogue (the
            # buyer's account gone: invalid_token; a revoked token:
            # session_revoked).
            raise refusal(outcome, ACCOUNT_GONE if outcome == 'invalid_token' else None)
        resp.status = falcon.HTTP_201
        resp.media = {'order': row}


class MyOrder(UserReader):
    def on_get(self, req, resp, sale_id):
        sale_id = path_uuid(sale_id, 'order_not_found')
        with self._pool.connection() as conn:
            current_user(conn, req)
            row = sql.one(conn, sql.FIND_MY_ORDER, {'sale_id': sale_id, 'user_id': req.context.user_id})
        if row is None:
            raise refusal('order_not_found')
        resp.media = {'order': row}


class MyOrders(UserReader):
    def on_get(self, req, resp):
        with self._pool.connection() as conn:
            # A deleted user's token is refused (401), not answered "no orders".
            current_user(conn, req)
            resp.media = {'orders': sql.many(conn, sql.LIST_MY_ORDERS, {'user_id': req.context.user_id})}
