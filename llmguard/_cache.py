"""``@cached``: a persistent, safe, stampede-free response cache.

A hit returns the stored result, logs ``cache="hit"`` with ``cost_usd=0`` and the original
call's cost as ``saved_usd``, and skips every layer below (put ``@cached`` outermost).
Concurrent identical misses make one upstream call, however long it takes: threads and
asyncio tasks of a process wait on an in-process flight while its leader lives; other
processes (and, with Redis, other machines) wait on a lock entry in the storage, a lease the
leader renews while it works (see ``_lease``), which expires so a dead holder cannot block
them for ever. A call made inside its own miss (the function calling itself with the same
arguments) runs uncached instead of waiting for itself.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Generator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from decimal import Decimal
from typing import Any, NamedTuple, ParamSpec, Protocol, TypeVar, overload

from . import _validate as validate
from ._config import UNSET, Unset
from ._errors import LLMGuardError, StorageError
from ._events import warn_once, warn_outage
from ._flight import Flight, running_loop
from ._keys import Binder, canonical, code_digest
from ._lease import Lease
from ._money import format_usd
from ._pipeline import (
    PROCEED,
    Blocking,
    Call,
    CallRecord,
    GuardedFunction,
    Metering,
    PromptFn,
    Sleep,
    UserFunction,
    check_options,
    full_name,
    guard,
    original,
)
from ._serialize import Entry, EntryError, decode, encode, helper_options, unchunk
from ._storage import Storage, open_storage
from ._stream import (
    StreamTally,
    discard,
    helper_of,
    is_stream,
    is_stream_manager,
    manager_name,
    replay,
    replay_helper,
)
from ._stream import wrap as wrap_stream
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_bypass: ContextVar[bool] = ContextVar("llmguard_bypass_cache", default=False)
_STREAM_STORED = object()  # a flight's value: the leader's stream is in the storage now


@contextmanager
def bypass_cache() -> Iterator[None]:
    """Calls inside skip the cache read and store a fresh result (``cache="bypass"``).

    >>> with llmguard.bypass_cache():   # doctest: +SKIP
    ...     summarize(text)              # always calls upstream, refreshes the entry
    """
    token = _bypass.set(True)
    try:
        yield
    finally:
        _bypass.reset(token)


def parse_duration(value: Any, what: str) -> float | None:
    """Seconds from a number, a timedelta or ``"90s"``/``"30m"``/``"12h"``/``"7d"``/``"2w"``;
    None stays None. ConfigurationError for anything else or a value <= 0."""
    return validate.seconds(value, what, decorator="", allow_none=True, durations=True)


class CacheInfo(NamedTuple):
    """``cache_info()``: this process's hits, misses and stale hits, the USD the hits saved,
    and the entries the storage holds for the function (all versions)."""

    hits: int
    misses: int
    stale_hits: int
    saved_usd: Decimal
    entries: int

    def __repr__(self) -> str:
        return (
            f"CacheInfo(hits={self.hits}, misses={self.misses}, stale_hits={self.stale_hits}, "
            f"saved_usd={format_usd(self.saved_usd)}, entries={self.entries})"
        )


class CachedFunction(GuardedFunction[P, R_co], Protocol[P, R_co]):
    """A function decorated with ``@cached``: a :class:`GuardedFunction` with its cache's
    statistics, a way to empty it, and the key a call would use."""

    @property
    def __wrapped__(self) -> Callable[P, R_co]: ...

    def cache_info(self) -> CacheInfo: ...

    def cache_clear(self) -> None: ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...


def _model_and_cost(metering: Metering) -> tuple[str | None, Decimal | None]:
    return metering.model, metering.cost


class _CacheLayer:
    """The ``@cached`` policy for one function."""

    def __init__(
        self,
        target: Callable[..., Any],
        function: str,
        *,
        ttl: float | None,
        ignore: Collection[str],
        key: Callable[..., Any] | None,
        version: str | None,
        cache_if: Callable[[Any], bool] | None,
        stale_if_error: bool,
        stale_ttl: float | None,
        storage: str | None,
        namespace: str,
        serializer: str,
        lock_timeout: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
        async_sleep: Callable[[float], Awaitable[None]] | None,
    ) -> None:
        self.binder = Binder(target, ignore)
        self.function = function
        self.ttl = ttl
        self.key_fn = None if key is None else UserFunction(key, "cached", "key")
        self.arguments = None if key is None else Binder(target)  # key= sees them all
        self.key_by_name = self.key_fn is not None and self.key_fn.by_name(self.binder.names)
        self.cache_if = cache_if
        self.stale_if_error = stale_if_error
        self.stale_ttl = stale_ttl
        self.storage_uri = storage
        self.prefix = f"llmguard:cache:{namespace}:{function}:"
        salt = f"{version or ''}\x00{code_digest(target)}".encode()
        self._hasher = hashlib.sha256(len(salt).to_bytes(8, "big") + salt)  # copied per key
        self.serializer = serializer
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep
        self._flights: dict[str, Flight] = {}
        self._leading: dict[int, str] = {}  # id of a call leading a miss -> its key
        self._lock = threading.Lock()
        self._hits = self._misses = self._stale_hits = 0
        self._saved = Decimal(0)

    # -- keys ------------------------------------------------------------------------
    def key_for(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> str:
        """The entry key of a call: its arguments (or ``key=``'s value) and the per-call
        options that change the answer (``critical``), which no argument shows."""
        if self.key_fn is not None:
            if self.key_by_name:
                assert self.arguments is not None
                bound = self.arguments.bind(args, kwargs)  # TypeError: the call does not fit
                value = self.key_fn.call_bound(bound)
            else:
                value = self.key_fn.call_with(args, kwargs)
            material = canonical({"key": value})
        else:
            material = canonical(self.binder.bind(args, kwargs))
        h = self._hasher.copy()
        h.update(material)
        if options:  # canonical encodings are prefix-free: appending stays unambiguous
            h.update(canonical(options))
        return self.prefix + h.hexdigest()

    def public_key(self, args: tuple[Any, ...], kwargs: dict[str, Any], spec: Any) -> str:
        kwargs = dict(kwargs)
        options = {n: kwargs.pop(n) for n in spec.call_options if n in kwargs}
        try:
            return self.key_for(args, kwargs, options)
        except TypeError:
            if self.binder.skip_first and self.key_fn is None:  # called on the function
                return self.key_for((None, *args), kwargs, options)  # of a method: no self
            raise

    # -- storage, failing open ---------------------------------------------------------
    def _storage(self) -> Storage | None:
        try:
            return open_storage(self.storage_uri)
        except StorageError as exc:
            self._warn("cache_unavailable", exc)
            return None

    def _warn(
        self, event: str, exc: BaseException, hint: str = "the call runs without the cache"
    ) -> None:
        """A storage failure warns once per outage of the storage; anything else once."""
        fields = {
            "function": self.function,
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "hint": hint,
        }
        if isinstance(exc, StorageError):
            warn_outage(exc.uri, event, **fields)
        else:
            warn_once(f"{self.function}:{event}", event, **fields)

    def _read(self, storage: Storage, key: str) -> Entry | None:
        """The entry at ``key`` (None if absent or unreadable); StorageError if the storage
        itself fails."""
        raw = storage.get_entry(key)
        if raw is None:
            return None
        try:
            return decode(raw, function=self.function, allow_pickle=self.serializer == "pickle")
        except EntryError as exc:
            self._warn("cache_entry_unreadable", exc)
            try:
                storage.delete_entry(key)
            except StorageError:
                pass
            return None

    def _write(
        self,
        storage: Storage,
        key: str,
        value: Any,
        call: CallRecord,
        stream: tuple[str | None, Decimal | None] | None = None,
        helper: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """Store ``value`` (for a stream: its chunks, with the stream's (model, cost), and
        the stream helper that read them, if one did)."""
        model, cost = stream if stream is not None else _model_and_cost(call.meter(value))
        now = self.clock()
        try:
            data = encode(
                value,
                serializer=self.serializer,
                model=model,
                cost=cost,
                created=now,
                expires=None if self.ttl is None else now + self.ttl,
                function=self.function,
                stream=stream is not None,
                helper=helper,
            )
        except TypeError:  # a type the serializer never stores: a mistake in the code
            raise
        except Exception as exc:  # this value only (an int past the digit limit, a cycle...):
            # the call was paid for: its result is returned, not stored
            self._warn("cache_write_failed", exc, "the result was returned but not stored")
            return
        if self.ttl is None:
            physical = None
        elif self.stale_if_error:
            physical = None if self.stale_ttl is None else self.ttl + self.stale_ttl
        else:
            physical = self.ttl
        try:
            storage.set_entry(key, data, physical)
        except StorageError as exc:
            self._warn("cache_write_failed", exc)

    def _fresh(self, entry: Entry | None) -> bool:
        return entry is not None and (entry.expires is None or self.clock() < entry.expires)

    # -- outcomes ----------------------------------------------------------------------
    def _served(
        self, call: CallRecord, value: Any, model: str | None, cost: Decimal | None, kind: str
    ) -> Any:
        call.serve_cached(model, cost)
        call.fields["cache"] = kind
        with self._lock:
            if kind == "stale":
                self._stale_hits += 1
            else:
                self._hits += 1
            if cost is not None:
                self._saved += cost
        return value

    def _io(self, storage: Storage, fn: Callable[..., Any], *args: Any) -> Generator[Any, Any, Any]:
        """Run ``fn(*args)``, a storage operation: in a worker thread for remote storage in
        async calls, inline otherwise."""
        if storage.remote:
            return (yield Blocking(functools.partial(fn, *args)))
        return fn(*args)

    # -- the policy ----------------------------------------------------------------------
    def run(self, call: CallRecord) -> Generator[Any, Any, Any]:
        try:
            key = self.key_for(call.args, call.kwargs, call.options)
        except TypeError:
            if not self._binds(call):
                return (yield PROCEED)  # a wrong call: let the function raise its TypeError
            raise
        storage = self._storage()
        if _bypass.get():
            call.fields["cache"] = "bypass"
            result = yield PROCEED
            if storage is not None and is_stream(result):  # stored if read to its end
                helper = self._helper(result) if is_stream_manager(result) else None
                return self._store_when_done(call, storage, key, result, Flight(None), None, helper)
            if storage is not None and (self.cache_if is None or self.cache_if(result)):
                yield from self._io(storage, self._write, storage, key, result, call)
            return result
        entry = None
        if storage is not None:
            try:
                entry = yield from self._io(storage, self._read, storage, key)
            except StorageError as exc:  # fail open: this call runs without the cache
                self._warn("cache_unavailable", exc)
                storage = None
        if self._fresh(entry):
            assert entry is not None
            return self._served(call, self._value(entry, call), entry.model, entry.cost, "hit")
        stale = entry if self.stale_if_error else None
        return (yield from self._miss(call, storage, key, stale))

    @staticmethod
    def _value(entry: Entry, call: CallRecord) -> Any:
        """An entry's value for this call: a stored stream is replayed afresh (a stream
        helper's as a manager like the SDK's)."""
        if not entry.stream:
            return entry.value
        if entry.helper is not None:
            return replay_helper(entry.helper, entry.value, unchunk)
        return replay(entry.value, unchunk, asynchronous=call.spec.is_async)

    def _binds(self, call: CallRecord) -> bool:
        try:
            self.binder.signature.bind(*call.args, **call.kwargs)
            return True
        except TypeError:
            return False

    def _miss(
        self, call: CallRecord, storage: Storage | None, key: str, stale: Entry | None
    ) -> Generator[Any, Any, Any]:
        if self._leading and self._reentered(call, key):
            # Called again, with the same arguments, from inside its own upstream call: it
            # would wait for itself. It runs uncached (the outer call stores the answer).
            call.fields["cache"] = "reentrant"
            return (yield PROCEED)
        loop = running_loop() if call.spec.is_async else None
        while True:
            with self._lock:
                flight = self._flights.get(key)
                if flight is not None and not flight.alive():
                    # finished without a value for us, or its stream was dropped unfinished:
                    # lead the next one
                    flight = None
                leader = flight is None or flight.loop is not loop
                if flight is None:
                    flight = self._flights[key] = Flight(loop, call)
                elif leader:  # another event loop's flight: coordinate through the storage
                    flight = Flight(loop, call)
            if leader:
                break
            waiting = flight
            # However long the leader takes: it is alive (in this process) until it lands.
            ok, value, cost, model = yield Call(
                functools.partial(waiting.wait_while_alive, self.lock_timeout),
                functools.partial(waiting.wait_while_alive_async, self.lock_timeout),
            )
            if ok is True and value is _STREAM_STORED and storage is not None:
                entry = yield from self._io(storage, self._read, storage, key)
                if entry is not None and entry.stream:
                    call.fields["coalesced"] = True
                    return self._served(
                        call, self._value(entry, call), entry.model, entry.cost, "hit"
                    )
                return (yield PROCEED)
            if ok is True:
                call.fields["coalesced"] = True
                return self._served(call, value, model or call.requested_model(), cost, "hit")
            if ok is False and not isinstance(value, LLMGuardError):
                if stale is not None:  # the upstream call failed: it would fail for us too
                    return self._stale(call, stale, value)
                raise value
            # The leader was refused by a policy (its budget, its rate limit: another
            # tenant's refusal, never ours to raise), gave no outcome, or its stream was
            # dropped unfinished. Try again, leading the next flight unless another
            # follower already does.
        self._leading[id(call)] = key
        try:
            return (yield from self._lead(call, storage, key, stale, flight))
        finally:
            self._leading.pop(id(call), None)
            if not flight.deferred:
                self._land(key, flight)

    def _reentered(self, call: CallRecord, key: str) -> bool:
        """Whether ``call`` runs inside a call (its caller's, theirs...) leading ``key``."""
        outer = call.parent
        while outer is not None:
            if self._leading.get(id(outer)) == key:
                return True
            outer = outer.parent
        return False

    def _land(self, key: str, flight: Flight) -> None:
        """The flight is over: unblock its waiters (if the leader never published) and forget it."""
        flight.finish(None, None)
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _lead(
        self,
        call: CallRecord,
        storage: Storage | None,
        key: str,
        stale: Entry | None,
        flight: Flight,
    ) -> Generator[Any, Any, Any]:
        lock_key, token = key + ":lock", os.urandom(16)
        locked: Storage | None = None  # the storage whose lock this call holds
        lease: Lease | None = None
        if storage is not None:
            store = storage
            delay = 0.005
            while True:
                try:
                    acquired = yield from self._io(
                        store, store.add, lock_key, token, self.lock_timeout
                    )
                    locked = store if acquired else None
                    entry = yield from self._io(store, self._read, store, key)
                except StorageError as exc:
                    self._warn("cache_unavailable", exc)
                    storage = None
                    break
                if self._fresh(entry):  # another process filled it meanwhile
                    assert entry is not None
                    if locked is not None:
                        yield from self._release(locked, lock_key, token)
                    shared = _STREAM_STORED if entry.stream else entry.value
                    flight.finish(True, shared, entry.cost, entry.model)
                    if locked is None:
                        call.fields["coalesced"] = True
                    return self._served(
                        call, self._value(entry, call), entry.model, entry.cost, "hit"
                    )
                if locked is not None:
                    break
                # Another process holds the lock: wait as long as it is alive (it renews
                # its lease); a dead holder's lock expires within lock_timeout.
                yield Sleep(delay, sleep=self.sleep, async_sleep=self.async_sleep)
                delay = min(delay * 1.5, 0.1)
            if locked is not None:
                lease = Lease(locked, lock_key, token, self.lock_timeout).keep()
        try:
            try:
                result = yield PROCEED
            except Exception as exc:
                flight.finish(False, exc)
                if stale is not None:
                    return self._stale(call, stale, exc)
                raise
            with self._lock:
                self._misses += 1
            call.fields["cache"] = "miss"
            if is_stream(result) and storage is not None:
                helper = None
                if is_stream_manager(result):  # checked before its request is sent
                    try:
                        helper = self._helper(result)
                    except TypeError as exc:
                        flight.finish(False, exc)
                        raise
                flight.deferred = True  # lock and flight stay open until the stream ends
                return self._store_when_done(call, storage, key, result, flight, lease, helper)
            if is_stream(result):
                return result
            if storage is not None and (self.cache_if is None or self.cache_if(result)):
                try:
                    yield from self._io(storage, self._write, storage, key, result, call)
                except TypeError as exc:
                    flight.finish(False, exc)
                    raise
            metering = call.meter(result)
            flight.finish(True, result, metering.cost, metering.model)
            return result
        finally:
            if lease is not None and not flight.deferred:
                lease.end()
                yield from self._release(lease.storage, lease.key, lease.token)

    def _store_when_done(
        self,
        call: CallRecord,
        storage: Storage,
        key: str,
        stream: Any,
        flight: Flight,
        lease: Lease | None,
        helper: tuple[str, dict[str, Any]] | None = None,
    ) -> Any:
        """The leader's stream, passed through; stored only if it was read to its end from
        its first chunk. The lock (and the flight) stay held while the stream is alive:
        dropped unfinished, its lease is no longer renewed and the flight is dead, so others
        go on without it."""

        def at_end(tally: StreamTally, error: BaseException | None) -> None:
            stored = False
            try:
                chunks = tally.kept
                if (
                    error is None
                    and tally.complete
                    and chunks is not None
                    and (self.cache_if is None or self.cache_if(chunks))
                ):
                    cost = call.stream_cost(tally)
                    self._write(storage, key, chunks, call, stream=cost, helper=helper)
                    stored = True
            finally:
                if lease is not None:
                    lease.end()
                    try:
                        lease.storage.release(lease.key, lease.token)
                    except StorageError as exc:
                        self._warn("cache_unavailable", exc)
                if stored:
                    flight.finish(True, _STREAM_STORED)
                self._land(key, flight)

        wrapped = wrap_stream(stream, at_end, keep=True)
        alive = weakref.ref(wrapped)
        flight.owner = alive
        if lease is not None:
            lease.owner = alive
        return wrapped

    def _release(self, storage: Storage, lock_key: str, token: bytes) -> Generator[Any, Any, None]:
        try:
            yield from self._io(storage, storage.release, lock_key, token)
        except StorageError as exc:
            self._warn("cache_unavailable", exc)

    def _helper(self, manager: Any) -> tuple[str, dict[str, Any]]:
        """What a replay of this stream helper needs (its class and parse options, stored);
        TypeError before its request is sent (and the helper discarded) if it cannot be
        replayed faithfully."""
        helper = helper_of(manager)
        try:
            if helper is not None:
                return helper[0], helper_options(helper[1])
            problem = "this SDK version's stream helper is not one llmguard knows how to replay"
        except TypeError as exc:
            problem = (
                f"its {exc} option is neither plain data nor a pydantic model class, so a "
                "replay could not parse like the original"
            )
        discard(manager)
        raise TypeError(
            f"@cached cannot store the {manager_name(manager)} returned by {self.function}: "
            f"{problem}. Nothing was sent. Return create(stream=True) instead, or remove "
            "@cached from this function."
        )

    def _stale(self, call: CallRecord, stale: Entry, error: BaseException) -> Any:
        call.fields["stale_error"] = type(error).__name__
        return self._served(call, self._value(stale, call), stale.model, stale.cost, "stale")

    # -- the function's cache_* methods -------------------------------------------------
    def info(self) -> CacheInfo:
        storage = open_storage(self.storage_uri)
        entries = storage.count_entries(self.prefix)
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._stale_hits, self._saved, entries)

    def clear(self) -> None:
        open_storage(self.storage_uri).clear_entries(self.prefix)
        with self._lock:
            self._hits = self._misses = self._stale_hits = 0
            self._saved = Decimal(0)


