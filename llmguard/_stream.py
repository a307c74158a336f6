"""Streams: chunks pass through unchanged, as they arrive; the call is metered once, at the end.

A decorated function that returns a stream (an ``openai`` ``Stream``/``AsyncStream`` of
chat chunks or of Responses API events, an ``anthropic`` event stream, any iterator or async
iterator of chunks) gets back a wrapper that yields the same chunks. When the stream ends, is
closed early, fails, or is dropped unfinished (garbage-collected), the wrapper reports what
was consumed: the usage the provider sent (OpenAI ``stream_options={"include_usage":
True}``, the Responses API's ``response.completed``, Anthropic ``message_start`` /
``message_delta``), else the text of the deltas for an estimate.

The SDKs' stream helpers (``client.chat.completions.stream(...)``, ``client.responses.stream
(...)``, ``client.messages.stream(...)``) return a *manager*: nothing is sent until its block
is entered. The wrapper of a manager meters the helper's raw event stream, so every way of
reading it (events, ``text_stream``, ``until_done()``, ``get_final_message()`` /
``get_final_completion()`` / ``get_final_response()``) counts, once; leaving the block ends
it.

One stream has one :class:`StreamMeter`, however many observers wait for its end (the
instrumented client, ``@budget``, ``@cached``, the decorated call): wrapping a wrapped stream
adds an observer instead of a second wrapper, and the stream's usage is added to one call
only (:meth:`StreamTally.claim`).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from ._events import warn_once
from ._tokens import counter_for
from ._usage import Usage, usage_from_usage_object

_NOT_STREAMS = (str, bytes, bytearray, list, tuple, dict, set, frozenset)

OnEnd = Callable[["StreamTally", BaseException | None], None]

# Responses API events whose delta is output text (counted for an estimate of a stream left
# before its usage arrived).
_RESPONSE_DELTAS = frozenset(
    (
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
    )
)

HELPER_STREAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    # The SDK helper streams a stream manager opens: "module:class" -> (the SDK's "not
    # given" value, the parse options the class takes besides the raw stream).
    "anthropic.lib.streaming:MessageStream": ("anthropic:NOT_GIVEN", ("output_format",)),
    "anthropic.lib.streaming:AsyncMessageStream": ("anthropic:NOT_GIVEN", ("output_format",)),
    "anthropic.lib.streaming:BetaMessageStream": ("anthropic:NOT_GIVEN", ("output_format",)),
    "anthropic.lib.streaming:BetaAsyncMessageStream": ("anthropic:NOT_GIVEN", ("output_format",)),
    "openai.lib.streaming.chat:ChatCompletionStream": (
        "openai:omit",
        ("response_format", "input_tools"),
    ),
    "openai.lib.streaming.chat:AsyncChatCompletionStream": (
        "openai:omit",
        ("response_format", "input_tools"),
    ),
    "openai.lib.streaming.responses:ResponseStream": (
        "openai:omit",
        ("text_format", "input_tools", "starting_after"),
    ),
    "openai.lib.streaming.responses:AsyncResponseStream": (
        "openai:omit",
        ("text_format", "input_tools", "starting_after"),
    ),
}
_MANAGERS = {  # SDK stream manager class -> the helper stream it opens
    "MessageStreamManager": "anthropic.lib.streaming:MessageStream",
    "AsyncMessageStreamManager": "anthropic.lib.streaming:AsyncMessageStream",
    "BetaMessageStreamManager": "anthropic.lib.streaming:BetaMessageStream",
    "BetaAsyncMessageStreamManager": "anthropic.lib.streaming:BetaAsyncMessageStream",
    "ChatCompletionStreamManager": "openai.lib.streaming.chat:ChatCompletionStream",
    "AsyncChatCompletionStreamManager": "openai.lib.streaming.chat:AsyncChatCompletionStream",
    "ResponseStreamManager": "openai.lib.streaming.responses:ResponseStream",
    "AsyncResponseStreamManager": "openai.lib.streaming.responses:AsyncResponseStream",
}


def _sdk_manager(value: Any) -> str | None:
    """The helper stream ``value`` opens if it is an SDK stream manager, else None."""
    kind = type(value)
    helper = _MANAGERS.get(kind.__name__)
    if helper is None or not kind.__module__.startswith(helper.partition(".")[0] + "."):
        return None
    return helper


def is_stream_manager(value: Any) -> bool:
    """An SDK stream helper's manager (``messages.stream(...)``,
    ``chat.completions.stream(...)``), a metered one, or a cached helper call's replay: a
    context manager around a stream, which sends nothing until entered."""
    return isinstance(value, (ManagedStream, ReplayedStreamManager)) or (
        _sdk_manager(value) is not None
    )


def is_stream(value: Any) -> bool:
    """An iterator or async iterator of chunks (not a string, container or file-like answer),
    or a stream helper's manager."""
    if value is None or isinstance(value, _NOT_STREAMS):
        return False
    if isinstance(value, _Base) or is_stream_manager(value):
        return True
    kind = type(value)
    return (hasattr(kind, "__next__") and hasattr(kind, "__iter__")) or hasattr(kind, "__anext__")


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class StreamTally:
    """What the chunks of one stream add up to: text, model, usage."""

    __slots__ = (
        "_input",
        "_output",
        "_usage",
        "abandoned",
        "chunks",
        "complete",
        "count_only",
        "kept",
        "model",
        "owner",
        "parts",
        "sent",
    )

    def __init__(self, keep: bool = False, count_only: bool = False, sent: bool = True) -> None:
        self.count_only = count_only  # a replay whose cost is known: just count
        self.kept: list[Any] | None = [] if keep else None  # the chunks themselves, if asked
        self.complete = False  # ran to its end (not closed early, not failed)
        self.abandoned = False  # dropped unfinished, settled when garbage-collected
        self.sent = sent  # False for a stream helper never entered: no request was made
        self.owner: object = None  # the call its usage was added to (see claim)
        self.parts: list[str] = []
        self.model: str | None = None
        self._usage: Usage | None = None
        self._input: dict[str, int] = {}
        self._output: int | None = None
        self.chunks = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def usage(self) -> Usage | None:
        """The usage the provider reported, or None (then estimate from ``text``). An
        Anthropic stream left before its ``message_delta`` has its input from
        ``message_start`` and its output counted from the text received."""
        if self._usage is not None:
            return self._usage
        if self._input:
            read = self._input.get("cache_read_input_tokens", 0)
            write = self._input.get("cache_creation_input_tokens", 0)
            total = self._input.get("input_tokens", 0) + read + write
            output = self._output
            if output is None:
                output = int(counter_for(self.model).count(self.text))
            return Usage(total, output, read, write, self.model)
        return None

    def claim(self, owner: object) -> bool:
        """True the first time only: the caller adds this stream's usage to ``owner``. One
        stream is one provider call, counted in one call however many observe it."""
        if self.owner is not None:
            return False
        self.owner = owner
        return True

    def add(self, chunk: Any) -> None:
        self.chunks += 1
        if self.count_only:
            return
        if self.kept is not None:
            self.kept.append(chunk)
        if isinstance(chunk, str):  # a generator of text pieces
            self.parts.append(chunk)
            return
        kind = _get(chunk, "type")
        if kind is None:  # OpenAI chat chunk
            model = _get(chunk, "model")
            if isinstance(model, str):
                self.model = model
            for choice in _get(chunk, "choices") or ():
                content = _get(_get(choice, "delta"), "content")
                if isinstance(content, str):
                    self.parts.append(content)
            usage = _get(chunk, "usage")
            if usage is not None:
                self._usage = usage_from_usage_object(usage, self.model)
        elif isinstance(kind, str) and kind.startswith("response."):  # OpenAI Responses API events
            self._add_response_event(kind, chunk)
        elif kind == "message_start":  # Anthropic raw events
            message = _get(chunk, "message")
            self.model = _get(message, "model") or self.model
            usage = _get(message, "usage")
            for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                value = _get(usage, name)
                if isinstance(value, int):
                    self._input[name] = value
        elif kind == "content_block_delta":
            text = _get(_get(chunk, "delta"), "text")
            if isinstance(text, str):
                self.parts.append(text)
        elif kind == "message_delta":
            output = _get(_get(chunk, "usage"), "output_tokens")
            if isinstance(output, int):
                self._output = output

    def _add_response_event(self, kind: str, event: Any) -> None:
        """A Responses API event: the model from the response the lifecycle events carry
        (``response.created``...), the text from the output deltas, the usage from the
        response of the final event (``response.completed``, or ``response.incomplete`` /
        ``response.failed``, which report what was billed too)."""
        response = _get(event, "response")
        if response is not None:
            model = _get(response, "model")
            if isinstance(model, str):
                self.model = model
            usage = _get(response, "usage")
            if usage is not None:
                self._usage = usage_from_usage_object(usage, self.model)
        elif kind in _RESPONSE_DELTAS:
            delta = _get(event, "delta")
            if isinstance(delta, str):
                self.parts.append(delta)


