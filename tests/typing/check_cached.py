"""Checked by mypy --strict (never run): @cached keeps signatures and adds cache_* methods."""

from __future__ import annotations

from decimal import Decimal

from typing_extensions import assert_type

import llmguard


@llmguard.cached
def summarize(text: str, *, model: str = "gpt-4o") -> str:
    return text


@llmguard.cached(ttl="7d", ignore=("client",), version="v2", cache_if=bool)
async def ask(question: str, client: object = None) -> list[str]:
    return [question]


assert_type(summarize("x"), str)
summarize(1)  # type: ignore[arg-type]
assert_type(summarize.cache_info().saved_usd, Decimal)
assert_type(summarize.cache_info().hits, int)
assert_type(summarize.cache_key("x", model="gpt-4"), str)
summarize.cache_key(2)  # type: ignore[arg-type]
summarize.cache_clear()


async def use() -> None:
    assert_type(await ask("q"), list[str])
    ask.cache_clear()


with llmguard.bypass_cache():
    summarize("fresh")
