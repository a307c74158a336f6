"""``@retry_on_rate_limit``: absorb 429s (and, optionally, server errors) the way the
provider asks.

When the error carries ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), the
wait is that long plus a little jitter (capped by ``max_wait``); otherwise it is exponential
backoff with full jitter (backoff's ``expo`` and ``full_jitter``). A 429 that means the quota
or spend limit is exhausted is never retried: waiting cannot help. Nor is llmguard's own
``RateLimitExceeded``: ``@rate_limited`` queues a call itself, so its refusal is not provider
trouble, and the time a call queued there does not count against ``max_time``. SDK
exception types are recognised by name, so no SDK is imported.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Generator
from datetime import datetime, timezone
from typing import Any, ParamSpec, TypeVar, overload

from . import _validate as validate
from ._config import UNSET, Unset
from ._errors import RateLimitExceeded, RequestTooLarge
from ._events import emit
from ._pipeline import (
    PROCEED,
    CallRecord,
    GuardedFunction,
    PromptFn,
    Sleep,
    check_options,
    guard,
)
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")

_TIMEOUT_NAMES = {
    "APITimeoutError",
    "TimeoutException",
    "ReadTimeout",
    "ConnectTimeout",
    "WriteTimeout",
    "PoolTimeout",
}
_CONNECTION_NAMES = {
    "APIConnectionError",
    "ConnectError",
    "RemoteProtocolError",
    "NetworkError",
    "TransportError",
}
_QUOTA_WORDS = (
    "insufficient_quota",
    "exceeded your current quota",
    "spend limit",
    "billing hard limit",
)


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (``.status_code``, ``.status``, ``.response``)."""
    for value in (
        getattr(exc, "status_code", None),
        getattr(exc, "status", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _is_quota(exc: BaseException) -> bool:
    """A 429 (or 402) that means money or quota ran out: retrying cannot help."""
    if any("SpendLimit" in name or "Quota" in name for name in _names(exc)):
        return True
    codes = [getattr(exc, "code", None), getattr(exc, "type", None)]
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            codes += [error.get("code"), error.get("type")]
    if "insufficient_quota" in codes:
        return True
    message = str(exc).lower()
    return any(word in message for word in _QUOTA_WORDS)


def classify(
    exc: BaseException, *, server_errors: bool, retry_on: tuple[type[BaseException], ...]
) -> str | None:
    """Why ``exc`` is worth retrying (``rate_limit``, ``overloaded``, ``server_error``,
    ``timeout``, ``connection``, ``retry_on``), or None if it is not."""
    if isinstance(exc, RequestTooLarge):  # can never pass
        return None
    if retry_on and isinstance(exc, retry_on):
        return "retry_on"
    if isinstance(exc, RateLimitExceeded):  # @rate_limited's own refusal, not the provider's
        return None
    names = _names(exc)
    status = status_of(exc)
    if status == 429 or "RateLimitError" in names:
        return None if _is_quota(exc) else "rate_limit"
    if status == 529 or "OverloadedError" in names:
        return "overloaded"
    if not server_errors:
        return None
    if status in (500, 502, 503, 504):
        return "server_error"
    if isinstance(exc, TimeoutError) or names & _TIMEOUT_NAMES:
        return "timeout"
    if isinstance(exc, ConnectionError) or names & _CONNECTION_NAMES:
        return "connection"
    return None


def retry_after(exc: BaseException, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the error asks to wait: ``RateLimitExceeded.retry_after``, else the
    response's ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date) header."""
    if isinstance(exc, RateLimitExceeded):
        return exc.retry_after
    headers = getattr(getattr(exc, "response", None), "headers", None) or getattr(
        exc, "headers", None
    )
    if not headers:
        return None
    try:
        milliseconds = headers.get("retry-after-ms")
        if milliseconds is not None:
            return max(float(milliseconds) / 1000, 0.0)
        value = headers.get("retry-after")
    except Exception:
        return None
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.fromtimestamp(now(), timezone.utc)).total_seconds(), 0.0)


def _small_jitter(seconds: float) -> float:
    """A retry-after wait, spread a little so waiting clients do not return in lockstep."""
    return seconds + random.uniform(0, min(0.1 * seconds, 1.0) + 0.01)


class _RetryLayer:
    def __init__(
        self,
        *,
        max_tries: int,
        max_time: float | None,
        max_wait: float,
        initial_wait: float,
        server_errors: bool,
        retry_on: tuple[type[BaseException], ...],
        jitter: Callable[[float], float] | None,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
        async_sleep: Callable[[float], Awaitable[None]] | None,
    ) -> None:
        self.max_tries = max_tries
        self.max_time = max_time
        self.max_wait = max_wait
        self.initial_wait = initial_wait
        self.server_errors = server_errors
        self.retry_on = retry_on
        self.jitter = jitter
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep

    def _wait(self, exc: BaseException, backoff_wait: float) -> float:
        asked = retry_after(exc)
        if asked is not None:
            wait = _small_jitter(asked) if self.jitter is not None else asked
        else:
            wait = self.jitter(backoff_wait) if self.jitter is not None else backoff_wait
        return min(wait, self.max_wait)

    def run(self, call: CallRecord) -> Generator[Any, Any, Any]:
        import backoff

        delays = backoff.expo(factor=self.initial_wait, max_value=self.max_wait)
        next(delays)  # backoff's generators start with a bare yield
        started = self.clock()
        queued_before = float(call.fields.get("rate_wait_s", 0.0))
        waited = 0.0
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    return (yield PROCEED)
                except Exception as exc:
                    reason = classify(exc, server_errors=self.server_errors, retry_on=self.retry_on)
                    if reason is None or attempt >= self.max_tries:
                        raise
                    wait = self._wait(exc, next(delays))
                    # time spent queueing in @rate_limited below is not retrying
                    queued = float(call.fields.get("rate_wait_s", 0.0)) - queued_before
                    elapsed = self.clock() - started - queued
                    if self.max_time is not None and elapsed + wait > self.max_time:
                        raise
                    emit(
                        "warning",
                        "llm_retry",
                        {
                            "function": call.spec.name,
                            "call_id": call.call_id,
                            "attempt": attempt,
                            "wait_s": round(wait, 3),
                            "status": status_of(exc),
                            "reason": reason,
                            "error": type(exc).__name__,
                        },
                    )
                    yield Sleep(wait, sleep=self.sleep, async_sleep=self.async_sleep)
                    waited += wait
        finally:
            call.fields["attempts"] = attempt
            call.fields["retry_wait_s"] = round(waited, 3)


@overload
def retry_on_rate_limit(fn: Callable[P, R], /) -> GuardedFunction[P, R]: ...


@overload
def retry_on_rate_limit(
    *,
    max_tries: int = ...,
    max_time: float | None = ...,
    max_wait: float = ...,
    initial_wait: float = ...,
    server_errors: bool = ...,
    retry_on: tuple[type[BaseException], ...] = ...,
    jitter: Callable[[float], float] | Unset | None = ...,
    clock: Callable[[], float] = ...,
    sleep: Callable[[float], None] | None = ...,
    async_sleep: Callable[[float], Awaitable[None]] | None = ...,
    model: str | Unset | None = ...,
    prompt: PromptFn | Unset | None = ...,
    log_content: bool | Unset = ...,
    tags: TagValues | None = ...,
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]: ...


def retry_on_rate_limit(
    fn: Any = None,
    /,
    *,
    max_tries: int = 6,
    max_time: float | None = 120,
    max_wait: float = 60,
    initial_wait: float = 1.0,
    server_errors: bool = True,
    retry_on: tuple[type[BaseException], ...] = (),
    jitter: Callable[[float], float] | Unset | None = UNSET,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | Unset | None = UNSET,
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Any:
    """Retry the call when the provider says "too many requests", as it asks.

    Retried: ``openai.RateLimitError``, ``anthropic.RateLimitError``, Anthropic's 529
    overloaded, any exception with a 429 status (httpx ``HTTPStatusError`` included); with
    ``server_errors`` (default) also 500/502/503/504, timeouts and connection errors; and any
    type in ``retry_on``. Never retried: quota or spend-limit errors (OpenAI
    ``insufficient_quota``, Anthropic spend limits), ``RequestTooLarge``, and llmguard's own
    ``RateLimitExceeded`` unless named in ``retry_on`` (``@rate_limited`` waits for its
    window itself; its refusal is a local decision, not provider trouble). Gives up after
    ``max_tries`` attempts or ``max_time`` seconds of trying (time queued in
    ``@rate_limited`` not counted), re-raising the last exception unchanged. Each retry
    logs an ``llm_retry`` event; the call's ``llm_call`` event gets ``attempts`` and
    ``retry_wait_s``. Turn the SDK's own retries off (``max_retries=0``) so the two do not
    multiply. ``jitter=None``, ``clock``, ``sleep`` and ``async_sleep`` make waits exact and
    instant in tests.
    """
    import backoff

    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("retry_on_rate_limit", options)
    where = "@retry_on_rate_limit"
    validate.integer(
        max_tries, "max_tries", decorator=where, minimum=1, maximum=1000, meaning="attempts"
    )
    max_time_s = validate.seconds(
        max_time, "max_time", decorator=where, allow_none=True, none_means="no time limit"
    )
    max_wait_s = validate.seconds(max_wait, "max_wait", decorator=where)
    initial_wait_s = validate.seconds(initial_wait, "initial_wait", decorator=where)
    validate.flag(server_errors, "server_errors", decorator=where)
    types: Any = retry_on
    if not isinstance(types, (tuple, list)) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in types
    ):
        raise validate.refuse(
            where,
            "retry_on",
            retry_on,
            "retry_on must be a tuple of exception types, e.g. (TimeoutError,)",
        )
    if not isinstance(jitter, Unset):
        validate.function(jitter, "jitter", decorator=where, takes="given a wait, returning one")
    validate.function(clock, "clock", decorator=where, allow_none=False)
    validate.function(sleep, "sleep", decorator=where)
    validate.function(async_sleep, "async_sleep", decorator=where)
    layer = _RetryLayer(
        max_tries=max_tries,
        max_time=max_time_s,
        max_wait=max_wait_s,
        initial_wait=initial_wait_s,
        server_errors=server_errors,
        retry_on=tuple(retry_on),
        jitter=backoff.full_jitter if isinstance(jitter, Unset) else jitter,
        clock=clock,
        sleep=sleep,
        async_sleep=async_sleep,
    )

    def decorate(func: Any) -> Any:
        return guard(func, decorator="retry_on_rate_limit", layer=layer, options=options)

    return decorate if fn is None else decorate(fn)
