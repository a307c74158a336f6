"""A batch through README's whole stack under a provider's rate limit, in one run.

    python benchmarks/bench_batch.py [--calls 1000 --rpm 100 --window 10]

README's first example (``@cached``, ``@route_model``, ``@budget``, ``@retry_on_rate_limit``,
``@rate_limited`` set to the provider's limit, default settings otherwise) over the real
``openai`` SDK (async, ``max_retries=0``), ``--calls`` distinct documents submitted at once
(``asyncio.gather``), against llmguard's fake provider enforcing ``--rpm`` requests per
``--window`` seconds (and ``2000 x --rpm`` tokens) with OpenAI's 429s; the local limits are
set to the provider's. All state lives in a temporary folder.

Prints: failed calls; retries, and how many of them were spurious (retrying llmguard's own
limiter, not a provider error); 429s the provider sent; the most requests any window held
(at most the limit); and the % of the limit reached: steady-state throughput (requests
after the first window's burst over the time from the first to the last arrival) as a
fraction of the limit's rate.
Targets (issue 11): 0 failed, 0 spurious retries, >= 95% of the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))


def max_in_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    best, first = 0, 0
    for last, at in enumerate(starts):
        while at - starts[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def provider(rpm: int, tpm: int, window: float, pipe: Any) -> None:
    """The fake provider in a process of its own, as a real one is (in the client's process
    its threads would compete with the batch for the GIL): sends its URL, and when told to
    stop, what it saw: [(message, arrival time)] and the statuses it answered."""
    import http.server

    from llmguard.testing import FakeLLMServer

    # A provider's front end accepts many pending connections; the fake server keeps
    # socketserver's default backlog of 5, which a batch's burst of connections overflows
    # (connection errors and retries that say nothing about llmguard).
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    with FakeLLMServer(rpm=rpm, tpm=tpm, window=window, reply=lambda _: "A short summary.") as fake:
        pipe.send(fake.openai_base_url)
        pipe.recv()
        seen = [
            (request.body["messages"][0]["content"], request.at)
            for request in fake.requests
            if request.path.endswith("/completions")
        ]
        pipe.send((seen, list(fake.statuses)))


async def run(calls: int, rpm: int, window: float) -> None:
    import multiprocessing

    import openai

    import llmguard
    from llmguard.testing import capture_calls

    granted: dict[str, float] = {}
    tpm = rpm * 2000  # per window: the request limit is the one that binds
    pipe, child_end = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=provider, args=(rpm, tpm, window, child_end)
    )
    server.start()
    try:
        base_url = pipe.recv()
        client = llmguard.instrument(
            openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
        )

        @llmguard.cached(ttl="7d")
        @llmguard.route_model(
            "gpt-4o",
            cheap="gpt-4o-mini",
            when=lambda text, **_: len(text) < 2000,
            fallbacks=("gpt-4o-mini",),
        )
        @llmguard.budget(usd=20, per="day")
        @llmguard.retry_on_rate_limit(max_tries=6)
        @llmguard.rate_limited(
            f"{rpm} per {window:g} seconds", tokens=f"{tpm} per {window:g} seconds"
        )
        async def summarize(text: str, *, model: str = "gpt-4o") -> str:
            granted.setdefault(f"Summarize: {text}", time.time())  # the limiter let it go
            response = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Summarize: {text}"}]
            )
            return response.choices[0].message.content or ""

        # Warm the SDK (its lazily imported chat resources, its HTTP stack) without spending
        # the provider's limit, as a running service's client is: a cold first request is
        # late by a second, and the provider's window then sees two batches at once.
        _ = client.chat.completions
        try:
            await client.models.list()  # the fake answers 501: no limit spent
        except Exception:
            pass
        documents = [f"Document {i}: quarterly figures for region {i % 7}." for i in range(calls)]
        started = time.monotonic()
        with capture_calls() as events:
            results = await asyncio.gather(
                *(summarize(doc) for doc in documents), return_exceptions=True
            )
        elapsed = time.monotonic() - started
        pipe.send("stop")
        seen, statuses = pipe.recv()
    finally:
        server.join(30)
        if server.is_alive():
            server.kill()
    first_arrival: dict[str, float] = {}
    for text, at in seen:
        first_arrival.setdefault(text, at)
    delays = sorted(at - granted[text] for text, at in first_arrival.items())
    arrivals = [at for _, at in seen]

    failed = [r for r in results if isinstance(r, BaseException)]
    retries = events.of("llm_retry")
    provider_429s = statuses.count(429)
    spurious = sum(1 for r in retries if r.get("error") in ("RateLimitExceeded", "RequestTooLarge"))
    first, last = min(arrivals), max(arrivals)
    steady = (len(arrivals) - rpm) / (last - first) if last > first else 0.0
    reached = steady * window / rpm
    queued = sum(e.get("rate_wait_s") or 0 for e in events.calls)
    print(f"calls                      {calls} submitted at once, {elapsed:.1f}s wall time")
    print(f"failed                     {len(failed)}")
    if failed:
        kinds = sorted({type(f).__name__ for f in failed})
        print(f"  errors                   {', '.join(kinds)}")
    print(f"retries                    {len(retries)} ({spurious} spurious: of a local refusal)")
    reasons: dict[str, int] = {}
    for r in retries:
        label = f"{r.get('reason')}/{r.get('status')}/{r.get('error')}"
        reasons[label] = reasons.get(label, 0) + 1
    if reasons:
        print(f"  by reason                {reasons}")
    print(f"provider 429s              {provider_429s} of {len(statuses)} requests")
    print(f"most requests in a window  {max_in_window(arrivals, window)} (limit {rpm})")
    print(f"% of the limit reached     {reached:.1%} (steady state: {steady:.2f}/s)")
    print(f"rate-limit queueing        {queued:.0f}s summed over calls")
    if delays:
        p50, p95 = delays[len(delays) // 2], delays[int(len(delays) * 0.95)]
        print(
            f"grant to arrival           p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
            f"max {delays[-1] * 1000:.0f} ms (the limiter's margin: {window * 20:.0f} ms)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rpm", type=int, default=100, help="requests allowed per window")
    parser.add_argument("--window", type=float, default=10.0, help="the window, in seconds")
    args = parser.parse_args()
    print(
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"provider limit {args.rpm} per {args.window:g}s"
    )
    with tempfile.TemporaryDirectory() as folder:
        os.environ["LLMGUARD_CACHE_DIR"] = folder  # the default local storage: ours alone
        os.environ.pop("LLMGUARD_STORAGE", None)
        import llmguard

        llmguard.configure_logging(json=True, file=open(os.devnull, "w"))  # noqa: SIM115
        asyncio.run(run(args.calls, args.rpm, args.window))


if __name__ == "__main__":
    main()
