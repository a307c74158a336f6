from __future__ import annotations

from pathlib import Path

import pytest

import llmguard
from llmguard._budget import _BudgetLayer
from llmguard._cache import _CacheLayer
from llmguard._ratelimit import _RateLimitLayer
from llmguard._retry import _RetryLayer
from llmguard._route import _RouteLayer
from llmguard.testing import CapturedEvents, FakeLLMServer


def test_guard_applies_the_recommended_order(tmp_path: Path) -> None:
    @llmguard.guard(
        cache={"ttl": "1h", "storage": f"file://{tmp_path}/c"},
        route={"default": "gpt-4o", "cheap": "gpt-4o-mini", "cheap_below_tokens": 100},
        budget={"usd": 1, "storage": f"file://{tmp_path}/b"},
        retry=True,
        rate="100/second",
    )
    def summarize(text: str, *, model: str = "gpt-4o") -> str:
        return model

    layers = [type(layer) for layer in summarize.__llmguard__.layers]  # type: ignore[attr-defined]
    assert layers == [_CacheLayer, _RouteLayer, _BudgetLayer, _RetryLayer, _RateLimitLayer]
    assert summarize("short") == "gpt-4o-mini"
    assert summarize.cache_info().hits == 0  # type: ignore[attr-defined]


def test_the_full_stack_with_the_real_sdk(
    fake_llm: FakeLLMServer, events: CapturedEvents, tmp_path: Path
) -> None:
    client = llmguard.instrument(fake_llm.openai_client())
    naps: list[float] = []

    @llmguard.guard(
        cache={"storage": f"file://{tmp_path}/c"},
        route={"default": "gpt-4o", "fallbacks": ("gpt-4o-mini",)},
        budget={"usd": "0.5", "name": "stack", "storage": f"file://{tmp_path}/b"},
        retry={"max_tries": 2, "jitter": None, "sleep": naps.append},
        rate={"rate": "50/second", "storage": "memory://stack"},
    )
    def ask(question: str, *, model: str = "gpt-4o") -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )
        return str(reply.choices[0].message.content)

    fake_llm.fail_next(3, 429, retry_after=0.1)  # gpt-4o twice (retried once), then mini once
    answer = ask("What is a token?")
    assert answer == ask("What is a token?")  # the second is a cache hit
    assert [r.model for r in fake_llm.requests] == [
        "gpt-4o",
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4o-mini",
    ]
    miss, hit = events.calls
    assert (miss["route"], miss["model"], miss["cache"], miss["attempts"]) == (
        "fallback:1",
        "gpt-4o-mini",
        "miss",
        2,
    )
    assert (hit["cache"], hit["cost_usd"]) == ("hit", 0.0)
    assert float(llmguard.budget_status("stack").spent_usd) == pytest.approx(miss["cost_usd"])
    assert len(events.of("llm_retry")) == 2


def test_guard_configuration() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="at least one"):
        llmguard.guard()
    with pytest.raises(llmguard.ConfigurationError, match="default"):
        llmguard.guard(route={"cheap": "gpt-4o-mini"})
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.guard(cache="yes")  # type: ignore[arg-type]


def test_the_briefs_stack_sync_and_async(
    flavour: str, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    import asyncio

    def stack(fn: object) -> object:
        return llmguard.cached(ttl="7d")(
            llmguard.route_model(
                "gpt-4o", cheap="gpt-4o-mini", when=lambda text, **_: len(text) < 2000
            )(
                llmguard.budget(usd=20, per="day", name=f"brief-{flavour}")(
                    llmguard.retry_on_rate_limit(max_tries=6, jitter=None, sleep=lambda s: None)(
                        llmguard.rate_limited("500/minute", tokens="200000/minute")(fn)  # type: ignore[arg-type]
                    )
                )
            )
        )

    if flavour == "sync":
        client = llmguard.instrument(fake_llm.openai_client())

        def summarize(text: str, *, model: str = "gpt-4o") -> str:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}]
            )
            return str(reply.choices[0].message.content)

        fn = stack(summarize)
        results = [fn("short text"), fn("short text"), fn("long " * 3000)]  # type: ignore[operator]
    else:
        aclient = llmguard.instrument(fake_llm.openai_client(async_client=True))

        async def asummarize(text: str, *, model: str = "gpt-4o") -> str:
            reply = await aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}]
            )
            return str(reply.choices[0].message.content)

        afn = stack(asummarize)

        async def main() -> list[str]:
            return [await afn("short text"), await afn("short text"), await afn("long " * 3000)]  # type: ignore[operator]

        results = asyncio.run(main())
    assert results[0] == results[1]
    assert [r.model for r in fake_llm.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert [(e["cache"], e.get("route")) for e in events.calls] == [
        ("miss", "cheap:when"),
        ("hit", None),
        ("miss", "default"),
    ]
    spent = llmguard.budget_status(f"brief-{flavour}").spent_usd
    assert float(spent) == pytest.approx(events.calls[0]["cost_usd"] + events.calls[2]["cost_usd"])
