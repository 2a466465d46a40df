"""A tiny in-process cache for the answers everyone polls.

Thousands of open pages poll the current sale every second or two. Within a
fraction of a second their answers are identical, so one database query serves
them all. A cached answer is at most `ttl` seconds old; the purchase never
reads it (stock is decided by the purchase statement alone).
"""

import hashlib
import json
import threading
import time
from datetime import timedelta


class PollCache:
    def __init__(self, ttl, default):
        self._ttl = ttl
        self._json_default = default
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, key, load):
        """(payload, server_time, etag) for key. `load()` returns
        (payload, server_time) from the database; it runs at most once per
        key per ttl, however many threads ask at once."""
        entry = self._fresh(key)
        if entry is None:
            with self._lock:
                # Another thread may have loaded it while this one waited.
                entry = self._fresh(key)
                if entry is None:
                    payload, server_time = load()
                    entry = (time.monotonic(), payload, server_time, self._etag(payload))
                    if len(self._entries) > 10_000:
                        self._entries.clear()
                    self._entries[key] = entry
        loaded_at, payload, server_time, etag = entry
        if server_time is not None:
            # The database's clock, moved on by the time the answer spent in
            # the cache, so clients correcting their clocks by it stay accurate.
            server_time += timedelta(seconds=time.monotonic() - loaded_at)
        return payload, server_time, etag

    def _fresh(self, key):
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry[0] < self._ttl:
            return entry
        return None

    def _etag(self, payload):
        body = json.dumps(payload, default=self._json_default, sort_keys=True).encode()
        return hashlib.blake2b(body, digest_size=12).hexdigest()
