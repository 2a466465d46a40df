"""What every response carries: security headers, caching policy, a log line."""

import itertools
import logging
import os
import re
import time

import falcon

log = logging.getLogger('flashsale.access')

# A client's request id is echoed into logs: accept only a plain token.
_REQUEST_ID = re.compile(r'^[A-Za-z0-9._-]{1,64}$')
# What a client chooses (its path, its method) goes into log lines: a
# newline in it would forge a line, an escape sequence would drive the
# operator's terminal, and a 100 KB path would make a 100 KB line.
_UNPRINTABLE = re.compile(r'[\x00-\x1f\x7f-\x9f\\]')
MAX_LOGGED_CHARS = 200


def _escape(match):
    return f'\\x{ord(match.group()):02x}'


def loggable(text, limit=MAX_LOGGED_CHARS):
    """`text` safe for one log line: control characters (and the backslash,
    so an escape cannot be faked) written as \\xNN, at most `limit`
    characters, then an ellipsis and the full length."""
    if len(text) > limit:
        text = f'{text[:limit]}...({len(text)} chars)'
    return _UNPRINTABLE.sub(_escape, text) if _UNPRINTABLE.search(text) else text


# Our own ids: this process's pid and a counter. Unique per process, and free:
# uuid4() costs a getrandom() call per request, a tenth of a sold-out answer's
# CPU. A forked worker (WORKERS) starts its own.
def _start_request_ids():
    global _PROCESS_TAG, _request_numbers
    _PROCESS_TAG = f'{os.getpid():x}'
    _request_numbers = itertools.count(1)


_start_request_ids()
os.register_at_fork(after_in_child=_start_request_ids)

# The API returns JSON only; nothing in it may be rendered, framed or run.
_API_CSP = "default-src 'none'; frame-ancestors 'none'"
# The page loads its own script, style and API, and nothing from elsewhere.
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


# On every API answer, including the ones waitress gives itself (resources/serving.py).
API_SECURITY_HEADERS = (
    ('X-Content-Type-Options', 'nosniff'),
    ('X-Frame-Options', 'DENY'),
    ('Referrer-Policy', 'no-referrer'),
    ('Content-Security-Policy', _API_CSP),
)


class SecurityHeaders:
    def process_response(self, req, resp, resource, req_succeeded):
        is_page = req.path == '/' or req.path.startswith('/static/')
        resp.set_header('X-Content-Type-Options', 'nosniff')
        resp.set_header('X-Frame-Options', 'DENY')
        resp.set_header('Referrer-Policy', 'no-referrer')
        resp.set_header('Content-Security-Policy', _PAGE_CSP if is_page else _API_CSP)
        if is_page:
            # Revalidate on every load (cheap with Last-Modified), so a new
            # release of the page is never hidden behind a stale cache.
            if req.path.startswith('/static/'):
                resp.cache_control = ['no-cache']
        elif resp.get_header('Cache-Control') is None:
            # API answers carry tokens and per-user data: never store them,
            # unless a resource has said otherwise.
            resp.cache_control = ['no-store']


# What a page on another origin (CORS_ORIGINS) may read of an answer besides
# the safelisted headers: when to try again after a 429 or 503, and the id
# to quote when something went wrong.
CORS_EXPOSED_HEADERS = ('Retry-After', 'X-Request-ID')


class VaryByOrigin:
    """With CORS_ORIGINS, every answer varies by the request's Origin:
    Falcon's CORSMiddleware names the caller's origin in
    Access-Control-Allow-Origin, or leaves the header out. Said on every
    answer, also to a request without Origin, so that a shared cache never
    hands one origin's answer to another, or a plain answer to a page that
    needs the header."""

    def process_response(self, req, resp, resource, req_succeeded):
        resp.append_header('Vary', 'Origin')


class RequestLog:
    """One line per request: method, path, status, duration, request id."""

    def process_request(self, req, resp):
        req.context.started = time.perf_counter()
        given = req.get_header('X-Request-ID') or ''
        req.context.request_id = (
            given if _REQUEST_ID.match(given) else f'{_PROCESS_TAG}-{next(_request_numbers)}'
        )

    def process_response(self, req, resp, resource, req_succeeded):
        resp.set_header('X-Request-ID', req.context.request_id)
        elapsed_ms = (time.perf_counter() - req.context.started) * 1000
        log.info(
            '%s %s %s %.1fms id=%s',
            loggable(req.method, 16), loggable(req.path), resp.status[:3], elapsed_ms, req.context.request_id,
        )


class StaticMethods:
    """Falcon's static route serves its file whatever the method: a POST or a
    DELETE to /static/... would be answered 200 with the file. Only GET and
    HEAD read a file; anything else gets the API's 405."""

    def process_request(self, req, resp):
        if req.path.startswith('/static/') and req.method not in ('GET', 'HEAD', 'OPTIONS'):
            raise falcon.HTTPMethodNotAllowed(['GET', 'HEAD'])
