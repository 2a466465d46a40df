"""/openapi.json describes every route the app has, and only those."""

import re

import falcon

from resources.errors import CATALOGUE
from resources.openapi import DOCUMENT

METHODS = {'get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'}


def routed_resources(app):
    """(resource, OpenAPI path) for every route of the app's router."""
    def walk(nodes):
        for node in nodes:
            if node.resource is not None:
                # Falcon's {name:converter} is OpenAPI's {name}.
                yield node.resource, re.sub(r'{(\w+)(:[^}]*)?}', r'{\1}', node.uri_template)
            yield from walk(node.children)

    return walk(app._router._roots)


def routed_operations(app):
    """(METHOD, path) for every responder the app's router and static routes have."""
    found = set()
    for resource, path in routed_resources(app):
        methods = set(falcon.routing.map_http_methods(resource))
        # flashsale._App answers HEAD wherever GET is routed; the document
        # says so once, in its description.
        if 'GET' in methods:
            methods.discard('HEAD')
        found.update((method, path) for method in methods)
    for route, _, _ in app._static_routes:
        # resources/middleware.py lets only these through to a static route.
        found.update((method, route._prefix + '{path}') for method in ('GET', 'HEAD'))
    return found


def documented_operations(document):
    return {(method.upper(), path) for path, item in document['paths'].items() for method in item
            if method in METHODS}


def test_every_route_is_documented_and_every_documented_route_exists(wsgi_app):
    routed = routed_operations(wsgi_app)
    documented = documented_operations(DOCUMENT)
    assert routed - documented == set(), 'routes missing from resources/openapi.py'
    assert documented - routed == set(), 'documented operations the app does not have'
    assert len(routed) >= 14


def test_the_document_is_served_as_json(client):
    resp = client.get('/openapi.json', status=200)
    assert resp.content_type == 'application/json'
    assert resp.json['openapi'].startswith('3.0')
    assert documented_operations(resp.json) == documented_operations(DOCUMENT)


def test_every_operation_documents_its_errors_in_the_error_shape():
    for path, item in DOCUMENT['paths'].items():
        for method, operation in item.items():
            for status, response in operation['responses'].items():
                if status >= '400' and path != '/openapi.json':
                    schema = response['content']['application/json']['schema']
                    assert schema['allOf'][0] == {'$ref': '#/components/schemas/Error'}, (method, path, status)
            if operation.get('security'):
                assert '401' in operation['responses'], (method, path)


def test_every_documented_error_code_is_the_catalogues_with_its_status():
    documented = set()
    for item in DOCUMENT['paths'].values():
        for operation in item.values():
            for status, response in operation['responses'].items():
                if status >= '400' and 'content' in response:
                    for code in response['content']['application/json']['schema']['allOf'][1]['properties']['code']['enum']:
                        assert CATALOGUE[code].status.startswith(status), (code, status)
                        documented.add(code)
    # What the document cannot list per operation: refusals of the HTTP edge
    # before any route (the info text names 404 and 405), and the 500 no
    # operation is meant to give.
    edge = {'bad_request', 'headers_too_large', 'not_implemented', 'method_not_allowed', 'internal_error'}
    assert set(CATALOGUE) - documented == edge


def test_the_operations_that_need_a_token_are_the_ones_documented_with_one(wsgi_app):
    # (HEAD, where GET needs a token, needs one too: flashsale._App.)
    needing = {(method, path) for resource, path in routed_resources(wsgi_app)
               for method in getattr(resource, 'login_required', ()) if method != 'HEAD'}
    documented = {(method.upper(), path) for path, item in DOCUMENT['paths'].items()
                  for method, operation in item.items() if operation.get('security')}
    assert needing == documented
    assert len(needing) == 8  # with POST /api/auth/refresh, /api/me/password, GET /api/purchase-outcomes