# -- streams dropped unfinished ------------------------------------------------------------
# A finalizer runs wherever the garbage collector happens to run: in any thread, maybe while
# that thread holds a lock that settling needs (a storage's, the cache's). So it only queues
# the stream; a daemon thread settles it (no event loop needed), and at exit the queue is
# settled before the interpreter goes.
_settler_lock = threading.Lock()
_dropped: Any = None  # queue.SimpleQueue: put() is safe from finalizers
_exiting = False
_exit_hook = False


def _start_settler() -> Any:
    """The queue of dropped streams, its daemon thread started on first use (per process)."""
    global _dropped, _exit_hook
    with _settler_lock:
        if _dropped is None:
            import atexit
            import queue

            dropped: Any = queue.SimpleQueue()
            threading.Thread(
                target=_settle_dropped, args=(dropped,), name="llmguard-streams", daemon=True
            ).start()
            _dropped = dropped
            if not _exit_hook:
                atexit.register(_at_exit)
                _exit_hook = True
    return _dropped


def _settle_dropped(dropped: Any) -> None:
    while True:
        item = dropped.get()
        try:
            if isinstance(item, threading.Event):  # settle_dropped_streams() waits for it
                item.set()
            else:
                item.dropped()
        except Exception:  # pragma: no cover - dropped() swallows what observers raise
            pass


