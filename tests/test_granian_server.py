"""granian as `flashsale serve` runs it (resources/granian_server.py).

It drives granian below its public API (its Rust worker class, its callback
scheduler): every name it uses is listed in granian_server.GRANIAN_NAMES,
granian is pinned exactly in setup.cfg, and the contract tests here say
which names or parameters changed when granian does. Then what
granian_server adds: chunked bodies read, asyncio left usable."""

import asyncio
import configparser
import importlib
import json
import importlib.metadata
import inspect
import re
import uuid
from pathlib import Path

import pytest

from conftest import ServerInThread
from conftest import call
from conftest import raw_http
from resources import granian_server

SETUP_CFG = Path(__file__).resolve().parent.parent / 'setup.cfg'


def parameters(thing):
    """The parameter names of a function, class or Rust builtin, or None
    when it does not say."""
    text = getattr(thing, '__text_signature__', None)
    if text:
        return [name.strip().lstrip('*').split('=')[0].strip() for name in text.strip('()').split(',')
                if name.strip() and name.strip() not in ('/', '*', '$self', 'self', 'cls', '$cls')]
    try:
        return [name for name in inspect.signature(thing).parameters if name != 'self']
    except (TypeError, ValueError):
        return None


def changes(names, resolve):
    """What no longer matches in `names` (GRANIAN_NAMES' shape), each as
    'module.name: what'. resolve(dotted) -> the module or class, or raises
    ImportError/AttributeError."""
    found = []
    for owner, members in names.items():
        try:
            holder = resolve(owner)
        except (ImportError, AttributeError) as exc:
            found.append(f'{owner}: gone ({exc})')
            continue
        for name, wanted in members.items():
            if not hasattr(holder, name):
                found.append(f'{owner}.{name}: gone')
                continue
            if not wanted:
                continue
            have = parameters(getattr(holder, name))
            if have is None:
                found.append(f'{owner}.{name}: its parameters can no longer be read')
            elif missing := [p for p in wanted if p not in have]:
                found.append(f'{owner}.{name}: no parameter {", ".join(missing)} (now {", ".join(have)})')
    return found


def resolve(dotted):
    """A module, or a class in one ('granian._granian.WSGIWorker')."""
    try:
        return importlib.import_module(dotted)
    except ImportError:
        module, _, attribute = dotted.rpartition('.')
        return getattr(importlib.import_module(module), attribute)


def test_every_granian_name_flashsale_uses_is_there_with_its_parameters():
    assert changes(granian_server.GRANIAN_NAMES, resolve) == []


def test_granian_is_pinned_to_the_version_installed():
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    pins = set(re.findall(r'^\s*granian==(\S+)\s*$', config['options.extras_require']['granian'], re.M))
    assert pins == {importlib.metadata.version('granian')}


def test_a_changed_granian_is_reported_by_name():
    """The check against a changed copy: WSGIWorker without a parameter,
    a function gone, a module gone."""
    import granian._granian as real  # noqa: PLC0415

    class WSGIWorker:  # as if granian renamed py_threads
        def __init__(self, worker_id, sock, ipc, threads, blocking_threads, python_threads, backpressure):
            pass

        def serve_str(self):
            pass

    changed = {
        'granian._granian': type('module', (), {'WSGIWorker': WSGIWorker, 'SocketHolder': real.SocketHolder,
                                                'WorkerSignal': real.WorkerSignal}),
        'granian._granian.WSGIWorker': WSGIWorker,
    }

    def resolve_changed(dotted):
        if dotted in changed:
            return changed[dotted]
        if dotted == 'granian._futures':
            raise ImportError('No module named granian._futures')
        return resolve(dotted)

    found = changes(granian_server.GRANIAN_NAMES, resolve_changed)
    assert any(line.startswith('granian._granian.WSGIWorker: no parameter py_threads, py_threads_idle_timeout')
               for line in found), found
    assert 'granian._futures: gone (No module named granian._futures)' in found
    assert len(found) == 2, found


@pytest.mark.parametrize('owner', sorted(granian_server.GRANIAN_NAMES))
def test_the_names_listed_are_the_ones_the_module_imports(owner):
    """GRANIAN_NAMES lists what granian_server.py uses: every `from granian...
    import X` in it is listed, and every listed module is imported."""
    source = Path(granian_server.__file__).read_text()
    imported = set(re.findall(r'from (granian[\w.]*) import (\w+)', source))
    listed = {(module, name) for module, names in granian_server.GRANIAN_NAMES.items()
              if not module.rsplit('.', 1)[-1][0].isupper() for name in names}
    assert imported <= listed, imported - listed
    module = owner if not owner.rsplit('.', 1)[-1][0].isupper() else owner.rsplit('.', 1)[0]
    assert any(m == module for m, _ in imported), f'{owner} is listed but not imported'


def test_a_granian_server_leaves_asyncio_usable_in_its_process(wsgi_app, settings):
    """granian's own scheduler registers an asyncio task it never
    initialises, after which asyncio.all_tasks() raises in that process
    (asyncio.run's shutdown, Playwright): ours makes none."""
    server = ServerInThread(wsgi_app, settings, engine='granian')
    try:
        assert call(server.base_url, 'GET', '/health').status == 200
        loop = asyncio.new_event_loop()
        try:
            assert asyncio.all_tasks(loop) == set()
        finally:
            loop.close()
    finally:
        server.stop()


def test_a_chunked_body_reaches_the_app_under_granian_up_to_the_body_limit(wsgi_app, settings):
    """granian hands a chunked request on without a Content-Length, which
    the app would read as an empty body: granian_server reads it, up to
    MAX_BODY_BYTES (413 in the API's shape past it)."""
    server = ServerInThread(wsgi_app, settings, engine='granian')
    try:
        body = json.dumps({'email': f'chunked-{uuid.uuid4()}@example.com', 'password': 'a long password'}).encode()
        chunked = b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body)
        head = (b'POST /api/auth/register HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n'
                b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n')
        status, _, answer = raw_http(server.base_url, head + chunked)
        assert status == 201, answer
        too_big = b'x' * (settings.max_body_bytes + 1)
        status, headers, answer = raw_http(server.base_url, head + b'%x\r\n%s\r\n0\r\n\r\n' % (len(too_big), too_big))
        assert status == 413 and json.loads(answer)['code'] == 'payload_too_large', (status, answer)
    finally:
        server.stop()
