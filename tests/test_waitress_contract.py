"""The parts of waitress that resources/serving.py is built on, checked
against the waitress installed: a new waitress that renames, removes or
reshapes one of them fails here, naming each, before an upgrade can switch a
check of the edge off in silence (setup.cfg pins the version checked).

CONTRACT is the one list of them. Then cheap checks of the behaviour serving
relies on, on real waitress objects (serving's own subclasses, a real socket,
no database). scripts/waitress_contract.py runs this file against another
waitress: a source tree (its main branch), or a copy of the installed one with
a name changed."""

import ast
import dataclasses
import importlib
import inspect
import logging
import json
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import flashsale
from resources import serving

# Every waitress module, class, function, method and attribute serving.py
# uses (and flashsale's logging set-up: the logger it quietens). Per module,
# dotted names within it; a callable's value is its parameters as serving
# overrides or calls it (annotations aside), None when only its presence is
# used. "Class()." names an attribute of the objects serving works with, set
# when they are made, looked up on real ones (made below); "Class." one of the
# class itself (a method, or a default serving reads or sets).
CONTRACT = {
    'waitress.wasyncore': {
        # serving's socket loop: one step of its own (_Poller) or waitress'
        'readwrite': '(obj, flags)',
        'poll2': '(timeout=0.0, map=None)',
        'close_all': '(map=None, ignore_all=False)',
        'dispatcher': None,
        # the graceful stop closes the listening socket only, not the trigger
        'dispatcher.close': '(self)',
        'dispatcher.accepting': None,
        'dispatcher.readable': '(self)',
        'dispatcher.writable': '(self)',
        'dispatcher.recv': '(self, buffer_size)',
        'dispatcher.handle_close': '(self)',
    },
    'waitress.adjustments': {
        'Adjustments': None,
        'Adjustments.__init__': '(self, **kw)',
        # the arguments create_server passes, and the values serving reads
        'Adjustments.sockets': None,
        'Adjustments.threads': None,
        'Adjustments.ident': None,
        'Adjustments.max_request_body_size': None,
        'Adjustments.max_request_header_size': None,
        'Adjustments.connection_limit': None,
        'Adjustments.asyncore_use_poll': None,
        'Adjustments.backlog': None,
        'Adjustments.cleanup_interval': None,
        'Adjustments.clear_untrusted_proxy_headers': None,
        'Adjustments.trusted_proxy': None,
        'Adjustments.trusted_proxy_headers': None,
        # Deprecated by waitress 3, set after construction (create_server);
        # honoured: test_send_bytes_is_still_honoured.
        'Adjustments.send_bytes': None,
    },
    'waitress.channel': {
        'HTTPChannel': None,
        'HTTPChannel.__init__': '(self, server, sock, addr, adj, map=None)',
        'HTTPChannel.error_task_class': None,
        # serving._Task: every answer of a stopping server closes its connection
        'HTTPChannel.task_class': None,
        'HTTPChannel().server': None,
        'HTTPChannel.parser_class': None,
        # overridden by serving._Channel
        'HTTPChannel.received': '(self, data)',
        'HTTPChannel.readable': '(self)',
        'HTTPChannel.handle_read': '(self)',
        'HTTPChannel.handle_write': '(self)',
        'HTTPChannel.add_channel': '(self, map=None)',
        'HTTPChannel.del_channel': '(self, map=None)',
        # called
        'HTTPChannel.writable': '(self)',
        'HTTPChannel._flush_exception': '(self, flush, do_close=True)',
        'HTTPChannel._flush_some': '(self, do_close=True)',
        'HTTPChannel.handle_close': '(self)',
        'HTTPChannel.write_soon': '(self, data)',
        # read or set
        'HTTPChannel.request': None,
        'HTTPChannel.last_activity': None,
        'HTTPChannel.will_close': None,
        'HTTPChannel.close_when_flushed': None,
        'HTTPChannel.total_outbufs_len': None,
        'HTTPChannel().requests': None,
        'HTTPChannel().socket': None,
        'HTTPChannel().adj': None,
        'HTTPChannel()._map': None,
        'HTTPChannel()._fileno': None,
    },
    'waitress.parser': {
        'ParsingError': None,
        'HTTPRequestParser': None,
        'HTTPRequestParser.__init__': '(self, adj)',
        # overridden by serving._Parser
        'HTTPRequestParser.received': '(self, data)',
        'HTTPRequestParser.parse_header': '(self, header_plus)',
        # read or set
        'HTTPRequestParser.body_rcv': None,
        'HTTPRequestParser.completed': None,
        'HTTPRequestParser.header_plus': None,
        'HTTPRequestParser.error': None,
        'HTTPRequestParser.expect_continue': None,
        'HTTPRequestParser.chunked': None,
        'HTTPRequestParser.version': None,
        'HTTPRequestParser.headers_finished': None,
        'HTTPRequestParser().headers': None,
        'HTTPRequestParser().adj': None,
        # read by the access log line of a refusal, when the request line parsed
        'HTTPRequestParser().command': None,
        'HTTPRequestParser().path': None,
    },
    'waitress.receiver': {
        'ChunkedReceiver': None,
        # overridden by serving._ChunkedReceiver
        'ChunkedReceiver.__init__': '(self, buf)',
        'ChunkedReceiver.received': '(self, s)',
        'ChunkedReceiver.getbuf': '(self)',
        'ChunkedReceiver.error': None,
        'ChunkedReceiver.chunk_remainder': None,
        'ChunkedReceiver.control_line': None,
        'ChunkedReceiver.trailer': None,
        'ChunkedReceiver.all_chunks_received': None,
    },
    'waitress.server': {
        'TcpWSGIServer': None,
        'TcpWSGIServer.__init__': ('(self, application, map=None, _start=True, _sock=None, dispatcher=None, '
                                   'adj=None, sockinfo=None, bind_socket=True, **kw)'),
        'TcpWSGIServer.channel_class': None,
        # overridden by serving._Listener (maintenance: called from readable)
        'TcpWSGIServer.maintenance': '(self, now)',
        'TcpWSGIServer.handle_accept': '(self)',
        'TcpWSGIServer.readable': '(self)',
        'TcpWSGIServer.next_channel_cleanup': None,
        'TcpWSGIServer().active_channels': None,
        'TcpWSGIServer().adj': None,
        'TcpWSGIServer().socket': None,
        'TcpWSGIServer()._map': None,
        'TcpWSGIServer()._fileno': None,
        'TcpWSGIServer().effective_port': None,
        'TcpWSGIServer().task_dispatcher': None,
    },
    'waitress.task': {
        'ThreadedTaskDispatcher.shutdown': '(self, cancel_pending=True, timeout=5)',
        'ErrorTask': None,
        'ErrorTask.__init__': '(self, channel, request)',
        # overridden by serving._JSONErrorTask
        'ErrorTask.execute': '(self)',
        'ErrorTask.set_close_on_finish': '(self)',
        'ErrorTask.write': '(self, data)',
        'ErrorTask.status': None,
        'ErrorTask.content_length': None,
        'ErrorTask().request': None,
        'ErrorTask().channel': None,
        'ErrorTask().response_headers': None,
        'WSGITask': None,
        'WSGITask.build_response_header': '(self)',
        'WSGITask.set_close_on_finish': '(self)',
        # flashsale.main quietens it by its name
        'queue_logger': None,
        'queue_logger.name': None,
    },
    # resources/granian_server.py: TRUSTED_PROXY under granian, as waitress does it
    'waitress.proxy_headers': {
        'proxy_headers_middleware': '(app, trusted_proxy=None, trusted_proxy_count=1, trusted_proxy_headers=None, '
                                    'clear_untrusted=True, log_untrusted=False, logger=<logger waitress>)',
    },
    'waitress.utilities': {
        'Error.code': None,
        'Error.reason': None,
        'BadRequest': '(body)',
        'RequestEntityTooLarge': '(body)',
    },
}


