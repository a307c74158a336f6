"""Streams: chunks pass through unchanged, as they arrive; the call is metered at the end.

A decorated function that returns a stream (an ``openai`` ``Stream``/``AsyncStream`` of
chat chunks, an ``anthropic`` event stream, any iterator or async iterator of chunks) gets
back a wrapper that yields the same chunks. When the stream ends, is closed early, or fails,
the wrapper reports what was consumed: the usage in the final chunk when the provider sends
one (OpenAI ``stream_options={"include_usage": True}``, Anthropic ``message_start`` /
``message_delta``), else the text of the deltas for an estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._usage import Usage, usage_from_usage_object

_NOT_STREAMS = (str, bytes, bytearray, list, tuple, dict, set, frozenset)

OnEnd = Callable[["StreamTally", BaseException | None], None]


def is_stream_manager(value: Any) -> bool:
    """Anthropic's ``messages.stream(...)`` helper: a context manager around a stream."""
    kind = type(value)
    return kind.__name__ in ("MessageStreamManager", "AsyncMessageStreamManager") and (
        kind.__module__.startswith("anthropic")
    )


def is_stream(value: Any) -> bool:
    """An iterator or async iterator of chunks (not a string, container or file-like answer),
    or Anthropic's stream manager."""
    if value is None or isinstance(value, _NOT_STREAMS):
        return False
    if is_stream_manager(value):
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
        "chunks",
        "complete",
        "count_only",
        "kept",
        "model",
        "parts",
    )

    def __init__(self, keep: bool = False, count_only: bool = False) -> None:
        self.count_only = count_only  # a replay whose cost is known: just count
        self.kept: list[Any] | None = [] if keep else None  # the chunks themselves, if asked
        self.complete = False  # ran to its end (not closed early, not failed)
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
        """The usage the provider reported, or None (then estimate from ``text``)."""
        if self._usage is not None:
            return self._usage
        if self._input:
            read = self._input.get("cache_read_input_tokens", 0)
            write = self._input.get("cache_creation_input_tokens", 0)
            total = self._input.get("input_tokens", 0) + read + write
            return Usage(total, self._output or 0, read, write, self.model)
        return None

    def add_message(self, message: Any) -> None:
        """Take in a whole (possibly partial) Anthropic message: its text and usage."""
        if message is None:
            return
        self.model = _get(message, "model") or self.model
        for block in _get(message, "content") or ():
            text = _get(block, "text")
            if isinstance(text, str):
                self.parts.append(text)
        usage = _get(message, "usage")
        if usage is not None:
            self._usage = usage_from_usage_object(usage, self.model)

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


class _Base:
    def __init__(
        self, inner: Any, on_end: OnEnd, keep: bool = False, count_only: bool = False
    ) -> None:
        self._inner = inner
        self._on_end: OnEnd | None = on_end
        self.tally = StreamTally(keep, count_only)

    def _end(self, error: BaseException | None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self.tally, error)

    def __getattr__(self, name: str) -> Any:  # .response, .get_final_completion(), ...
        return getattr(self._inner, name)


class MeteredStream(_Base):
    """A sync stream: the same chunks, metered when it ends or is closed."""

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> Any:
        try:
            chunk = next(self._inner)
        except StopIteration:
            self.tally.complete = True
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        self.tally.add(chunk)
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
    """An async stream: the same chunks, metered when it ends or is closed."""

    def __aiter__(self) -> AsyncMeteredStream:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            self.tally.complete = True
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        self.tally.add(chunk)
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


class _ManagedStream:
    """Anthropic's ``messages.stream(...)`` manager, metered when its block exits: however
    the stream was read (``text_stream``, events, ``until_done()``), the SDK's own message
    snapshot holds the text and usage consumed."""

    def __init__(self, manager: Any, on_end: OnEnd) -> None:
        self._manager = manager
        self._on_end: OnEnd | None = on_end
        self._stream: Any = None

    def _end(self, error: BaseException | None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is None:
            return
        tally = StreamTally()
        tally.add_message(getattr(self._stream, "_current_snapshot_or_none", lambda: None)())
        tally.complete = error is None
        on_end(tally, error)

    def __enter__(self) -> Any:
        self._stream = self._manager.__enter__()
        return self._stream

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> Any:
        try:
            return self._manager.__exit__(kind, error, tb)
        finally:
            self._end(error)

    async def __aenter__(self) -> Any:
        self._stream = await self._manager.__aenter__()
        return self._stream

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> Any:
        try:
            return await self._manager.__aexit__(kind, error, tb)
        finally:
            self._end(error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)


def wrap(stream: Any, on_end: OnEnd, *, keep: bool = False, count_only: bool = False) -> Any:
    """``stream`` metered: ``on_end(tally, error)`` runs once, when it ends; ``keep`` also
    keeps the chunks in ``tally.kept``; ``count_only`` only counts them (a cache replay)."""
    if is_stream_manager(stream):
        return _ManagedStream(stream, on_end)
    if hasattr(type(stream), "__anext__"):
        return AsyncMeteredStream(stream, on_end, keep, count_only)
    return MeteredStream(stream, on_end, keep, count_only)


def replay(items: list[Any], build: Callable[[Any], Any], *, asynchronous: bool) -> Any:
    """A fresh stream of ``build(item)`` for each stored item (an async one for async
    functions); each chunk is built as it is yielded, so none piles up in memory."""
    if not asynchronous:
        return (build(item) for item in items)

    async def chunks_again() -> Any:
        for item in items:
            yield build(item)

    return chunks_again()
