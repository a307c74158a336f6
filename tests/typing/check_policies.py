"""Checked by mypy --strict (never run): the policy decorators keep signatures when stacked."""

from __future__ import annotations

from typing_extensions import assert_type

import llmguard


@llmguard.cached(ttl="7d")
@llmguard.retry_on_rate_limit(max_tries=6)
@llmguard.rate_limited("500/minute", tokens="200000/minute")
def summarize(text: str, *, model: str = "gpt-4o", max_tokens: int = 500) -> str:
    return text


@llmguard.debounced(wait=0.3, key=lambda user, text: user)
async def suggest(user: str, text: str) -> list[str]:
    return [text]


@llmguard.debounced
def debounced_bare(text: str) -> str:
    return text


@llmguard.debounced(0.5)
def debounced_positional(text: str) -> str:
    return text


@llmguard.retry_on_rate_limit
def bare(x: int) -> float:
    return x / 2


assert_type(summarize("x"), str)
assert_type(summarize.cache_info().entries, int)
summarize("x", model=3)  # type: ignore[arg-type]
assert_type(bare(3), float)
assert_type(debounced_bare("x"), str)
assert_type(debounced_bare.with_options()("x"), str)
debounced_bare(3)  # type: ignore[arg-type]
assert_type(debounced_positional("x"), str)
bare("3")  # type: ignore[arg-type]


async def use() -> None:
    assert_type(await suggest("alice", "hel"), list[str])
    await suggest("alice")  # type: ignore[call-arg]


def handle(error: llmguard.RateLimitExceeded) -> float | None:
    return error.retry_after
