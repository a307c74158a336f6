"""``@rate_limited``: hold a provider's request and token limits, across processes and
machines, by waiting (or failing fast) before the call rather than drawing 429s.

Built on ``limits``. Request limits use its *moving window* storages (exact: one timestamp
per request), with the window widened by a small safety ``margin`` (by default 2% of the
window, at least 50 ms): a request reaches the provider a little after its grant (a commit,
a thread waking up, the network), so without it two requests a hair under a window apart
could land in one provider window and draw a 429. Token limits use limits'
*sliding window counter*, because a moving window stores one entry per unit of cost (per
token); the counter approximates the window from two counters, weighting the previous one
by how much of it still overlaps.

Waiting for the window is queueing, not a failure: by default a blocked call waits as long
as its window needs (``max_wait=None``), and ``@retry_on_rate_limit`` neither retries a
local refusal nor counts the queueing against its ``max_time``.

When the storage fails (unreachable, hung, corrupt, read-only...), ``on_storage_error``
decides: ``"allow"`` (default) lets the call through unlimited, with one
``rate_limit_unavailable`` warning per outage; ``"raise"`` raises the ``StorageError``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Literal, ParamSpec, TypeVar

from . import _validate as validate
from ._config import UNSET, Unset, settings_generation, storage_uri
from ._errors import ConfigurationError, RateLimitExceeded, RequestTooLarge, StorageError
from ._events import emit, warn_outage
from ._pipeline import (
    PROCEED,
    Blocking,
    Call,
    CallRecord,
    GuardedFunction,
    PromptFn,
    Sleep,
    UserFunction,
    check_options,
    guard,
)
from ._redact import redact_uri
from ._storage import open_storage, scheme_of, split_redis_prefix, validate_uri
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")

_limits_storages: dict[tuple[str, Callable[[], float]], Any] = {}
_limits_lock = threading.Lock()
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_SCHEMES = ("local", "disk", "file", "memory", "redis", "rediss", "unix")


def _clock_refused(uri: str) -> ConfigurationError:
    return ConfigurationError(
        f"@rate_limited(clock=...) needs local or memory:// storage, not {uri!r}: Redis "
        "expires rate-limit keys by its own clock, so an injected one cannot reach it"
    )


def limits_storage(uri: str | None, clock: Callable[[], float] = time.time) -> tuple[Any, bool]:
    """The ``limits`` storage for an llmguard storage URI (one per URI and clock per
    process), and whether it is remote: llmguard's own over diskcache for local storage and
    over a dict for ``memory://`` (both read time from ``clock``), limits' Redis storage for
    ``redis://`` (keys under the URI's ``?prefix=``)."""
    chosen = uri or storage_uri()
    scheme = scheme_of(chosen)
    if scheme in ("local", "disk", "file"):  # "local" names a folder that settings may move
        chosen = open_storage(chosen).uri
    with _limits_lock:
        found = _limits_storages.get((chosen, clock))
        if found is None:
            validate_uri(chosen)  # a missing extra is named as such, not as limits words it
            if scheme in ("local", "disk", "file"):
                from ._limits_storage import DiskCacheLimitsStorage
                from ._storage import LocalStorage

                local = open_storage(chosen)
                assert isinstance(local, LocalStorage)
                found = (
                    DiskCacheLimitsStorage(f"llmguard+file://{local.directory}", clock=clock),
                    False,
                )
            elif scheme == "memory":
                from ._limits_storage import MemoryLimitsStorage

                found = (MemoryLimitsStorage(clock=clock), False)
            elif scheme in _REDIS_SCHEMES:
                if clock is not time.time:
                    raise _clock_refused(chosen)
                from ._limits_storage import RedisMovingWindowStorage

                connection_uri, prefix = split_redis_prefix(chosen)
                found = (
                    RedisMovingWindowStorage(
                        connection_uri, key_prefix=f"{prefix}LIMITS", storage_uri=chosen
                    ),
                    True,
                )
            else:
                raise ConfigurationError(
                    "rate limits need local, memory:// or redis:// storage, "
                    f"not {redact_uri(chosen)!r}"
                )
            _limits_storages[(chosen, clock)] = found
    return found


