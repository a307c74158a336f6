"""The seed's get_summary, cached and metered by llmguard: every call logs its model,
tokens and cost; the repeated question is served from the cache for $0.

Runs offline against llmguard's fake provider (no API key, no network); with
OPENAI_API_KEY set it calls the real API instead.

    pip install -e ".[openai]" && python examples/quickstart.py
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from openai import OpenAI

import llmguard
from llmguard.testing import FakeLLMServer

# An application with no logging set up opts in to llmguard's JSON lines on stdout.
llmguard.configure_logging(json=True, file=sys.stdout)


def main() -> None:
    with ExitStack() as stack:
        if os.environ.get("OPENAI_API_KEY"):
            client = OpenAI()
            print("# calling the real OpenAI API", file=sys.stderr)
        else:
            fake = stack.enter_context(FakeLLMServer())
            client = OpenAI(base_url=fake.openai_base_url, api_key="offline-demo")
            print(f"# offline: fake provider at {fake.url}", file=sys.stderr)
        llmguard.instrument(client)  # real usage from every call made inside a decorated function

        @llmguard.cached(ttl="7d", storage="memory://quickstart")  # a repeat costs $0
        def get_summary(text: str, *, model: str = "gpt-4o-mini") -> str:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Summarize: {text}"}]
            )
            return response.choices[0].message.content or ""

        @llmguard.track(model="gpt-4o-mini")
        def headline(text: str) -> str:
            # No provider call here: llmguard estimates tokens and cost from the arguments.
            return text.split(".")[0][:60]

        print(get_summary("Generate summary"), file=sys.stderr)
        print(get_summary("Generate summary"), file=sys.stderr)  # served from the cache
        print(
            get_summary("Quarterly revenue grew 12% while costs fell.", model="gpt-4o"),
            file=sys.stderr,
        )
        print(headline("Caching cuts LLM bills. Routing cuts them further."), file=sys.stderr)


if __name__ == "__main__":
    main()
