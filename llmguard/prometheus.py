"""Prometheus metrics for llmguard's calls (the ``prometheus`` extra).

::

    import llmguard.prometheus
    from prometheus_client import start_http_server

    metrics = llmguard.prometheus.instrument()
    start_http_server(9464, addr="127.0.0.1", registry=metrics.registry)

Every metric has the labels ``function``, ``model`` and ``route`` (empty when the call was
not routed), plus those named by ``labels=`` (event fields such as ``tenant``):

- ``llmguard_cost_usd_total``: what the calls cost;
- ``llmguard_tokens_total{type="input"|"output"}``: tokens sent to and received from a
  provider (served calls have none);
- ``llmguard_calls_total{outcome, cache, error}``: calls, ``cache`` being ``hit``, ``miss``,
  ``stale``, ``bypass`` or ``none`` (no ``@cached``), ``error`` the exception's type name;
- ``llmguard_saved_usd_total{by="cache"|"routing"|"debounce"}``: what was not spent;
- ``llmguard_retries_total{reason, status}``: attempts ``@retry_on_rate_limit`` made again
  (``status="429"`` for rate limits);
- ``llmguard_rate_limit_wait_seconds``: a histogram of the seconds each call waited for
  ``@rate_limited`` (all attempts);
- ``llmguard_budget_refusals_total{budget}``: calls a ``@budget`` refused;
- ``llmguard_budget_remaining_usd{budget}``: read from each budget's ledger at scrape time.

Multi-process servers (gunicorn, uvicorn ``--workers``): set ``PROMETHEUS_MULTIPROC_DIR``
to an empty folder before the workers start, as prometheus_client's multiprocess mode
requires; each worker calls :func:`instrument`, and ``metrics.registry`` (in any worker)
serves the sum over all of them.

Importing this module loads nothing of prometheus_client; :func:`instrument` does, and says
which extra to install when it is missing (``pip install "llmguard[prometheus]"``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError, require
from ._events import Subscription, subscribe
from ._monitor import SERVED, BudgetNames, field_text, refused, savings
from ._pipeline import current_call

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["DEFAULT_LABELS", "PrometheusMetrics", "instrument", "uninstrument"]

DEFAULT_LABELS = ("function", "model", "route")
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RESERVED = {"outcome", "cache", "error", "type", "by", "reason", "status", "budget", "key"}
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

_lock = threading.Lock()
_active: PrometheusMetrics | None = None


def multiprocess_dir() -> str | None:
    """The folder of prometheus_client's multiprocess mode, if this process is in it."""
    env = os.environ
    return env.get("PROMETHEUS_MULTIPROC_DIR") or env.get("prometheus_multiproc_dir")


class _BudgetCollector:
    """``llmguard_budget_remaining_usd``, read from the budgets' ledgers at each scrape:
    right in every process (the ledger is shared), so it needs no multiprocess mode."""

    def __init__(self, budgets: BudgetNames, keys: bool) -> None:
        self.budgets = budgets
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "llmguard_budget_remaining_usd",
            "What is left of each llmguard budget in its current window, in USD.",
            labels=["budget", "key"] if self.keys else ["budget"],
        )
        for name, key, remaining in self.budgets.readings(self.keys):
            gauge.add_metric([name, key or ""] if self.keys else [name], remaining)
        yield gauge

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected only when scraped (a ledger read), never at registration


