"""``llmguard demo``: every policy at work, offline, in under a minute.

Starts the fake provider on a free loopback port (with a rate limit, like a real one) and
runs a scripted workload through decorated functions using the real ``openai`` SDK, then
prints what happened and the bill, and writes the JSON log and the HTML report.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

QUESTIONS = [
    "What does prompt caching save?",
    "Why use a cheaper model for short prompts?",
    "What is a rate limit?",
]
REPORT = """Quarterly revenue grew 12% while operating costs fell 3%. The board asked for a
plain-English summary of the risks: customer churn rose slightly in the enterprise segment,
and cloud spending on inference doubled after the product launch. """


def run(out_dir: Path, *, fast: bool = False, stream: TextIO | None = None) -> tuple[Path, Path]:
    """Run the demo, writing ``llmguard-demo.jsonl`` and ``llmguard-demo.html`` into
    ``out_dir``; returns their paths. The narrative goes to ``stream`` (default stdout)."""
    import openai

    import llmguard
    from llmguard._html import render_html
    from llmguard._report import build, read_events, render_table
    from llmguard.testing import FakeLLMServer, capture_calls

    def say(text: str) -> None:
        print(text, file=stream or sys.stdout, flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "llmguard-demo.jsonl"
    html_path = out_dir / "llmguard-demo.html"
    log_path.write_text("")
    window = 2 if fast else 10
    rpm = 8 if fast else 20
    limit = f"{rpm} per {window} seconds"  # what the provider allows
    llmguard.configure(storage=f"file://{tempfile.mkdtemp(prefix='llmguard-demo-')}")
    llmguard.configure_logging(json=True, file=str(log_path))
    words = " ".join(["insight"] * 120)

    def reply(request: Any) -> str:
        return f"Summary: {words}"

    with FakeLLMServer(requests_per_window=rpm, window=window, reply=reply) as fake:
        client = llmguard.instrument(
            openai.OpenAI(base_url=fake.openai_base_url, api_key="demo", max_retries=0)
        )
        say(
            f"llmguard demo: a fake OpenAI-compatible provider at {fake.url} allows {rpm} "
            f"requests per {window}s, and answers 429 past that.\n"
        )

        @llmguard.cached(ttl="1h")
        @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", cheap_below_tokens=200)
        @llmguard.budget(usd=5, per="day", name="demo-daily")
        @llmguard.retry_on_rate_limit(max_tries=8)
        @llmguard.rate_limited(limit, name="provider")
        def answer(question: str, *, model: str = "gpt-4o", max_tokens: int = 200) -> str:
            messages: list[Any] = [{"role": "user", "content": question}]
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens
            )
            return response.choices[0].message.content or ""

        say("1. Caching: the same three questions, asked three times each.")
        for _ in range(3):
            for question in QUESTIONS:
                answer(question)
        info = answer.cache_info()
        say(
            f"   {info.misses} provider calls, {info.hits} answers from the cache, "
            f"saving ${info.saved_usd}.\n"
        )

        say("2. Routing: short prompts go to gpt-4o-mini, a long report to gpt-4o.")
        answer("Summarize: sales are up.")
        answer("Summarize: " + REPORT * 6)
        say(f"   models used: {', '.join(r.model or '?' for r in fake.requests[-2:])}.\n")

        say(
            f"3. A burst of {rpm * 3} distinct questions against the provider's limit, which is "
            "briefly overloaded as it starts."
        )
        fake.fail_next(2, 429, retry_after=1)
        started = time.monotonic()
        with capture_calls() as burst:
            for i in range(rpm * 3):
                answer(f"Burst question number {i}?")
        window_wait = sum(e.get("rate_wait_s", 0) for e in burst.calls)
        retry_wait = sum(e.get("retry_wait_s", 0) for e in burst.calls)
        say(
            f"   all {rpm * 3} answered in {time.monotonic() - started:.1f}s, none failed: "
            f"@rate_limited waited {window_wait:.1f}s for the window, and the "
            f"{len(burst.of('llm_retry'))} rate-limit errors of the overload were absorbed by "
            f"@retry_on_rate_limit ({retry_wait:.1f}s waiting what the provider asked).\n"
        )

        say("4. A runaway loop against a $0.02 budget.")

        @llmguard.budget(usd="0.02", per="day", name="runaway")
        @llmguard.retry_on_rate_limit(max_tries=8)
        @llmguard.rate_limited(limit, name="provider")
        def runaway(i: int, *, model: str = "gpt-4o", max_tokens: int = 200) -> str:
            messages: list[Any] = [{"role": "user", "content": f"Step {i}: keep going"}]
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens
            )
            return response.choices[0].message.content or ""

        steps = 0
        try:
            for steps in range(1000):  # the loop a bug would run forever
                runaway(steps)
        except llmguard.BudgetExceeded as exc:
            say(f"   stopped after {steps} calls: {exc}\n")

    counter = [0]
    report = build(read_events([str(log_path)], counter))
    report.skipped_lines = counter[0]
    html_path.write_text(render_html(report), encoding="utf-8")
    say(render_table(report))
    say(f"\nThe JSON log: {log_path}\nThe HTML report: {html_path}")
    say(f"Read it again any time: llmguard report {log_path} --by model --html report.html")
    return log_path, html_path
