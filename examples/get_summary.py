"""The seed's get_summary, made cheap: cached, routed to a cheaper model, budgeted, and
resilient to rate limits. Offline against llmguard's fake provider, or the real API when
OPENAI_API_KEY is set.

    python examples/get_summary.py
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

import llmguard
from llmguard.testing import FakeLLMServer

fake = None if os.environ.get("OPENAI_API_KEY") else FakeLLMServer().start()
client = llmguard.instrument(
    OpenAI(max_retries=0)
    if fake is None
    else OpenAI(base_url=fake.openai_base_url, api_key="offline", max_retries=0)
)


@llmguard.cached(ttl="7d")  # the seed's dict cache, but persistent and shared by processes
@llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", cheap_below_tokens=2000)
@llmguard.budget(usd=1, per="day")
@llmguard.retry_on_rate_limit(max_tries=6)
def get_summary(text: str, *, model: str = "gpt-4o") -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Summarize: {text}"}]
    )
    return response.choices[0].message.content or ""


if __name__ == "__main__":
    with llmguard.testing.capture_calls() as events:
        print(get_summary("Generate summary"))
        print(get_summary("Generate summary"))  # from the cache: $0
    for event in events.calls:
        print(
            f"{event['cache']:>4}  {event['model']:<12} ${event['cost_usd']:.8f}  "
            f"route={event.get('route', '-')}",
            file=sys.stderr,
        )
    if fake is not None:
        fake.stop()
