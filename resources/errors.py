"""The API's one error format, and the one place exceptions become responses.

Every error the API returns is JSON {"code": ..., "message": ...}: `code` is
stable and machine-readable, `message` is for people. Resources raise APIError
where they make a decision; exceptions from the driver and from Falcon itself
are mapped here, by add_handlers() and serialize().
"""

import json
import logging

import falcon
import psycopg
import psycopg.errors
import psycopg_pool

log = logging.getLogger('flashsale')


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


def invalid(field, message, code='invalid_field'):
    return APIError(falcon.HTTP_400, code, message, field=field)


def unauthorized(code='unauthorized', message='Log in first: send "Authorization: Bearer <token>".'):
    return APIError(
        falcon.HTTP_401, code, message, headers={'WWW-Authenticate': 'Bearer'}
    )


def not_found(code, message):
    return APIError(falcon.HTTP_404, code, message)


def conflict(code, message):
    return APIError(falcon.HTTP_409, code, message)


def unavailable(code, message, retry_after):
    return APIError(
        falcon.HTTP_503, code, message, headers={'Retry-After': str(retry_after)}
    )


def outcome_unknown():
    # The connection to the database broke while a purchase statement was in
    # flight: it may have committed just before. Only the purchase raises this.
    return unavailable(
        'outcome_unknown',
        'We lost the database while placing your order, so we cannot tell whether it went through. '
        'GET /api/me/orders/{flashSaleId} tells; buying again is safe (one order per person).',
        2,
    )


def rate_limited(retry_after):
    return APIError(
        falcon.HTTP_429, 'rate_limited', 'Too many requests; slow down.',
        headers={'Retry-After': str(retry_after)},
    )


# Falcon raises these itself (routing, methods, streams); give them our shape.
_FALCON_CODES = {
    falcon.HTTPRouteNotFound: ('not_found', 'No such endpoint.'),
    falcon.HTTPNotFound: ('not_found', 'Not found.'),
    falcon.HTTPMethodNotAllowed: ('method_not_allowed', 'This endpoint does not accept that method.'),
    falcon.HTTPUnsupportedMediaType: ('unsupported_media_type', 'Send JSON (Content-Type: application/json).'),
    falcon.HTTPContentTooLarge: ('payload_too_large', 'The request body is too large.'),
    falcon.HTTPInternalServerError: ('internal_error', 'Something went wrong on our side.'),
}


def _error_body(exc):
    if isinstance(exc, APIError):
        return exc.to_dict()
    for cls in type(exc).__mro__:
        if cls in _FALCON_CODES:
            code, message = _FALCON_CODES[cls]
            return {'code': code, 'message': message}
    status = falcon.code_to_http_status(exc.status)
    return {'code': status.split(' ', 1)[1].lower().replace(' ', '_').replace('-', '_'),
            'message': exc.title or status}


def serialize(req, resp, exc):
    """Falcon's error serializer, replaced: always JSON, whatever the client
    accepts, so a script never has to guess."""
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(_error_body(exc), separators=(',', ':'))


def already_purchased():
    # Said by the purchase statement's outcome, and by the unique index when
    # the same user's other tab won a race (see sql.PURCHASE).
    return conflict('already_purchased', 'You already bought one in this sale.')


# Which unique constraint a violation names tells what the user did.
_UNIQUE_VIOLATIONS = {
    'users_email_key': lambda: conflict('email_taken', 'An account with this email already exists.'),
    'orders_one_per_user_per_sale': already_purchased,
}


def _unique_violation(req, resp, exc, params):
    constraint = exc.diag.constraint_name
    if constraint not in _UNIQUE_VIOLATIONS:
        _unexpected(req, resp, exc, params)
    raise _UNIQUE_VIOLATIONS[constraint]()


def _foreign_key_violation(req, resp, exc, params):
    # The only reference a request can break is orders.user_id: the token
    # names a user who has since been deleted.
    if exc.diag.constraint_name != 'orders_user_id_fkey':
        _unexpected(req, resp, exc, params)
    raise unauthorized('invalid_token', 'This account no longer exists.')


def _overloaded(req, resp, exc, params):
    # A statement or lock timeout: the statement did not commit.
    log.warning('overloaded: %s: %s', type(exc).__name__, exc)
    raise unavailable('overloaded', 'The service is busy; try again shortly.', 1)


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
    raise unavailable('database_unavailable', 'The database is unavailable; try again shortly.', 2)


def _unexpected(req, resp, exc, params):
    log.exception('unhandled error in %s %s', req.method, req.path)
    raise APIError(falcon.HTTP_500, 'internal_error', 'Something went wrong on our side.')


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
    app.set_error_serializer(serialize)