def settle_dropped_streams(timeout: float | None = 5.0) -> bool:
    """Wait until the streams dropped unfinished so far have been settled (their events
    emitted, their budget reservations released); False if ``timeout`` passed first."""
    dropped = _dropped
    if dropped is None:
        return True
    done = threading.Event()
    dropped.put(done)
    return done.wait(timeout)


def _at_exit() -> None:
    global _exiting
    _exiting = True  # from now on, settled where dropped: the interpreter is going
    settle_dropped_streams(5.0)


def _forget_settler() -> None:  # a forked child has no settler thread
    global _dropped, _settler_lock
    _dropped = None
    _settler_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_settler)


class StreamMeter:
    """One stream's tally and the observers waiting for its end, told once, in the order
    they asked, when the stream ends, is closed, fails, or when every wrapper of it has been
    garbage-collected unfinished (then settled by the streams thread: observers must not
    need an event loop, and nothing they raise escapes)."""

    __slots__ = (
        "_finalizers",
        "_holders",
        "_listeners",
        "_lock",
        "_target",
        "done",
        "error",
        "tally",
    )

    def __init__(self, *, keep: bool = False, count_only: bool = False, sent: bool = True) -> None:
        self.tally = StreamTally(keep, count_only, sent)
        self._listeners: list[OnEnd] = []
        self._lock = threading.RLock()  # reentrant: at exit, a finalizer settles inline
        self._holders = 0
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._target: StreamMeter | None = None  # merged into another meter (see absorb)
        self.done = False
        self.error: BaseException | None = None

    def resolve(self) -> StreamMeter:
        meter = self
        while meter._target is not None:
            meter = meter._target
        return meter

    def listen(self, on_end: OnEnd, *, keep: bool = False, count_only: bool = False) -> None:
        """Call ``on_end(tally, error)`` when the stream ends (now, if it has). ``keep``:
        keep the chunks in ``tally.kept`` (impossible once some were read: then None);
        ``count_only``: this observer needs no text or usage."""
        meter = self.resolve()
        tally = meter.tally
        if keep and tally.kept is None and tally.chunks == 0:
            tally.kept = []
        tally.count_only = tally.count_only and count_only
        with meter._lock:
            if not meter.done:
                meter._listeners.append(on_end)
                return
        on_end(tally, meter.error)

    def hold(self, holder: object) -> None:
        """``holder`` (a wrapper) uses this meter; when all holders are garbage-collected
        before the end, the stream is settled with what was consumed."""
        if _dropped is None:
            _start_settler()
        finalizer = weakref.finalize(holder, _release, self)
        meter = self.resolve()
        with meter._lock:
            meter._holders += 1
            meter._finalizers.append(finalizer)

    def dropped(self) -> None:
        """A holder was garbage-collected: the last one settles the stream unfinished."""
        meter = self.resolve()
        with meter._lock:
            meter._holders -= 1
            last = meter._holders <= 0 and not meter.done
        if last:
            meter.end(None, abandoned=True)

    def absorb(self, other: StreamMeter) -> None:
        """``other`` (a stream manager's meter) now meters the same stream as this one (its
        raw stream's): one meter, ``other``'s observers after this one's."""
        meter, other = self.resolve(), other.resolve()
        if other is meter:
            return
        with other._lock:
            other._target = meter
            listeners, other._listeners = other._listeners, []
            holders, other._holders = other._holders, 0
            finalizers, other._finalizers = other._finalizers, []
        with meter._lock:
            meter._holders += holders
            meter._finalizers.extend(finalizers)
        meter.tally.sent = True
        keep = other.tally.kept is not None
        for listener in listeners:
            meter.listen(listener, keep=keep, count_only=other.tally.count_only)

    def end(self, error: BaseException | None, *, abandoned: bool = False) -> None:
        """The stream is over: tell every observer, once. An observer's exception is raised
        after all were told (swallowed when ``abandoned``: called from a finalizer)."""
        meter = self.resolve()
        with meter._lock:
            if meter.done:
                return
            meter.done = True
            meter.error = error
            listeners, meter._listeners = meter._listeners, []
            finalizers, meter._finalizers = meter._finalizers, []
        for finalizer in finalizers:
            finalizer.detach()
        tally = meter.tally
        tally.abandoned = abandoned
        failure: Exception | None = None
        for listener in listeners:
            try:
                listener(tally, error)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            if not abandoned:
                raise failure
            try:
                warn_once(
                    "llmguard_stream_finalizer",
                    "llmguard_internal_error",
                    error=repr(failure)[:300],
                    hint="an abandoned stream could not be fully settled",
                )
            except Exception:  # pragma: no cover - e.g. during interpreter shutdown
                pass


