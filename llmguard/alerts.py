"""Where budget alerts go: ``@budget(on_alert=llmguard.alerts.webhook(url))``.

A webhook posts each alert as JSON with a Slack-compatible ``text`` field (Slack and
Mattermost incoming webhooks show it as is; the other fields are the alert's data) from a
background thread: the call that crossed the threshold never waits for the post and never
fails because of it. A post that fails is retried; once the retries are used up, a
``alert_webhook_failed`` warning event says so (the URL's path and query, where Slack keeps
its secret, are left out). ``BurnAlert`` configures ``@budget(burn_alert=...)``;
``BudgetAlert`` is what ``on_alert`` receives.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from ._budget import BudgetAlert, BudgetStatus, BurnAlert
from ._errors import ConfigurationError
from ._events import emit
from ._money import decimal_text, format_usd

__all__ = ["BudgetAlert", "BurnAlert", "Webhook", "alert_payload", "alert_text", "webhook"]

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_EXIT_WAIT_MAX = 10.0  # seconds an exiting process waits, at most, for alerts not yet posted


def _when(at: datetime | None) -> str:
    return "never" if at is None else at.isoformat(timespec="seconds")


def _who(status: BudgetStatus) -> str:
    return f"`{status.name}`" + ("" if status.key is None else f" (key `{status.key}`)")


def alert_text(status: BudgetStatus) -> str:
    """One line for people: which budget, what happened, the numbers, when it resets."""
    money = (
        f"{format_usd(status.spent_usd)} of {format_usd(status.limit_usd)} spent, "
        f"{format_usd(status.remaining_usd)} left; resets {_when(status.resets_at)}"
    )
    if isinstance(status, BudgetAlert) and status.kind == "burn":
        window = status.window_s or 0
        span = f"{window / 3600:g}h" if window >= 3600 else f"{window / 60:g}m"
        return (
            f":fire: llmguard budget {_who(status)} is burning fast: "
            f"{format_usd(status.window_spent_usd or 0)} in the last {span} "
            f"({format_usd(status.rate_usd_per_hour or 0)}/h); at this rate its limit runs out "
            f"{_when(status.exhausts_at)}, before it resets. {money}."
        )
    if isinstance(status, BudgetAlert) and status.threshold is not None:
        return (
            f":warning: llmguard budget {_who(status)} reached {status.threshold:.0%} of its "
            f"limit: {money}."
        )
    return f":warning: llmguard budget {_who(status)}: {money}."


def alert_payload(status: BudgetStatus) -> dict[str, Any]:
    """The JSON a webhook posts: ``text`` for chat tools, then the alert's data (amounts as
    exact decimal strings, times in ISO 8601)."""
    data: dict[str, Any] = {
        "text": alert_text(status),
        "event": status.event if isinstance(status, BudgetAlert) else "budget_alert",
        "budget": status.name,
        "key": status.key,
    }
    fields = dict(vars(status))
    for name in ("name", "key"):
        fields.pop(name, None)
    for name, value in fields.items():
        if isinstance(value, Decimal):
            data[name] = decimal_text(value)
        elif isinstance(value, datetime):
            data[name] = value.isoformat()
        else:
            data[name] = value
    return data


def _where(url: str) -> str:
    """``scheme://host[:port]``: a webhook's path often is its secret."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}"


