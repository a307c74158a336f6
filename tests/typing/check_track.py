"""Checked by mypy --strict (never run): decorated functions keep their signatures."""

from __future__ import annotations

from typing_extensions import assert_type

import llmguard


@llmguard.track
def summarize(text: str, *, model: str = "gpt-4o") -> str:
    return text


@llmguard.track(model="gpt-4o-mini", prompt=lambda q, **_: q)
async def ask(question: str, retries: int = 0) -> list[str]:
    return [question]


class Assistant:
    @llmguard.track
    def reply(self, message: str) -> int:
        return len(message)


assert_type(summarize("x"), str)
assert_type(summarize("x", model="gpt-4"), str)
summarize(1)  # type: ignore[arg-type]
summarize("x", mode="gpt-4")  # type: ignore[call-arg]


async def use() -> None:
    assert_type(await ask("q"), list[str])
    await ask("q", retries="3")  # type: ignore[arg-type]


assert_type(Assistant().reply("hi"), int)
Assistant().reply(3)  # type: ignore[arg-type]
assert_type(llmguard.count_tokens("x", "gpt-4o"), llmguard.TokenCount)
