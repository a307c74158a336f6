"""Helpers for users' own tests: capture llmguard's events whatever structlog's config."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._events import add_sink, remove_sink


class CapturedEvents(list[dict[str, Any]]):
    """The events captured by :func:`capture_calls`, oldest first (a ``list`` of dicts).

    ``calls`` are only the ``llm_call`` events; ``of(event)`` filters by event name.
    """

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self if e.get("event") == event]

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.of("llm_call")


@contextmanager
def capture_calls() -> Iterator[CapturedEvents]:
    """Collect every llmguard event emitted inside the block (from any thread or task).

    Works whatever the application's structlog configuration, including cached loggers,
    because it hooks llmguard's own emitter rather than structlog's::

        with llmguard.testing.capture_calls() as events:
            summarize("some text")
        assert events.calls[0]["cost_source"] == "usage"
    """
    captured = CapturedEvents()
    lock = threading.Lock()

    def sink(level: str, event: dict[str, Any]) -> None:
        with lock:
            captured.append(event)

    add_sink(sink)
    try:
        yield captured
    finally:
        remove_sink(sink)