class _WaitQueue:
    """The calls of this process waiting for one limit, first come first served: only the
    head of the queue asks the storage and sleeps until the window frees; the others wait
    their turn without polling. So a window that frees a slot wakes one call, not every
    waiting one (a batch of 1,000 would otherwise stampede the storage and the event loop at
    every window, delaying the calls it lets through). Threads and event loops alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = False
        self._waiters: deque[Any] = deque()  # threading.Event | (loop, future)

    def busy(self) -> bool:
        return self._held

    def acquire(self) -> None:
        with self._lock:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # release() hands the queue over to us

    async def acquire_async(self) -> None:
        import asyncio

        with self._lock:
            if not self._held:
                self._held = True
                return
            loop = asyncio.get_running_loop()
            turn = loop.create_future()
            self._waiters.append((loop, turn))
        try:
            await turn
        except BaseException:  # cancelled: if the queue was handed over already, pass it on
            if turn.done() and not turn.cancelled():
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                turn = self._waiters.popleft()
                if isinstance(turn, threading.Event):
                    turn.set()
                    return
                loop, future = turn
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self._hand_over, future)
                    return
            self._held = False

    def _hand_over(self, future: Any) -> None:
        if future.cancelled():  # its caller went away: the next one's turn
            self.release()
        else:
            future.set_result(None)


_queues: weakref.WeakValueDictionary[tuple[int, tuple[str, ...]], _WaitQueue] = (
    weakref.WeakValueDictionary()
)


def _queue_for(storage: Any, ids: tuple[str, ...]) -> _WaitQueue:
    with _limits_lock:
        queue = _queues.get((id(storage), ids))
        if queue is None:
            queue = _queues[(id(storage), ids)] = _WaitQueue()
        return queue


def _parse(rates: Any, what: str) -> list[Any]:
    """The ``limits`` items of a rate string; each allows at least one call (or token) per
    window of at least a millisecond and at most 100 years."""
    import limits
    from limits.util import SEPARATORS, SINGLE_EXPR

    syntax = (
        f"{what} must be a rate in limits' syntax, e.g. '500/minute', '10 per 2 seconds' or "
        "'10/second;500/minute'"
    )
    if not isinstance(rates, str) or not rates.strip():
        raise validate.refuse("@rate_limited", what, rates, syntax)
    try:
        items = list(limits.parse_many(rates))
    except (ValueError, TypeError):
        raise validate.refuse("@rate_limited", what, rates, syntax) from None
    # limits reads a window of "0 seconds" as 1 second: look at the numbers as written
    written = [SINGLE_EXPR.match(part) for part in SEPARATORS.split(rates)]
    for item, match in zip(items, written, strict=True):
        assert match is not None
        multiples = match.group(3)
        if multiples is not None and int(multiples) < 1:
            raise validate.refuse(
                "@rate_limited",
                what,
                rates,
                f"{match.group(0).strip()!r} has a window of 0: use a window of at least 1 "
                "unit, e.g. '1/second' or '10 per 2 seconds'",
            )
        if not 1 <= item.amount <= validate.MAX_RATE:
            raise validate.refuse(
                "@rate_limited",
                what,
                rates,
                f"{match.group(0).strip()!r} allows {item.amount} "
                f"{'calls' if what == 'rate' else 'tokens'} per window: allow from 1 to "
                f"{validate.MAX_RATE:,} (leave {what} out for no such limit)",
            )
        if item.get_expiry() > validate.MAX_SECONDS:
            raise validate.refuse(
                "@rate_limited",
                what,
                rates,
                f"{match.group(0).strip()!r} has a window over 100 years: use a shorter one",
            )
    return items


class _RateLimitLayer:
    def __init__(
        self,
        *,
        requests: list[Any],
        tokens: list[Any],
        name: str | None,
        key: Callable[..., Any] | None,
        block: bool,
        max_wait: float | None,
        storage: str | None,
        default_output_tokens: int,
        margin: float | None,
        on_storage_error: str,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
        async_sleep: Callable[[float], Awaitable[None]] | None,
    ) -> None:
        self.requests = requests
        self.tokens = tokens
        self.name = name
        self.key = None if key is None else UserFunction(key, "rate_limited", "key")
        self.block = block
        self.max_wait = max_wait
        self.storage_uri = storage
        self.default_output_tokens = default_output_tokens
        self.margin = margin
        self.on_storage_error = on_storage_error
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep
        self._strategies: tuple[Any, Any] | None = None
        self._remote = False
        self._generation = -1  # the settings the storage was resolved under

    def strategies(self) -> tuple[Any, Any]:
        """(the moving-window storage, limits' sliding window counter limiter), resolved
        again after ``configure()``."""
        if self._strategies is None or self._generation != settings_generation():
            from limits.strategies import SlidingWindowCounterRateLimiter

            generation = settings_generation()
            storage, self._remote = limits_storage(self.storage_uri, self.clock)
            self._strategies = (storage, SlidingWindowCounterRateLimiter(storage))
            self._generation = generation
        return self._strategies

    def _unavailable(self, call: CallRecord, error: StorageError) -> None:
        """The storage failed: raise (``on_storage_error="raise"``), or let the call through
        unlimited with one warning per outage."""
        if self.on_storage_error == "raise":
            raise error
        warn_outage(
            error.uri,
            "rate_limit_unavailable",
            function=call.spec.name,
            error=f"{type(error).__name__}: {error}"[:300],
            hint="calls run without this rate limit until the storage answers again; "
            "@rate_limited(on_storage_error='raise') refuses them instead",
        )

    def token_cost(self, call: CallRecord) -> int:
        """Tokens the provider counts against TPM: prompt tokens plus the output budget."""
        return call.prompt_tokens() + call.output_budget(self.default_output_tokens)

    def _expiry(self, item: Any) -> float:
        """The request window, widened by the margin (default: 2% of it, at least 50 ms)."""
        window = float(item.get_expiry())
        return window + (self.margin if self.margin is not None else max(0.05, 0.02 * window))

    def _moving_wait(self, storage: Any, item: Any, ids: tuple[str, ...]) -> float:
        """Seconds until the widened moving window has a free slot (0 if it has one)."""
        expiry = self._expiry(item)
        oldest, count = storage.get_moving_window(item.key_for(*ids), item.amount, expiry)
        if count < item.amount:
            return 0.0
        return max(float(oldest) + float(expiry) - self.clock(), 0.005)

    def _attempt(self, ids: tuple[str, ...], cost: int) -> tuple[float, Any]:
        """Take a request slot and ``cost`` tokens; (0, None) when taken, else (seconds to
        wait, the limit that refused). Looks at every limit first, so a refusal spends
        nothing; a race lost between looking and taking waits like a refusal."""
        storage, sliding = self.strategies()
        for item in self.requests:
            wait = self._moving_wait(storage, item, ids)
            if wait:
                return wait, item
        for item in self.tokens:
            if not sliding.test(item, *ids, cost=cost):
                return self._sliding_wait(storage, item, ids), item
        for item in self.requests:
            expiry = self._expiry(item)
            if not storage.acquire_entry(item.key_for(*ids), item.amount, expiry):
                return max(self._moving_wait(storage, item, ids), 0.005), item
        for item in self.tokens:
            if not sliding.hit(item, *ids, cost=cost):
                return self._sliding_wait(storage, item, ids), item
        return 0.0, None

    @staticmethod
    def _sliding_wait(storage: Any, item: Any, ids: tuple[str, ...]) -> float:
        """Seconds until the sliding window counter frees a unit: limits'
        ``get_window_stats`` arithmetic, without its ``time.time()`` (so the clock rules)."""
        previous, previous_in, current, current_in = storage.get_sliding_window(
            item.key_for(*ids), item.get_expiry()
        )
        expiry = float(item.get_expiry())
        waits = [expiry]
        if previous:
            waits.append(float(previous_in) % (expiry / previous))
        if current:
            waits.append(float(current_in) % expiry)
        return max(min(waits), 0.005)

    @staticmethod
    def _describe(item: Any, tokens: bool) -> str:
        return f"{'token' if tokens else 'request'} limit {item}"

    def run(self, call: CallRecord) -> Generator[Any, Any, Any]:
        ids: tuple[str, ...] = ("llmguard", self.name or call.spec.name)
        if self.key is not None:
            ids += (str(self.key(call)),)
        cost = self.token_cost(call) if self.tokens else 0
        for item in self.tokens:
            if cost > item.amount:
                raise RequestTooLarge(
                    f"{call.spec.name} needs ~{cost} tokens (prompt + output budget) but its "
                    f"limit is {item}: it can never pass. Shorten the prompt, lower max_tokens "
                    "or raise the limit.",
                    retry_after=None,
                    limit=str(item),
                )
        waited = 0.0
        queue: _WaitQueue | None = None  # while waiting with no bound: our place in line
        held = False
        try:
            while True:
                try:
                    self.strategies()
                except StorageError as exc:
                    self._unavailable(call, exc)
                    break
                if queue is None and self.block and self.max_wait is None:
                    line = _queue_for(self._strategies[0] if self._strategies else None, ids)
                    if line.busy():  # others already wait for this limit: queue behind them
                        queue = line
                if queue is not None and not held:
                    before = self.clock()
                    yield Call(queue.acquire, queue.acquire_async)
                    held = True
                    waited += max(self.clock() - before, 0.0)
                try:
                    if self._remote:
                        wait, item = yield Blocking(lambda: self._attempt(ids, cost))
                    else:
                        wait, item = self._attempt(ids, cost)
                except StorageError as exc:
                    self._unavailable(call, exc)
                    break
                if not wait:
                    break
                if not self.block or (self.max_wait is not None and waited + wait > self.max_wait):
                    what = self._describe(item, any(item is t for t in self.tokens))
                    raise RateLimitExceeded(
                        f"{call.spec.name}: {what} reached; it would allow this call "
                        f"in {wait:.3f}s"
                        + (
                            " (block=False)"
                            if not self.block
                            else f" (waited {waited:.3f}s of max_wait {self.max_wait:g}s)"
                        ),
                        retry_after=wait,
                        limit=str(item),
                    )
                if queue is None and self.max_wait is None:  # take a place in line first
                    queue = _queue_for(self._strategies[0] if self._strategies else None, ids)
                    continue
                yield Sleep(wait, sleep=self.sleep, async_sleep=self.async_sleep)
                waited += wait
        finally:  # summed over the attempts of a retried call (and stacked limiters)
            if held and queue is not None:
                queue.release()  # the next in line asks at once: the window may hold more
                held = False
            call.fields["rate_wait_s"] = round(call.fields.get("rate_wait_s", 0.0) + waited, 3)
            if waited > 0:  # for subscribers (a span event per wait); DEBUG in the log
                emit(
                    "debug",
                    "rate_limit_wait",
                    {
                        "function": call.spec.name,
                        "call_id": call.call_id,
                        "limit": ids[1],
                        "wait_s": round(waited, 3),
                    },
                )
        return (yield PROCEED)


def rate_limited(
    rate: str | None = None,
    *,
    tokens: str | None = None,
    name: str | None = None,
    key: Callable[..., Any] | None = None,
    block: bool = True,
    max_wait: float | None = None,
    storage: str | None = None,
    default_output_tokens: int = 1024,
    margin: float | None = None,
    on_storage_error: Literal["allow", "raise"] = "allow",
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | Unset | None = UNSET,
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]:
    """Start at most ``rate`` calls (``"500/minute"``, ``"10/second;500/minute"``) and spend
    at most ``tokens`` tokens (``"200000/minute"``) per window.

    A call's tokens are counted as the provider counts them against TPM: the estimated
    prompt plus its output budget (``max_tokens``, ``max_completion_tokens`` or
    ``max_output_tokens`` argument, else ``default_output_tokens``). Functions with the same
    ``name`` share limits (default: each function its own); ``key`` (given the call's
    arguments by name) gives each user or tenant their own. ``block=True`` waits until the
    window allows the call (``await``ing in async functions), as long as that takes by
    default; with ``max_wait`` seconds it raises ``RateLimitExceeded(retry_after=...)`` past
    that (for servers that must answer in time); ``block=False`` raises at once.
    ``@retry_on_rate_limit`` never retries these local refusals. A call needing more tokens
    than a whole window allows raises ``RequestTooLarge`` at once, whatever ``max_wait``.
    The limit holds across processes (local storage, the default), in one process
    (``memory://``) or across machines (``redis://``). ``margin`` widens request windows by
    that many seconds (default: 2% of the window, at least 50 ms), so requests still fit the
    provider's window when they reach it a little after their grant. The event gets
    ``rate_wait_s`` (seconds queued, summed over the call's attempts). When the storage
    fails, ``on_storage_error="allow"`` (the default) lets calls through unlimited, with one
    ``rate_limit_unavailable`` warning per outage (a limiter is there to spare the provider
    429s, which ``@retry_on_rate_limit`` handles: its outage must not take the application
    down); ``"raise"`` raises ``StorageError``. ``clock``, ``sleep``
    and ``async_sleep`` make waits exact and instant in tests (``clock`` with local or
    ``memory://`` storage: Redis keeps its own time).
    """
    where = "@rate_limited"
    given: Any = rate
    if given is not None and not isinstance(given, str) and callable(given):
        raise ConfigurationError(
            "@rate_limited needs a rate string, e.g. @rate_limited('500/minute') — not a function"
        )
    if rate is None and tokens is None:
        raise ConfigurationError("@rate_limited needs a rate, tokens=, or both")
    requests_items = _parse(rate, "rate") if rate is not None else []
    token_items = _parse(tokens, "tokens") if tokens is not None else []
    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("rate_limited", options)
    validate.text(name, "name", decorator=where, allow_none=True, meaning="shared by functions")
    validate.function(key, "key", decorator=where, takes="given the call's arguments by name")
    validate.flag(block, "block", decorator=where)
    max_wait_s = validate.seconds(
        max_wait,
        "max_wait",
        decorator=where,
        allow_none=True,
        inclusive=True,
        none_means="wait as long as the window needs",
    )
    validate.function(clock, "clock", decorator=where, allow_none=False)
    margin_s = validate.seconds(
        margin,
        "margin",
        decorator=where,
        allow_none=True,
        inclusive=True,
        maximum=3600,
        none_means="2% of the window, at least 50 ms",
    )
    validate.output_budget(default_output_tokens, decorator=where)
    validate.function(sleep, "sleep", decorator=where)
    validate.function(async_sleep, "async_sleep", decorator=where)
    validate.choice(
        on_storage_error, "on_storage_error", decorator=where, choices=("allow", "raise")
    )
    validate.storage(storage, decorator=where)
    if storage is not None and scheme_of(storage) not in _SCHEMES:
        raise validate.refuse(
            where, "storage", storage, "rate limits need local, memory:// or redis:// storage"
        )
    if storage is not None and clock is not time.time and scheme_of(storage) in _REDIS_SCHEMES:
        raise _clock_refused(storage)
    layer = _RateLimitLayer(
        requests=requests_items,
        tokens=token_items,
        name=name,
        key=key,
        block=block,
        max_wait=max_wait_s,
        storage=storage,
        default_output_tokens=default_output_tokens,
        margin=margin_s,
        on_storage_error=on_storage_error,
        clock=clock,
        sleep=sleep,
        async_sleep=async_sleep,
    )

    def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
        return guard(func, decorator="rate_limited", layer=layer, options=options)  # type: ignore[no-any-return]

    return decorate
