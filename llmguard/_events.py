"""Where llmguard's events go: the structlog logger ``"llmguard"``, plus test sinks.

The library never calls ``structlog.configure``; the application's configuration decides
how events are rendered and where they go. Until the application configures structlog,
events are console lines on **stderr** (structlog's own default would print them to stdout,
into the program's output). ``configure_logging()`` is an opt-in helper for applications
that have no logging set up at all.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, ClassVar, Protocol

from ._money import format_usd

Sink = Callable[[str, dict[str, Any]], None]


class Writable(Protocol):
    """Anything with ``write(str)`` and ``flush()``: a file, ``sys.stdout``, a StringIO."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> Any: ...


_sinks: tuple[Sink, ...] = ()
_sinks_lock = threading.Lock()
_failed_sinks: set[Sink] = set()  # sinks whose failure was reported (once each)
_logger: Any = None
# True while _logger is llmguard's own stderr logger, i.e. structlog was not configured when
# it was chosen: only then does an event ask structlog whether that has changed since.
_fallback = False
_is_configured: Callable[[], bool] = bool  # structlog.is_configured once structlog is imported
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (applications and tests swap it)."""

    def write(self, text: str) -> None:
        stream = sys.stderr
        if stream is not None:
            stream.write(text)

    def flush(self) -> None:
        stream = sys.stderr
        if stream is not None:
            stream.flush()


def money_as_text(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor for console lines: USD fields (``*_usd``) as money, ``$0.0000125``
    rather than ``1.25e-05``. (JSON keeps them numbers.)"""
    for key, value in event_dict.items():
        if key.endswith("_usd") and isinstance(value, (int, float)) and not isinstance(value, bool):
            event_dict[key] = format_usd(value)
    return event_dict


def _stderr_logger(structlog: Any) -> Any:
    """structlog's default console logger, writing to stderr instead of stdout."""
    stream = sys.stderr
    colors = not os.environ.get("NO_COLOR") and (
        bool(os.environ.get("FORCE_COLOR")) or bool(getattr(stream, "isatty", bool)())
    )
    try:
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    except SystemError:  # colours on Windows without colorama
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.dev.set_exc_info,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        money_as_text,
        renderer,
    ]
    return structlog.wrap_logger(
        structlog.WriteLogger(_Stderr()),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        context_class=dict,
    ).bind()


def _resolve_logger() -> Any:
    global _logger, _fallback, _is_configured
    import structlog

    _is_configured = structlog.is_configured
    if structlog.is_configured():
        proxy = structlog.get_logger("llmguard")
        # With cache_logger_on_first_use, structlog itself would keep the first bound logger
        # forever; holding it here skips the lazy proxy on every event.
        logger = proxy.bind() if structlog.get_config()["cache_logger_on_first_use"] else proxy
        _fallback = False
    else:
        logger = _stderr_logger(structlog)
        _fallback = True
    _logger = logger
    return logger


def get_logger() -> Any:
    """The logger llmguard's events go to, chosen on first use (structlog imported then).

    Once the application has configured structlog: ``structlog.get_logger("llmguard")``, so
    its configuration decides everything. Until then: structlog's default console lines,
    on stderr. The choice is kept; while it is the stderr logger, each event checks (one
    attribute read in structlog) whether the application has configured structlog since.
    """
    logger = _logger
    if logger is None or (_fallback and _is_configured()):
        logger = _resolve_logger()
    return logger


def add_sink(sink: Sink) -> None:
    """Also hand every event (level, event dict) to ``sink``, whatever structlog's config."""
    global _sinks
    with _sinks_lock:
        _sinks = (*_sinks, sink)


def remove_sink(sink: Sink) -> None:
    global _sinks
    with _sinks_lock:
        _sinks = tuple(s for s in _sinks if s is not sink)
        _failed_sinks.discard(sink)


def emit(level: str, event: str, fields: dict[str, Any]) -> None:
    """Send one event to the sinks and to the ``"llmguard"`` logger at ``level``.

    Each sink gets a dict of its own. A sink that raises does not stop the event, the other
    sinks or the call that emitted it: its first failure is reported as a
    ``subscriber_failed`` warning event, later ones are dropped silently."""
    for sink in _sinks:
        try:
            sink(level, {"event": event, "log_level": level, **fields})
        except Exception as exc:
            _sink_failed(sink, exc)
    getattr(get_logger(), level)(event, **fields)


