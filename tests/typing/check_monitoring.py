"""Checked by mypy --strict (never run): subscribe() and the exporters are typed."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import llmguard
import llmguard.otel
import llmguard.prometheus

seen: list[dict[str, Any]] = []


def on_event(event: dict[str, Any]) -> None:
    seen.append(event)


subscription = llmguard.subscribe(on_event)
assert_type(subscription, llmguard.Subscription)
assert_type(subscription.active, bool)
with llmguard.subscribe(seen.append) as block:
    assert_type(block, llmguard.Subscription)
llmguard.unsubscribe(on_event)
llmguard.unsubscribe(subscription)
llmguard.subscribe(1)  # type: ignore[arg-type]

otel = llmguard.otel.instrument(attributes=("tenant",), budgets=("daily",))
assert_type(otel, llmguard.otel.OtelInstrumentation)
otel.uninstrument()
llmguard.otel.instrument(meter_provider="global")  # type: ignore[arg-type]

metrics = llmguard.prometheus.instrument(labels=("tenant",))
assert_type(metrics, llmguard.prometheus.PrometheusMetrics)
metrics.uninstrument()
llmguard.prometheus.uninstrument()
