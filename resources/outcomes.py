"""GET /api/purchase-outcomes (admins): the purchase answers by outcome, for
the admin page's live table (static/app.js).

The page's poll of the sale shows the stock going down, not the refusals
(sold out, already bought, rate limited, busy): those are only counted, by
the metrics (resources/metrics.py), per server. So this answers the counts of
the server that answers, with that server's id: behind a proxy spreading the
polls over several servers, the page keeps each server's latest answer and
adds them up.
"""

from resources import metrics
from resources.credentials import current_user
from resources.errors import refusal


class PurchaseOutcomes:
    login_required = frozenset({'GET'})

    def __init__(self, pool):
        self._pool = pool

    def on_get(self, req, resp):
        with self._pool.connection() as conn:
            if not current_user(conn, req)['isAdmin']:
                raise refusal('forbidden', 'Only admins can see the purchase outcomes.')
        counts, server = metrics.purchase_counts()
        resp.media = {'server': server, 'outcomes': counts}