class PrometheusMetrics:
    """llmguard's Prometheus metrics, fed by its events while active (see
    :func:`instrument`). ``registry`` is the registry to serve."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        labels: tuple[str, ...],
        budgets: Iterable[str],
        budget_keys: bool,
    ) -> None:
        from prometheus_client import REGISTRY as DEFAULT_REGISTRY
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.label_names = (*DEFAULT_LABELS, *labels)
        self.extra = labels
        self.budgets = BudgetNames(budgets)
        self.multiprocess = multiprocess_dir() is not None
        self._registered: list[Any] = []
        own: CollectorRegistry | None
        if self.multiprocess:
            from prometheus_client import multiprocess

            # Each process writes its values to files in the folder; the registry to serve
            # reads them all (a registry of its own: the default one would add this
            # process's values a second time).
            self.registry = registry if registry is not None else CollectorRegistry()
            self._registered.append(multiprocess.MultiProcessCollector(self.registry))  # type: ignore[no-untyped-call]
            own = None
        else:
            self.registry = registry if registry is not None else DEFAULT_REGISTRY
            own = self.registry
        base = self.label_names
        self.cost = self._add(
            Counter(
                "llmguard_cost_usd", "What llmguard-metered calls cost, in USD.", base, registry=own
            )
        )
        self.tokens = self._add(
            Counter(
                "llmguard_tokens",
                "Tokens llmguard-metered calls sent (type=input) and received (type=output).",
                (*base, "type"),
                registry=own,
            )
        )
        self.calls = self._add(
            Counter(
                "llmguard_calls",
                "Calls of llmguard-decorated functions, by outcome, cache outcome and error.",
                (*base, "outcome", "cache", "error"),
                registry=own,
            )
        )
        self.saved = self._add(
            Counter(
                "llmguard_saved_usd",
                "What calls did not cost, in USD, by what saved it (cache, routing, debounce).",
                (*base, "by"),
                registry=own,
            )
        )
        self.retries = self._add(
            Counter(
                "llmguard_retries",
                "Attempts @retry_on_rate_limit made again, by reason and HTTP status.",
                (*base, "reason", "status"),
                registry=own,
            )
        )
        self.rate_wait = self._add(
            Histogram(
                "llmguard_rate_limit_wait_seconds",
                "Seconds a call waited for @rate_limited (all its attempts).",
                base,
                buckets=WAIT_BUCKETS,
                registry=own,
            )
        )
        self.refusals = self._add(
            Counter(
                "llmguard_budget_refusals",
                "Calls a @budget refused.",
                (*base, "budget"),
                registry=own,
            )
        )
        self.collector = _BudgetCollector(self.budgets, budget_keys)
        self.registry.register(self.collector)
        self.active = True
        self._subscription: Subscription | None = subscribe(self._on_event)

    def _add(self, metric: Any) -> Any:
        self._registered.append(metric)
        return metric

    # -- feeding ---------------------------------------------------------------------------
    def _labels(self, event: dict[str, Any]) -> list[str]:
        return [field_text(event, name) for name in self.label_names]

    def _labels_during(self, event: dict[str, Any]) -> list[str]:
        """Labels of an event emitted during a call (a retry): its own fields, else the
        call's."""
        call = current_call()
        if call is None:
            return self._labels(event)
        fields = {**call.fields, "model": call.requested_model(), "function": call.spec.name}
        return [field_text(event, name) or field_text(fields, name) for name in self.label_names]

    def _on_event(self, event: dict[str, Any]) -> None:
        if not self.active:
            return
        kind = event.get("event")
        if kind == "llm_call":
            self._call(event)
        elif kind == "llm_retry":
            status = event.get("status")
            self.retries.labels(
                *self._labels_during(event),
                field_text(event, "reason"),
                "" if status is None else str(status),
            ).inc()

    def _call(self, event: dict[str, Any]) -> None:
        labels = self._labels(event)
        self.budgets.saw(event)
        self.calls.labels(
            *labels,
            event.get("outcome") or "ok",
            field_text(event, "cache") or "none",
            field_text(event, "error"),
        ).inc()
        cost = event.get("cost_usd")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
            self.cost.labels(*labels).inc(cost)
        if event.get("cost_source") not in SERVED:
            for kind in ("input", "output"):
                count = event.get(f"{kind}_tokens")
                if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                    self.tokens.labels(*labels, kind).inc(count)
        for by, amount in savings(event):
            self.saved.labels(*labels, by).inc(amount)
        wait = event.get("rate_wait_s")
        if isinstance(wait, (int, float)) and not isinstance(wait, bool):
            self.rate_wait.labels(*labels).observe(wait)
        if refused(event):
            self.refusals.labels(*labels, field_text(event, "budget")).inc()

    # -- stopping ----------------------------------------------------------------------------
    def uninstrument(self) -> None:
        """Stop counting and take the metrics out of the registry."""
        global _active
        self.active = False
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None
        for collector in (*self._registered, self.collector):
            try:
                self.registry.unregister(collector)
            except KeyError:  # not registered there (multiprocess mode)
                pass
        with _lock:
            if _active is self:
                _active = None


def instrument(
    registry: CollectorRegistry | None = None,
    *,
    labels: Iterable[str] = (),
    budgets: Iterable[str] = (),
    budget_keys: bool = False,
) -> PrometheusMetrics:
    """Count every llmguard event into Prometheus metrics (see the module's documentation).

    ``registry`` is where they are served from: default prometheus_client's global
    ``REGISTRY``, or, in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set), a registry of
    their own that reads every process's values; serve ``metrics.registry``. ``labels``
    adds labels from event fields (``labels=("tenant",)``: the event's ``tenant`` field, or
    its ``tags``' ``tenant``): each distinct value is a new time series, so add only fields
    with few values. ``llmguard_budget_remaining_usd`` covers the budgets declared in this
    process, those seen in its events and those named in ``budgets``; a keyed budget one
    series per key, and only with ``budget_keys=True``.

    Calling it again replaces the previous metrics; the returned object's
    ``uninstrument()`` (or :func:`uninstrument`) stops them.
    """
    global _active
    require("prometheus_client", extra="prometheus", what="llmguard.prometheus.instrument()")
    extra = (labels,) if isinstance(labels, str) else tuple(labels)
    for name in extra:
        if not isinstance(name, str) or not _LABEL.match(name) or name.startswith("__"):
            raise ConfigurationError(
                f"llmguard.prometheus.instrument(labels=...): {name!r} is not a Prometheus "
                "label name (letters, digits and _, not starting with a digit or __)"
            )
        if name in DEFAULT_LABELS or name in _RESERVED:
            raise ConfigurationError(
                f"llmguard.prometheus.instrument(labels=...): {name!r} is already a label of "
                "llmguard's metrics"
            )
    if len(set(extra)) != len(extra):
        raise ConfigurationError("llmguard.prometheus.instrument(labels=...) names a label twice")
    uninstrument()
    metrics = PrometheusMetrics(
        registry,
        labels=extra,
        budgets=[budgets] if isinstance(budgets, str) else budgets,
        budget_keys=budget_keys,
    )
    with _lock:
        _active = metrics
    return metrics


def uninstrument() -> None:
    """Stop the metrics :func:`instrument` started, if any."""
    with _lock:
        active = _active
    if active is not None:
        active.uninstrument()
