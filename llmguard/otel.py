"""OpenTelemetry metrics and traces for llmguard's calls (the ``otel`` extra).

::

    import llmguard.otel

    llmguard.otel.instrument()  # the global MeterProvider and TracerProvider

Metrics follow the OpenTelemetry GenAI semantic conventions (``gen_ai.client.token.usage``,
``gen_ai.client.operation.duration``), with llmguard's own under ``llmguard.*``: cost,
savings, cache lookups, retries, rate-limit waits, budget refusals and budgets' remaining
USD. Each decorated call is a span (a child of the application's current span; nested
decorated calls are child spans), with retries and rate-limit waits as span events.

Importing this module loads nothing of OpenTelemetry; :func:`instrument` does, and says
which extra to install when it is missing (``pip install "llmguard[otel]"``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError, require
from ._events import Subscription, subscribe
from ._monitor import SERVED, BudgetNames, field_text, provider_of, refused, savings
from ._pipeline import CallRecord, add_call_observer, current_call, remove_call_observer
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["OtelInstrumentation", "instrument", "uninstrument"]

# The GenAI semantic conventions' names (opentelemetry-semantic-conventions'
# gen_ai_attributes / gen_ai_metrics; the tests check they are the same).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_WORKFLOW_NAME = "gen_ai.workflow.name"
ERROR_TYPE = "error.type"
HTTP_STATUS = "http.response.status_code"
TOKEN_USAGE = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"
# The conventions' advice for these two histograms' buckets.
TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))  # 1, 4, 16 ... 67108864
DURATION_BUCKETS = tuple(0.01 * 2**n for n in range(14))  # 0.01, 0.02 ... 81.92
WAIT_BUCKETS = (0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CHAT = "chat"
WORKFLOW = "invoke_workflow"  # a call whose provider calls were nested decorated calls

# llm_call fields that become span attributes, as llmguard.<field>.
_SPAN_FIELDS = (
    "function",
    "call_id",
    "cost_usd",
    "cost_source",
    "cache",
    "saved_usd",
    "coalesced",
    "debounced",
    "route",
    "route_default",
    "failed_over_from",
    "downgraded_from",
    "attempts",
    "retry_wait_s",
    "rate_wait_s",
    "budget",
    "budget_spent_usd",
    "budget_remaining_usd",
    "budget_exceeded",
    "cached_input_tokens",
    "cache_write_tokens",
    "tokens_method",
    "children",
    "children_cost_usd",
    "stream_chunks",
    "stream_abandoned",
)

_lock = threading.Lock()
_active: OtelInstrumentation | None = None


def _attribute(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float))


class _Watch:
    """One call in progress: its span (made current while the call runs) until it ends."""

    __slots__ = ("call", "owner", "span", "token")

    def __init__(self, owner: OtelInstrumentation, call: CallRecord) -> None:
        self.owner = owner
        self.call = call
        self.span: Span | None = None
        self.token: object = None
        if owner.tracer is not None:
            model = call.requested_model()
            self.span = span = owner.tracer.start_span(
                f"{CHAT} {model}" if model else CHAT,
                kind=owner.client_kind,
                attributes={"llmguard.function": call.spec.name, "llmguard.call_id": call.call_id},
            )
            self.token = owner.context.attach(owner.trace.set_span_in_context(span))
            owner.spans[call.call_id] = span

    def leave(self) -> None:
        if self.token is not None:
            self.owner.context.detach(self.token)
            self.token = None

    def finish(self, fields: dict[str, Any] | None, error: BaseException | None) -> None:
        owner = self.owner
        span = self.span
        if span is not None:
            owner.spans.pop(self.call.call_id, None)
        try:
            if fields is not None and owner.active:
                owner.record(self.call, fields, error, span)
        finally:
            if span is not None:
                span.end()


class OtelInstrumentation:
    """llmguard's OpenTelemetry instruments, fed by every decorated call while active
    (see :func:`instrument`); :meth:`uninstrument` stops it."""

    def __init__(
        self,
        meter_provider: MeterProvider | None,
        tracer_provider: TracerProvider | None,
        *,
        metrics: bool,
        traces: bool,
        attributes: tuple[str, ...],
        budgets: Iterable[str],
        budget_keys: bool,
        provider: Callable[[str | None], str],
    ) -> None:
        from opentelemetry import context, trace
        from opentelemetry import metrics as otel_metrics

        self.context = context
        self.trace = trace
        self.client_kind = trace.SpanKind.CLIENT
        self.attributes = attributes
        self.provider = provider
        self.budget_keys = budget_keys
        self.budgets = BudgetNames(budgets)
        self.spans: dict[str, Span] = {}
        self.active = True
        self.tracer = (
            trace.get_tracer("llmguard", __version__, tracer_provider=tracer_provider)
            if traces
            else None
        )
        self.meter = (
            otel_metrics.get_meter("llmguard", __version__, meter_provider=meter_provider)
            if metrics
            else None
        )
        if self.meter is not None:
            meter = self.meter
            self.token_usage = meter.create_histogram(
                TOKEN_USAGE,
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
            )
            self.duration = meter.create_histogram(
                OPERATION_DURATION,
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            self.calls = meter.create_counter(
                "llmguard.calls",
                unit="{call}",
                description="Calls of llmguard-decorated functions.",
            )
            self.cost = meter.create_counter(
                "llmguard.cost", unit="USD", description="What the calls cost, in USD."
            )
            self.saved = meter.create_counter(
                "llmguard.saved",
                unit="USD",
                description="What calls did not cost, by what saved it (cache, routing, debounce).",
            )
            self.cache_lookups = meter.create_counter(
                "llmguard.cache.lookups",
                unit="{lookup}",
                description="@cached lookups, by outcome (hit, miss, stale, bypass).",
            )
            self.retries = meter.create_counter(
                "llmguard.retries",
                unit="{retry}",
                description="Attempts @retry_on_rate_limit made again.",
            )
            self.rate_wait = meter.create_histogram(
                "llmguard.rate_limit.wait",
                unit="s",
                description="Seconds a call waited for @rate_limited (all its attempts).",
                explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
            )
            self.refusals = meter.create_counter(
                "llmguard.budget.refusals",
                unit="{call}",
                description="Calls a @budget refused.",
            )
            self.remaining = meter.create_observable_gauge(
                "llmguard.budget.remaining",
                callbacks=[self._observe_budgets],
                unit="USD",
                description="What is left of each budget in its current window.",
            )
        self._subscription: Subscription | None = subscribe(self._on_event)
        add_call_observer(self._observe)

    # -- feeding ---------------------------------------------------------------------------
    def _observe(self, call: CallRecord) -> _Watch | None:
        return _Watch(self, call) if self.active else None

    def _extra(self, fields: dict[str, Any]) -> dict[str, str]:
        return {f"llmguard.{name}": field_text(fields, name) for name in self.attributes}

    def _extra_during(self, event: dict[str, Any]) -> dict[str, str]:
        """The extra attributes of an event emitted during a call: its own fields, else the
        call's."""
        if not self.attributes:
            return {}
        call = current_call()
        fields = call.fields if call is not None else {}
        return {
            f"llmguard.{name}": field_text(event, name) or field_text(fields, name)
            for name in self.attributes
        }

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "llm_call" or not self.active:
            return  # calls are recorded as they finish (see _Watch)
        call_id = event.get("call_id")
        if not isinstance(call_id, str):
            call = current_call()
            call_id = None if call is None else call.call_id
        span = self.spans.get(call_id) if call_id is not None else None
        if kind == "llm_retry":
            attrs: dict[str, Any] = {
                "llmguard.function": field_text(event, "function"),
                "llmguard.retry.reason": field_text(event, "reason"),
                ERROR_TYPE: field_text(event, "error"),
            }
            if isinstance(event.get("status"), int):
                attrs[HTTP_STATUS] = event["status"]
            if self.meter is not None:
                self.retries.add(1, {**attrs, **self._extra_during(event)})
            if span is not None:
                attrs["llmguard.attempt"] = event.get("attempt", 0)
                attrs["llmguard.wait_s"] = float(event.get("wait_s") or 0.0)
                span.add_event("llmguard.retry", attrs)
        elif span is not None and kind in ("rate_limit_wait", "budget_alert", "budget_exceeded"):
            attrs = {
                f"llmguard.{k}": v
                for k, v in event.items()
                if k not in ("event", "log_level") and v is not None and _attribute(v)
            }
            span.add_event(f"llmguard.{kind}", attrs)

    def record(
        self, call: CallRecord, fields: dict[str, Any], error: BaseException | None, span: Any
    ) -> None:
        """Record one finished call: its metrics, and its span's final name and attributes."""
        source = fields.get("cost_source")
        workflow = source == "children"
        served = source in SERVED
        request_model = call.requested_model()
        response_model = fields.get("model") if source == "usage" else None
        model = response_model or request_model
        genai: dict[str, Any] = {GEN_AI_OPERATION_NAME: WORKFLOW if workflow else CHAT}
        if not workflow:
            genai[GEN_AI_PROVIDER_NAME] = self.provider(model)
        if request_model:
            genai[GEN_AI_REQUEST_MODEL] = request_model
        if response_model:
            genai[GEN_AI_RESPONSE_MODEL] = response_model
        inputs, outputs = fields.get("input_tokens"), fields.get("output_tokens")
        tokens = not served and not workflow
        extra = self._extra(fields)
        if self.meter is not None:
            self.budgets.saw(fields)
            if not served:
                timed = {**genai, **extra}
                if error is not None:
                    timed[ERROR_TYPE] = type(error).__name__
                self.duration.record(float(fields.get("latency_ms") or 0.0) / 1000, timed)
            if tokens:
                for kind, count in (("input", inputs), ("output", outputs)):
                    if isinstance(count, int):
                        self.token_usage.record(count, {**genai, GEN_AI_TOKEN_TYPE: kind, **extra})
            own = {
                "llmguard.function": fields.get("function") or call.spec.name,
                "llmguard.model": fields.get("model") or "",
                "llmguard.route": field_text(fields, "route"),
                **extra,
            }
            counted = {
                **own,
                "llmguard.outcome": fields.get("outcome") or "ok",
                "llmguard.cache": field_text(fields, "cache") or "none",
            }
            if error is not None:
                counted[ERROR_TYPE] = type(error).__name__
            self.calls.add(1, counted)
            cost = fields.get("cost_usd")
            if isinstance(cost, (int, float)) and not isinstance(cost, bool):
                self.cost.add(float(cost), own)
            for by, amount in savings(fields):
                self.saved.add(amount, {**own, "llmguard.saved_by": by})
            if "cache" in fields:
                self.cache_lookups.add(
                    1, {**own, "llmguard.cache.outcome": field_text(fields, "cache")}
                )
            wait = fields.get("rate_wait_s")
            if isinstance(wait, (int, float)):
                self.rate_wait.record(float(wait), own)
            if refused(fields):
                self.refusals.add(1, {**own, "llmguard.budget": field_text(fields, "budget")})
        if span is None:
            return
        if workflow:
            span.update_name(f"{WORKFLOW} {call.spec.name}")
            genai[GEN_AI_WORKFLOW_NAME] = call.spec.name
        elif request_model:
            span.update_name(f"{CHAT} {request_model}")  # after routing: the model asked for
        attrs: dict[str, Any] = dict(genai)
        if tokens and isinstance(inputs, int):
            attrs[GEN_AI_USAGE_INPUT_TOKENS] = inputs
        if tokens and isinstance(outputs, int):
            attrs[GEN_AI_USAGE_OUTPUT_TOKENS] = outputs
        for name in _SPAN_FIELDS:
            value = fields.get(name)
            if value is not None and _attribute(value):
                attrs[f"llmguard.{name}"] = value
        attrs.update(extra)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            attrs[ERROR_TYPE] = type(error).__name__
            # The type only: an exception's message may quote the prompt or the provider.
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attributes(attrs)

    def _observe_budgets(self, options: CallbackOptions) -> Iterator[Observation]:
        from opentelemetry.metrics import Observation

        for name, key, remaining in self.budgets.readings(self.budget_keys):
            attrs = {"llmguard.budget": name}
            if key is not None:
                attrs["llmguard.budget.key"] = key
            yield Observation(remaining, attrs)

    # -- stopping ----------------------------------------------------------------------------
    def uninstrument(self) -> None:
        """Stop: calls made from now on are not recorded (calls in progress end their
        spans). Instruments already created stay with their meter."""
        global _active
        self.active = False
        remove_call_observer(self._observe)
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None
        with _lock:
            if _active is self:
                _active = None


