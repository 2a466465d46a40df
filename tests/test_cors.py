"""CORS_ORIGINS: only named origins, refused at start when it names none
that a browser could send; what a page on one of them may read; and what a
shared cache must know (Vary: Origin)."""

import re

import pytest

import flashsale
from conftest import clean_env
from conftest import free_port
from conftest import run_cli

SHOP = 'https://shop.example.com'


@pytest.fixture
def cors_client(make_app):
    return make_app(cors_origins=(SHOP, 'http://localhost:3000')).client


def test_an_answer_to_a_named_origin_names_it_and_exposes_retry_after(cors_client):
    resp = cors_client.get('/health', headers={'Origin': SHOP}, status=200)
    assert resp.headers['Access-Control-Allow-Origin'] == SHOP
    exposed = {name.strip().lower() for name in resp.headers['Access-Control-Expose-Headers'].split(',')}
    assert {'retry-after', 'x-request-id'} <= exposed
    assert resp.headers['Vary'] == 'Origin'


def test_every_answer_varies_by_origin_even_without_one_or_to_another_origin(cors_client):
    plain = cors_client.get('/api/flash-sales/current', status=404)
    other = cors_client.get('/api/flash-sales/current', headers={'Origin': 'https://evil.example'}, status=404)
    for resp in (plain, other):
        assert resp.headers['Vary'] == 'Origin'
        assert 'Access-Control-Allow-Origin' not in resp.headers


def test_a_preflight_is_answered_for_a_named_origin_and_varies_by_origin(cors_client):
    resp = cors_client.options('/api/flash-sales/current', headers={
        'Origin': SHOP, 'Access-Control-Request-Method': 'GET', 'Access-Control-Request-Headers': 'authorization',
    }, status=200)
    assert resp.headers['Access-Control-Allow-Origin'] == SHOP
    assert 'GET' in resp.headers['Access-Control-Allow-Methods']
    assert resp.headers['Vary'] == 'Origin'


def test_without_cors_origins_nothing_varies_by_origin(client):
    resp = client.get('/health', headers={'Origin': SHOP}, status=200)
    assert 'Vary' not in resp.headers
    assert 'Access-Control-Allow-Origin' not in resp.headers


def test_serve_refuses_cors_origins_star_in_one_line(database_url):
    result = run_cli('serve', env=clean_env(DATABASE_URL=database_url, JWT_SECRET='s' * 40,
                                             PORT=str(free_port()), CORS_ORIGINS='*'))
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith('flashsale: CORS_ORIGINS=* is refused: list the origins that may call the API')


@pytest.mark.parametrize('origins, said', [
    (f'{SHOP},*', 'CORS_ORIGINS=* is refused'),
    (f'{SHOP}/', "'https://shop.example.com/' is not an origin as a browser sends it"),
    ('shop.example.com', "'shop.example.com' is not an origin"),
    ('https://Shop.example.com', "'https://Shop.example.com' is not an origin"),
    ('null', "'null' is not an origin"),
])
def test_origins_a_browser_never_sends_are_refused(origins, said):
    with pytest.raises(flashsale.ConfigError, match=re.escape(said)):
        flashsale.Settings.from_env({'CORS_ORIGINS': origins})


def test_origins_as_browsers_send_them_are_taken():
    origins = 'https://shop.example.com, http://localhost:3000,https://[::1]:8443,https://xn--bcher-kva.example'
    assert flashsale.Settings.from_env({'CORS_ORIGINS': origins}).cors_origins == (
        'https://shop.example.com', 'http://localhost:3000', 'https://[::1]:8443', 'https://xn--bcher-kva.example')
