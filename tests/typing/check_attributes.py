"""Checked by mypy --strict (never run): every attribute a decorator attaches is typed, and
every llmguard-decorated function has ``with_options``, methods included."""

from __future__ import annotations

from decimal import Decimal

from typing_extensions import assert_type

import llmguard


@llmguard.budget(usd=5, per="day")
def ask(question: str) -> str:
    return question


@llmguard.cached
def summarize(text: str) -> str:
    return text


@llmguard.track
def tracked(text: str) -> str:
    return text


@llmguard.rate_limited("10/second")
def limited(text: str) -> str:
    return text


@llmguard.retry_on_rate_limit(max_tries=3)
def retried(text: str) -> str:
    return text


@llmguard.route_model(default="gpt-4o", cheap="gpt-4o-mini", cheap_below_tokens=100)
def routed(text: str, model: str = "gpt-4o") -> str:
    return text


@llmguard.debounced(wait=0.1)
def debounced(text: str) -> str:
    return text


@llmguard.guard(cache=True, budget={"usd": 5, "per": "day"})
def stacked(text: str) -> str:
    return text


class Assistant:
    @llmguard.budget(usd=1, per="hour")
    def reply(self, message: str) -> int:
        return len(message)


assert_type(ask("q"), str)
assert_type(ask.budget_status(), llmguard.BudgetStatus)
assert_type(ask.budget_status(key=None).remaining_usd, Decimal)
ask.budget_status(3)  # type: ignore[arg-type]
assert_type(summarize.cache_info(), llmguard.CacheInfo)
assert_type(summarize.cache_clear(), None)
assert_type(summarize.cache_key("x"), str)
summarize.cache_key(1)  # type: ignore[arg-type]
assert_type(summarize.__wrapped__("x"), str)
for fn in (ask, summarize, tracked, limited, retried, routed, debounced, stacked):
    assert_type(fn.with_options()("x"), str)
assert_type(routed.with_options(critical=True)("x"), str)
ask.with_options()(1)  # type: ignore[arg-type]

assert_type(Assistant().reply("hi"), int)
Assistant().reply(3)  # type: ignore[arg-type]
assert_type(Assistant.reply.budget_status(), llmguard.BudgetStatus)
assert_type(Assistant.reply(Assistant(), "hi"), int)
