"""``@debounced``: a burst of calls collapses into one execution with the latest arguments.

For UI-driven calls such as summarize-as-you-type: calls with the same key that arrive
within ``wait`` seconds of each other make one provider call, with the arguments of the
last of them, once the burst has been quiet for ``wait``; every caller of the burst gets that
result (or its exception). Within one process, for threads and asyncio tasks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, ParamSpec, TypeVar

from ._config import UNSET, _Unset
from ._errors import ConfigurationError
from ._flight import Flight, _running_loop
from ._pipeline import (
    PROCEED,
    Call,
    CallRecord,
    PromptFn,
    Sleep,
    UserFunction,
    check_options,
    guard,
)
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")


class _Burst:
    __slots__ = ("args", "closed", "deadline", "flight", "kwargs")

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.closed = False
        self.deadline = 0.0
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}


class _DebounceLayer:
    def __init__(
        self,
        *,
        wait: float,
        key: Callable[..., Any] | None,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
        async_sleep: Callable[[float], Awaitable[None]] | None,
    ) -> None:
        self.wait = wait
        self.key = None if key is None else UserFunction(key, "debounced", "key")
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep
        self._bursts: dict[Any, _Burst] = {}
        self._lock = threading.Lock()

    def run(self, call: CallRecord) -> Generator[Any, Any, Any]:
        key = self.key(call) if self.key is not None else None
        loop = _running_loop() if call.spec.is_async else None
        with self._lock:
            burst = self._bursts.get(key)
            leader = burst is None or burst.closed or burst.flight.loop is not loop
            if leader:
                burst = self._bursts[key] = _Burst(Flight(loop))
            assert burst is not None
            burst.args, burst.kwargs = call.args, call.kwargs
            burst.deadline = self.clock() + self.wait
        flight = burst.flight
        if not leader:
            ok, value, cost, model = yield Call(
                lambda: flight.wait(None), lambda: flight.wait_async(None)
            )
            if ok:
                call.fields["debounced"] = True
                call.serve_cached(model, cost, source="debounced")
                return value
            if ok is False:
                raise value
            return (yield PROCEED)  # the leader vanished without an outcome: call ourselves
        try:
            while True:  # wait until the burst has been quiet for `wait`
                with self._lock:
                    remaining = burst.deadline - self.clock()
                    if remaining <= 0:
                        burst.closed = True
                        if self._bursts.get(key) is burst:
                            del self._bursts[key]
                        call.args, call.kwargs = burst.args, burst.kwargs  # the latest call's
                        break
                yield Sleep(remaining, sleep=self.sleep, async_sleep=self.async_sleep)
            try:
                result = yield PROCEED
            except Exception as exc:
                flight.finish(False, exc)
                raise
            metering = call.meter(result)
            flight.finish(True, result, metering.cost, metering.model)
            return result
        finally:
            with self._lock:
                burst.closed = True
                if self._bursts.get(key) is burst:
                    del self._bursts[key]
            flight.finish(None, None)


def debounced(
    wait: float = 0.3,
    *,
    key: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | _Unset | None = UNSET,
    prompt: PromptFn | _Unset | None = UNSET,
    log_content: bool | _Unset = UNSET,
    tags: TagValues | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Collapse bursts of calls into one execution with the latest arguments.

    Calls with the same ``key`` (given the call's arguments by name; default: every call of
    the function) arriving within ``wait`` seconds of each other make one call, ``wait``
    seconds after the last of them, with that last call's arguments; every caller gets its
    result (or its exception). The executing call's event is an ordinary one; the others log
    ``debounced=True``, ``cost_usd=0`` and ``cost_source="debounced"``::

        @llmguard.debounced(wait=0.3, key=lambda user, text: user)
        async def suggest(user: str, text: str) -> str: ...
    """
    if callable(wait) and not isinstance(wait, (int, float)):
        raise ConfigurationError(
            "@debounced needs parentheses: @debounced() or @debounced(wait=0.3)"
        )
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait > 0:
        raise ConfigurationError(f"wait must be seconds > 0, got {wait!r}")
    if key is not None and not callable(key):
        raise ConfigurationError("@debounced(key=...) must be callable")
    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("debounced", options)
    layer = _DebounceLayer(
        wait=float(wait), key=key, clock=clock, sleep=sleep, async_sleep=async_sleep
    )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        return guard(func, decorator="debounced", layer=layer, options=options)  # type: ignore[no-any-return]

    return decorate
