"""Flash sales: the current one, the list, one by id, and creating one (admins)."""

import base64
import binascii
import uuid
from datetime import datetime
from datetime import timezone

import falcon

from resources import sql
from resources.credentials import current_user
from resources.errors import invalid
from resources.errors import refusal
from resources.parsing import path_uuid
from resources.parsing import query_int
from resources.parsing import query_text
from resources.parsing import read_object
from resources.parsing import string_field

MAX_TOTAL_STOCK = 1_000_000
# The list of sales, a page at a time: a shop's history grows without end,
# and one answer of 20,000 sales was 4.8 MB and 0.27 s of a core.
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Pages of the list kept for everyone (resources/cache.py): the first page
# at each size is what a flood asks for; 64 of the largest are 3 MB.
CACHED_PAGES = 64
# Outside these, a date may not survive the trip: year 1 at +01:00 is 1 BC in
# UTC, which PostgreSQL stores and Python cannot read back, so every list of
# sales would fail from then on (tests/test_fuzz.py sends such dates).
EARLIEST_DATE = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST_DATE = datetime(9999, 1, 1, tzinfo=timezone.utc)


def _split(row):
    """A sale row as ({flashSale, status}, serverTime), or (None, None)."""
    if row is None:
        return None, None
    server_time = row.pop('serverTime')
    return {'flashSale': row, 'status': row['status']}, server_time


def _respond_polled(req, resp, cache, key, load, missing):
    """Answer a polled GET from the cache: 304 when the client's ETag still
    matches, else the sale with a fresh serverTime."""
    payload, server_time, etag = cache.get(key, load)
    if payload is None:
        raise refusal(missing)
    # Browsers may reuse the answer for a second; after that If-None-Match
    # makes an unchanged answer a bodiless 304.
    resp.cache_control = ['max-age=1']
    resp.etag = etag
    if etag in (req.if_none_match or ()):
        resp.status = falcon.HTTP_304
        return
    resp.media = {**payload, 'serverTime': server_time}


def _json(resp, media):
    """`media` as the app's JSON handler writes it (flashsale.create_app)."""
    return resp.options.media_handlers[falcon.MEDIA_JSON].serialize(media, falcon.MEDIA_JSON)


def _cursor(created_at, sale_id):
    """Where the page after the sale at (created_at, sale_id) starts: its
    place in the list's order, as an opaque string (base64url of both)."""
    place = f'{created_at.isoformat()}|{sale_id}'
    return base64.urlsafe_b64encode(place.encode()).decode().rstrip('=')


def _after(cursor):
    """The params of sql.LIST_SALES_AFTER for a cursor _cursor() made, None
    for none; any other string is 400."""
    if cursor is None:
        return None
    try:
        place = base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)).decode()
        created, _, sale_id = place.partition('|')
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError(created)
        return {'created_at': created_at, 'id': uuid.UUID(sale_id)}
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        raise refusal('invalid_parameter', '"cursor" must be a nextCursor this list gave.', field='cursor') from None


def _aware_datetime(body, name):
    value = string_field(body, name, max_length=64)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(name, f'"{name}" must be an ISO 8601 date-time.') from None
    # A date without an offset could mean any of 24 hours; refuse to guess.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise invalid(name, f'"{name}" needs a UTC offset or "Z", e.g. 2026-12-01T10:00:00Z.')
    try:
        in_range = EARLIEST_DATE <= moment.astimezone(timezone.utc) < LATEST_DATE
    except OverflowError:  # beyond year 1 or 9999 in UTC
        in_range = False
    if not in_range:
        raise invalid(name, f'"{name}" must be from the year 2000 to 9998.')
    return moment


class Current:
    def __init__(self, pool, cache):
        self._pool = pool
        self._cache = cache

    def on_get(self, req, resp):
        _respond_polled(req, resp, self._cache, 'current', self._load, 'no_sale')

    def _load(self):
        with self._pool.connection() as conn:
            return _split(sql.one(conn, sql.CURRENT_SALE))


class Item:
    def __init__(self, pool, cache):
        self._pool = pool
        self._cache = cache

    def on_get(self, req, resp, sale_id):
        sale_id = path_uuid(sale_id, 'sale_not_found')
        _respond_polled(req, resp, self._cache, sale_id, lambda: self._load(sale_id), 'sale_not_found')

    def _load(self, sale_id):
        with self._pool.connection() as conn:
            return _split(sql.one(conn, sql.FIND_SALE, {'sale_id': sale_id}))


class Collection:
    """The list, a page at a time, and creating a sale. An anonymous request
    for a page is answered from `cache` (a PollCache of CACHED_PAGES pages),
    so that a flood of list requests costs about what a flood of polls does;
    one with a token (the admin's table) is answered fresh."""

    login_required = frozenset({'POST'})

    def __init__(self, pool, settings, cache):
        self._pool = pool
        self._settings = settings
        self._cache = cache

    def on_get(self, req, resp):
        limit = query_int(req, 'limit', default=PAGE_SIZE, low=1, high=MAX_PAGE_SIZE)
        after = _after(query_text(req, 'cursor'))

        def load():
            return self._load(resp, limit, after)

        if req.get_header('Authorization'):
            body, server_time = load()
        else:
            body, server_time, _ = self._cache.get((limit, after and tuple(after.values())), load)
        # The page is JSON already; its serverTime is now's.
        now = _json(resp, {'serverTime': server_time})
        resp.data = body[:-1] + b',' + now[1:]
        resp.content_type = falcon.MEDIA_JSON

    def _load(self, resp, limit, after):
        """(the page's JSON without serverTime, serverTime)."""
        with self._pool.connection() as conn:
            if after is None:
                page = sql.one(conn, sql.LIST_SALES, {'limit': limit})
            else:
                page = sql.one(conn, sql.LIST_SALES_AFTER, {**after, 'limit': limit})
        next_cursor = _cursor(page['lastCreatedAt'], page['lastId']) if page['more'] else None
        # The sales come as JSON text (sql.LIST_SALES): they go out as they are.
        body = b'{"flashSales":' + page['flashSales'].encode() + b',' + _json(resp, {'nextCursor': next_cursor})[1:]
        return body, page['serverTime']

    def on_post(self, req, resp):
        with self._pool.connection() as conn:
            # Who may ask comes before what they ask: a non-admin gets 403
            # whatever the body says.
            if not current_user(conn, req)['isAdmin']:
                raise refusal('forbidden')
            row = sql.one(conn, sql.CREATE_SALE, self._new_sale(req))
        row.pop('serverTime')
        resp.status = falcon.HTTP_201
        resp.media = {'flashSale': row}

    def _new_sale(self, req):
        body = read_object(
            req,
            self._settings.max_body_bytes,
            required=('startDate', 'endDate', 'totalStock'),
            optional=('name',),
        )
        start = _aware_datetime(body, 'startDate')
        end = _aware_datetime(body, 'endDate')
        if end <= start:
            raise invalid('endDate', '"endDate" must be after "startDate".')
        total = body['totalStock']
        # bool is an int in Python; true is not a stock level.
        if not isinstance(total, int) or isinstance(total, bool) or not 1 <= total <= MAX_TOTAL_STOCK:
            raise invalid('totalStock', f'"totalStock" must be a whole number from 1 to {MAX_TOTAL_STOCK}.')
        name = string_field(body, 'name', max_length=200).strip() if 'name' in body else 'Flash sale'
        if not name:
            raise invalid('name', '"name" must not be empty.')
        return {'name': name, 'start_date': start, 'end_date': end, 'total_stock': total}