@pytest.fixture(autouse=True)
def db():
    """No database here (in place of conftest's): this file runs against
    other waitress versions, alone."""


def _parameters(obj):
    sig = inspect.signature(obj)
    # A default that is an object (a logger) by its name: its repr changes
    # with the logging configuration of the moment.
    parameters = [p.replace(annotation=inspect.Parameter.empty,
                            default=_Named(p.default.name) if isinstance(p.default, logging.Logger) else p.default)
                  for p in sig.parameters.values()]
    return str(sig.replace(return_annotation=inspect.Signature.empty, parameters=parameters))


class _Named:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f'<logger {self.name}>'


def _ok(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', '2')])
    return [b'ok']


@dataclasses.dataclass
class Made:
    """Real waitress objects as serving makes them: its listener on a
    loopback port, one accepted connection (`client` its other end), a
    parser that read a chunked request's header."""
    server: object
    client: socket.socket
    channel: object
    parser: object
    task: object


def _settings(**changes):
    return dataclasses.replace(flashsale.Settings(), host='127.0.0.1', port=0, threads=2, hash_queue=1, **changes)


@pytest.fixture
def made():
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # create_server passes nothing waitress deprecates
        server = serving.create_server(_ok, _settings())
    client = socket.create_connection(('127.0.0.1', server.effective_port), timeout=5)
    try:
        server.handle_accept()
        (channel,) = server.active_channels.values()
        parser = serving._Parser(server.adj)
        parser.received(b'POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n')
        refused = serving._Parser(server.adj)
        refused.error = serving.BadRequest('for the contract')
        yield Made(server, client, channel, parser, serving._JSONErrorTask(channel, refused))
    finally:
        client.close()
        server.task_dispatcher.shutdown(timeout=1)
        serving.wasyncore.close_all(server._map)


def _instances(made):
    return {
        'HTTPChannel()': made.channel,
        'HTTPRequestParser()': made.parser,
        'TcpWSGIServer()': made.server,
        'ErrorTask()': made.task,
    }


def _resolve(module, dotted, instances):
    if '()' in dotted:
        owner, attribute = dotted.split('.', 1)
        return getattr(instances[owner], attribute)
    obj = module
    for part in dotted.split('.'):
        obj = getattr(obj, part)
    return obj


def contract_breaches(instances):
    """Every name of CONTRACT missing from the waitress imported, or whose
    parameters changed: ['module:name: what changed']."""
    breaches = []
    for module_name, names in CONTRACT.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            breaches.append(f'{module_name}: cannot import ({exc})')
            continue
        for dotted, expected in names.items():
            where = f'{module_name}:{dotted}'
            try:
                obj = _resolve(module, dotted, instances)
            except AttributeError as exc:
                breaches.append(f'{where}: missing ({exc})')
                continue
            if expected is not None:
                try:
                    got = _parameters(obj)
                except (TypeError, ValueError) as exc:
                    breaches.append(f'{where}: no signature ({exc})')
                    continue
                if got != expected:
                    breaches.append(f'{where}: parameters {got}, not {expected}')
    return breaches


def test_every_waitress_name_serving_uses_is_there_with_its_parameters(made):
    import waitress  # noqa: PLC0415 (which one: scripts/waitress_contract.py runs others)

    breaches = contract_breaches(_instances(made))
    assert not breaches, f'waitress at {Path(waitress.__file__).parent} changed:\n' + '\n'.join(breaches)


def test_the_contract_names_every_waitress_import_of_serving():
    """What serving.py imports from waitress is in CONTRACT (the attributes
    it reads on them are the reviewer's part: they are listed above)."""
    tree = ast.parse(Path(serving.__file__).read_text())
    imported = {(node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module.startswith('waitress')
                for alias in node.names}
    listed = {(module, name.split('.')[0].removesuffix('()')) for module, names in CONTRACT.items() for name in names}
    modules = {f'waitress.{name}' for module, name in imported if module == 'waitress'}
    assert {i for i in imported if i[0] != 'waitress'} - listed == set()
    assert modules - CONTRACT.keys() == set()


# --- behaviour serving relies on ----------------------------------------------


def test_a_chunked_request_with_content_length_is_refused_by_the_parser(made):
    """The smuggling refusal (serving._Parser.parse_header) fires, whatever
    waitress keeps of the header."""
    parser = serving._Parser(made.server.adj)
    _feed(parser, b'POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n')
    assert parser.completed and isinstance(parser.error, serving.BadRequest), \
        f'not refused: error {parser.error!r}, headers {parser.headers}'
    assert parser.error.code == 400
    # ... and the chunked one alone is read with serving's chunked reader.
    assert made.parser.chunked and made.parser.error is None
    assert isinstance(made.parser.body_rcv, serving._ChunkedReceiver)


def test_a_header_arriving_in_pieces_is_held_then_parsed_whole(made):
    """serving._Parser holds what waitress leaves in header_plus while the
    header is incomplete, and hands it back whole."""
    parser = serving._Parser(made.server.adj)
    request = b'GET /health HTTP/1.1\r\nHost: test\r\nX-Long: ' + b'a' * 100 + b'\r\n\r\n'
    for i in range(0, len(request), 7):
        parser.received(request[i:i + 7])
        if not parser.completed:
            assert parser.header_plus == b'' and parser._held is not None
    assert parser.completed and parser.error is None
    assert parser.headers['X_LONG'] == 'a' * 100 and parser.path == '/health'


def _feed(parser, data):
    """Hand `data` to the parser as the channel does: again with what it
    did not take (the body after the header) until it is complete."""
    while data and not parser.completed:
        data = data[parser.received(data):]


@pytest.mark.parametrize('body, error', [
    (b'4000\r\n', serving.RequestEntityTooLarge),  # a chunk of the whole body limit
    (b'1' * 2000, serving.BadRequest),  # a chunk-size line that never ends
    (b'0\r\nX-Trailer: ' + b'a' * 5000, serving.BadRequest),  # a trailer that never ends
], ids=['chunk_remainder', 'control_line', 'trailer'])
def test_the_chunked_readers_state_serving_reads_is_kept(made, body, error):
    parser = serving._Parser(made.server.adj)
    _feed(parser, b'POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n' + body)
    assert isinstance(parser.error, error), (parser.error, parser.body_rcv.__dict__)
    assert parser.completed


def test_send_bytes_is_still_honoured(made):
    """create_server sets adj.send_bytes (waitress 3 deprecates the argument):
    an answer below it is sent by the socket loop, not by the worker as it is
    written. Should waitress stop reading it, answers would go out as with its
    default of 1, correct but slower (README.md, "Slow commits"): this test
    fails first, for the attribute to be taken out or replaced."""
    channel = made.channel
    assert made.server.adj.send_bytes == serving._SEND_BYTES
    channel.write_soon(b'x' * 100)
    assert channel.total_outbufs_len == 100  # kept for the socket loop
    channel._flush_some()
    assert made.client.recv(1000) == b'x' * 100
    made.server.adj.send_bytes = 1
    channel.write_soon(b'y' * 100)
    assert channel.total_outbufs_len == 0  # sent by the writer at once
    assert made.client.recv(1000) == b'y' * 100


def test_the_listeners_readable_runs_serving_maintenance(made):
    """serving._Listener.maintenance (the idle, header and body deadlines)
    runs when the socket loop asks the listener whether it is readable,
    every cleanup_interval."""
    channel = made.channel
    channel.last_activity = time.time() - made.server.idle_timeout - 1
    made.server.next_channel_cleanup = 0
    made.server.readable()
    assert channel.will_close


def test_serve_answers_refuses_in_json_and_stops_on_request():
    """serving.serve, the loop `flashsale serve` runs, from a thread: an
    answer, the server's own JSON refusal (one answer, then the connection
    closed), and a graceful stop asked for by appending to its stop list."""
    server = serving.create_server(_ok, _settings())
    stops = []
    loop = threading.Thread(target=serving.serve, args=(server, 2.0, stops))
    loop.start()
    try:
        with socket.create_connection(('127.0.0.1', server.effective_port), timeout=5) as sock:
            sock.sendall(b'GET / HTTP/1.1\r\nHost: test\r\n\r\n')
            assert sock.recv(65536).startswith(b'HTTP/1.1 200 OK\r\n')
            # a request smuggled in the body of one with both lengths
            sock.sendall(b'POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n'
                         b'0\r\n\r\nGET / HTTP/1.1\r\nHost: test\r\n\r\n')
            answer = b''
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b'\r\n\r\n')
        assert head.startswith(b'HTTP/1.1 400 Bad Request\r\n') and b'\r\nConnection: close' in head, head
        assert json.loads(body)['code'] == 'bad_request'  # and nothing after it: the smuggled GET unanswered
    finally:
        stops.append('end of test')
        loop.join(10)
    assert not loop.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(('127.0.0.1', server.effective_port), timeout=5)


def test_the_contract_fails_naming_what_changed_in_a_changed_copy():
    """Against a copy of the installed waitress with names changed (the
    attribute serving's answers wait on, the deprecated send_bytes gone), the
    contract check fails, naming each."""
    script = Path(__file__).resolve().parent.parent / 'scripts' / 'waitress_contract.py'
    run = subprocess.run(
        [sys.executable, str(script), '--rename', 'channel.py:total_outbufs_len:outbufs_len',
         '--rename', 'adjustments.py:send_bytes:flush_bytes', '--rename', 'channel.py:send_bytes:flush_bytes',
         '--', '-k', 'every_waitress_name or send_bytes'],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert 'waitress.channel:HTTPChannel.total_outbufs_len: missing' in run.stdout, run.stdout
    assert 'waitress.adjustments:Adjustments.send_bytes: missing' in run.stdout, run.stdout
    assert '2 failed' in run.stdout, run.stdout
