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
"""

import collections
import logging
import os
import select
import sys
import threading

INTERVAL_SECONDS = 0.05
MAX_WAITING_LINES = 100_000


class BatchedWriter(logging.Handler):
    def __init__(self, stream=None, interval=INTERVAL_SECONDS, max_lines=MAX_WAITING_LINES):
        super().__init__()
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._max_lines = max_lines
        self._lines = collections.deque()
        self._dropped = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name='log-writer', daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        """Write every line emitted so far, and end the thread."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._write_waiting()

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
        if len(self._lines) >= self._max_lines:
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
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            lines.append(f'{dropped} log lines dropped: stderr did not take them in time')
        if not lines:
            return
        try:
            self._stream.write('\n'.join(lines) + '\n')
            self._stream.flush()
        except (OSError, ValueError):
            # stderr closed or broken: nothing left to tell.
            pass


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
