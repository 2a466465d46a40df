"""GET /health: the process is up and the database answers."""

from resources import sql


class Health:
    def __init__(self, pool):
        self._pool = pool

    def on_get(self, req, resp):
        # A database that cannot be reached raises here; resources/errors.py
        # turns that into 503 database_unavailable with Retry-After.
        with self._pool.connection() as conn:
            server_time = sql.value(conn, sql.SERVER_TIME)
        resp.media = {'status': 'ok', 'database': 'ok', 'serverTime': server_time}
