"""``llmguard demo``: every policy at work, offline, in about 12 seconds (``--fast``: 5).

Starts the fake provider on a free loopback port (with a rate limit, like a real one) and
runs a scripted workload through decorated functions using the real ``openai`` SDK, then
prints what happened and the bill, and writes the JSON log and the HTML report. Waits for
the provider's rate window are shown as they happen.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ._errors import MissingExtra, require
from ._money import format_usd

QUESTIONS = [
    "What does prompt caching save?",
    "Why use a cheaper model for short prompts?",
    "What is a rate limit?",
]
REPORT = """Quarterly revenue grew 12% while operating costs fell 3%. The board asked for a
plain-English summary of the risks: customer churn rose slightly in the enterprise segment,
and cloud spending on inference doubled after the product launch. """


@dataclass(frozen=True)
class Pace:
    """How hard the demo's provider pushes back: ``rpm`` requests per ``window`` seconds (a
    whole number: rate strings count in seconds), the ``retry_after`` its overload errors
    ask for, and how many questions the burst asks at once (more than a window allows)."""

    rpm: int
    window: int
    retry_after: float
    burst: int


NORMAL = Pace(rpm=10, window=3, retry_after=0.5, burst=20)
FAST = Pace(rpm=8, window=1, retry_after=0.3, burst=12)


class _Progress:
    """The demo's waits, shown while they happen: a countdown on a terminal, else one line
    per wait long enough to notice."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self.note = ""  # e.g. " (12/20 answered)"

    def sleeper(self, what: str) -> Callable[[float], None]:
        return lambda seconds: self.wait(what, seconds)

    def wait(self, what: str, seconds: float) -> None:
        if seconds < 0.25:
            time.sleep(seconds)
            return
        if not self.live:
            print(f"   ... waiting {seconds:.1f}s for {what}{self.note}", file=self.stream)
            self.stream.flush()
            time.sleep(seconds)
            return
        end = time.monotonic() + seconds
        width = 0
        while (left := end - time.monotonic()) > 0:
            line = f"   ... {left:4.1f}s waiting for {what}{self.note}"
            width = max(width, len(line))
            self.stream.write("\r" + line.ljust(width))
            self.stream.flush()
            time.sleep(min(0.1, left))
        self.stream.write("\r" + " " * width + "\r")
        self.stream.flush()


