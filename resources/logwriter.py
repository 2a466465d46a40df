"""The process' log lines, written to stderr in batches by one thread.

A request thread formats its line and appends it to a deque: no lock, no
system call, and no other thread woken. The writer thread wakes every
`interval` seconds and writes everything that came in with one write(). A
handler writing to stderr itself would make every request thread take the
handler's lock for a write() per line; one that hands each line to a
waiting writer thread (logging.handlers.QueueListener) wakes that thread
for every line: two thread switches and GIL hand-offs per request, which
cost a third of a /health answer's CPU (README.md, "Serving a crowd").

Lines keep their order (one deque, one writer). A line waits at most
`interval` before it is written; stop() writes what is left. If stderr
blocks (a pipe nobody reads), at most `max_lines` wait; beyond that, lines
are dropped and counted, and the writer says how many once it can write
again, rather than letting memory grow without bound. (The count is kept
without a lock, by the threads that drop and the writer that reports it: a
drop counted at the very moment of a report may be left out of it.)

A reader that stalls must not stop the service either: only the writer
thread ever waits in write(), and stop() waits for it at most `stop_wait`
seconds, then lets it be (a daemon thread: the process exits all the same)
and counts what it could not write as dropped. The writer writes with
os.write() on the descriptor, never through sys.stderr's own buffer, whose
lock a thread stuck in a write would hold: the interpreter takes that lock
to flush stderr at exit, and aborts when it cannot ("could not acquire lock
... at interpreter shutdown"). A reader that is gone (EPIPE: `2>&1 | head`,
a closed terminal) is gone for good: every line from then on is dropped.

ReaderGoneSafe does the same for the prints to stdout and stderr (the
"listening" line, a one-line refusal): a reader that is gone drops them,
instead of a BrokenPipeError that would end the process.
"""

import collections
import logging
import os
import select
import sys
import threading
import time

INTERVAL_SECONDS = 0.05
MAX_WAITING_LINES = 100_000
# At stop, the longest the lines still waiting may take to go out. A live
# reader (a terminal, journald, a file) takes a pipe's 64 KiB at once; one
# that takes nothing for this long is not reading, and a stop (systemd's,
# docker's: their own timeouts run) must not wait for it.
STOP_WAIT_SECONDS = 1.0


class BatchedWriter(logging.Handler):
    def __init__(self, stream=None, interval=INTERVAL_SECONDS, max_lines=MAX_WAITING_LINES,
                 stop_wait=STOP_WAIT_SECONDS):
        """`stream`: a file with a descriptor (default: sys.stderr)."""
        super().__init__()
        self._fd = (stream if stream is not None else sys.stderr).fileno()
        self._interval = interval
        self._max_lines = max_lines
        self._stop_wait = stop_wait
        self._lines = collections.deque()
        self._dropped = 0
        self._reader_gone = False
        self._deadline = None  # of the last writes, set by stop()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name='log-writer', daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        """Write every line emitted so far and end the thread, in at most
        `stop_wait` seconds: what the stream has not taken by then is
        dropped (a stop must not wait for a reader that stalls)."""
        self._deadline = time.monotonic() + self._stop_wait
        self._stopping.set()
        if self._thread.is_alive():
            # Its last write keeps to the deadline; this one is for a write
            # it was already waiting in when the stop came.
            self._thread.join(self._stop_wait)
        if self._thread.is_alive():
            self._dropped += len(self._lines)  # still stuck: nowhere to say so
            self._lines.clear()
        else:  # never started; or lines came in after its last look
            self._write_waiting()

    @property
    def dropped(self):
        """Lines dropped and not yet said to be."""
        return self._dropped

    def handle(self, record):
        # Without logging.Handler's lock: emit() only appends to the deque,
        # which is safe from any thread.
        passed = self.filter(record)
        if passed:
            # (From Python 3.12 a filter may hand back a record to use instead.)
            self.emit(passed if isinstance(passed, logging.LogRecord) else record)
        return passed

    def emit(self, record):
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 (logging's own policy: a bad record must not break the caller)
            self.handleError(record)
            return
        if self._reader_gone or len(self._lines) >= self._max_lines:
            self._dropped += 1
        else:
            self._lines.append(line)

    def _run(self):
        while not self._stopping.wait(self._interval):
            self._write_waiting()
        self._write_waiting()

    def _write_waiting(self):
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        reported = 0
        if self._dropped and not self._reader_gone:
            reported, self._dropped = self._dropped, 0
            lines.append(f'{reported} log lines dropped: stderr did not take them in time')
        if not lines:
            return
        data = memoryview(('\n'.join(lines) + '\n').encode('utf-8', 'backslashreplace'))
        try:
            while data and self._may_write():
                # Once stopping, a pipe buffer at a time (poll() said one
                # is free): a write that fits does not wait.
                data = data[os.write(self._fd, data[:select.PIPE_BUF] if self._stopping.is_set() else data):]
        except OSError:
            # EPIPE, EBADF: the reader is gone, and will not come back.
            self._reader_gone = True
        if data:  # not written, the report (the last line) included
            self._dropped += data.tobytes().count(b'\n') - bool(reported) + reported

    def _may_write(self):
        """True while running (a write may wait: only this thread waits);
        once stopping, whether the stream takes a write before the deadline
        (a reader that is gone says so too: the write then fails)."""
        if not self._stopping.is_set():
            return True
        left = self._deadline - time.monotonic()
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return left > 0 and bool(poller.poll(left * 1000))


class ReaderGoneSafe:
    """sys.stdout or sys.stderr, for a process that must outlive the reader
    of its output (`flashsale serve | true`, a closed terminal). The first
    write the reader is gone for points the descriptor at /dev/null: that
    write and every later one (Python's own flush at exit included) is
    dropped, where a BrokenPipeError would have ended the process with a
    traceback (and a failed flush at exit, with status 120)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop_from_now_on()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop_from_now_on()

    def _drop_from_now_on(self):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)
        self._stream.flush()  # what it still holds: to /dev/null

    def __getattr__(self, name):
        return getattr(self._stream, name)


class DirectWriter(logging.Handler):
    """Each line written at once, for a process that must run no thread of
    its own (the command line; the parent that forks the workers, and must
    go on supervising them even when stderr is stalled): a line stderr
    cannot take now is dropped and counted, never waited for."""

    def __init__(self, stream=None):
        super().__init__()
        self._stream = stream if stream is not None else sys.stderr
        self._dropped = 0

    def emit(self, record):
        try:
            line = self.format(record) + '\n'
        except Exception:  # noqa: BLE001 (logging's own policy)
            self.handleError(record)
            return
        if self._dropped:
            line = f'{self._dropped} log lines dropped: stderr did not take them in time\n' + line
        try:
            fd = self._stream.fileno()
            # Writable: a pipe has room for a line (Linux: a page) now.
            if not select.select([], [fd], [], 0)[1]:
                self._dropped += 1
                return
            os.write(fd, line.encode('utf-8', 'backslashreplace'))
            self._dropped = 0
        except (OSError, ValueError):
            self._dropped += 1
