"""A ``limits`` storage over diskcache: rate limits shared by every process on one machine,
with no server. Registered with ``limits`` under the scheme ``llmguard+file``; the same code
over a dict serves ``memory://`` (``llmguard+memory``).

Each acquisition runs in one SQLite transaction, so the moving window (one timestamp per
request) and the sliding window counter (two counters per key) stay exact across processes.
Both read the time from ``clock`` (``time.time`` unless ``@rate_limited(clock=...)`` gives
another), so tests can move time instead of sleeping. diskcache expires idle keys by real
time, so under another clock the folder's keys are left to the windows' own arithmetic.

Every operation ``limits`` calls on these storages (and on the Redis one) runs inside
llmguard's storage seam (:data:`llmguard._storage.storage_errors`), like every operation of
llmguard's own storages: a backend's exception (``sqlite3.DatabaseError``, redis-py's
``ConnectionError``/``TimeoutError``...) reaches ``@rate_limited`` as a ``StorageError``
with the original chained, and the storage's outages are tracked in one place.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from math import floor
from typing import Any
from urllib.parse import unquote, urlsplit

from limits.storage import MovingWindowSupport, RedisStorage, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from ._storage import REDIS_TIMEOUTS, storage_errors

_PREFIX = "llmguard:limits:"

# What limits (and llmguard's rate limiter) call on a storage: the methods limits itself
# wraps with its own error handling, and decr.
_OPERATIONS = (
    "incr",
    "decr",
    "get",
    "get_expiry",
    "reset",
    "clear",
    "acquire_entry",
    "get_moving_window",
    "acquire_sliding_window_entry",
    "get_sliding_window",
    "clear_sliding_window",
)


def _through_seam(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def operation(self: Any, *args: Any, **kwargs: Any) -> Any:
        with storage_errors(self.storage_uri, name):
            return method(self, *args, **kwargs)

    operation.__llmguard_seam__ = True  # type: ignore[attr-defined]
    return operation


class _Seam:
    """Runs every storage operation of a ``limits`` storage class (and its subclasses) inside
    llmguard's storage seam, outside limits' own error wrapping. ``storage_uri`` is the
    llmguard storage URI errors and outages name."""

    storage_uri: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)  # limits wraps its methods first: ours go outside
        for name in _OPERATIONS:
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "__llmguard_seam__", False):
                setattr(cls, name, _through_seam(name, method))


class DiskCacheLimitsStorage(
    _Seam, Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    """``limits`` storage for ``llmguard+file:///path/to/folder`` (llmguard's local storage)."""

    STORAGE_SCHEME = ["llmguard+file"]  # noqa: RUF012 - the attribute limits reads

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        from ._storage import LocalStorage

        parts = urlsplit(uri or "")
        self.local = LocalStorage(unquote(parts.netloc + parts.path))
        self.storage_uri = self.local.uri
        self.clock = clock
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (OSError, sqlite3.Error)

    def _ttl(self, seconds: float) -> float | None:
        """diskcache's expiry for a key living ``seconds`` by the clock: real time only
        matches the real clock (a virtual one may move slower, and keys must not expire
        early)."""
        return seconds if self.clock is time.time else None

    @property
    def _cache(self) -> Any:
        return self.local.cache

    def _atomic(self) -> Any:
        """One transaction, on the folder now on disk (never reopened in the middle)."""
        return self.local.atomic()

    # -- counters (fixed window, and the sliding window's two windows) ----------------------
    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        with self._atomic():
            cache = self._cache
            created = cache.get(_PREFIX + key) is None
            value = int(cache.incr(_PREFIX + key, amount, default=0))
            if created:
                cache.touch(_PREFIX + key, expire=self._ttl(expiry))
            return value

    def decr(self, key: str, amount: int = 1) -> int:
        with self._atomic():
            cache = self._cache
            current = int(cache.get(_PREFIX + key, 0))
            if current == 0:
                return 0
            return int(cache.incr(_PREFIX + key, -min(amount, current)))

    def get(self, key: str) -> int:
        return int(self._cache.get(_PREFIX + key, 0))

    def get_expiry(self, key: str) -> float:
        _, expire_time = self._cache.get(_PREFIX + key, expire_time=True)
        return float(expire_time) if expire_time else self.clock()

    def check(self) -> bool:
        try:
            self._cache.get(_PREFIX + "health")
            return True
        except Exception:
            return False

    def reset(self) -> int | None:
        cache = self._cache
        doomed = [k for k in cache.iterkeys() if isinstance(k, str) and k.startswith(_PREFIX)]
        return sum(1 for key in doomed if cache.delete(key))

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
        with self._atomic():
            cache = self._cache
            now = self.clock()
            entries = self._window(key, expiry, now)
            if len(entries) + amount > limit:
                return False
            entries[:0] = [now] * amount
            cache.set(_PREFIX + key, json.dumps(entries), expire=self._ttl(expiry))
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = self.clock()
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
        with self._atomic():
            now = self.clock()
            previous, previous_ttl, current, _ = self._sliding(key, expiry, now)
            if floor(previous * previous_ttl / expiry + current) + amount > limit:
                return False
            self.incr(self.sliding_window_keys(key, expiry, now)[1], 2 * expiry, amount)
            return True

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self._sliding(key, expiry, self.clock())

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        for window_key in self.sliding_window_keys(key, expiry, self.clock()):
            self.clear(window_key)


