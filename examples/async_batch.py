"""An asyncio batch job under RPM and TPM limits: 40 documents summarized concurrently,
never faster than the provider allows, with the few 429s that still happen retried. Offline
against llmguard's fake provider (which enforces its own limits), or the real API when
OPENAI_API_KEY is set (then set the limits to your account's).

    python examples/async_batch.py
"""

from __future__ import annotations

import asyncio
import os
import time

from openai import AsyncOpenAI

import llmguard
from llmguard.testing import FakeLLMServer

RPM, WINDOW = (500, 60) if os.environ.get("OPENAI_API_KEY") else (20, 2)
fake = (
    None
    if os.environ.get("OPENAI_API_KEY")
    else FakeLLMServer(requests_per_window=RPM, tokens_per_window=RPM * 2000, window=WINDOW).start()
)
client = llmguard.instrument(
    AsyncOpenAI(max_retries=0)
    if fake is None
    else AsyncOpenAI(base_url=fake.openai_base_url, api_key="offline", max_retries=0)
)


@llmguard.retry_on_rate_limit(max_tries=6)
@llmguard.rate_limited(
    f"{RPM} per {WINDOW} seconds",
    tokens=f"{RPM * 2000} per {WINDOW} seconds",
    storage="memory://batch",
)
async def summarize(doc: str, *, model: str = "gpt-4o-mini", max_tokens: int = 150) -> str:
    response = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Summarize: {doc}"}],
        max_tokens=max_tokens,
    )
    return response.choices[0].message.content or ""


async def main() -> None:
    documents = [f"Document {i}: quarterly figures for region {i % 7}." for i in range(40)]
    started = time.monotonic()
    with llmguard.testing.capture_calls() as events:
        summaries = await asyncio.gather(*(summarize(doc) for doc in documents))
    waited = sum(e.get("rate_wait_s", 0) for e in events.calls)
    cost = sum(e["cost_usd"] or 0 for e in events.calls)
    print(f"{len(summaries)} summaries in {time.monotonic() - started:.1f}s, ${cost:.6f}")
    print(
        f"waited {waited:.1f}s in total for the rate window; retries: {len(events.of('llm_retry'))}"
    )
    if fake is not None:
        print(f"429s from the provider: {fake.statuses.count(429)}")
        fake.stop()


if __name__ == "__main__":
    asyncio.run(main())
