"""A tiny in-process cache for the answers everyone polls.

Thousands of open pages poll the current sale every second or two. Within a
fraction of a second their answers are identical, so one database query serves
them all. A cached answer is at most `ttl` seconds old, except while one
request loads its successor (then the others are given it, at most one load's
time older). The purchase never reads it (stock is decided by the purchase
statement alone).

Anyone can ask for any id, so the cache is built so that asking cannot be
turned against the polls of the current sale:
- one load at a time per key, never one for all keys: a slow load (a busy
  pool, a flood of other ids) holds up only the requests for its own key,
  and those are given the previous answer if there is one;
- "not found" is cached like any answer, so a flood of unknown ids costs at
  most one query per id per ttl (as long as fewer than `max_missing`
  distinct unknown ids come within one ttl);
- found and not-found answers are kept apart, each bounded, oldest dropped
  first: a flood of unknown ids can never push a real sale out.
Each process has its own cache: with N processes (WORKERS, hosts) an answer
costs up to N queries per ttl.
"""

import hashlib
import json
import threading
import time
from collections import OrderedDict
from datetime import timedelta

# Entries kept of each kind. Found ones are real sales, and few; not-found
# ones are whatever anyone asks for (about 300 bytes each: 3 MB at most).
MAX_FOUND = 10_000
MAX_MISSING = 10_000


class PollCache:
    def __init__(self, ttl, default, max_found=MAX_FOUND, max_missing=MAX_MISSING):
        self._ttl = ttl
        self._json_default = default
        # key -> (loaded at, payload, server time, etag), oldest load first.
        self._found = OrderedDict()
        self._missing = OrderedDict()
        self._max_found = max_found
        self._max_missing = max_missing
        self._loading = {}  # key -> Event, set when the load of that key in flight ends
        self._lock = threading.Lock()  # the maps above; never held across a load
        self.loads = 0  # loads begun so far: what the database was asked

    def get(self, key, load):
        """(payload, server_time, etag) for key. `load()` returns
        (payload, server_time) from the database; a payload of None is "not
        found". It runs at most once at a time per key, and once per key per
        ttl, however many threads ask at once."""
        if self._ttl <= 0:  # off: every answer straight from the database
            return self._answer(self._entry(*load()))
        # The common case, a fresh answer, takes no lock (a dict lookup is
        # atomic): thousands of polls a second ask for the same key.
        entry = self._found.get(key) or self._missing.get(key)
        if entry is not None and self._fresh(entry):
            return self._answer(entry)
        while True:
            with self._lock:
                entry = self._found.get(key) or self._missing.get(key)
                if entry is not None and self._fresh(entry):
                    return self._answer(entry)
                loading = self._loading.get(key)
                if loading is None:
                    loading = self._loading[key] = threading.Event()
                    self.loads += 1
                    break
            if entry is not None:
                return self._answer(entry)  # the previous answer, while another thread loads the next
            loading.wait()  # then look again (if that load failed, this thread loads it)
        try:
            entry = self._entry(*load())
            with self._lock:
                self._found.pop(key, None)
                self._missing.pop(key, None)
                entries, most = (self._missing, self._max_missing) if entry[1] is None else (self._found, self._max_found)
                entries[key] = entry  # the newest load last
                while len(entries) > most:
                    entries.popitem(last=False)
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()
        return self._answer(entry)

    def _fresh(self, entry):
        return time.monotonic() - entry[0] < self._ttl

    def loads_in_flight(self):
        with self._lock:
            return len(self._loading)

    def __len__(self):
        return len(self._found) + len(self._missing)

    def _entry(self, payload, server_time):
        etag = None if payload is None else self._etag(payload)
        return time.monotonic(), payload, server_time, etag

    @staticmethod
    def _answer(entry):
        loaded_at, payload, server_time, etag = entry
        if server_time is not None:
            # The database's clock, moved on by the time the answer spent in
            # the cache, so clients correcting their clocks by it stay accurate.
            server_time += timedelta(seconds=time.monotonic() - loaded_at)
        return payload, server_time, etag

    def _etag(self, payload):
        """A payload of bytes is an answer's JSON already (the list's pages)."""
        body = payload if isinstance(payload, bytes) else \
            json.dumps(payload, default=self._json_default, sort_keys=True).encode()
        return hashlib.blake2b(body, digest_size=12).hexdigest()
