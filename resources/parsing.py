"""Reading what a request sends, strictly: a JSON body of known fields and
sane size, and ids in paths."""

import json
import re
import uuid

import falcon

from resources.errors import invalid
from resources.errors import refusal

# No body this API takes nests at all; this is far beyond any honest one, and
# keeps the parser away from Python's recursion limit whatever its version.
MAX_JSON_DEPTH = 16

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b'[]{}')


def _nesting(raw):
    """How deeply raw JSON nests arrays and objects (brackets in strings
    don't count). Linear in the size of the body, which is capped."""
    depth = deepest = 0
    for bracket in _JSON_STRING.sub(b'', raw).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in b'[{' else -1
        deepest = max(deepest, depth)
    return deepest


def read_object(req, max_bytes, *, required, optional=()):
    """The body as a dict with every `required` field and no field outside
    `required` and `optional`; anything else is a 4xx with a code."""
    media_type = (req.content_type or '').split(';', 1)[0].strip().lower()
    if media_type != falcon.MEDIA_JSON:
        raise refusal('unsupported_media_type')
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise refusal('payload_too_large', f'The request body is over {max_bytes} bytes.')
    if _nesting(raw) > MAX_JSON_DEPTH:
        raise invalid(None, f'The request body nests deeper than {MAX_JSON_DEPTH} levels.', 'invalid_json')
    try:
        body = json.loads(raw)
    # RecursionError: a body of thousands of nested brackets fits in the size
    # limit but is deeper than Python's parser will go.
    except (ValueError, RecursionError):
        raise invalid(None, 'The request body is not valid JSON.', 'invalid_json') from None
    if not isinstance(body, dict):
        raise invalid(None, 'The request body must be a JSON object.', 'invalid_body')
    for name in body:
        if name not in required and name not in optional:
            raise invalid(name, f'Unknown field "{name}".', 'unknown_field')
    for name in required:
        if name not in body:
            raise invalid(name, f'"{name}" is required.', 'missing_field')
    return body


def string_field(body, name, *, max_length):
    value = body[name]
    if not isinstance(value, str):
        raise invalid(name, f'"{name}" must be a string.')
    if len(value) > max_length:
        raise invalid(name, f'"{name}" is longer than {max_length} characters.')
    return value


def path_uuid(raw, not_found):
    """An id from the path; a malformed one is simply not found: the refusal
    with code `not_found` (e.g. 'sale_not_found')."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise refusal(not_found) from None
