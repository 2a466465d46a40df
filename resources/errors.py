"""Every error the API sends, once: the catalogue of codes with their status
and message, and the one place exceptions become responses.

Every error is JSON {"code": ..., "message": ...} (and "field" for a body
field at fault): `code` is stable and machine-readable, `message` is for
people. Resources raise refusal(code) where they make a decision; exceptions
from the driver and from Falcon are mapped here, by add_handlers() and
serialize(); resources/serving.py gives waitress' own refusals the same
shape. resources/openapi.py documents the codes from CATALOGUE, and the page
(static/app.js, MESSAGES) has a sentence for each (tests/test_page.py).
"""

import json
import logging
from typing import NamedTuple

import falcon
import psycopg
import psycopg.errors
import psycopg_pool

from resources.middleware import loggable

log = logging.getLogger('flashsale')


class Code(NamedTuple):
    status: str
    # The message where the raiser gives none. Some raisers give a more
    # precise one (the field at fault, the limit that was passed).
    message: str
    retry_after: int | None = None  # seconds, sent as Retry-After
    bearer: bool = False  # sent with WWW-Authenticate: Bearer (a token would fix it)


CATALOGUE = {
    # The request as HTTP: waitress refuses these before the app sees them
    # (resources/serving.py), Falcon while routing.
    'bad_request': Code(falcon.HTTP_400, 'The request is not valid HTTP.'),
    'headers_too_large': Code(falcon.HTTP_431, 'The request headers are too large.'),
    'not_implemented': Code(falcon.HTTP_501, 'That transfer encoding is not supported.'),
    'payload_too_large': Code(falcon.HTTP_413, 'The request body is too large.'),
    'not_found': Code(falcon.HTTP_404, 'No such endpoint.'),
    'method_not_allowed': Code(falcon.HTTP_405, 'This endpoint does not accept that method.'),
    'range_not_satisfiable': Code(falcon.HTTP_416, 'That range is not in the file.'),
    'unsupported_media_type': Code(falcon.HTTP_415, 'Send JSON (Content-Type: application/json).'),
    # The body (resources/parsing.py, and the resources' own checks).
    'invalid_json': Code(falcon.HTTP_400, 'The request body is not valid JSON.'),
    'invalid_body': Code(falcon.HTTP_400, 'The request body must be a JSON object.'),
    'missing_field': Code(falcon.HTTP_400, 'A required field is missing.'),
    'unknown_field': Code(falcon.HTTP_400, 'The body has a field this endpoint does not take.'),
    'invalid_field': Code(falcon.HTTP_400, 'A field has a value this endpoint does not take.'),
    'invalid_email': Code(falcon.HTTP_400, 'That does not look like an email address.'),
    'invalid_password': Code(falcon.HTTP_400, 'The password is too short or too long.'),
    # A query parameter (the list's page size and cursor).
    'invalid_parameter': Code(falcon.HTTP_400, 'A query parameter has a value this endpoint does not take.'),
    # Who is asking.
    'unauthorized': Code(falcon.HTTP_401, 'Log in first: send "Authorization: Bearer <token>".', bearer=True),
    'invalid_token': Code(falcon.HTTP_401, 'The token is not valid; log in again.', bearer=True),
    'token_expired': Code(falcon.HTTP_401, 'Your session expired; log in again.', bearer=True),
    # A genuine, unexpired token whose user's sessions were ended since it was
    # issued (a password change, `flashsale revoke-sessions`).
    'session_revoked': Code(
        falcon.HTTP_401, 'This session was ended (password changed or signed out); log in again.', bearer=True,
    ),
    # A wrong password is not a token problem: no WWW-Authenticate.
    'invalid_credentials': Code(falcon.HTTP_401, 'Wrong email or password.'),
    'forbidden': Code(falcon.HTTP_403, 'Only admins can create flash sales.'),
    'email_taken': Code(falcon.HTTP_409, 'An account with this email already exists.'),
    # Sales and orders. Every outcome of the purchase statement but `created`
    # is one of these codes (sql.PURCHASE).
    'no_sale': Code(falcon.HTTP_404, 'No flash sale is scheduled.'),
    'sale_not_found': Code(falcon.HTTP_404, 'There is no flash sale with that id.'),
    'order_not_found': Code(falcon.HTTP_404, 'You have no order in that sale.'),
    'sale_not_started': Code(falcon.HTTP_409, 'This sale has not started yet.'),
    'sale_ended': Code(falcon.HTTP_409, 'This sale has ended.'),
    'sold_out': Code(falcon.HTTP_409, 'Sold out: every item in this sale is taken.'),
    'already_purchased': Code(falcon.HTTP_409, 'You already bought one in this sale.'),
    # The service: nothing was done, try again.
    'rate_limited': Code(falcon.HTTP_429, 'Too many requests; slow down.', retry_after=1),
    'overloaded': Code(falcon.HTTP_503, 'The service is busy; try again shortly.', retry_after=1),
    'database_unavailable': Code(falcon.HTTP_503, 'The database is unavailable; try again shortly.', retry_after=2),
    # The connection to the database broke while a purchase statement was in
    # flight: it may have committed just before. Only the purchase says this.
    'outcome_unknown': Code(
        falcon.HTTP_503,
        'We lost the database while placing your order, so we cannot tell whether it went through. '
        'GET /api/me/orders/{flashSaleId} tells; buying again is safe (one order per person).',
        retry_after=2,
    ),
    'internal_error': Code(falcon.HTTP_500, 'Something went wrong on our side.'),
}

