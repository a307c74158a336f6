"""llmguard.otel: OpenTelemetry metrics and spans, read back with the SDK's in-memory reader
and exporter."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as genai
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.semconv.attributes import error_attributes
from opentelemetry.trace import SpanKind, StatusCode

import llmguard
import llmguard.otel
from llmguard.testing import CapturedEvents, FakeLLMServer

from ._helpers import VirtualClock

MESSAGES = [{"role": "user", "content": "hello there"}]


class Telemetry:
    """An SDK MeterProvider and TracerProvider reading into memory, llmguard instrumented."""

    def __init__(self, **options: Any) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.instrumentation = llmguard.otel.instrument(self.meters, self.tracers, **options)

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of every point of metric ``name``."""
        found: list[tuple[dict[str, Any], Any]] = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        return found

    def metric(self, name: str) -> Any:
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return metric
        return None

    def value(self, name: str, **attributes: Any) -> Any:
        """The sum of metric ``name`` over points whose attributes include ``attributes``."""
        total: Any = 0
        for attrs, point in self.points(name):
            if all(attrs.get(k.replace("__", ".")) == v for k, v in attributes.items()):
                total += point.sum if hasattr(point, "sum") else point.value
        return total

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    llmguard.otel.uninstrument()


def test_names_are_the_semantic_conventions() -> None:
    otel = llmguard.otel
    assert otel.TOKEN_USAGE == gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE
    assert otel.OPERATION_DURATION == gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION
    assert otel.GEN_AI_OPERATION_NAME == genai.GEN_AI_OPERATION_NAME
    assert otel.GEN_AI_PROVIDER_NAME == genai.GEN_AI_PROVIDER_NAME
    assert otel.GEN_AI_REQUEST_MODEL == genai.GEN_AI_REQUEST_MODEL
    assert otel.GEN_AI_RESPONSE_MODEL == genai.GEN_AI_RESPONSE_MODEL
    assert otel.GEN_AI_TOKEN_TYPE == genai.GEN_AI_TOKEN_TYPE
    assert otel.GEN_AI_USAGE_INPUT_TOKENS == genai.GEN_AI_USAGE_INPUT_TOKENS
    assert otel.GEN_AI_USAGE_OUTPUT_TOKENS == genai.GEN_AI_USAGE_OUTPUT_TOKENS
    assert otel.GEN_AI_WORKFLOW_NAME == genai.GEN_AI_WORKFLOW_NAME
    assert otel.ERROR_TYPE == error_attributes.ERROR_TYPE
    assert genai.GenAiOperationNameValues.CHAT.value == otel.CHAT
    assert genai.GenAiOperationNameValues.INVOKE_WORKFLOW.value == otel.WORKFLOW
    values = {v.value for v in genai.GenAiProviderNameValues}
    from llmguard._monitor import provider_of

    for model, provider in [
        ("gpt-4o-mini", "openai"),
        ("o3-mini", "openai"),
        ("claude-3-5-haiku-latest", "anthropic"),
        ("gemini-2.0-flash", "gcp.gemini"),
        ("mistral-large-latest", "mistral_ai"),
        ("grok-3", "x_ai"),
        ("deepseek-chat", "deepseek"),
        ("bedrock/anthropic.claude-3", "aws.bedrock"),
        ("openai/gpt-4o", "openai"),
    ]:
        assert provider_of(model) == provider
        assert provider in values
    assert provider_of("my-local-llama") == provider_of(None) == "_OTHER"


def cached_ask(fake: FakeLLMServer) -> Any:
    client = fake.openai_client()

    @llmguard.cached
    def ask(question: str, model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )

    return ask