class Webhook:
    """``on_alert`` that posts alerts to ``url`` from a background thread (see
    :func:`webhook`). Calling it only puts the alert in a bounded queue."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        backoff: float = 0.5,
        queue_size: int = 100,
        headers: Mapping[str, str] | None = None,
        payload: Callable[[BudgetStatus], Mapping[str, Any]] = alert_payload,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"webhook url must be an http:// or https:// URL, got {url!r}")
        for name, value in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigurationError(f"webhook {name} must be seconds >= 0, got {value!r}")
        if not 0 < timeout < float("inf"):
            raise ConfigurationError(f"webhook timeout must be seconds > 0, got {timeout!r}")
        for name, count, low in (("retries", retries, 0), ("queue_size", queue_size, 1)):
            if isinstance(count, bool) or not isinstance(count, int) or count < low:
                raise ConfigurationError(f"webhook {name} must be an int >= {low}, got {count!r}")
        if not callable(payload):
            raise ConfigurationError("webhook payload must be a callable taking the alert")
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.queue_size = queue_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.payload = payload
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._pending = 0  # queued or being posted
        self._idle = threading.Condition(self._lock)
        _open_webhooks.add(self)

    def __repr__(self) -> str:
        return f"Webhook({_where(self.url)!r}, timeout={self.timeout:g}, retries={self.retries})"

    def __call__(self, status: BudgetStatus) -> None:
        """Queue ``status`` for posting; never blocks, never raises."""
        try:
            body = json.dumps(self.payload(status), default=str).encode()
            label = f"{status.name}" + ("" if status.key is None else f" key {status.key}")
        except Exception as exc:
            emit(
                "warning",
                "alert_webhook_failed",
                {"url": _where(self.url), "error": f"payload: {type(exc).__name__}: {exc}"[:300]},
            )
            return
        if self._pid != os.getpid():  # forked where os.register_at_fork does not exist
            self._forked()
        with self._lock:
            self._start()
            try:
                self._queue.put_nowait((label, body))
            except queue.Full:
                dropped = True
            else:
                dropped = False
                self._pending += 1
        if dropped:
            emit(
                "warning",
                "alert_webhook_dropped",
                {
                    "url": _where(self.url),
                    "budget": status.name,
                    "key": status.key,
                    "hint": f"{self.queue_size} alerts are waiting to be posted already: the "
                    "webhook is slow or down",
                },
            )

    def _forked(self) -> None:
        """In a forked child: a fresh lock and queue, no thread (threads do not survive
        fork, and a lock held by one at that moment would stay held)."""
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue = queue.Queue(self.queue_size)
        self._thread = None
        self._pending = 0
        self._pid = os.getpid()

    def _start(self) -> None:
        """Start the posting thread if it is not running."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="llmguard-webhook", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            label, body = item
            try:
                self._deliver(label, body)
            except Exception as exc:  # never let the thread die on a surprise
                emit(
                    "warning",
                    "alert_webhook_failed",
                    {"url": _where(self.url), "alert": label, "error": repr(exc)[:300]},
                )
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending <= 0:
                        self._idle.notify_all()

    def _deliver(self, label: str, body: bytes) -> None:
        import urllib.error
        import urllib.request

        attempts = self.retries + 1
        error = ""
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(self.url, data=body, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read(65536)
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
                if exc.code not in _RETRY_STATUS:
                    break  # the receiver refuses it: sending it again will not help
            except Exception as exc:  # URLError, timeouts, resets
                reason = getattr(exc, "reason", None) or exc
                error = f"{type(reason).__name__}: {reason}"[:200]
            if attempt < attempts:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        emit(
            "warning",
            "alert_webhook_failed",
            {
                "url": _where(self.url),
                "alert": label,
                "attempts": attempt,
                "error": error,
                "hint": "the alert was not delivered; it is still in the llmguard events",
            },
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued alert was posted (or given up on), at most ``timeout``
        seconds; True if none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True


def webhook(
    url: str,
    *,
    timeout: float = 2.0,
    retries: int = 2,
    backoff: float = 0.5,
    queue_size: int = 100,
    headers: Mapping[str, str] | None = None,
    payload: Callable[[BudgetStatus], Mapping[str, Any]] = alert_payload,
) -> Webhook:
    """An ``on_alert`` that posts budget alerts to ``url`` as JSON::

        @llmguard.budget(usd=50, per="day", key=lambda team, **_: team, burn_alert="1h",
                         on_alert=llmguard.alerts.webhook(os.environ["SLACK_WEBHOOK_URL"]))

    The body is :func:`alert_payload` (``text``, Slack-compatible, then ``event``,
    ``budget``, ``key``, ``kind``, ``threshold``, the amounts as decimal strings...), or what
    ``payload(alert)`` returns. Posts run in one background thread per webhook, in order:
    each attempt waits at most ``timeout`` seconds (to connect, and for each read), a
    network error, a timeout or an HTTP 408/425/429/5xx is tried again up to ``retries``
    times (``backoff`` seconds, doubling, in between), and a post that still fails logs
    ``alert_webhook_failed``. At most ``queue_size`` alerts wait; more are dropped with an
    ``alert_webhook_dropped`` warning. A process exiting waits (at most 10 s) for alerts not
    yet posted; ``flush(timeout)`` waits for them. ``headers`` are added to the request
    (an ``Authorization`` for a receiver that needs one).
    """
    return Webhook(
        url,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        queue_size=queue_size,
        headers=headers,
        payload=payload,
    )


_open_webhooks: weakref.WeakSet[Webhook] = weakref.WeakSet()


def _after_fork() -> None:
    for hook in list(_open_webhooks):
        hook._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@atexit.register
def _flush_at_exit() -> None:
    deadline = time.monotonic() + _EXIT_WAIT_MAX
    for hook in list(_open_webhooks):
        if hook._pid == os.getpid():
            hook.flush(max(deadline - time.monotonic(), 0))
