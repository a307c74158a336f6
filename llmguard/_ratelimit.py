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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, ParamSpec, TypeVar

from . import _validate as validate
from ._config import UNSET, _Unset, storage_uri
from ._errors import ConfigurationError, RateLimitExceeded, RequestTooLarge
from ._pipeline import (
    PROCEED,
    Blocking,
    CallRecord,
    PromptFn,
    Sleep,
    UserFunction,
    check_options,
    guard,
)
from ._storage import _scheme, open_storage

P = ParamSpec("P")
R = TypeVar("R")

_limits_storages: dict[str, Any] = {}
_limits_lock = threading.Lock()
_SCHEMES = ("local", "disk", "file", "memory", "redis", "rediss", "unix")


def limits_storage(uri: str | None) -> tuple[Any, bool]:
    """The ``limits`` storage for an llmguard storage URI (one per URI per process), and
    whether it is remote: diskcache via llmguard's own backend for local storage, limits'
    memory storage for ``memory://``, limits' Redis storage for ``redis://``."""
    chosen = uri or storage_uri()
    with _limits_lock:
        found = _limits_storages.get(chosen)
        if found is None:
            import limits.storage

            scheme = _scheme(chosen)
            if scheme in ("local", "disk", "file"):
                from ._limits_storage import DiskCacheLimitsStorage
                from ._storage import LocalStorage

                local = open_storage(chosen)
                assert isinstance(local, LocalStorage)
                found = (DiskCacheLimitsStorage(f"llmguard+file://{local.directory}"), False)
            elif scheme == "memory":
                found = (limits.storage.MemoryStorage(), False)
            elif scheme in ("redis", "rediss", "unix"):
                from ._limits_storage import RedisMovingWindowStorage

                found = (RedisMovingWindowStorage(chosen), True)
            else:
                raise ConfigurationError(
                    f"rate limits need local, memory:// or redis:// storage, not {chosen!r}"
                )
            _limits_storages[chosen] = found
    return found


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
        max_wait: float,
        storage: str | None,
        default_output_tokens: int,
        margin: float | None,
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
        self.sleep = sleep
        self.async_sleep = async_sleep
        self._strategies: tuple[Any, Any] | None = None
        self._remote = False

    def strategies(self) -> tuple[Any, Any]:
        """(the moving-window storage, limits' sliding window counter limiter)."""
        if self._strategies is None:
            from limits.strategies import SlidingWindowCounterRateLimiter

            storage, self._remote = limits_storage(self.storage_uri)
            self._strategies = (storage, SlidingWindowCounterRateLimiter(storage))
        return self._strategies

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
        return max(float(oldest) + float(expiry) - time.time(), 0.005)

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
                return self._sliding_wait(sliding, item, ids), item
        for item in self.requests:
            expiry = self._expiry(item)
            if not storage.acquire_entry(item.key_for(*ids), item.amount, expiry):
                return max(self._moving_wait(storage, item, ids), 0.005), item
        for item in self.tokens:
            if not sliding.hit(item, *ids, cost=cost):
                return self._sliding_wait(sliding, item, ids), item
        return 0.0, None

    @staticmethod
    def _sliding_wait(limiter: Any, item: Any, ids: tuple[str, ...]) -> float:
        stats = limiter.get_window_stats(item, *ids)
        return max(float(stats.reset_time) - time.time(), 0.005)

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
        try:
            while True:
                if self._strategies is None or self._remote:
                    self.strategies()
                if self._remote:
                    wait, item = yield Blocking(lambda: self._attempt(ids, cost))
                else:
                    wait, item = self._attempt(ids, cost)
                if not wait:
                    break
                if not self.block or waited + wait > self.max_wait:
                    raise RateLimitExceeded(
                        f"{call.spec.name}: rate limit {item} reached; it would allow this call "
                        f"in {wait:.3f}s"
                        + (
                            ""
                            if not self.block
                            else f" (waited {waited:.3f}s of max_wait {self.max_wait:g}s)"
                        ),
                        retry_after=wait,
                        limit=str(item),
                    )
                yield Sleep(wait, sleep=self.sleep, async_sleep=self.async_sleep)
                waited += wait
        finally:
            call.fields["rate_wait_s"] = round(waited, 3)
        return (yield PROCEED)


def rate_limited(
    rate: str | None = None,
    *,
    tokens: str | None = None,
    name: str | None = None,
    key: Callable[..., Any] | None = None,
    block: bool = True,
    max_wait: float = 30,
    storage: str | None = None,
    default_output_tokens: int = 1024,
    margin: float | None = None,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | _Unset | None = UNSET,
    prompt: PromptFn | _Unset | None = UNSET,
    log_content: bool | _Unset = UNSET,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Start at most ``rate`` calls (``"500/minute"``, ``"10/second;500/minute"``) and spend
    at most ``tokens`` tokens (``"200000/minute"``) per window.

    A call's tokens are counted as the provider counts them against TPM: the estimated
    prompt plus its output budget (``max_tokens``, ``max_completion_tokens`` or
    ``max_output_tokens`` argument, else ``default_output_tokens``). Functions with the same
    ``name`` share limits (default: each function its own); ``key`` (given the call's
    arguments by name) gives each user or tenant their own. ``block=True`` waits until the
    window allows the call (``await``ing in async functions) and raises
    ``RateLimitExceeded(retry_after=...)`` past ``max_wait``; ``block=False`` raises at
    once. A call needing more tokens than a whole window allows raises ``RequestTooLarge``.
    The limit holds across processes (local storage, the default), in one process
    (``memory://``) or across machines (``redis://``). ``margin`` widens request windows by
    that many seconds (default: 2% of the window, at least 50 ms), so requests still fit the
    provider's window when they reach it a little after their grant. The event gets
    ``rate_wait_s``.
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
    options = {"model": model, "prompt": prompt, "log_content": log_content}
    check_options("rate_limited", options)
    validate.text(name, "name", decorator=where, allow_none=True, meaning="shared by functions")
    validate.function(key, "key", decorator=where, takes="given the call's arguments by name")
    validate.flag(block, "block", decorator=where)
    max_wait_s = validate.seconds(max_wait, "max_wait", decorator=where, inclusive=True)
    margin_s = validate.seconds(
        margin,
        "margin",
        decorator=where,
        allow_none=True,
        inclusive=True,
        maximum=3600,
        none_means="2% of the window, at least 50 ms",
    )
    validate.integer(
        default_output_tokens,
        "default_output_tokens",
        decorator=where,
        minimum=0,
        maximum=validate.MAX_TOKENS,
        meaning="the output budget assumed when a call gives no max_tokens",
    )
    validate.function(sleep, "sleep", decorator=where)
    validate.function(async_sleep, "async_sleep", decorator=where)
    validate.storage(storage, decorator=where)
    if storage is not None and _scheme(storage) not in _SCHEMES:
        raise validate.refuse(
            where, "storage", storage, "rate limits need local, memory:// or redis:// storage"
        )
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
        sleep=sleep,
        async_sleep=async_sleep,
    )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        return guard(func, decorator="rate_limited", layer=layer, options=options)  # type: ignore[no-any-return]

    return decorate