def run(
    out_dir: Path,
    *,
    fast: bool = False,
    stream: TextIO | None = None,
    pace: Pace | None = None,
) -> tuple[Path, Path]:
    """Run the demo, writing ``llmguard-demo.jsonl`` and ``llmguard-demo.html`` into
    ``out_dir``; returns their paths. The narrative goes to ``stream`` (default stdout).
    ``pace`` overrides the provider's limits (``FAST`` with ``fast=True``, else ``NORMAL``).
    Without the ``openai`` package, raises ``MissingExtra`` before doing anything."""
    started = time.monotonic()
    if importlib.util.find_spec("openai") is None:  # before saying anything
        raise MissingExtra("llmguard demo", module="openai", extra="openai")
    out = stream or sys.stdout
    progress = _Progress(out, live=bool(getattr(out, "isatty", bool)()))

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say("llmguard demo: loading the openai SDK, the tokenizer and the price table ...")
    openai = require("openai", extra="openai", what="llmguard demo")

    import llmguard
    from llmguard._html import render_html
    from llmguard._report import build, read_events, render_table
    from llmguard.testing import FakeLLMServer, capture_calls

    pace = pace or (FAST if fast else NORMAL)
    rpm, window = pace.rpm, pace.window
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "llmguard-demo.jsonl"
    html_path = out_dir / "llmguard-demo.html"
    log_path.write_text("")
    limit = f"{rpm} per {window} seconds"  # what the provider allows
    llmguard.configure(storage=f"file://{tempfile.mkdtemp(prefix='llmguard-demo-')}")
    llmguard.configure_logging(json=True, file=str(log_path))
    llmguard.warm_up(models=["gpt-4o", "gpt-4o-mini"])  # what a server does at start-up
    words = " ".join(["insight"] * 120)

    def reply(request: Any) -> str:
        return f"Summary: {words}"

    with FakeLLMServer(requests_per_window=rpm, window=window, reply=reply) as fake:
        client = llmguard.instrument(
            openai.OpenAI(base_url=fake.openai_base_url, api_key="demo", max_retries=0)
        )
        say(
            f"A fake OpenAI-compatible provider at {fake.url} allows {rpm} requests per "
            f"{window}s, and answers 429 past that.\n"
        )
        window_wait = progress.sleeper("the provider's rate window (@rate_limited)")
        retry_wait = progress.sleeper("the retry-after of a 429 (@retry_on_rate_limit)")

        @llmguard.cached(ttl="1h")
        @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", cheap_below_tokens=200)
        @llmguard.budget(usd=5, per="day", name="demo-daily")
        @llmguard.retry_on_rate_limit(max_tries=8, sleep=retry_wait)
        @llmguard.rate_limited(limit, name="provider", sleep=window_wait)
        def answer(question: str, *, model: str = "gpt-4o", max_tokens: int = 200) -> str:
            messages: list[Any] = [{"role": "user", "content": question}]
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens
            )
            return response.choices[0].message.content or ""

        say("1. Caching: the same three questions, asked three times each.")
        with llmguard.tags(feature="faq"):  # cost per feature: llmguard report --by tag:feature
            for _ in range(3):
                for question in QUESTIONS:
                    answer(question)
        info = answer.cache_info()
        say(
            f"   {info.misses} provider calls, {info.hits} answers from the cache, "
            f"saving {format_usd(info.saved_usd)}.\n"
        )

        say("2. Routing: short prompts go to gpt-4o-mini, a long report to gpt-4o.")
        with llmguard.tags(feature="summaries"):
            answer("Summarize: sales are up.")
            answer("Summarize: " + REPORT * 6)
        say(f"   models used: {', '.join(r.model or '?' for r in fake.requests[-2:])}.\n")

        burst = pace.burst
        say(
            f"3. A burst of {burst} distinct questions against the provider's limit, which is "
            "briefly overloaded as it starts."
        )
        fake.fail_next(2, 429, retry_after=pace.retry_after)
        burst_started = time.monotonic()
        with capture_calls() as calls, llmguard.tags(feature="burst"):
            for i in range(burst):
                progress.note = f" ({i}/{burst} answered)"
                answer(f"Burst question number {i}?")
        progress.note = ""
        waited_window = sum(e.get("rate_wait_s", 0) for e in calls.calls)
        waited_retry = sum(e.get("retry_wait_s", 0) for e in calls.calls)
        say(
            f"   all {burst} answered in {time.monotonic() - burst_started:.1f}s, none failed: "
            f"@rate_limited waited {waited_window:.1f}s for the window, and the "
            f"{len(calls.of('llm_retry'))} rate-limit errors of the overload were absorbed by "
            f"@retry_on_rate_limit ({waited_retry:.1f}s waiting what the provider asked).\n"
        )

        say("4. A runaway loop against a $0.01 budget.")

        @llmguard.budget(usd="0.01", per="day", name="runaway")
        @llmguard.retry_on_rate_limit(max_tries=8, sleep=retry_wait)
        @llmguard.rate_limited(limit, name="provider", sleep=window_wait)
        def runaway(i: int, *, model: str = "gpt-4o", max_tokens: int = 400) -> str:
            messages: list[Any] = [{"role": "user", "content": f"Step {i}: keep going"}]
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens
            )
            return response.choices[0].message.content or ""

        steps = 0
        try:
            with llmguard.tags(feature="agent-loop"):
                for steps in range(1000):  # the loop a bug would run forever
                    runaway(steps)
        except llmguard.BudgetExceeded as exc:
            say(f"   stopped after {steps} calls: {exc}\n")

    counter = [0]
    report = build(read_events([str(log_path)], counter))
    report.skipped_lines += counter[0]  # malformed events were counted already
    html_path.write_text(render_html(report), encoding="utf-8")
    say(render_table(report))
    say(f"\nThe JSON log: {log_path}\nThe HTML report: {html_path}")
    say(f"Read it again any time: llmguard report {log_path} --by model --html report.html")
    say(f"(the demo took {time.monotonic() - started:.1f}s)")
    return log_path, html_path