@overload
def cached(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(
    *,
    ttl: float | datetime.timedelta | str | None = ...,
    ignore: Collection[str] = ...,
    key: Callable[..., Any] | None = ...,
    version: str | None = ...,
    cache_if: Callable[[Any], bool] | None = ...,
    stale_if_error: bool = ...,
    stale_ttl: float | datetime.timedelta | str | None = ...,
    storage: str | None = ...,
    namespace: str = ...,
    serializer: str = ...,
    lock_timeout: float | datetime.timedelta | str = ...,
    clock: Callable[[], float] = ...,
    sleep: Callable[[float], None] | None = ...,
    async_sleep: Callable[[float], Awaitable[None]] | None = ...,
    model: str | Unset | None = ...,
    prompt: PromptFn | Unset | None = ...,
    log_content: bool | Unset = ...,
    tags: TagValues | None = ...,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]: ...


def cached(
    fn: Any = None,
    /,
    *,
    ttl: float | datetime.timedelta | str | None = None,
    ignore: Collection[str] = (),
    key: Callable[..., Any] | None = None,
    version: str | None = None,
    cache_if: Callable[[Any], bool] | None = None,
    stale_if_error: bool = False,
    stale_ttl: float | datetime.timedelta | str | None = "1d",
    storage: str | None = None,
    namespace: str = "default",
    serializer: str = "json",
    lock_timeout: float | datetime.timedelta | str = 60,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | Unset | None = UNSET,
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Any:
    """Cache the decorated function's results in the storage (local disk by default).

    ``ttl``: seconds, a timedelta or ``"90s"``/``"30m"``/``"12h"``/``"7d"``; None (the default)
    never expires. The key is the function's name, its code digest, ``version`` and every bound
    argument but ``self``/``cls`` and those in ``ignore`` (or the value of ``key``, given the
    call's arguments by name, instead), and the per-call options that change the answer
    (``critical`` of ``@route_model``). ``cache_if(result)`` False refuses to store.
    ``stale_if_error``: keep entries ``stale_ttl`` past expiry and serve them when the call
    raises. ``serializer="pickle"`` stores any picklable value, at the risk that whoever can
    write the storage can run code in your process; the default stores JSON data and
    pydantic models only. Concurrent misses wait for the one upstream call however long it
    takes: its lock is renewed every ``lock_timeout / 3`` while it runs, and a dead holder's
    lock expires within ``lock_timeout``. ``clock``, ``sleep`` and ``async_sleep`` are
    injectable for tests::

        @llmguard.cached(ttl="7d", ignore=("client",), version="prompt-v2")
        def summarize(text: str, client=None, *, model: str = "gpt-4o") -> str: ...

        summarize.cache_info()     # CacheInfo(hits=..., misses=..., ...)
    """
    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("cached", options)
    where = "@cached"
    ttl_s = validate.seconds(
        ttl, "ttl", decorator=where, allow_none=True, durations=True, none_means="no expiry"
    )
    stale_s = validate.seconds(
        stale_ttl,
        "stale_ttl",
        decorator=where,
        allow_none=True,
        durations=True,
        none_means="stale entries kept until evicted",
    )
    lock_s = validate.seconds(
        lock_timeout,
        "lock_timeout",
        decorator=where,
        minimum=0.1,
        inclusive=True,
        durations=True,
        none_means="how long a dead holder of the lock can keep others waiting",
    )
    serializer = validate.choice(
        serializer, "serializer", decorator=where, choices=("json", "pickle")
    )
    validate.function(key, "key", decorator=where, takes="given the call's arguments by name")
    validate.function(cache_if, "cache_if", decorator=where, takes="given the result")
    validate.function(clock, "clock", decorator=where, allow_none=False)
    validate.function(sleep, "sleep", decorator=where)
    validate.function(async_sleep, "async_sleep", decorator=where)
    validate.flag(stale_if_error, "stale_if_error", decorator=where)
    named: Any = version
    if named is not None and (
        isinstance(named, bool) or not isinstance(named, (str, int)) or named == ""
    ):
        raise validate.refuse(
            where,
            "version",
            version,
            "version must be a non-empty string (or an int) naming the prompt version, e.g. "
            "'prompt-v2' (None: no version)",
        )
    if isinstance(ignore, str):
        ignore = (ignore,)
    ignore = validate.strings(ignore, "ignore", decorator=where, meaning="parameter names")
    validate.storage(storage, decorator=where)
    validate.text(namespace, "namespace", decorator=where, meaning="e.g. 'default'")

    def decorate(func: Any) -> Any:
        if isinstance(func, (classmethod, staticmethod)):
            return type(func)(decorate(func.__func__))
        target = original(func)
        if not callable(target) or isinstance(target, str):
            return guard(func, decorator="cached")  # raises the usual ConfigurationError
        layer = _CacheLayer(
            target,
            full_name(target),
            ttl=ttl_s,
            ignore=tuple(ignore),
            key=key,
            version=None if version is None else str(version),
            cache_if=cache_if,
            stale_if_error=stale_if_error,
            stale_ttl=stale_s,
            storage=storage,
            namespace=namespace,
            serializer=serializer,
            lock_timeout=lock_s,
            clock=clock,
            sleep=sleep,
            async_sleep=async_sleep,
        )
        wrapper = guard(func, decorator="cached", layer=layer, options=options)
        wrapper.cache_info = layer.info
        wrapper.cache_clear = layer.clear
        spec = wrapper.__llmguard__
        wrapper.cache_key = lambda *args, **kwargs: layer.public_key(args, kwargs, spec)
        return wrapper

    return decorate if fn is None else decorate(fn)