def _sink_failed(sink: Sink, exc: Exception) -> None:
    with _sinks_lock:
        if sink in _failed_sinks:
            return
        _failed_sinks.add(sink)
    target = sink.callback if isinstance(sink, Subscription) else sink
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    emit(
        "warning",
        "subscriber_failed",
        {
            "subscriber": f"{getattr(target, '__module__', None) or '?'}.{name}",
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "hint": "llmguard went on without it; this warning is given once per subscriber",
        },
    )


Subscriber = Callable[[dict[str, Any]], object]


class Subscription:
    """A callback subscribed with :func:`llmguard.subscribe`: ``unsubscribe()`` ends it, and
    so does leaving a ``with`` block::

        with llmguard.subscribe(events.append):
            summarize("some text")
    """

    __slots__ = ("__weakref__", "callback")

    def __init__(self, callback: Subscriber) -> None:
        self.callback = callback

    def __call__(self, level: str, event: dict[str, Any]) -> None:
        self.callback(event)

    @property
    def active(self) -> bool:
        """Whether the callback still receives events."""
        return self in _sinks

    def unsubscribe(self) -> None:
        """Stop delivering events to the callback (nothing happens if it was stopped)."""
        remove_sink(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<Subscription {self.callback!r} ({state})>"


def subscribe(callback: Subscriber) -> Subscription:
    """Call ``callback(event)`` with every llmguard event, whatever structlog's configuration.

    ``event`` is a plain dict of its own: ``event["event"]`` is the event's name
    (``llm_call``, ``llm_retry``, ``budget_alert``...), ``event["log_level"]`` its level, and
    the other keys its fields, as logged. Events below the log level are delivered too. The
    callback runs in the thread (or event loop) that made the call, after the call is done;
    keep it short, and hand slow work (a network send) to a queue. An exception it raises is
    never the caller's: the call goes on, and a ``subscriber_failed`` warning event reports
    the callback's first failure.

    Subscribing a callback that is already subscribed returns its subscription (each event
    is delivered once). The returned :class:`Subscription` ends with ``unsubscribe()`` or as
    a context manager::

        llmguard.subscribe(my_exporter)             # for the life of the process
        with llmguard.subscribe(seen.append):       # for a block
            summarize("some text")
    """
    global _sinks
    given: object = callback  # checked at run time too: the caller may not use a type checker
    if not callable(given):
        from ._errors import ConfigurationError

        raise ConfigurationError(
            f"llmguard.subscribe() takes a callable receiving each event dict, got {callback!r}"
        )
    with _sinks_lock:
        for sink in _sinks:
            if isinstance(sink, Subscription) and sink.callback == callback:
                return sink
        subscription = Subscription(callback)
        _sinks = (*_sinks, subscription)
    return subscription


def unsubscribe(callback: Subscriber | Subscription) -> None:
    """Stop calling ``callback`` (a subscribed callable, or the :class:`Subscription` that
    :func:`subscribe` returned). Nothing happens if it is not subscribed."""
    if isinstance(callback, Subscription):
        callback.unsubscribe()
        return
    with _sinks_lock:
        found = [s for s in _sinks if isinstance(s, Subscription) and s.callback == callback]
    for subscription in found:
        subscription.unsubscribe()


def warn_once(key: str, event: str, **fields: Any) -> None:
    """Emit a warning event the first time ``(event, key)`` is seen in this process."""
    marker = (event, key)
    with _warned_lock:
        if marker in _warned:
            return
        _warned.add(marker)
    emit("warning", event, fields)


class _Outage:
    """One storage's current outage: since when, whether a write failed in it, and which
    warning events it has given."""

    __slots__ = ("since", "warned", "writes")

    def __init__(self) -> None:
        self.since = time.monotonic()
        self.writes = False
        self.warned: set[str] = set()


outages: dict[str, _Outage] = {}
"""The storages (URIs, passwords masked) in an outage now. Empty almost always, so the hot
path of a storage operation only tests it for truth."""


def storage_failed(storage: str, *, write: bool) -> None:
    """An operation on ``storage`` failed (``write``: one that changes it): it is in an
    outage until an operation succeeds again (a write, if a write failed: a read-only
    folder or replica answers reads, and is still down for what needs writes)."""
    with _warned_lock:
        outage = outages.get(storage)
        if outage is None:
            outage = outages[storage] = _Outage()
        outage.writes = outage.writes or write


def storage_answered(storage: str, *, write: bool) -> None:
    """An operation on ``storage`` succeeded: an outage it was in is over, so one
    ``storage_recovered`` event (info) is emitted and its warnings are armed again."""
    with _warned_lock:
        outage = outages.get(storage)
        if outage is None or (outage.writes and not write):
            return
        del outages[storage]
    emit(
        "info",
        "storage_recovered",
        {
            "storage": storage,
            "outage_s": round(time.monotonic() - outage.since, 3),
            "warned": sorted(outage.warned),
        },
    )


def warn_outage(storage: str, event: str, **fields: Any) -> None:
    """Emit the warning ``event`` about ``storage`` (its URI, password masked) once per
    outage: not again until the storage has answered since (see :func:`storage_answered`)."""
    with _warned_lock:
        outage = outages.get(storage)
        if outage is None:
            outage = outages[storage] = _Outage()
        if event in outage.warned:
            return
        outage.warned.add(event)
    emit("warning", event, {"storage": storage, **fields})


def reset_warnings() -> None:
    """Forget which one-time warnings were given and which storages are down (for tests)."""
    with _warned_lock:
        _warned.clear()
        outages.clear()


class _JSONLines:
    """structlog's add_log_level + TimeStamper(fmt="iso", utc=True) + JSONRenderer in one
    processor: same output, a third of the cost (an event is rendered on every call)."""

    _ALIASES: ClassVar[dict[str, str]] = {"warn": "warning", "exception": "error"}

    def __init__(self) -> None:
        import json

        self._encode = json.JSONEncoder(default=repr, ensure_ascii=False).encode
        self._second = -1
        self._prefix = ""

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date part changes once a second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> str:
        event_dict["level"] = self._ALIASES.get(method_name, method_name)
        event_dict["timestamp"] = self._timestamp()
        return str(self._encode(event_dict))


_owned_stream: IO[str] | None = None


def close_owned_stream() -> None:
    """Close the log file ``configure_logging(file=path)`` opened, if any."""
    global _owned_stream
    if _owned_stream is not None:
        _owned_stream.close()
        _owned_stream = None


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def configure_logging(
    *,
    json: bool = True,
    file: str | IO[str] | Writable | None = None,
    level: str = "INFO",
) -> None:
    """Set up structlog for an application that has no logging configured.

    Opt-in: a library must not configure logging, an application may, and calling this is
    that application's explicit choice. Events are written one per line to ``file`` (a
    path, appended to, or an open text stream) as JSON (``json=True``) or as a
    human-readable console line, with an ISO timestamp and the level, and events below
    ``level`` are dropped. The default ``file`` is **stdout**, the container convention
    (the platform collects a process's stdout as its log); pass ``file=sys.stderr`` to keep
    stdout for the program's own output. Without this call, and with structlog left
    unconfigured, events go to stderr.

    >>> import llmguard
    >>> llmguard.configure_logging(json=True, file="llmguard.jsonl")  # doctest: +SKIP
    """
    import structlog

    from ._errors import ConfigurationError

    try:
        threshold = _LEVELS[level.lower()]
    except KeyError:
        raise ConfigurationError(
            f"unknown log level {level!r}: use one of {', '.join(n.upper() for n in _LEVELS)}"
        ) from None
    stream: IO[str] | Writable
    close_owned_stream()  # a file this helper opened before is replaced
    if file is None:
        stream = sys.stdout
    elif isinstance(file, str):
        stream = open(file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - kept until reconfigured
        global _owned_stream
        _owned_stream = stream
    else:
        stream = file
    processors: list[Any] = [structlog.contextvars.merge_contextvars]
    if json:
        processors.append(_JSONLines())
    else:
        processors += [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            money_as_text,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    global _logger
    _logger = None
