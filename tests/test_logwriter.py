"""The log writer (resources/logwriter.py): every line written once, in order,
none lost at stop, and a stderr that stops taking lines costs memory only
up to a bound."""

import functools
import logging
import os
import threading

from conftest import run_together
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


def test_a_blocked_stderr_holds_at_most_max_lines_and_says_how_many_it_dropped():
    pipe = PipeReader()  # not read yet: once full, a write to it blocks
    os.set_blocking(pipe.stream.fileno(), False)
    for size in (4096, 1):  # then not even one byte more fits
        try:
            while True:
                os.write(pipe.stream.fileno(), b'#' * size)
        except BlockingIOError:
            pass
    os.set_blocking(pipe.stream.fileno(), True)
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
