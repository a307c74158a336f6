"""Checked by mypy --strict (never run): a ``@budget`` function keeps its signature and
gains a typed ``budget_status`` (README: ``research.budget_status(key="alice")``)."""

from __future__ import annotations

from decimal import Decimal

from typing_extensions import assert_type

import llmguard


@llmguard.budget(usd=500, per="month", name="team-research", key=lambda user, **_: user)
def research(user: str, question: str, *, model: str = "gpt-4o") -> str:
    return question


@llmguard.budget(usd=20, per="day")
async def summarize(text: str, *, model: str = "gpt-4o") -> str:
    return text


assert_type(research("alice", "why?"), str)
assert_type(research.budget_status(key="alice"), llmguard.BudgetStatus)
assert_type(summarize.budget_status().remaining_usd, Decimal)
assert_type(research.with_options(critical=True)("alice", "why?"), str)
research("alice", 3)  # type: ignore[arg-type]
research.budget_status(key=3)  # type: ignore[arg-type]
summarize.budget_status("team", "x")  # type: ignore[call-arg]


async def use() -> None:
    assert_type(await summarize("text"), str)


def status_of(fn: llmguard.BudgetedFunction[[str, str], str]) -> llmguard.BudgetStatus:
    return fn.budget_status(key="alice")


status_of(research)