class _DictCache:
    """The part of ``diskcache.Cache`` that :class:`DiskCacheLimitsStorage` uses, as a dict
    in this process, expiring entries by ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._data: dict[str, tuple[Any, float | None]] = {}
        self._lock = threading.RLock()

    def transact(self) -> threading.RLock:
        return self._lock

    def _live(self, key: str) -> tuple[Any, float | None] | None:
        item = self._data.get(key)
        if item is not None and item[1] is not None and item[1] <= self.clock():
            del self._data[key]
            return None
        return item

    def get(self, key: str, default: Any = None, expire_time: bool = False) -> Any:
        with self._lock:
            item = self._live(key)
        if expire_time:
            return (default, None) if item is None else item
        return default if item is None else item[0]

    def set(self, key: str, value: Any, expire: float | None = None) -> None:
        with self._lock:
            self._data[key] = (value, None if expire is None else self.clock() + expire)

    def incr(self, key: str, delta: int = 1, default: int = 0) -> int:
        with self._lock:
            item = self._live(key)
            value, expires = (default, None) if item is None else item
            self._data[key] = (int(value) + delta, expires)
            return int(value) + delta

    def touch(self, key: str, expire: float | None = None) -> bool:
        with self._lock:
            item = self._live(key)
            if item is None:
                return False
            self._data[key] = (item[0], None if expire is None else self.clock() + expire)
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._live(key) is not None and self._data.pop(key, None) is not None

    def iterkeys(self) -> Iterator[str]:
        with self._lock:
            return iter([key for key in list(self._data) if self._live(key) is not None])


class MemoryLimitsStorage(DiskCacheLimitsStorage):
    """The same limits storage over a dict in this process: ``memory://`` rate limits."""

    STORAGE_SCHEME = ["llmguard+memory"]  # noqa: RUF012 - the attribute limits reads

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        self.clock = clock
        self.storage_uri = uri or "memory://"
        self._dict = _DictCache(clock)
        Storage.__init__(self, uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def _ttl(self, seconds: float) -> float | None:
        return seconds  # the dict expires keys by the clock itself

    @property
    def _cache(self) -> Any:
        return self._dict

    def _atomic(self) -> Any:
        return self._dict.transact()


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


class RedisMovingWindowStorage(_Seam, RedisStorage):
    """limits' Redis storage, taking fractional-second moving windows, with llmguard's
    Redis timeouts (:data:`llmguard._storage.REDIS_TIMEOUTS`; the URI's
    ``?socket_timeout=`` wins): limits sets none, and a Redis that accepts connections but
    never answers would hang the call. ``storage_uri`` is the llmguard URI errors name."""

    STORAGE_SCHEME = ["llmguard+redis"]  # noqa: RUF012 - never claim limits' own schemes

    def __init__(self, uri: str, *, storage_uri: str, **options: Any) -> None:
        self.storage_uri = storage_uri
        super().__init__(uri, **{**REDIS_TIMEOUTS, **options})

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self._acquire_ms = self.get_connection().register_script(_ACQUIRE_MOVING_WINDOW_MS.encode())

    def acquire_entry(self, key: str, limit: int, expiry: float, amount: int = 1) -> bool:
        return bool(
            self._acquire_ms([self.prefixed_key(key)], [time.time(), limit, expiry, amount])
        )