Context = tuple[ContextVar[Any], Any]


def _release(meter: StreamMeter) -> None:
    """A holder's finalizer: queue the meter (settle it here when the interpreter exits, or
    in a forked child that has no settler thread yet)."""
    try:
        dropped = _dropped
        if dropped is None or _exiting or sys.is_finalizing():
            meter.dropped()
        else:
            dropped.put(meter)
    except Exception:  # pragma: no cover - a finalizer must never raise
        pass


class _Base:
    def __init__(self, inner: Any, meter: StreamMeter, context: Context | None = None) -> None:
        self._inner = inner
        self.meter = meter
        self._tally = meter.tally
        self._context = context  # set while the inner stream runs (a generator's own code)
        meter.hold(self)

    @property
    def tally(self) -> StreamTally:
        return self.meter.resolve().tally

    def _end(self, error: BaseException | None) -> None:
        self.meter.end(error)

    def __getattr__(self, name: str) -> Any:  # .response, .get_final_completion(), ...
        if name in ("_inner", "meter", "_tally", "_context"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class MeteredStream(_Base):
    """A sync stream: the same chunks, metered when it ends or is closed."""

    def __iter__(self) -> MeteredStream:
        return self

    def _next_in_context(self, var: ContextVar[Any], value: Any) -> Any:
        token = var.set(value)
        try:
            return next(self._inner)
        finally:
            var.reset(token)

    def __next__(self) -> Any:
        try:
            context = self._context
            chunk = next(self._inner) if context is None else self._next_in_context(*context)
        except StopIteration:
            self._tally.complete = True
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        self._tally.add(chunk)
        return chunk

    def close(self) -> None:
        """Stop early: the call is metered with what was consumed."""
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._end(None)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMeteredStream(_Base):
    """An async stream: the same chunks, metered when it ends, is closed, or its task is
    cancelled while waiting for a chunk."""

    def __aiter__(self) -> AsyncMeteredStream:
        return self

    async def _next_in_context(self, var: ContextVar[Any], value: Any) -> Any:
        token = var.set(value)
        try:
            return await self._inner.__anext__()
        finally:
            var.reset(token)

    async def __anext__(self) -> Any:
        try:
            context = self._context
            if context is None:
                chunk = await self._inner.__anext__()
            else:
                chunk = await self._next_in_context(*context)
        except StopAsyncIteration:
            self._tally.complete = True
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        self._tally.add(chunk)
        return chunk

    async def aclose(self) -> None:
        """Stop early: the call is metered with what was consumed."""
        try:
            close = getattr(self._inner, "aclose", None) or getattr(self._inner, "close", None)
            if close is not None:
                result = close()
                if hasattr(result, "__await__"):
                    await result
        finally:
            self._end(None)

    close = aclose

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- one stream, several readers (@debounced) -----------------------------------------------
class SharedStream:
    """One stream read by several callers (those of a ``@debounced`` burst): each gets its
    own :meth:`reader`, which yields every chunk from the first, as they arrive; the reader
    ahead pulls the next chunk from the stream for all, so none waits for another to read.
    The stream keeps its one meter (the call that made it pays, once; every reader's
    observers are told when it ends) and is closed when every reader has been closed, or
    read to its end, or failed. A reader whose task is cancelled while it waits for a chunk
    leaves: the chunk is still read for the others (the last one leaving ends the stream)."""

    def __init__(self, stream: Any, readers: int, context: Context | None = None) -> None:
        if isinstance(stream, _Base):
            if stream._context is None and _lazy(stream._inner):
                stream._context = context
            source = stream
        else:
            meter = StreamMeter()
            if not _lazy(stream):
                context = None
            kind = AsyncMeteredStream if hasattr(type(stream), "__anext__") else MeteredStream
            source = kind(stream, meter, context)
        self.source: Any = source  # a MeteredStream or an AsyncMeteredStream
        self.asynchronous = isinstance(source, AsyncMeteredStream)
        self.chunks: list[Any] = []
        self.done = False
        self.error: BaseException | None = None
        self._open = readers  # readers not yet closed, finished or gone
        self.cost: tuple[str | None, Any] | None = None  # (model, USD), set when metered
        self._lock = threading.Lock()
        self._pull = threading.Lock()  # sync: one reader at a time reads the stream
        self._pulling: Any = None  # async: the task reading the next chunk, if one is

    def reader(self) -> Any:
        """A new reader: from the first chunk, then live."""
        return (_AsyncSharedReader if self.asynchronous else _SharedReader)(self)

    def release(self) -> bool:
        """A reader leaves: True if it was the last and the stream is not over (the caller
        then closes it)."""
        with self._lock:
            self._open -= 1
            return self._open == 0 and not self.done

    def abandon(self) -> None:
        """Close the stream from where it cannot be awaited (every reader left): an async
        one is closed by a task on the running loop, else ended with what was read."""
        if not self.asynchronous:
            self.source.close()
            return
        import asyncio

        try:
            asyncio.get_running_loop().create_task(self.source.aclose())
        except RuntimeError:  # no loop: the stream is dropped, settle what was read now
            self.source.meter.end(None)

    def failure(self) -> BaseException:
        """What a reader raises when the stream failed (in another reader's hands)."""
        error = self.error
        assert error is not None
        if isinstance(error, Exception):
            return error
        failed = RuntimeError(
            f"the stream shared by this burst of calls was interrupted ({type(error).__name__})"
        )
        failed.__cause__ = error
        return failed

    def took(self, task: Any) -> None:
        """The async pull ``task`` is over: its chunk (or the end, or the failure) is
        recorded once, whoever awaited it."""
        if self._pulling is not task:
            return
        self._pulling = None
        if task.cancelled():
            import asyncio

            self.done, self.error = True, asyncio.CancelledError()
            return
        error = task.exception()
        if error is not None:
            self.done, self.error = True, error
            return
        more, chunk = task.result()
        if more:
            self.chunks.append(chunk)
        else:
            self.done = True


async def _next_chunk(source: Any) -> tuple[bool, Any]:
    try:
        return True, await source.__anext__()
    except StopAsyncIteration:
        return False, None


class _Reader(_Base):
    """One caller's reader of a :class:`SharedStream`: its observers are the stream's."""

    def __init__(self, shared: SharedStream) -> None:
        super().__init__(shared.source, shared.source.meter)
        self._shared = shared
        self._position = 0
        self._left = False

    def _leave(self) -> bool:
        """This reader is done: True if the stream is to be closed now (see release)."""
        if self._left:
            return False
        self._left = True
        return self._shared.release()

    def _buffered(self) -> tuple[bool, Any]:
        """(True, the next chunk) if it has been read already, else (False, None)."""
        position = self._position
        chunks = self._shared.chunks
        if position < len(chunks):
            self._position = position + 1
            return True, chunks[position]
        return False, None

    def _over(self) -> BaseException | None:
        """The stream is over and this reader has had it all: what to raise if it failed."""
        self._leave()
        return None if self._shared.error is None else self._shared.failure()


class _SharedReader(_Reader):
    """A reader of a sync :class:`SharedStream` (readers in several threads)."""

    def __iter__(self) -> _SharedReader:
        return self

    def __next__(self) -> Any:
        shared = self._shared
        while not self._left:
            found, chunk = self._buffered()
            if found:
                return chunk
            if shared.done:
                error = self._over()
                if error is not None:
                    raise error
                break
            with shared._pull:
                if self._position < len(shared.chunks) or shared.done:
                    continue  # another reader read it meanwhile
                try:
                    chunk = next(shared.source)
                except StopIteration:
                    shared.done = True
                    continue
                except BaseException as exc:
                    shared.done, shared.error = True, exc
                    self._leave()
                    raise
                shared.chunks.append(chunk)
        raise StopIteration

    def close(self) -> None:
        """Stop reading: the stream is closed once every reader has stopped."""
        if self._leave():
            self._shared.source.close()

    def __enter__(self) -> _SharedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncSharedReader(_Reader):
    """A reader of an async :class:`SharedStream` (every reader on one event loop)."""

    def __aiter__(self) -> _AsyncSharedReader:
        return self

    async def __anext__(self) -> Any:
        import asyncio

        shared = self._shared
        while not self._left:
            found, chunk = self._buffered()
            if found:
                return chunk
            if shared.done:
                error = self._over()
                if error is not None:
                    raise error
                break
            pulling = shared._pulling
            if pulling is None:
                pulling = shared._pulling = asyncio.ensure_future(_next_chunk(shared.source))
                pulling.add_done_callback(shared.took)
            try:  # shielded: a reader cancelled here leaves, the others read on
                await asyncio.shield(pulling)
            except asyncio.CancelledError:
                if self._leave():  # the last reader: nobody reads the rest
                    pulling.cancel()
                raise
            except BaseException:
                pass  # the stream failed: recorded by took(), raised by _over()
            shared.took(pulling)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading: the stream is closed once every reader has stopped."""
        if self._leave():
            import asyncio

            pulling = self._shared._pulling
            if pulling is not None:  # a chunk being read for a reader that left
                pulling.cancel()
                await asyncio.wait([pulling])
            await self._shared.source.aclose()

    close = aclose

    async def __aenter__(self) -> _AsyncSharedReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ManagedStream:
    """An SDK stream helper's manager, metered: entering it sends the request and meters the
    helper's raw event stream (so events, ``text_stream``, ``until_done()`` and
    ``get_final_*()`` all count, once); leaving the block ends it. Never entered, it ends
    (nothing sent) when dropped."""

    def __init__(self, manager: Any, meter: StreamMeter) -> None:
        self._manager = manager
        self.meter = meter
        meter.hold(self)
        weakref.finalize(self, _close_request, manager)

    @property
    def tally(self) -> StreamTally:
        return self.meter.resolve().tally

    def _opened(self, stream: Any) -> Any:
        raw = getattr(stream, "_raw_stream", None)
        if isinstance(raw, _Base):  # an instrumented client's create() already meters it
            raw.meter.absorb(self.meter)
            self.meter = raw.meter
        elif raw is not None:
            kind = AsyncMeteredStream if hasattr(type(raw), "__anext__") else MeteredStream
            stream._raw_stream = kind(raw, self.meter)
        else:  # pragma: no cover - an SDK version whose helper llmguard does not know
            warn_once(
                f"stream_helper:{type(stream).__qualname__}",
                "stream_helper_unmetered",
                helper=type(stream).__qualname__,
                hint="only the prompt is estimated; use create(stream=True) for real usage",
            )
        return stream

    def _failed(self, error: BaseException) -> None:
        self.meter.end(error)

    def __enter__(self) -> Any:
        self.meter.resolve().tally.sent = True  # entering sends the request
        try:
            stream = self._manager.__enter__()
        except BaseException as exc:
            self._failed(exc)
            raise
        return self._opened(stream)

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> Any:
        try:
            return self._manager.__exit__(kind, error, tb)
        finally:
            self.meter.end(None)  # left early, or after the end: what was read counts

    async def __aenter__(self) -> Any:
        self.meter.resolve().tally.sent = True
        try:
            stream = await self._manager.__aenter__()
        except BaseException as exc:
            self._failed(exc)
            raise
        return self._opened(stream)

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> Any:
        try:
            return await self._manager.__aexit__(kind, error, tb)
        finally:
            self.meter.end(None)

    def __getattr__(self, name: str) -> Any:
        if name in ("_manager", "meter"):
            raise AttributeError(name)
        return getattr(self._manager, name)


def _close_request(manager: Any) -> None:
    """An async SDK manager makes its request coroutine when created: one never entered is
    closed, rather than warned about as never awaited (entered, closing it does nothing)."""
    try:
        for value in vars(manager).values():
            if isinstance(value, types.CoroutineType):
                value.close()
    except Exception:  # pragma: no cover - a finalizer must never raise
        pass


def wrap(
    stream: Any,
    on_end: OnEnd,
    *,
    keep: bool = False,
    count_only: bool = False,
    context: Context | None = None,
) -> Any:
    """``stream`` metered: ``on_end(tally, error)`` runs once, when it ends; ``keep`` also
    keeps the chunks in ``tally.kept``; ``count_only`` only counts them (a cache replay);
    ``context`` (a contextvar and its value) is set while a generator computes a chunk (its
    code runs as it is read), unless an inner wrapper set one. A stream wrapped already gets
    one more observer, not a second wrapper."""
    if isinstance(stream, (_Base, ManagedStream)):
        stream.meter.listen(on_end, keep=keep, count_only=count_only)
        if isinstance(stream, _Base) and stream._context is None and _lazy(stream._inner):
            stream._context = context
        return stream
    manager = is_stream_manager(stream)
    meter = StreamMeter(keep=keep, count_only=count_only, sent=not manager)
    meter.listen(on_end, keep=keep, count_only=count_only)
    if manager:
        return ManagedStream(stream, meter)
    if not _lazy(stream):
        context = None
    if hasattr(type(stream), "__anext__"):
        return AsyncMeteredStream(stream, meter, context)
    return MeteredStream(stream, meter, context)


def _lazy(stream: Any) -> bool:
    return isinstance(stream, (types.GeneratorType, types.AsyncGeneratorType))


def discard(stream: Any) -> None:
    """A metered stream helper that will never be entered: end it now (nothing was sent)."""
    if isinstance(stream, ManagedStream) and not stream.tally.sent:
        _close_request(stream._manager)
        stream.meter.end(None)
    elif _sdk_manager(stream) is not None:
        _close_request(stream)


def replay(items: list[Any], build: Callable[[Any], Any], *, asynchronous: bool) -> Any:
    """A fresh stream of ``build(item)`` for each stored item (an async one for async
    functions); each chunk is built as it is yielded, so none piles up in memory."""
    if not asynchronous:
        return (build(item) for item in items)

    async def chunks_again() -> Any:
        for item in items:
            yield build(item)

    return chunks_again()


# -- stream helpers in the cache ---------------------------------------------------------
def helper_of(manager: Any) -> tuple[str, dict[str, Any]] | None:
    """The helper stream ``manager`` opens ("module:class") and the parse options it was
    given (those not given left out), read before any request is made; None if this SDK's
    manager is not one llmguard knows."""
    if isinstance(manager, ManagedStream):
        manager = manager._manager
    if isinstance(manager, ReplayedStreamManager):
        return manager.helper, dict(manager.options)
    helper = _sdk_manager(manager)
    if helper is None:
        return None
    state = vars(manager)
    options: dict[str, Any] = {}
    for name in HELPER_STREAMS[helper][1]:
        key = f"_{type(manager).__name__}__{name}"  # the manager's private attribute
        if key not in state:
            return None
        value = state[key]
        if type(value).__name__ not in ("NotGiven", "Omit"):
            options[name] = value
    return helper, options


def manager_name(manager: Any) -> str:
    """The class name of a stream helper's manager, metered or not."""
    return type(manager._manager if isinstance(manager, ManagedStream) else manager).__name__


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class ReplayedResponse:
    """The ``response`` of a replayed stream: the replay made no HTTP request, so there are
    no headers and nothing to close."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.is_closed = False

    def close(self) -> None:
        self.is_closed = True

    async def aclose(self) -> None:
        self.is_closed = True


class _ReplayedEvents:
    """A helper's raw event stream, replayed from the stored events."""

    def __init__(self, items: Iterable[Any], build: Callable[[Any], Any]) -> None:
        self._items = iter(items)
        self._build = build
        self.response = ReplayedResponse()

    def __iter__(self) -> _ReplayedEvents:
        return self

    def __next__(self) -> Any:
        return self._build(next(self._items))

    def close(self) -> None:
        self._items = iter(())
        self.response.close()


