"""Fuzzing the real app and the real database from /openapi.json with
schemathesis: valid and invalid requests to every operation, each answer
checked against the document (status documented, content type, body schema,
headers such as Retry-After) and never a 5xx.

The run is bounded (FUZZ_EXAMPLES generated cases per operation, plus the
examples and boundary cases schemathesis derives from the document) and
test_the_fuzzing_ran_enough_cases reports how many cases ran, and
test_after_the_fuzzing_the_metrics_hold_a_bounded_number_of_series that
whatever the cases sent made no series of their own in /metrics.
"""

import collections
import hashlib
import secrets
import uuid
from datetime import datetime
from datetime import timezone

import bcrypt
import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import auth
from conftest import metric_samples
from resources.openapi import DOCUMENT
from resources.sales import EARLIEST_DATE
from resources.sales import LATEST_DATE

FUZZ_EXAMPLES = 250
CASES = []

class SessionApp:
    """The session's WSGI app (tests/conftest.py builds it), once a test has
    been given it. schemathesis' fixture-built schemas do not run under
    pytest 9, so the schema is built at import, before the app exists."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


APP = SessionApp()
# The document the app serves at /openapi.json (tests/test_openapi.py checks
# that it is this one).
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.app = APP


@pytest.fixture
def world(make_user, make_sale, db):
    """An admin (whose token every authenticated case carries) and sales in
    every state, for valid sale ids to name."""
    admin_id, token = make_user(admin=True)
    # A real hash, of a password no case will guess: POST /api/me/password
    # checks it (and a change would end the session every case carries).
    db.execute('UPDATE users SET password_hash = %s WHERE id = %s',
               (bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(4)).decode(), admin_id))
    sales = [
        make_sale(stock=3),
        make_sale(stock=1, remaining=0),
        make_sale(stock=1, starts_in=60),
        make_sale(stock=2, starts_in=-120, ends_in=-60),
    ]
    return token, [str(sale) for sale in sales]


def aim_at_a_real_sale(case, sales):
    """A random valid UUID names no sale: most valid cases would only ever
    see 404. Point most of them at one of the sales that exist instead,
    chosen by the generated id (so that shrinking and replay still work)."""
    sale_id = (case.path_parameters or {}).get('sale_id')
    if not (case.meta and case.meta.generation.mode.is_positive and isinstance(sale_id, str)):
        return
    choice = int(hashlib.blake2b(sale_id.encode(), digest_size=4).hexdigest(), 16) % (len(sales) + 1)
    if choice < len(sales):
        case.path_parameters['sale_id'] = sales[choice]


# Text a generator rarely makes and a server must still refuse cleanly: NUL
# (PostgreSQL cannot store it), lone surrogates (UTF-8 cannot encode them),
# control characters, and very long runs.
SPIKES = ['\x00', '\ud800', '\udfff', 'a\x00b', '\n', '\r\n', '\x1b[31m', '\x7f', '\x85', '\t',
          'x' * 5000, '\x00' * 300, '\ud800' * 300, 'é' * 3000, '\\' * 2000]


def spike_text(case):
    """Put one of SPIKES into about half of the bodies' string fields, chosen
    by the generated value (so that shrinking and replay still work).
    Returns whether it did: the case is then no longer the one schemathesis
    made, valid or invalid, so only the checks that hold for any request
    apply to it (never a 5xx, the answer as documented)."""
    body = case.body if isinstance(case.body, dict) else {}
    spiked = False
    for name, value in body.items():
        if not isinstance(value, str):
            continue
        choice = int(hashlib.blake2b(value.encode('utf-8', 'surrogatepass'), digest_size=4).hexdigest(), 16)
        if choice % 2:
            spike = SPIKES[choice // 2 % len(SPIKES)]
            body[name] = (value + spike, spike + value, spike)[choice // 64 % 3]
            spiked = True
    return spiked


def rules_the_document_cannot_state(case):
    """The checks a case cannot be held to. JSON Schema counts a password's
    characters, the API its bytes (8 to 72 of UTF-8); OpenAPI 3.0 cannot
    bound a date-time (the API takes the years 2000 to 9998) nor compare two
    fields (endDate after startDate). So a schema-valid body may be refused,
    and a schema-invalid one (a password of 5 two-byte characters) accepted.
    The list's cursor has a documented shape, but only the strings the list
    gave (nextCursor) are cursors: any other is refused."""
    if (case.query or {}).get('cursor') is not None:
        return [positive_data_acceptance]
    body = case.body if isinstance(case.body, dict) else {}
    password = body.get('password')
    if isinstance(password, str) and len(password) != len(password.encode()):
        return [positive_data_acceptance, negative_data_rejection]
    if 'startDate' in body and 'endDate' in body:
        try:
            start, end = datetime.fromisoformat(body['startDate']), datetime.fromisoformat(body['endDate'])
            fine = end > start and all(EARLIEST_DATE <= d.astimezone(timezone.utc) < LATEST_DATE for d in (start, end))
        except (TypeError, ValueError, OverflowError):
            fine = False
        if not fine:
            return [positive_data_acceptance]
    return None


@schema.parametrize()
@hypothesis.settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_answer_conforms_and_none_is_a_5xx(case, world, wsgi_app):
    token, sales = world
    APP.app = wsgi_app
    aim_at_a_real_sale(case, sales)
    headers = auth(token) if case.operation.definition.raw.get('security') else None
    excluded = rules_the_document_cannot_state(case)
    if spike_text(case):
        excluded = [positive_data_acceptance, negative_data_rejection]
    response = case.call_and_validate(headers=headers, excluded_checks=excluded)
    CASES.append((case.operation.label, case.meta.phase.name.value if case.meta else '-', response.status_code))


def test_the_fuzzing_ran_enough_cases(capsys):
    """Reported in the test output: how many cases, by operation and phase."""
    # Never a skip: a run that fuzzed nothing must not pass. (Alone, this test
    # fails; run the module, whose fuzzing test comes first.)
    assert CASES, 'no fuzz case ran before this test: run it with test_every_answer_conforms_and_none_is_a_5xx'
    operations = {operation for operation, _, _ in CASES}
    phases = collections.Counter(phase for _, phase, _ in CASES)
    statuses = sorted({status for *_, status in CASES})
    with capsys.disabled():
        print(f'\nschemathesis: {len(CASES)} cases over {len(operations)} operations '
              f'({", ".join(f"{n} {p}" for p, n in phases.most_common())}); statuses seen: {statuses}')
    assert len(operations) >= 14
    assert len(CASES) >= 300
    assert all(status < 500 for *_, status in CASES)


# The series /metrics may hold in this process whatever clients send: every
# label is a route template (not a path), a standard method or "other", a
# status, an error code of the catalogue, a purchase outcome or a fixed
# reason. 542 after this module's run alone (printed below; other modules
# run in the same process add their own kinds of request); a label taken
# from a request would pass this within the first thousand cases.
MAX_SERIES = 1200


def series(client):
    return set(metric_samples(client.get('/metrics', status=200).text))


@pytest.mark.filterwarnings('ignore:Unknown REQUEST_METHOD')  # WebTest's, for the made-up methods
def test_after_the_fuzzing_the_metrics_hold_a_bounded_number_of_series(client, wsgi_app, capsys):
    # (Alone, this test fails, as the one above.)
    assert CASES, 'no fuzz case ran before this test: run it with test_every_answer_conforms_and_none_is_a_5xx'
    after_fuzzing = series(client)
    with capsys.disabled():
        print(f'\nmetrics after the fuzzing: {len(after_fuzzing)} series')
    assert len(after_fuzzing) < MAX_SERIES
    templates = {route.uri_template for route in _routes(wsgi_app)} | {'unmatched', '/static/{path}'}
    assert {dict(labels)['route'] for _, labels in after_fuzzing if 'route' in dict(labels)} <= templates

    def junk():
        """Requests no client of the API sends: random paths, ids and methods."""
        for _ in range(20):
            client.get(f'/{uuid.uuid4()}/{secrets.token_hex(8)}', status=404)
            client.get(f'/api/flash-sales/{uuid.uuid4()}', status=404)
            client.get(f'/api/flash-sales/{secrets.token_hex(40)}', status=404)
            client.request(f'/api/flash-sales/{uuid.uuid4()}/purchase', method=secrets.token_hex(4).upper(),
                           status='*')
            client.get(f'/static/{secrets.token_hex(8)}.js', status=404)

    junk()
    once = series(client)
    junk()  # different values, the same kinds of request: not one series more
    assert series(client) == once


def _routes(app):
    def walk(nodes):
        for node in nodes:
            if node.resource is not None:
                yield node
            yield from walk(node.children)

    return walk(app._router._roots)
