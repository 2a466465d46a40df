"""/openapi.json describes every route the app has, and only those."""

import re

import falcon

from resources.openapi import DOCUMENT

METHODS = {'get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'}


def routed_operations(app):
    """(METHOD, path) for every responder the app's router and static routes have."""
    found = set()

    def walk(nodes):
        for node in nodes:
            if node.resource is not None:
                # Falcon's {name:converter} is OpenAPI's {name}.
                path = re.sub(r'{(\w+)(:[^}]*)?}', r'{\1}', node.uri_template)
                found.update((method, path) for method in falcon.routing.map_http_methods(node.resource))
            walk(node.children)

    walk(app._router._roots)
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