class _AsyncReplayedEvents(_ReplayedEvents):
    def __aiter__(self) -> _AsyncReplayedEvents:
        return self

    async def __anext__(self) -> Any:
        try:
            item = next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None
        return self._build(item)

    async def close(self) -> None:  # type: ignore[override]
        self._items = iter(())
        self.response.close()


class ReplayedStreamManager:
    """A cached stream-helper call, replayed: entering it opens the SDK's own helper stream
    (events, ``text_stream``, ``until_done()``, ``get_final_message()`` /
    ``get_final_completion()``, parsing) over the stored raw events; nothing is sent. Async
    helpers are entered with ``async with``, as the SDK's."""

    def __init__(
        self, helper: str, options: dict[str, Any], items: list[Any], build: Callable[[Any], Any]
    ) -> None:
        self.helper = helper
        self.options = options
        self._items = items
        self._build = build
        self._stream: Any = None
        self.asynchronous = "Async" in helper.partition(":")[2]

    def _open(self) -> Any:
        sentinel, names = HELPER_STREAMS[self.helper]
        options = dict(self.options)
        for name in names:
            options.setdefault(name, _import(sentinel))
        events = (_AsyncReplayedEvents if self.asynchronous else _ReplayedEvents)(
            self._items, self._build
        )
        self._stream = _import(self.helper)(raw_stream=events, **options)
        return self._stream

    def __enter__(self) -> Any:
        if self.asynchronous:
            raise TypeError(f"{self.helper.partition(':')[2]} is entered with 'async with'")
        return self._open()

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            self._stream.close()

    async def __aenter__(self) -> Any:
        if not self.asynchronous:
            raise TypeError(f"{self.helper.partition(':')[2]} is entered with 'with'")
        return self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is not None:
            await self._stream.close()


def replay_helper(
    helper: tuple[str, dict[str, Any]], items: list[Any], build: Callable[[Any], Any]
) -> ReplayedStreamManager:
    """A stored stream-helper call as a manager like the SDK's (see ReplayedStreamManager)."""
    return ReplayedStreamManager(helper[0], helper[1], items, build)
