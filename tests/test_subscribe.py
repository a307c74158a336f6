"""llmguard.subscribe(): every event as a plain dict, whatever structlog's configuration."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import pytest
import structlog

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

from ._helpers import VirtualClock
from .conftest import call, make

MESSAGES = [{"role": "user", "content": "hello"}]


def test_a_subscriber_gets_every_event_as_a_dict(flavour: str, fake_llm: FakeLLMServer) -> None:
    seen: list[dict[str, Any]] = []
    naps: list[float] = []
    fake_llm.fail_next(1, 429, retry_after=0.25)
    client = fake_llm.openai_client(async_client=flavour == "async")

    if flavour == "sync":

        @llmguard.budget(usd="0.05", per="total", alert_at=(0.001,), name=f"sub-{flavour}")
        @llmguard.retry_on_rate_limit(jitter=None, sleep=naps.append)
        def ask(question: str, model: str = "gpt-4o") -> Any:
            return client.chat.completions.create(model=model, messages=MESSAGES)

    else:

        async def nap(seconds: float) -> None:
            naps.append(seconds)

        @llmguard.budget(usd="0.05", per="total", alert_at=(0.001,), name=f"sub-{flavour}")
        @llmguard.retry_on_rate_limit(jitter=None, async_sleep=nap)
        async def ask(question: str, model: str = "gpt-4o") -> Any:  # type: ignore[misc]
            return await client.chat.completions.create(model=model, messages=MESSAGES)

    with llmguard.subscribe(seen.append) as subscription:
        assert subscription.active
        call(ask, "q")
    assert not subscription.active
    assert naps == [0.25]
    assert [e["event"] for e in seen] == ["llm_retry", "budget_alert", "llm_call"]
    retry, alert, done = seen
    assert type(retry) is dict
    assert (retry["log_level"], retry["status"], retry["attempt"]) == ("warning", 429, 1)
    assert (alert["budget"], alert["threshold"]) == (f"sub-{flavour}", 0.001)
    assert done["log_level"] == "info"
    assert (done["attempts"], done["cost_source"], done["model"]) == (2, "usage", "gpt-4o")
    assert done["cost_usd"] == alert["spent_usd"] > 0
    assert retry["call_id"] == done["call_id"]


def test_delivered_whatever_structlog_drops_or_caches() -> None:
    out = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(40),  # ERROR and above only
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    seen: list[dict[str, Any]] = []
    f = make("sync", lambda text: "answer", model="gpt-4o-mini")
    with llmguard.subscribe(seen.append):
        f("one")
        f("two")
    f("three")  # after the block: not delivered
    assert out.getvalue() == ""  # the log level dropped them
    assert [e["event"] for e in seen] == ["llm_call", "llm_call"]
    assert [e["output_tokens"] for e in seen] == [1, 1]


def test_each_subscriber_gets_a_dict_of_its_own() -> None:
    first: list[dict[str, Any]] = []

    def vandal(event: dict[str, Any]) -> None:
        event["cost_usd"] = -1
        event.clear()

    f = make("sync", lambda text: "answer", model="gpt-4o-mini")
    with llmguard.subscribe(vandal), llmguard.subscribe(first.append):
        f("text")
    assert first[0]["cost_usd"] > 0


def test_a_failing_subscriber_never_breaks_a_call(
    flavour: str, events: CapturedEvents, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, Any]] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("exporter down")

    class Other:
        def __call__(self, event: dict[str, Any]) -> None:
            raise KeyError(event["event"])

    other = Other()
    f = make(flavour, lambda text: "answer", model="gpt-4o-mini")
    with llmguard.subscribe(broken), llmguard.subscribe(other), llmguard.subscribe(seen.append):
        for _ in range(3):
            assert call(f, "text") == "answer"
    warnings = events.of("subscriber_failed")
    assert [w["subscriber"] for w in warnings] == [
        f"{__name__}.test_a_failing_subscriber_never_breaks_a_call.<locals>.broken",
        f"{__name__}.test_a_failing_subscriber_never_breaks_a_call.<locals>.Other",
    ]
    assert warnings[0]["error"] == "RuntimeError: exporter down"
    assert warnings[0]["log_level"] == "warning"
    assert len(events.calls) == 3
    # the other subscriber got every event, the warnings included
    assert [e["event"] for e in seen].count("llm_call") == 3
    assert [e["event"] for e in seen].count("subscriber_failed") == 2
    assert "subscriber_failed" in capsys.readouterr().err  # logged too


def test_a_resubscribed_failing_callback_is_reported_again(events: CapturedEvents) -> None:
    def broken(event: dict[str, Any]) -> None:
        raise ValueError("no")

    f = make("sync", lambda text: "answer", model="gpt-4o-mini")
    for _ in range(2):
        with llmguard.subscribe(broken):
            f("text")
            f("text")
    assert len(events.of("subscriber_failed")) == 2


def test_subscribe_is_idempotent_and_unsubscribe_by_callback() -> None:
    seen: list[dict[str, Any]] = []

    class Exporter:
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_event(self, event: dict[str, Any]) -> None:
            self.events.append(event["event"])

    exporter = Exporter()
    f = make("sync", lambda text: "answer", model="gpt-4o-mini")
    first = llmguard.subscribe(seen.append)
    again = llmguard.subscribe(seen.append)  # a new bound method object, equal to the first
    assert again is first
    llmguard.subscribe(exporter.on_event)
    f("text")
    assert len(seen) == 1
    llmguard.unsubscribe(seen.append)
    llmguard.unsubscribe(exporter.on_event)
    llmguard.unsubscribe(exporter.on_event)  # not subscribed any more: nothing happens
    f("text")
    assert len(seen) == 1
    assert exporter.events == ["llm_call"]
    assert not first.active
    assert "ended" in repr(first)


def test_unsubscribe_a_subscription() -> None:
    seen: list[dict[str, Any]] = []
    subscription = llmguard.subscribe(seen.append)
    f = make("sync", lambda text: "answer", model="gpt-4o-mini")
    f("text")
    llmguard.unsubscribe(subscription)
    subscription.unsubscribe()
    f("text")
    assert len(seen) == 1


def test_subscribe_refuses_what_it_cannot_call() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="callable"):
        llmguard.subscribe("print")  # type: ignore[arg-type]


def test_events_from_threads_and_tasks() -> None:
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def collect(event: dict[str, Any]) -> None:
        with lock:
            seen.append(event)

    f = make("sync", lambda text: "answer", model="gpt-4o-mini")
    af = make("async", lambda text: "answer", model="gpt-4o-mini")

    async def tasks() -> None:
        await asyncio.gather(*(af(f"t{i}") for i in range(5)))

    with llmguard.subscribe(collect):
        threads = [threading.Thread(target=f, args=(f"x{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        asyncio.run(tasks())
    assert len([e for e in seen if e["event"] == "llm_call"]) == 13


def test_a_rate_limit_wait_is_an_event(flavour: str) -> None:
    clock = VirtualClock()
    seen: list[dict[str, Any]] = []
    if flavour == "sync":

        @llmguard.rate_limited("1/second", name="sub-wait", **clock.options())
        def f(text: str, model: str = "gpt-4o-mini") -> str:
            return "answer"

    else:

        @llmguard.rate_limited("1/second", name="sub-wait", **clock.options())
        async def f(text: str, model: str = "gpt-4o-mini") -> str:  # type: ignore[misc]
            return "answer"

    with llmguard.subscribe(seen.append):
        call(f, "a")
        call(f, "b")
    [wait] = [e for e in seen if e["event"] == "rate_limit_wait"]
    calls = [e for e in seen if e["event"] == "llm_call"]
    assert wait["log_level"] == "debug"
    assert (wait["function"], wait["limit"]) == (calls[1]["function"], "sub-wait")
    assert wait["call_id"] == calls[1]["call_id"]
    assert wait["wait_s"] == calls[1]["rate_wait_s"] == pytest.approx(sum(clock.slept), abs=1e-3)
    assert wait["wait_s"] > 0
    assert calls[0]["rate_wait_s"] == 0  # no wait, no event