def test_metrics_of_a_known_call(
    otel: Telemetry, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    ask = cached_ask(fake_llm)
    ask("hello there")
    ask("hello there")  # a cache hit
    miss, hit = events.calls
    assert (miss["input_tokens"], miss["output_tokens"]) == (9, 6)  # as the fake counted them
    cost = (9 * Decimal("2.50") + 6 * Decimal("10.00")) / 10**6  # gpt-4o: $2.50 / $10 per Mtok
    assert cost == Decimal("0.0000825")
    assert miss["cost_usd"] == float(cost)

    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
    }
    usage = otel.metric("gen_ai.client.token.usage")
    assert usage.unit == "{token}"
    points = sorted(
        otel.points("gen_ai.client.token.usage"), key=lambda p: p[0]["gen_ai.token.type"]
    )
    assert [attrs for attrs, _ in points] == [
        {**base, "gen_ai.token.type": "input"},
        {**base, "gen_ai.token.type": "output"},
    ]
    assert [(p.count, p.sum, p.min, p.max) for _, p in points] == [(1, 9, 9, 9), (1, 6, 6, 6)]
    assert list(points[0][1].explicit_bounds) == [4.0**n for n in range(14)]

    duration = otel.metric("gen_ai.client.operation.duration")
    assert duration.unit == "s"
    [(attrs, point)] = otel.points("gen_ai.client.operation.duration")  # the hit called nobody
    assert attrs == base
    assert (point.count, point.sum) == (1, miss["latency_ms"] / 1000)
    assert list(point.explicit_bounds)[:3] == [0.01, 0.02, 0.04]

    own = {"llmguard.function": miss["function"], "llmguard.model": "gpt-4o", "llmguard.route": ""}
    assert otel.metric("llmguard.cost").unit == "USD"
    assert [attrs for attrs, _ in otel.points("llmguard.cost")] == [own]
    assert otel.value("llmguard.cost") == float(cost)
    assert otel.points("llmguard.saved")[0][0] == {**own, "llmguard.saved_by": "cache"}
    assert otel.value("llmguard.saved") == hit["saved_usd"] == float(cost)
    assert otel.value("llmguard.cache.lookups", llmguard__cache__outcome="miss") == 1
    assert otel.value("llmguard.cache.lookups", llmguard__cache__outcome="hit") == 1
    assert otel.value("llmguard.calls", llmguard__cache="hit", llmguard__outcome="ok") == 1
    assert otel.value("llmguard.calls") == 2
    assert otel.points("llmguard.retries") == []


def test_one_span_per_call_in_the_applications_trace(
    otel: Telemetry, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    ask = cached_ask(fake_llm)

    @llmguard.track
    def research(topic: str) -> str:
        first = ask(f"about {topic}")
        ask(f"about {topic}")
        return str(first.choices[0].message.content)

    app = otel.tracers.get_tracer("app")
    with app.start_as_current_span("request") as request:
        research("owls")
    inner_miss, inner_hit, outer = otel.spans[:3]
    assert [s.name for s in otel.spans] == [
        "chat gpt-4o",
        "chat gpt-4o",
        f"invoke_workflow {events.calls[2]['function']}",
        "request",
    ]
    assert outer.parent is not None
    assert outer.parent.span_id == request.get_span_context().span_id
    assert outer.context.trace_id == request.get_span_context().trace_id
    for inner in (inner_miss, inner_hit):
        assert inner.parent is not None
        assert inner.parent.span_id == outer.context.span_id
        assert inner.kind is SpanKind.CLIENT
    miss_event = events.calls[0]
    attrs = dict(inner_miss.attributes or {})
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
        "gen_ai.usage.input_tokens": miss_event["input_tokens"],
        "gen_ai.usage.output_tokens": miss_event["output_tokens"],
        "llmguard.function": miss_event["function"],
        "llmguard.call_id": miss_event["call_id"],
        "llmguard.cost_usd": miss_event["cost_usd"],
        "llmguard.cost_source": "usage",
        "llmguard.cache": "miss",
        "llmguard.cached_input_tokens": 0,
        "llmguard.cache_write_tokens": 0,
    }
    hit = dict(inner_hit.attributes or {})
    assert (hit["llmguard.cache"], hit["llmguard.cost_usd"]) == ("hit", 0.0)
    assert hit["llmguard.saved_usd"] == miss_event["cost_usd"]
    assert "gen_ai.usage.input_tokens" not in hit  # nothing was sent
    workflow = dict(outer.attributes or {})
    assert workflow["gen_ai.operation.name"] == "invoke_workflow"
    assert workflow["gen_ai.workflow.name"] == events.calls[2]["function"]
    assert workflow["llmguard.children"] == 2
    assert workflow["llmguard.children_cost_usd"] == miss_event["cost_usd"]
    assert all(s.status.status_code is StatusCode.UNSET for s in otel.spans)
    # the workflow's duration is recorded as its own operation; no tokens of its own
    assert otel.value("gen_ai.client.operation.duration", gen_ai__operation__name="invoke_workflow")
    assert {a["gen_ai.operation.name"] for a, _ in otel.points("gen_ai.client.token.usage")} == {
        "chat"
    }


