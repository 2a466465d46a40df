"""GET /openapi.json: the whole HTTP API as an OpenAPI 3.0 document.

tests/test_openapi.py keeps it true: every route the app has is described
here and nothing else is, and schemathesis (tests/test_fuzz.py) fuzzes the
real app from it and checks every answer against it.
"""

import falcon

from resources.credentials import MAX_PASSWORD_BYTES
from resources.credentials import MIN_PASSWORD_BYTES
from resources.errors import CATALOGUE
from resources.sales import MAX_PAGE_SIZE
from resources.sales import MAX_TOTAL_STOCK
from resources.sales import PAGE_SIZE

_UUID = {'type': 'string', 'format': 'uuid'}
# What resources/accounts.py accepts: something@something.something. (The
# control characters are excluded because Python's strip() takes them for
# spaces, which JSON Schema's \s does not.)
_NOT_SPACE = r'[^@\s\x00-\x20\x7f-\x9f]'
# A text field (email, password, sale name) has no control character (resources/parsing.py
# refuses them with invalid_field). Said as a lookahead over the whole text: a pattern ending
# in $ would also match a text ending in a newline.
_NO_CONTROL = r'^(?![\s\S]*[\x00-\x1f\x7f-\x9f])'
_EMAIL = {
    'type': 'string', 'maxLength': 254, 'pattern': _NO_CONTROL + f'{_NOT_SPACE}+@{_NOT_SPACE}+\\.{_NOT_SPACE}+$',
    'example': 'shopper@example.com', 'description': 'trimmed and lower-cased',
}
_TIME = {'type': 'string', 'format': 'date-time'}


def _ref(name):
    return {'$ref': f'#/components/schemas/{name}'}


def _json(schema):
    return {'application/json': {'schema': schema}}


def _object(required, **properties):
    return {'type': 'object', 'required': list(required), 'properties': properties, 'additionalProperties': False}


SCHEMAS = {
    'Error': {
        'type': 'object',
        'required': ['code', 'message'],
        'properties': {
            'code': {'type': 'string', 'description': 'stable, for programs'},
            'message': {'type': 'string', 'description': 'for people'},
            'field': {'type': 'string', 'nullable': True, 'description': 'the body field or query parameter at fault'},
        },
        'additionalProperties': False,
    },
    'User': _object(
        ['id', 'email', 'isAdmin', 'createdAt'],
        id=_UUID, email={'type': 'string'}, isAdmin={'type': 'boolean'}, createdAt=_TIME,
    ),
    'FlashSale': _object(
        ['id', 'name', 'startDate', 'endDate', 'totalStock', 'remainingStock', 'status', 'createdAt'],
        id=_UUID,
        name={'type': 'string'},
        startDate=_TIME,
        endDate=_TIME,
        totalStock={'type': 'integer', 'minimum': 1},
        remainingStock={'type': 'integer', 'minimum': 0},
        status=_ref('SaleStatus'),
        createdAt=_TIME,
    ),
    'SaleStatus': {'type': 'string', 'enum': ['upcoming', 'active', 'ended']},
    'Order': _object(
        ['id', 'userId', 'flashSaleId', 'createdAt'],
        id=_UUID, userId=_UUID, flashSaleId=_UUID, createdAt=_TIME,
    ),
    'Registration': _object(
        ['email', 'password'],
        email=_EMAIL,
        password={
            'type': 'string', 'minLength': MIN_PASSWORD_BYTES, 'maxLength': MAX_PASSWORD_BYTES,
            'pattern': _NO_CONTROL, 'example': 'correct horse',
            'description': f'{MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes of UTF-8 (bcrypt reads no further)',
        },
    ),
    'PasswordChange': _object(
        ['currentPassword', 'newPassword'],
        currentPassword={'type': 'string', 'maxLength': 1024, 'pattern': _NO_CONTROL, 'example': 'correct horse'},
        newPassword={
            'type': 'string', 'minLength': MIN_PASSWORD_BYTES, 'maxLength': MAX_PASSWORD_BYTES,
            'pattern': _NO_CONTROL, 'example': 'battery staple',
            'description': f'{MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes of UTF-8 (bcrypt reads no further)',
        },
    ),
    'Login': _object(
        ['email', 'password'],
        email=_EMAIL,
        password={'type': 'string', 'maxLength': 1024, 'pattern': _NO_CONTROL, 'example': 'correct horse'},
    ),
    'NewSale': _object(
        ['startDate', 'endDate', 'totalStock'],
        startDate={**_TIME, 'description': 'with an offset or Z; in the years 2000 to 9998 (UTC)'},
        endDate={**_TIME, 'description': 'after startDate; in the years 2000 to 9998 (UTC)'},
        totalStock={'type': 'integer', 'minimum': 1, 'maximum': MAX_TOTAL_STOCK},
        name={'type': 'string', 'maxLength': 200,
              'pattern': _NO_CONTROL + r'[\s\S]*[^\s\x00-\x20\x7f-\x9f]',
              'description': 'trimmed; not blank'},
    ),
    'SaleWithTime': _object(
        ['flashSale', 'status', 'serverTime'],
        flashSale=_ref('FlashSale'), status=_ref('SaleStatus'), serverTime=_TIME,
    ),
    'Session': _object(['user', 'token'], user=_ref('User'), token={'type': 'string'}),
}


