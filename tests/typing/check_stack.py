"""Checked by mypy --strict (never run): the brief's full stack keeps the signature."""

from __future__ import annotations

from typing_extensions import assert_type

import llmguard


@llmguard.cached(ttl="7d")
@llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda text, **_: len(text) < 2000)
@llmguard.budget(usd=20, per="day")
@llmguard.retry_on_rate_limit(max_tries=6)
@llmguard.rate_limited("500/minute", tokens="200000/minute")
def summarize(text: str, *, model: str = "gpt-4o") -> str:
    return text


@llmguard.guard(cache=True, budget={"usd": 5}, rate="10/second")
async def ask(question: str, *, model: str = "gpt-4o") -> dict[str, int]:
    return {question: 1}


assert_type(summarize("x"), str)
summarize(b"x")  # type: ignore[arg-type]
status: llmguard.BudgetStatus = llmguard.budget_status("team")
assert_type(
    llmguard.budget_keys("team", storage="redis://localhost"), dict[str, llmguard.BudgetStatus]
)


async def use() -> None:
    assert_type(await ask("q"), dict[str, int])
    await ask(1)  # type: ignore[arg-type]
