"""Where llmguard's events go: the structlog logger ``"llmguard"``, plus test sinks.

The library never calls ``structlog.configure``; the application's configuration decides
how events are rendered and where they go. ``configure_logging()`` is an opt-in helper for
applications that have no logging set up at all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, ClassVar, Protocol

Sink = Callable[[str, dict[str, Any]], None]


class Writable(Protocol):
    """Anything with ``write(str)`` and ``flush()``: a file, ``sys.stdout``, a StringIO."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> Any: ...


_sinks: tuple[Sink, ...] = ()
_sinks_lock = threading.Lock()
_logger: Any = None
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def get_logger() -> Any:
    """The ``"llmguard"`` structlog logger, created (and structlog imported) on first use."""
    global _logger
    if _logger is None:
        import structlog

        proxy = structlog.get_logger("llmguard")
        # With cache_logger_on_first_use, structlog itself would keep the first bound logger
        # forever; holding it here skips the lazy proxy on every event.
        _logger = proxy.bind() if structlog.get_config()["cache_logger_on_first_use"] else proxy
    return _logger


def add_sink(sink: Sink) -> None:
    """Also hand every event (level, event dict) to ``sink``, whatever structlog's config."""
    global _sinks
    with _sinks_lock:
        _sinks = (*_sinks, sink)


def remove_sink(sink: Sink) -> None:
    global _sinks
    with _sinks_lock:
        _sinks = tuple(s for s in _sinks if s is not sink)


def emit(level: str, event: str, fields: dict[str, Any]) -> None:
    """Send one event to the sinks and to the ``"llmguard"`` logger at ``level``."""
    for sink in _sinks:
        sink(level, {"event": event, "log_level": level, **fields})
    getattr(get_logger(), level)(event, **fields)


def warn_once(key: str, event: str, **fields: Any) -> None:
    """Emit a warning event the first time ``(event, key)`` is seen in this process."""
    marker = (event, key)
    with _warned_lock:
        if marker in _warned:
            return
        _warned.add(marker)
    emit("warning", event, fields)


def reset_warnings() -> None:
    """Forget which one-time warnings were given (for tests)."""
    with _warned_lock:
        _warned.clear()


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

    Opt-in: a library must not configure logging, an application may. Events are written
    one per line to ``file`` (a path, appended to, or an open text stream; default
    stdout) as JSON (``json=True``) or as a human-readable console line, with an ISO
    timestamp and the level, and events below ``level`` are dropped.

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
