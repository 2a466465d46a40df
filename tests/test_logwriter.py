"""The log writer (resources/logwriter.py): every line written once, in order,
none lost at stop, and a stderr that stops taking lines costs memory only
up to a bound; a reader that stalls or is gone never holds up or ends the
server."""

import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from conftest import call
from conftest import free_port
from conftest import run_together
from conftest import serve_env
from conftest import start_serve
from conftest import timed
from conftest import wait_for
from resources.logwriter import BatchedWriter


def record(message):
    return logging.LogRecord('flashsale.test', logging.INFO, __file__, 1, message, None, None)


class PipeReader:
    """The read end of a real pipe, read by a thread into `text` once `start()`ed."""

    def __init__(self):
        read_fd, write_fd = os.pipe()
        self.reader = os.fdopen(read_fd, 'rb')
        self.stream = os.fdopen(write_fd, 'w')
        self.chunks = []
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self):
        while chunk := self.reader.read1(65536):
            self.chunks.append(chunk)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        """The text written, once the write end is closed and all of it read."""
        self.stream.close()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), 'the pipe reader did not finish'
        self.reader.close()
        return b''.join(self.chunks).decode()


def test_lines_from_many_threads_are_written_once_each_in_order():
    pipe = PipeReader().start()
    writer = BatchedWriter(pipe.stream, interval=0.01)
    writer.start()
    threads, per_thread = 8, 2000

    def emit(k):
        for i in range(per_thread):
            writer.handle(record(f't{k} {i}'))

    run_together([functools.partial(emit, k) for k in range(threads)], released_together=True)
    writer.stop()
    lines = pipe.close().splitlines()
    assert len(lines) == threads * per_thread
    for k in range(threads):
        mine = [int(line.split()[1]) for line in lines if line.startswith(f't{k} ')]
        assert mine == list(range(per_thread)), f'thread {k} lines lost, repeated or out of order'


def test_stop_writes_what_is_waiting_even_with_a_long_interval():
    pipe = PipeReader().start()
    writer = BatchedWriter(pipe.stream, interval=3600)
    writer.start()
    for i in range(100):
        writer.handle(record(f'line {i}'))
    writer.stop()
    assert pipe.close().splitlines() == [f'line {i}' for i in range(100)]


def fill(write_fd):
    """Fill the pipe behind write_fd to the last byte, with '#': a blocking
    write to it then waits until someone reads."""
    os.set_blocking(write_fd, False)
    for size in (4096, 1):  # then not even one byte more fits
        try:
            while True:
                os.write(write_fd, b'#' * size)
        except BlockingIOError:
            pass
    os.set_blocking(write_fd, True)


def test_a_blocked_stderr_holds_at_most_max_lines_and_says_how_many_it_dropped():
    pipe = PipeReader()  # not read yet: once full, a write to it blocks
    fill(pipe.stream.fileno())
    writer = BatchedWriter(pipe.stream, interval=0.01, max_lines=500)
    writer.start()
    writer.handle(record('first'))
    # The writer has taken 'first' and is stuck in its write().
    wait_for(lambda: not writer._lines, message='the writer to take the first line')
    for i in range(550):
        writer.handle(record(f'line {i}'))  # returns at once: the writer is blocked, not the caller
    assert len(writer._lines) == 500
    pipe.start()
    writer.stop()
    text = pipe.close().replace('#', '')
    lines = text.splitlines()
    assert lines[0] == 'first'
    assert lines[1:501] == [f'line {i}' for i in range(500)]
    assert lines[501:] == ['50 log lines dropped: stderr did not take them in time']


@pytest.mark.parametrize('started', [True, False], ids=['writer-stuck-in-a-write', 'writer-never-started'])
def test_stop_gives_up_on_a_stream_that_takes_nothing_after_stop_wait(started):
    pipe = PipeReader()  # never read
    fill(pipe.stream.fileno())
    writer = BatchedWriter(pipe.stream, interval=0.01, stop_wait=0.3)
    if started:
        writer.start()
        writer.handle(record('first'))
        wait_for(lambda: not writer._lines, message='the writer to take the first line')  # and block on it
    for i in range(10):
        writer.handle(record(f'line {i}'))
    _, took = timed(writer.stop)
    assert 0.25 < took < 2
    assert writer.dropped == 10
    pipe.reader.close()
    pipe.stream.close()


def test_a_reader_that_is_gone_drops_every_line_and_raises_nothing():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with os.fdopen(write_fd, 'w') as stream:
        writer = BatchedWriter(stream, interval=0.01)
        writer.start()
        writer.handle(record('to nobody'))
        wait_for(lambda: writer.dropped == 1, message='the line to be dropped')
        for i in range(5):
            writer.handle(record(f'line {i}'))
        writer.stop()
    assert writer.dropped == 6


def test_serve_whose_stderr_nobody_reads_answers_and_stops_within_the_grace(database_url, tmp_path):
    """WORKERS=2, stderr a full pipe never read: requests are answered (their
    log lines wait, then are dropped), and SIGTERM ends every process within
    SHUTDOWN_TIMEOUT_MS, exit status 0."""
    read_fd, write_fd = os.pipe()
    fill(write_fd)
    proc = None
    try:
        env = serve_env(database_url, PORT='0', WORKERS='2', SHUTDOWN_TIMEOUT_MS='5000')
        proc = start_serve(env, tmp_path / 'serve.log', stderr=write_fd)
        base_url = re.search(r'listening on (\S+)', (tmp_path / 'serve.log').read_text()).group(1)
        for _ in range(20):
            assert call(base_url, 'GET', '/health').status == 200
        proc.send_signal(signal.SIGTERM)
        status, took = timed(lambda: proc.wait(timeout=20))
        assert status == 0
        assert took < 5
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_fd)
        os.close(write_fd)


def test_serve_whose_output_readers_are_gone_serves_and_stops_with_status_0(database_url):
    """`flashsale serve | true` (and its stderr gone too): no BrokenPipeError,
    no exit 1; it serves, its output dropped. One process: it prints
    "listening" before it answers anything, so an answer means the print to
    the gone reader has happened."""
    port = free_port()
    ends = [os.pipe(), os.pipe()]
    for read_fd, _ in ends:
        os.close(read_fd)
    proc = subprocess.Popen([sys.executable, '-m', 'flashsale', 'serve'],
                            env=serve_env(database_url, PORT=str(port)),
                            stdout=ends[0][1], stderr=ends[1][1])
    for _, write_fd in ends:
        os.close(write_fd)
    base_url = f'http://127.0.0.1:{port}'

    def answers():
        assert proc.poll() is None, f'flashsale serve exited with status {proc.returncode}'
        try:
            return call(base_url, 'GET', '/health').status == 200
        except OSError:
            return False

    try:
        wait_for(answers, timeout=60, message='GET /health to answer')
        for _ in range(5):
            assert call(base_url, 'GET', '/health').status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
