from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

from .conftest import call

LONG = "word " * 3000


def routed(flavour: str, **options: Any) -> Any:
    """``summarize`` routed by ``options``; returns the model it was called with."""
    if flavour == "sync":

        @llmguard.route_model("gpt-4o", **options)
        def summarize(text: str, *, model: str = "gpt-4o") -> str:
            return model

    else:

        @llmguard.route_model("gpt-4o", **options)
        async def summarize(text: str, *, model: str = "gpt-4o") -> str:  # type: ignore[misc]
            return model

    return summarize


def test_rules_in_order(flavour: str, events: CapturedEvents) -> None:
    fn = routed(flavour, cheap="gpt-4o-mini", when=lambda text, **_: len(text) < 100)
    assert call(fn, "short") == "gpt-4o-mini"
    assert call(fn, LONG) == "gpt-4o"
    assert call(fn, "short", critical=True) == "gpt-4o"
    assert call(fn, "short", model="o3") == "o3"
    assert [e["route"] for e in events.calls] == ["cheap:when", "default", "critical", "explicit"]
    assert [e["model"] for e in events.calls] == ["gpt-4o-mini", "gpt-4o", "gpt-4o", "o3"]


def test_cheap_below_tokens(flavour: str, events: CapturedEvents) -> None:
    fn = routed(flavour, cheap="gpt-4o-mini", cheap_below_tokens=1500)
    assert call(fn, "word " * 100) == "gpt-4o-mini"
    assert call(fn, LONG) == "gpt-4o"
    assert [e["route"] for e in events.calls] == ["cheap:tokens", "default"]


def test_critical_is_passed_through_when_the_function_declares_it() -> None:
    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda *a, **k: True)
    def summarize(text: str, critical: bool = False, *, model: str = "gpt-4o") -> tuple[str, bool]:
        return model, critical

    assert summarize("x", critical=True) == ("gpt-4o", True)
    assert summarize("x") == ("gpt-4o-mini", False)


def test_downgrade_once_the_budget_is_mostly_spent(tmp_path: Path, events: CapturedEvents) -> None:
    storage = f"file://{tmp_path}/ledger"

    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", downgrade_at=0.5, budget="team")
    @llmguard.budget(usd="0.01", name="team", storage=storage, on_exceed="warn")
    def ask(text: str, *, model: str = "gpt-4o", max_tokens: int = 10) -> str:
        llmguard.record_usage(1000, 100)  # $0.0035 on gpt-4o
        return model

    assert ask("a") == "gpt-4o"
    assert ask("a") == "gpt-4o"
    assert ask("a") == "gpt-4o-mini"  # 70% spent
    assert [e["route"] for e in events.calls] == ["default", "default", "downgrade:budget"]


def test_fallbacks_with_the_real_sdk(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Path
) -> None:
    fake_llm.fail_next(1, 503)  # the first model's call fails
    options = {"fallbacks": ("gpt-4o-mini", "claude-3-5-haiku-latest")}
    budget = llmguard.budget(usd="1", name=f"fb-{flavour}", storage=f"file://{tmp_path}/l")
    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        @llmguard.route_model("gpt-4o", **options)
        @budget
        def ask(question: str, *, model: str = "gpt-4o") -> str:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}]
            )
            return str(reply.model)

        used = ask("hello")
    else:
        aclient = llmguard.instrument(fake_llm.openai_client(async_client=True))

        @llmguard.route_model("gpt-4o", **options)
        @budget
        async def aask(question: str, *, model: str = "gpt-4o") -> str:
            reply = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}]
            )
            return str(reply.model)

        used = asyncio.run(aask("hello"))
    assert used == "gpt-4o-mini"
    assert [r.model for r in fake_llm.requests] == ["gpt-4o", "gpt-4o-mini"]
    [event] = events.calls
    assert (event["route"], event["model"], event["failed_over_from"]) == (
        "fallback:1",
        "gpt-4o-mini",
        "gpt-4o",
    )
    status = llmguard.budget_status(f"fb-{flavour}")
    assert status.spent_usd == Decimal(str(event["cost_usd"]))  # settled at the fallback's price
    assert status.reserved_usd == 0


def test_client_errors_are_not_failed_over(fake_llm: FakeLLMServer) -> None:
    import openai

    fake_llm.fail_next(1, 400)
    client = fake_llm.openai_client()

    @llmguard.route_model("gpt-4o", fallbacks=("gpt-4o-mini",))
    def ask(question: str, *, model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )

    with pytest.raises(openai.BadRequestError):
        ask("x")
    assert len(fake_llm.requests) == 1


def test_the_last_fallback_failure_is_raised(fake_llm: FakeLLMServer) -> None:
    import openai

    fake_llm.fail_next(3, 429, retry_after=1)
    client = fake_llm.openai_client()

    @llmguard.route_model("gpt-4o", fallbacks=("gpt-4o-mini", "gpt-4.1-mini"))
    def ask(question: str, *, model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )

    with pytest.raises(openai.RateLimitError):
        ask("x")
    assert [r.model for r in fake_llm.requests] == ["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini"]


def test_bad_configuration() -> None:
    def no_model(text: str) -> str:
        return text

    with pytest.raises(llmguard.ConfigurationError, match="no 'model' parameter"):
        llmguard.route_model("gpt-4o")(no_model)
    llmguard.route_model("gpt-4o", param="engine")(lambda text, engine="x": engine)
    for options in (
        {"when": lambda *a: True},
        {"cheap": "m", "downgrade_at": 0.5},
        {"cheap": "m", "downgrade_at": 2, "budget": "b"},
        {"fallbacks": "gpt-4o-mini"},
        {"cheap": 3},
    ):
        with pytest.raises(llmguard.ConfigurationError):
            llmguard.route_model("gpt-4o", **options)
