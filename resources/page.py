"""The shopper's page: index.html at /, its files under /static/."""

from pathlib import Path

import falcon

STATIC_DIR = Path(__file__).resolve().parent / 'static'


class Index:
    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ['no-cache']
        resp.stream = (STATIC_DIR / 'index.html').open('rb')


def add_routes(app):
    app.add_route('/', Index())
    app.add_static_route('/static', str(STATIC_DIR))
