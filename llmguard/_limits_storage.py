"""A ``limits`` storage over diskcache: rate limits shared by every process on one machine,
with no server. Registered with ``limits`` under the scheme ``llmguard+file``.

Each acquisition runs in one SQLite transaction, so the moving window (one timestamp per
request) and the sliding window counter (two counters per key) stay exact across processes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from math import floor
from typing import Any
from urllib.parse import unquote, urlsplit

from limits.storage import MovingWindowSupport, RedisStorage, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

_PREFIX = "llmguard:limits:"


class DiskCacheLimitsStorage(
    Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    """``limits`` storage for ``llmguard+file:///path/to/folder`` (llmguard's local storage)."""

    STORAGE_SCHEME = ["llmguard+file"]  # noqa: RUF012 - the attribute limits reads

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any
    ) -> None:
        from ._storage import LocalStorage

        parts = urlsplit(uri or "")
        self.local = LocalStorage(unquote(parts.netloc + parts.path))
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (OSError, sqlite3.Error)

    @property
    def _cache(self) -> Any:
        return self.local.cache

    # -- counters (fixed window, and the sliding window's two windows) ----------------------
    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        return self.local.incr(_PREFIX + key, amount, ttl=expiry)

    def decr(self, key: str, amount: int = 1) -> int:
        cache = self._cache
        with cache.transact():
            current = int(cache.get(_PREFIX + key, 0))
            if current == 0:
                return 0
            return int(cache.incr(_PREFIX + key, -min(amount, current)))

    def get(self, key: str) -> int:
        return int(self._cache.get(_PREFIX + key, 0))

    def get_expiry(self, key: str) -> float:
        _, expire_time = self._cache.get(_PREFIX + key, expire_time=True)
        return float(expire_time) if expire_time else time.time()

    def check(self) -> bool:
        try:
            self._cache.get(_PREFIX + "health")
            return True
        except Exception:
            return False

    def reset(self) -> int | None:
        return self.local.clear(_PREFIX)

    def clear(self, key: str) -> None:
        self._cache.delete(_PREFIX + key)

    # -- moving window ---------------------------------------------------------------------
    def _window(self, key: str, expiry: float, now: float) -> list[float]:
        raw = self._cache.get(_PREFIX + key)
        entries: list[float] = json.loads(raw) if raw else []
        return [at for at in entries if at >= now - expiry]  # newest first

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        cache = self._cache
        with cache.transact():
            now = time.time()
            entries = self._window(key, expiry, now)
            if len(entries) + amount > limit:
                return False
            entries[:0] = [now] * amount
            cache.set(_PREFIX + key, json.dumps(entries), expire=expiry)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        entries = self._window(key, expiry, now)
        return (entries[-1], len(entries)) if entries else (now, 0)

    # -- sliding window counter ------------------------------------------------------------
    def _sliding(self, key: str, expiry: int, now: float) -> tuple[int, float, int, float]:
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous = self.get(previous_key)
        current = self.get(current_key)
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        if amount > limit:
            return False
        with self._cache.transact():
            now = time.time()
            previous, previous_ttl, current, _ = self._sliding(key, expiry, now)
            if floor(previous * previous_ttl / expiry + current) + amount > limit:
                return False
            self.incr(self.sliding_window_keys(key, expiry, now)[1], 2 * expiry, amount)
            return True

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self._sliding(key, expiry, time.time())

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        for window_key in self.sliding_window_keys(key, expiry, time.time()):
            self.clear(window_key)


# limits' own acquire script, but expiring the key in milliseconds: llmguard widens request
# windows by a fraction of a second, which Redis' EXPIRE (whole seconds) cannot take.
_ACQUIRE_MOVING_WINDOW_MS = """
local timestamp = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
if amount > limit then
    return false
end
local entry = redis.call('lindex', KEYS[1], limit - amount)
if entry and tonumber(entry) >= timestamp - expiry then
    return false
end
for i = 1, amount do
    redis.call('lpush', KEYS[1], timestamp)
end
redis.call('ltrim', KEYS[1], 0, limit - 1)
redis.call('pexpire', KEYS[1], math.ceil(expiry * 1000))
return true
"""


class RedisMovingWindowStorage(RedisStorage):
    """limits' Redis storage, taking fractional-second moving windows."""

    STORAGE_SCHEME = ["llmguard+redis"]  # noqa: RUF012 - never claim limits' own schemes

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self._acquire_ms = self.get_connection().register_script(_ACQUIRE_MOVING_WINDOW_MS.encode())

    def acquire_entry(self, key: str, limit: int, expiry: float, amount: int = 1) -> bool:
        return bool(
            self._acquire_ms([self.prefixed_key(key)], [time.time(), limit, expiry, amount])
        )