def _error(codes):
    """One status's error response: its codes, each with its message, and
    Retry-After when they send one (all from the catalogue)."""
    entries = [CATALOGUE[code] for code in codes]
    schema = {'allOf': [_ref('Error'), {'properties': {'code': {'enum': list(codes)}}}]}
    description = ' '.join(f'{code}: {entry.message}' for code, entry in zip(codes, entries))
    response = {'description': description, 'content': _json(schema)}
    if any(entry.retry_after for entry in entries):
        response['headers'] = {
            'Retry-After': {'required': all(entry.retry_after for entry in entries),
                            'schema': {'type': 'integer', 'minimum': 1},
                            'description': 'seconds to wait before trying again'},
        }
    return response


def _errors(*codes):
    """The error responses of an operation that can answer these codes,
    grouped by each code's status in resources/errors.py's CATALOGUE."""
    by_status = {}
    for code in codes:
        by_status.setdefault(CATALOGUE[code].status[:3], []).append(code)
    return {status: _error(grouped) for status, grouped in sorted(by_status.items())}


def _ok(description, schema):
    return {'description': description, 'content': _json(schema)}


_UNAVAILABLE = ('database_unavailable', 'overloaded')
_UNAUTHORIZED = ('unauthorized', 'invalid_token', 'token_expired', 'session_revoked')
_BAD_BODY = (
    'invalid_json', 'invalid_body', 'missing_field', 'unknown_field', 'invalid_field', 'invalid_email',
    'invalid_password', 'payload_too_large', 'unsupported_media_type',
)
_BEARER = [{'bearer': []}]
_SALE_ID = {
    'name': 'sale_id', 'in': 'path', 'required': True, 'schema': _UUID,
    'description': 'a flash sale id (a malformed one is simply not found)',
}
_POLLED = {
    '304': {'description': 'Unchanged since the ETag sent in If-None-Match'},
}
_IF_NONE_MATCH = {'name': 'If-None-Match', 'in': 'header', 'required': False, 'schema': {'type': 'string'}}


