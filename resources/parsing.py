"""Reading what a request sends, strictly: a JSON body of known fields and
sane size, ids in paths, and query parameters."""

import json
import re
import uuid

import falcon

from resources.errors import invalid
from resources.errors import refusal

# No body this API takes nests at all; this is far beyond any honest one.
MAX_JSON_DEPTH = 16

# Text PostgreSQL or the UTF-8 encoder cannot take (NUL, unpaired
# surrogates such as "\ud800", which JSON may escape), and control characters
# no honest email, password or name holds.
_UNFIT_TEXT = re.compile('[\x00-\x1f\x7f-\x9f\ud800-\udfff]')


def _deeper_than(value, limit):
    """Whether parsed JSON nests arrays and objects deeper than `limit`: one
    pass over its values, iterative (no recursion to exhaust)."""
    pending = [(value, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return True
        pending.extend((item, depth + 1) for item in value)
    return False


def _too_deep():
    return invalid(None, f'The request body nests deeper than {MAX_JSON_DEPTH} levels.', 'invalid_json')


def read_object(req, max_bytes, *, required, optional=()):
    """The body as a dict with every `required` field and no field outside
    `required` and `optional`; anything else is a 4xx with a code."""
    media_type = (req.content_type or '').split(';', 1)[0].strip().lower()
    if media_type != falcon.MEDIA_JSON:
        raise refusal('unsupported_media_type')
    raw = req.bounded_stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise refusal('payload_too_large', f'The request body is over {max_bytes} bytes.')
    # The depth is measured after parsing, not before: every step is then
    # linear in the body whatever its shape (json's C scanner, one pass over
    # the values). A pre-scan has to tell strings from brackets, and a regex
    # doing so backtracks on unterminated strings: quadratic, over a second
    # of CPU for one 16 KB body, holding the interpreter lock.
    try:
        body = json.loads(raw)
    # RecursionError: thousands of nested brackets fit in the size limit but
    # are deeper than Python's parser will go.
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise invalid(None, 'The request body is not valid JSON.', 'invalid_json') from None
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
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
    if _UNFIT_TEXT.search(value):
        raise invalid(name, f'"{name}" must not contain control characters, NUL or unpaired surrogates.')
    return value


def path_uuid(raw, not_found):
    """An id from the path; a malformed one is simply not found: the refusal
    with code `not_found` (e.g. 'sale_not_found')."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise refusal(not_found) from None


def query_text(req, name, *, max_length=200):
    """A query parameter's one value, or None when it is absent; given twice
    or too long, 400 invalid_parameter."""
    value = req.params.get(name)
    if isinstance(value, list):
        raise refusal('invalid_parameter', f'"{name}" is given more than once.', field=name)
    if value is not None and len(value) > max_length:
        raise refusal('invalid_parameter', f'"{name}" is longer than {max_length} characters.', field=name)
    return value


def query_int(req, name, *, default, low, high):
    """A whole-number query parameter from `low` to `high`, or `default`
    when it is absent; anything else is 400 invalid_parameter."""
    raw = query_text(req, name, max_length=12)
    if raw is None:
        return default
    # isdigit() alone would take other scripts' digits, which int() then refuses.
    if not (raw.isascii() and raw.isdigit() and low <= int(raw) <= high):
        raise refusal('invalid_parameter', f'"{name}" must be a whole number from {low} to {high}.', field=name)
    return int(raw)
