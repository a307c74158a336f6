"""``@debounced``: a burst of calls collapses into one execution with the latest arguments.

For UI-driven calls such as summarize-as-you-type: calls with the same key that arrive
within ``wait`` seconds of each other make one provider call, with the arguments of the
last of them, once the burst has been quiet for ``wait``; every caller of the burst gets that
result (or its exception). Within one process, for threads and asyncio tasks.

A function returning a stream: every caller of the burst gets its own reader of the one
stream, yielding every chunk from the first, as the chunks arrive (the reader ahead reads for
all, so no caller waits for another to read); see ``SharedStream``. A stream helper's manager
(entered by one caller) is refused before it is sent.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, ParamSpec, TypeVar, overload

from . import _validate as validate
from ._config import UNSET, Unset
from ._errors import ConfigurationError
from ._flight import Flight, running_loop
from ._pipeline import (
    PROCEED,
    Call,
    CallRecord,
    GuardedFunction,
    PromptFn,
    Sleep,
    UserFunction,
    check_options,
    full_name,
    guard,
    original,
    stream_context,
)
from ._stream import SharedStream, StreamTally, discard, is_stream, is_stream_manager, manager_name
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")


class _Burst:
    __slots__ = ("args", "callers", "closed", "deadline", "flight", "kwargs", "shared")

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.closed = False
        self.deadline = 0.0
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.callers = 1  # the leader and the followers waiting for its outcome
        self.shared: SharedStream | None = None  # the leader's stream, one reader per caller


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
        loop = running_loop() if call.spec.is_async else None
        with self._lock:
            burst = self._bursts.get(key)
            leader = burst is None or burst.closed or burst.flight.loop is not loop
            if leader:
                burst = self._bursts[key] = _Burst(Flight(loop))
            else:
                assert burst is not None
                burst.callers += 1
            assert burst is not None
            burst.args, burst.kwargs = call.args, call.kwargs
            burst.deadline = self.clock() + self.wait
        flight = burst.flight
        if not leader:
            try:
                ok, value, cost, model = yield Call(
                    lambda: flight.wait(None), lambda: flight.wait_async(None)
                )
            except BaseException:  # cancelled or interrupted while waiting: no reader taken
                self._leave(burst)
                raise
            if ok and isinstance(value, SharedStream):
                return self._follow(call, value, model)
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
            if is_stream_manager(result):  # refused before its request is sent
                refusal = TypeError(
                    f"@debounced cannot share the {manager_name(result)} returned by "
                    f"{call.spec.name} among the callers of a burst: a stream helper's manager "
                    "is entered by one caller. Nothing was sent. Return the raw stream "
                    "(create(stream=True)) instead: every caller then reads it."
                )
                discard(result)
                flight.finish(False, refusal)
                raise refusal
            if is_stream(result):
                return self._lead_stream(call, burst, result)
            metering = call.meter(result)
            flight.finish(True, result, metering.cost, metering.model)
            return result
        finally:
            with self._lock:
                burst.closed = True
                if self._bursts.get(key) is burst:
                    del self._bursts[key]
            flight.finish(None, None)

    def _lead_stream(self, call: CallRecord, burst: _Burst, stream: Any) -> Any:
        """The leader's stream, shared: every caller of the burst reads all of it, as it
        arrives (see SharedStream); one provider call, metered once, for the leader."""
        with self._lock:
            callers = burst.callers
            if callers > 1:
                shared = burst.shared = SharedStream(stream, callers, stream_context(call))
        if callers == 1:
            burst.flight.finish(None, None)  # nobody waits: nothing to share
            return stream
        reader = shared.reader()  # taken first: the leader's observers are told first

        def cost(tally: StreamTally, error: BaseException | None) -> None:
            shared.cost = call.stream_cost(tally, error)  # what the followers saved

        reader.meter.listen(cost)
        burst.flight.finish(True, shared, None, call.requested_model())
        return reader

    def _leave(self, burst: _Burst) -> None:
        """A follower gives up before it took its reader of the leader's stream."""
        with self._lock:
            shared = burst.shared
            if shared is None:
                burst.callers -= 1
                return
        if shared.release():  # the others are done with it already
            shared.abandon()

    @staticmethod
    def _follow(call: CallRecord, shared: SharedStream, model: str | None) -> Any:
        """A follower's reader of the leader's stream; its event (``cost_usd=0``) says what
        the stream cost the leader (``saved_usd``) once it is over."""
        call.fields["debounced"] = True
        call.serve_cached(model, None, source="debounced")
        reader = shared.reader()

        def saved(tally: StreamTally, error: BaseException | None) -> None:
            if shared.cost is not None:
                call.serve_cached(shared.cost[0], shared.cost[1], source="debounced")

        reader.meter.listen(saved)
        return reader


@overload
def debounced(fn: Callable[P, R], /) -> GuardedFunction[P, R]: ...


@overload
def debounced(
    wait: float = ...,
    *,
    key: Callable[..., Any] | None = ...,
    clock: Callable[[], float] = ...,
    sleep: Callable[[float], None] | None = ...,
    async_sleep: Callable[[float], Awaitable[None]] | None = ...,
    model: str | Unset | None = ...,
    prompt: PromptFn | Unset | None = ...,
    log_content: bool | Unset = ...,
    tags: TagValues | None = ...,
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]: ...


def debounced(
    wait: Any = 0.3,
    *,
    key: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
    async_sleep: Callable[[float], Awaitable[None]] | None = None,
    model: str | Unset | None = UNSET,
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Any:
    """Collapse bursts of calls into one execution with the latest arguments.

    Calls with the same ``key`` (given the call's arguments by name; default: every call of
    the function) arriving within ``wait`` seconds of each other make one call, ``wait``
    seconds after the last of them, with that last call's arguments; every caller gets its
    result (or its exception). The executing call's event is an ordinary one; the others log
    ``debounced=True``, ``cost_usd=0`` and ``cost_source="debounced"``. A returned stream is
    read by every caller, each from its own reader, live; a stream helper's manager is
    refused (``TypeError``, nothing sent); an async generator function is refused at
    decoration (``async def`` returning the generator works)::

        @llmguard.debounced(wait=0.3, key=lambda user, text: user)
        async def suggest(user: str, text: str) -> str: ...

    Bare ``@debounced`` waits 0.3 seconds for every call of the function.
    """
    if callable(wait) and not isinstance(wait, (int, float)):
        return debounced()(wait)  # bare @debounced
    where = "@debounced"
    wait_s = validate.seconds(
        wait, "wait", decorator=where, maximum=86400, none_means="the quiet time ending a burst"
    )
    validate.function(key, "key", decorator=where, takes="given the call's arguments by name")
    validate.function(clock, "clock", decorator=where, allow_none=False)
    validate.function(sleep, "sleep", decorator=where)
    validate.function(async_sleep, "async_sleep", decorator=where)
    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("debounced", options)
    layer = _DebounceLayer(wait=wait_s, key=key, clock=clock, sleep=sleep, async_sleep=async_sleep)

    def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
        target = original(getattr(func, "__func__", func))
        if inspect.isasyncgenfunction(target):
            raise ConfigurationError(
                f"@debounced cannot wait for a burst to end in {full_name(target)}, an async "
                "generator function: its calls are not awaited, so waiting would block the "
                "event loop. Make it an 'async def' that returns the generator (or the "
                "provider's stream): every caller of a burst then reads the one stream"
            )
        return guard(func, decorator="debounced", layer=layer, options=options)  # type: ignore[no-any-return]

    return decorate