def instrument(
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    *,
    metrics: bool = True,
    traces: bool = True,
    attributes: Iterable[str] = (),
    budgets: Iterable[str] = (),
    budget_keys: bool = False,
    provider: Callable[[str | None], str] | None = None,
) -> OtelInstrumentation:
    """Record every llmguard-decorated call as OpenTelemetry metrics and spans.

    ``meter_provider`` / ``tracer_provider`` default to the global ones (set by the
    application, or by the ``opentelemetry-instrument`` agent). ``metrics=False`` or
    ``traces=False`` leaves one out. ``attributes`` names event fields (``"tenant"``, or a
    key of the event's ``tags``) to add to every metric and span as ``llmguard.<name>``: each
    distinct value is a new time series, so name only fields with few values. The
    ``llmguard.budget.remaining`` gauge reads, when metrics are collected, the budgets
    declared in this process, those seen in its calls and those named in ``budgets``; a
    keyed budget one series per key, and only with ``budget_keys=True``. ``provider`` maps
    a model name to ``gen_ai.provider.name`` (default: from the name, ``_OTHER`` when it
    does not tell).

    Calling it again replaces the previous instrumentation; the returned object's
    ``uninstrument()`` (or :func:`uninstrument`) stops it.
    """
    global _active
    require("opentelemetry.trace", extra="otel", what="llmguard.otel.instrument()")
    require("opentelemetry.metrics", extra="otel", what="llmguard.otel.instrument()")
    names = (attributes,) if isinstance(attributes, str) else attributes
    extra = tuple(names)
    for name in extra:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(
                f"llmguard.otel.instrument(attributes=...) takes event field names, got {name!r}"
            )
    if provider is not None and not callable(provider):
        raise ConfigurationError(
            "llmguard.otel.instrument(provider=...) must map a model name to a provider name"
        )
    uninstrument()
    instrumentation = OtelInstrumentation(
        meter_provider,
        tracer_provider,
        metrics=metrics,
        traces=traces,
        attributes=extra,
        budgets=[budgets] if isinstance(budgets, str) else budgets,
        budget_keys=budget_keys,
        provider=provider or provider_of,
    )
    with _lock:
        _active = instrumentation
    return instrumentation


def uninstrument() -> None:
    """Stop the instrumentation :func:`instrument` started, if any."""
    with _lock:
        active = _active
    if active is not None:
        active.uninstrument()