def test_retries_and_rate_limit_waits_are_span_events(
    otel: Telemetry, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    clock = VirtualClock()
    client = fake_llm.openai_client()
    fake_llm.fail_next(2, 429, retry_after=0.5)

    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda question: True)
    @llmguard.retry_on_rate_limit(jitter=None, sleep=clock.sleep)
    @llmguard.rate_limited("2/second", **clock.options())
    def ask(question: str, model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(model=model, messages=MESSAGES)

    ask("hi")
    [event] = events.calls
    [span] = otel.spans
    assert span.name == "chat gpt-4o-mini"  # the routed model
    assert [e.name for e in span.events] == [
        "llmguard.retry",
        "llmguard.retry",
        "llmguard.rate_limit_wait",
    ]
    retry = dict(span.events[0].attributes or {})
    assert retry == {
        "llmguard.function": event["function"],
        "llmguard.retry.reason": "rate_limit",
        "error.type": "RateLimitError",
        "http.response.status_code": 429,
        "llmguard.attempt": 1,
        "llmguard.wait_s": 0.5,
    }
    [waited] = events.of("rate_limit_wait")
    wait = dict(span.events[2].attributes or {})
    assert wait["llmguard.wait_s"] == waited["wait_s"] == event["rate_wait_s"] > 0
    attrs = dict(span.attributes or {})
    assert (attrs["llmguard.attempts"], attrs["llmguard.retry_wait_s"]) == (3, 1.0)
    assert (attrs["llmguard.route"], attrs["llmguard.route_default"]) == ("cheap:when", "gpt-4o")
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert otel.value("llmguard.retries", http__response__status_code=429) == 2
    [(_, point)] = otel.points("llmguard.rate_limit.wait")
    assert (point.count, point.sum) == (1, event["rate_wait_s"])
    gpt4o = llmguard.calc_cost("gpt-4o", event["input_tokens"], event["output_tokens"])
    assert gpt4o is not None
    saved = gpt4o - Decimal(str(event["cost_usd"]))
    assert otel.value("llmguard.saved", llmguard__saved_by="routing") == float(saved) > 0


def test_a_failed_call_is_an_error_span(otel: Telemetry, fake_llm: FakeLLMServer) -> None:
    client = fake_llm.openai_client()
    fake_llm.fail_next(1, 400)

    @llmguard.track
    def ask(question: str, model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(model=model, messages=MESSAGES)

    with pytest.raises(Exception, match="400"):
        ask("hi")
    [span] = otel.spans
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "BadRequestError"
    assert dict(span.attributes or {})["error.type"] == "BadRequestError"
    [(attrs, _)] = otel.points("gen_ai.client.operation.duration")
    assert attrs["error.type"] == "BadRequestError"
    assert otel.value("llmguard.calls", error__type="BadRequestError") == 1


async def test_concurrent_async_calls_nest_under_their_own_parent(otel: Telemetry) -> None:
    @llmguard.track(model="gpt-4o-mini")
    async def leaf(text: str) -> str:
        await asyncio.sleep(0.01)
        return "answer"

    @llmguard.track
    async def branch(name: str) -> str:
        await asyncio.gather(leaf(name), leaf(name + "!"))
        return name

    await asyncio.gather(branch("a"), branch("b"))
    spans = otel.spans
    branches = {s.context.span_id: s for s in spans if s.name.startswith("invoke_workflow")}
    leaves = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert len(branches) == 2
    assert len(leaves) == 4
    for span in leaves:
        assert span.parent is not None
        assert span.parent.span_id in branches
    per_branch = [sum(1 for s in leaves if s.parent.span_id == b) for b in branches]  # type: ignore[union-attr]
    assert per_branch == [2, 2]
    assert {s.context.trace_id for s in spans} == {s.context.trace_id for s in branches.values()}


def test_a_stream_span_ends_when_the_stream_is_consumed(
    otel: Telemetry, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = fake_llm.openai_client()

    @llmguard.track
    def ask(model: str = "gpt-4o-mini") -> Any:
        return client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )

    stream = ask()
    assert otel.spans == []  # still open
    chunks = list(stream)
    [span] = otel.spans
    [event] = events.calls
    attrs = dict(span.attributes or {})
    assert attrs["llmguard.stream_chunks"] == len(chunks)
    assert attrs["gen_ai.usage.output_tokens"] == event["output_tokens"] > 0


def test_budget_refusals_and_remaining(otel: Telemetry, events: CapturedEvents) -> None:
    @llmguard.budget(usd="0.01", per="total", name="otel-team")
    def ask(text: str, model: str = "gpt-4o", max_tokens: int = 100) -> str:
        llmguard.record_usage(1000, 100)  # $0.0035
        return "ok"

    @llmguard.track
    def outer() -> str:
        return ask("again")

    ask("a")
    ask("b")
    with pytest.raises(llmguard.BudgetExceeded):
        outer()  # refused inside: counted once, not again for the outer call
    status = llmguard.budget_status("otel-team")
    assert status.remaining_usd == Decimal("0.003")
    assert otel.value("llmguard.budget.refusals", llmguard__budget="otel-team") == 1
    [(attrs, point)] = otel.points("llmguard.budget.remaining")
    assert attrs == {"llmguard.budget": "otel-team"}
    assert point.value == 0.003
    assert otel.metric("llmguard.budget.remaining").unit == "USD"
    assert otel.value("llmguard.cost") == pytest.approx(0.007, abs=1e-15)


def test_keyed_budgets_per_key_only_when_asked(events: CapturedEvents) -> None:
    @llmguard.budget(usd="1", per="total", key=lambda user, **_: user, name="otel-users")
    def ask(user: str, model: str = "gpt-4o", max_tokens: int = 100) -> str:
        llmguard.record_usage(1000, 100)
        return "ok"

    ask("alice")
    ask("bob")
    telemetry = Telemetry()
    try:
        assert telemetry.points("llmguard.budget.remaining") == []
        telemetry = Telemetry(budget_keys=True)
        readings = {
            a["llmguard.budget.key"]: p.value
            for a, p in telemetry.points("llmguard.budget.remaining")
        }
        assert readings == {"alice": 0.9965, "bob": 0.9965}
    finally:
        llmguard.otel.uninstrument()


def test_extra_attributes_from_event_fields(events: CapturedEvents) -> None:
    telemetry = Telemetry(attributes=("tenant",))
    try:

        @llmguard.track(model="gpt-4o-mini")
        def ask(text: str, tenant: str) -> str:
            call = llmguard.current_call()
            assert call is not None
            call.set(tenant=tenant)
            return "answer"

        ask("x", "acme")
        ask("y", "globex")
        ask("z", "acme")
        assert telemetry.value("llmguard.calls", llmguard__tenant="acme") == 2
        assert telemetry.value("llmguard.calls", llmguard__tenant="globex") == 1
        spans = telemetry.spans
        assert [dict(s.attributes or {})["llmguard.tenant"] for s in spans] == [
            "acme",
            "globex",
            "acme",
        ]
    finally:
        llmguard.otel.uninstrument()
    with pytest.raises(llmguard.ConfigurationError, match="field names"):
        llmguard.otel.instrument(attributes=("not a name",))


def test_uninstrument_and_instrument_again(events: CapturedEvents) -> None:
    first = Telemetry()
    f = llmguard.track(model="gpt-4o-mini")(lambda text: "answer")
    f("x")
    second = Telemetry()  # replaces the first: no call counted twice
    f("x")
    assert first.value("llmguard.calls") == 1
    assert second.value("llmguard.calls") == 1
    second.instrumentation.uninstrument()
    f("x")
    assert second.value("llmguard.calls") == 1
    assert len(second.spans) == 1
    llmguard.otel.uninstrument()  # nothing active: nothing happens


def test_only_metrics_or_only_traces() -> None:
    telemetry = Telemetry(traces=False)
    f = llmguard.track(model="gpt-4o-mini")(lambda text: "answer")
    try:
        f("x")
        assert telemetry.spans == []
        assert telemetry.value("llmguard.calls") == 1
        telemetry = Telemetry(metrics=False)
        f("x")
        assert len(telemetry.spans) == 1
        assert (
            telemetry.reader.get_metrics_data() is None or telemetry.points("llmguard.calls") == []
        )
    finally:
        llmguard.otel.uninstrument()


def test_a_broken_tracer_never_breaks_a_call(events: CapturedEvents) -> None:
    class Broken(TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            class Tracer:
                def start_span(self, *args: Any, **kwargs: Any) -> Any:
                    raise RuntimeError("tracer down")

            return Tracer()

    llmguard.otel.instrument(tracer_provider=Broken(), metrics=False)
    try:
        f = llmguard.track(model="gpt-4o-mini")(lambda text: "answer")
        assert f("x") == "answer"
        assert f("y") == "answer"
    finally:
        llmguard.otel.uninstrument()
    assert len(events.calls) == 2
    [warning] = events.of("llmguard_internal_error")  # once, not once per call
    assert "tracer down" in warning["error"]
    assert warning["observer"] == "OtelInstrumentation._observe"


def test_the_global_providers_by_default() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = trace._TRACER_PROVIDER  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = provider  # type: ignore[attr-defined]
    try:
        llmguard.otel.instrument(metrics=False)
        llmguard.track(model="gpt-4o-mini")(lambda text: "answer")("x")
    finally:
        llmguard.otel.uninstrument()
        trace._TRACER_PROVIDER = before  # type: ignore[attr-defined]
    assert [s.name for s in exporter.get_finished_spans()] == ["chat gpt-4o-mini"]


def test_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    with pytest.raises(llmguard.MissingExtra, match=r'pip install "llmguard\[otel\]"'):
        llmguard.otel.instrument()