# A verified token whose user has since been deleted.
ACCOUNT_GONE = 'This account no longer exists.'


class APIError(falcon.HTTPError):
    """An HTTP error with a string `code`. (Falcon's own `code=` argument is an
    integer, hence this small subclass.)"""

    def __init__(self, status, code, message, *, field=None, headers=None):
        super().__init__(status, headers=headers)
        self.error_code = code
        self.message = message
        self.field = field

    def to_dict(self, obj_type=dict):
        body = obj_type(code=self.error_code, message=self.message)
        if self.field is not None:
            body['field'] = self.field
        return body


def refusal(code, message=None, *, field=None, retry_after=None):
    """The error to raise for `code`: its status, message and headers from
    CATALOGUE. `message` replaces the catalogue's where the request decides
    it; `retry_after` (seconds) the catalogue's wait."""
    entry = CATALOGUE[code]
    headers = None
    if entry.retry_after is not None:
        headers = {'Retry-After': str(retry_after or entry.retry_after)}
    elif entry.bearer:
        headers = {'WWW-Authenticate': 'Bearer'}
    return APIError(entry.status, code, message or entry.message, field=field, headers=headers)


def invalid(field, message, code='invalid_field'):
    """400: the body's `field` (None: the body as a whole) is not acceptable."""
    return refusal(code, message, field=field)


# Falcon raises these itself (routing, methods, static files); give them our
# shape. Looked up along the exception's MRO, so HTTPRouteNotFound finds its
# own entry before HTTPNotFound's. None: the catalogue's message.
_FALCON_CODES = {
    falcon.HTTPRouteNotFound: ('not_found', None),
    falcon.HTTPNotFound: ('not_found', 'Not found.'),
    falcon.HTTPMethodNotAllowed: ('method_not_allowed', None),
    falcon.HTTPUnsupportedMediaType: ('unsupported_media_type', None),
    falcon.HTTPContentTooLarge: ('payload_too_large', None),
    falcon.HTTPRangeNotSatisfiable: ('range_not_satisfiable', None),
    falcon.HTTPInternalServerError: ('internal_error', None),
}


def _error_body(exc):
    if isinstance(exc, APIError):
        return exc.to_dict()
    for cls in type(exc).__mro__:
        if cls in _FALCON_CODES:
            code, message = _FALCON_CODES[cls]
            return {'code': code, 'message': message or CATALOGUE[code].message}
    # Any other Falcon error (a malformed Range header on a static file is a
    # 400): a code from its status, its own title as the message.
    status = falcon.code_to_http_status(exc.status)
    return {'code': status.split(' ', 1)[1].lower().replace(' ', '_').replace('-', '_'),
            'message': exc.title or status}


def serialize(req, resp, exc):
    """Falcon's error serializer, replaced: always JSON, whatever the client
    accepts, so a script never has to guess."""
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(_error_body(exc), separators=(',', ':'))


# Which unique constraint a violation names tells what the user did. The
# purchase's: the same user's other tab won a race (see sql.PURCHASE).
_UNIQUE_VIOLATIONS = {
    'users_email_key': 'email_taken',
    'orders_one_per_user_per_sale': 'already_purchased',
}


def _unique_violation(req, resp, exc, params):
    constraint = exc.diag.constraint_name
    if constraint not in _UNIQUE_VIOLATIONS:
        _unexpected(req, resp, exc, params)
    raise refusal(_UNIQUE_VIOLATIONS[constraint])


def _foreign_key_violation(req, resp, exc, params):
    # The only reference a request can break is orders.user_id: the token
    # names a user who has since been deleted.
    if exc.diag.constraint_name != 'orders_user_id_fkey':
        _unexpected(req, resp, exc, params)
    raise refusal('invalid_token', ACCOUNT_GONE)


def _overloaded(req, resp, exc, params):
    # A statement or lock timeout: the statement did not commit.
    log.warning('overloaded: %s: %s', type(exc).__name__, exc)
    raise refusal('overloaded')


def _pool_timeout(pool):
    def handle(req, resp, exc, params):
        # No connection came free within pool_timeout: because the database
        # cannot be reached, or because every connection is busy.
        if pool.database_unreachable:
            _database_unavailable(req, resp, exc, params)
        _overloaded(req, resp, exc, params)

    return handle


def _database_unavailable(req, resp, exc, params):
    log.error('database unavailable: %s', exc)
    raise refusal('database_unavailable')


def _unexpected(req, resp, exc, params):
    log.exception('unhandled error in %s %s', loggable(req.method, 16), loggable(req.path))
    raise refusal('internal_error')


def add_handlers(app, pool):
    # Falcon picks the most specific handler by the exception's MRO, so the
    # order here does not matter.
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(psycopg.OperationalError, _database_unavailable)
    app.add_error_handler(psycopg_pool.PoolTimeout, _pool_timeout(pool))
    app.add_error_handler(psycopg.errors.QueryCanceled, _overloaded)
    app.add_error_handler(psycopg.errors.LockNotAvailable, _overloaded)
    app.add_error_handler(psycopg.errors.UniqueViolation, _unique_violation)
    app.add_error_handler(psycopg.errors.ForeignKeyViolation, _foreign_key_violation)
    # A server that refused a write (a standby, or one made read-only) wrote
    # nothing; the pool drops that connection (database.Pool.connection).
    app.add_error_handler(psycopg.errors.ReadOnlySqlTransaction, _database_unavailable)
    app.set_error_serializer(serialize)