PATHS = {
    '/health': {'get': {
        'summary': 'The process is up and the database answers',
        'responses': {
            '200': _ok('Healthy', _object(
                ['status', 'database', 'serverTime'],
                status={'type': 'string', 'enum': ['ok']}, database={'type': 'string', 'enum': ['ok']},
                serverTime=_TIME,
            )),
            **_errors(*_UNAVAILABLE),
        },
    }},
    '/api/auth/register': {'post': {
        'summary': 'Create an account; returns a session token',
        'requestBody': {'required': True, 'content': _json(_ref('Registration'))},
        'responses': {
            '201': _ok('Registered', _ref('Session')),
            **_errors(*_BAD_BODY, 'email_taken', 'rate_limited', *_UNAVAILABLE),
        },
    }},
    '/api/auth/login': {'post': {
        'summary': 'Log in; returns a session token',
        'requestBody': {'required': True, 'content': _json(_ref('Login'))},
        'responses': {
            '200': _ok('Logged in', _ref('Session')),
            **_errors(*_BAD_BODY, 'invalid_credentials', 'rate_limited', *_UNAVAILABLE),
        },
    }},
    '/api/auth/refresh': {'post': {
        'summary': 'A new token with a new expiry, for a valid one (no password). Takes no body; ignores one',
        'security': _BEARER,
        'responses': {
            '200': _ok('Renewed', _ref('Session')),
            **_errors(*_UNAUTHORIZED, *_UNAVAILABLE),
        },
    }},
    '/api/me/password': {'post': {
        'summary': "Change the caller's password; every other session ends (returns a new token)",
        'security': _BEARER,
        'requestBody': {'required': True, 'content': _json(_ref('PasswordChange'))},
        'responses': {
            '200': _ok('Changed', _ref('Session')),
            **_errors(*_BAD_BODY, *_UNAUTHORIZED, 'invalid_credentials', 'rate_limited', *_UNAVAILABLE),
        },
    }},
    '/api/me': {'get': {
        'summary': 'Who the token belongs to',
        'security': _BEARER,
        'responses': {
            '200': _ok('The user', _object(['user'], user=_ref('User'))),
            **_errors(*_UNAUTHORIZED, *_UNAVAILABLE),
        },
    }},
    '/api/me/orders': {'get': {
        'summary': "The caller's orders, newest first",
        'security': _BEARER,
        'responses': {
            '200': _ok('Orders', _object(['orders'], orders={'type': 'array', 'items': _ref('Order')})),
            **_errors(*_UNAUTHORIZED, *_UNAVAILABLE),
        },
    }},
    '/api/me/orders/{sale_id}': {'get': {
        'summary': "The caller's order in one sale (how to settle a purchase answered outcome_unknown)",
        'security': _BEARER,
        'parameters': [_SALE_ID],
        'responses': {
            '200': _ok('The order', _object(['order'], order=_ref('Order'))),
            **_errors(*_UNAUTHORIZED, 'order_not_found', *_UNAVAILABLE),
        },
    }},
    '/api/flash-sales': {
        'get': {
            'summary': 'The sales, newest first, a page at a time',
            'parameters': [
                {'name': 'limit', 'in': 'query', 'required': False, 'description': 'sales in the page',
                 'schema': {'type': 'integer', 'minimum': 1, 'maximum': MAX_PAGE_SIZE, 'default': PAGE_SIZE}},
                {'name': 'cursor', 'in': 'query', 'required': False,
                 'description': "the page after the one whose nextCursor this is (absent: the first page)",
                 'schema': {'type': 'string', 'maxLength': 200, 'pattern': '^[A-Za-z0-9_-]+$'}},
            ],
            'responses': {
                '200': _ok('A page of sales', _object(
                    ['flashSales', 'nextCursor', 'serverTime'],
                    flashSales={'type': 'array', 'items': _ref('FlashSale'), 'maxItems': MAX_PAGE_SIZE},
                    nextCursor={'type': 'string', 'nullable': True,
                                'description': 'the cursor of the next page; null on the last'},
                    serverTime=_TIME,
                )),
                **_errors('invalid_parameter', *_UNAVAILABLE),
            },
        },
        'post': {
            'summary': 'Create a sale (admins only)',
            'security': _BEARER,
            'requestBody': {'required': True, 'content': _json(_ref('NewSale'))},
            'responses': {
                '201': _ok('Created', _object(['flashSale'], flashSale=_ref('FlashSale'))),
                **_errors(*_BAD_BODY, *_UNAUTHORIZED, 'forbidden', *_UNAVAILABLE),
            },
        },
    },
    '/api/flash-sales/current': {'get': {
        'summary': 'The active sale (ending first), else the next, else the last one',
        'parameters': [_IF_NONE_MATCH],
        'responses': {
            '200': _ok('The sale', _ref('SaleWithTime')),
            **_POLLED,
            **_errors('no_sale', *_UNAVAILABLE),
        },
    }},
    '/api/flash-sales/{sale_id}': {'get': {
        'summary': 'One sale',
        'parameters': [_SALE_ID, _IF_NONE_MATCH],
        'responses': {
            '200': _ok('The sale', _ref('SaleWithTime')),
            **_POLLED,
            **_errors('sale_not_found', *_UNAVAILABLE),
        },
    }},
    '/api/flash-sales/{sale_id}/purchase': {'post': {
        'summary': 'Buy one item (one per person per sale). Takes no body; ignores one',
        'security': _BEARER,
        'parameters': [_SALE_ID],
        'responses': {
            '201': _ok('Bought', _object(['order'], order=_ref('Order'))),
            **_errors(
                *_UNAUTHORIZED, 'sale_not_found', 'sale_not_started', 'sale_ended', 'sold_out',
                'already_purchased', 'rate_limited', *_UNAVAILABLE, 'outcome_unknown',
            ),
        },
    }},
    '/openapi.json': {'get': {
        'summary': 'This document',
        'responses': {'200': {'description': 'OpenAPI 3.0', 'content': _json({'type': 'object'})}},
    }},
    '/': {'get': {
        'summary': "The shopper's page",
        'responses': {'200': {'description': 'HTML', 'content': {'text/html': {'schema': {'type': 'string'}}}}},
    }},
    '/static/{path}': {
        method: {
            'summary': "The page's files",
            'parameters': [{'name': 'path', 'in': 'path', 'required': True, 'schema': {'type': 'string'}}],
            'responses': {
                '200': {'description': 'The file', 'content': {'*/*': {'schema': {'type': 'string'}}}},
                '206': {'description': 'Part of the file (Range)', 'content': {'*/*': {'schema': {'type': 'string'}}}},
                '304': {'description': 'Unchanged'},
                **_errors('not_found', 'range_not_satisfiable'),
            },
        }
        for method in ('get', 'head')
    },
}

DOCUMENT = {
    'openapi': '3.0.3',
    'info': {
        'title': 'flashsale',
        'version': '1',
        'description': (
            'A flash-sale service: exactly the stock, one item per person. Every error is '
            '{"code", "message"} with a stable code; every GET also answers HEAD (the same, without the '
            'body); any operation may also answer 405 '
            'method_not_allowed for a method it lacks, and an unknown path is 404 not_found.'
        ),
    },
    'paths': PATHS,
    'components': {
        'schemas': SCHEMAS,
        'securitySchemes': {'bearer': {'type': 'http', 'scheme': 'bearer', 'bearerFormat': 'JWT'}},
    },
}


class Document:
    def on_get(self, req, resp):
        resp.media = DOCUMENT
        # The same for everyone and changes only with a release.
        resp.cache_control = ['public', 'max-age=300']
        resp.content_type = falcon.MEDIA_JSON
