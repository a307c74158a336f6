"""How close to a provider's limit each client gets, in one run.

    python benchmarks/bench_ratelimit.py [--rpm 120 --window 10 --requests 240]

The fake provider enforces ``--rpm`` requests (and a token budget) per ``--window`` seconds,
answering 429s with ``retry-after`` past them, like OpenAI. 4 processes x 8 threads send a
fixed workload of ``--requests`` chat completions through the real ``openai`` SDK, four ways:

1. the bare SDK (``max_retries=0``);
2. the SDK with its default retries;
3. ``@retry_on_rate_limit`` only (SDK retries off);
4. ``@retry_on_rate_limit`` over ``@rate_limited`` set to the provider's limit (local
   storage, shared by the four processes).

For each: completed and failed calls, 429s the provider sent, and the achieved throughput
as a percentage of the provider's limit (the time the workload needs at exactly the limit,
over the time from the first request's arrival to the last's; only when every call
completed). Target for 4: >= 95% of the limit, 0 failed,
<= 1% of requests answered 429.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

PROCESSES, THREADS = 4, 8
MESSAGES = [{"role": "user", "content": "Summarize the quarterly report in one line."}]


def _client(base_url: str, retries: int) -> Any:
    import openai

    return openai.OpenAI(base_url=base_url, api_key="bench", max_retries=retries, timeout=120)


def worker(variant: str, base_url: str, rate: str, count: int, cache_dir: str, out: Any) -> None:
    os.environ["LLMGUARD_CACHE_DIR"] = cache_dir
    import llmguard

    llmguard.configure_logging(json=True, file=open(os.devnull, "w"), level="CRITICAL")  # noqa: SIM115
    client = _client(base_url, 2 if variant == "sdk-retries" else 0)

    def ask() -> Any:
        return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)

    if variant == "llmguard-retry":
        ask = llmguard.retry_on_rate_limit(max_tries=20, max_time=600)(ask)
    elif variant == "llmguard-limit+retry":
        ask = llmguard.retry_on_rate_limit(max_tries=20, max_time=600)(
            llmguard.rate_limited(rate, name="provider", max_wait=600)(ask)
        )
    # Warm the SDK (its lazily imported chat resources, its HTTP stack) without spending the
    # provider's limit, as a running service's client is.
    _ = client.chat.completions
    try:
        client.models.list()  # the fake answers 501: no limit spent
    except Exception:
        pass
    done = failed = 0
    lock = threading.Lock()
    todo = iter(range(count))

    def loop() -> None:
        nonlocal done, failed
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                ask()
                ok = True
            except Exception:
                ok = False
            with lock:
                done += ok
                failed += not ok

    threads = [threading.Thread(target=loop) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((done, failed))


def run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from llmguard.testing import FakeLLMServer

    with (
        FakeLLMServer(
            requests_per_window=args.rpm, tokens_per_window=args.rpm * 1000, window=args.window
        ) as fake,
        tempfile.TemporaryDirectory() as cache,
    ):
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        share = args.requests // PROCESSES
        rate = f"{args.rpm} per {args.window} seconds"
        processes = [
            context.Process(
                target=worker, args=(variant, fake.openai_base_url, rate, share, cache, out)
            )
            for _ in range(PROCESSES)
        ]
        started = time.monotonic()
        for process in processes:
            process.start()
        results = [out.get(timeout=1800) for _ in processes]
        elapsed = time.monotonic() - started
        for process in processes:
            process.join()
        statuses = fake.statuses
        arrivals = sorted(request.at for request in fake.requests)
    completed = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    # At the provider's limit, N requests arrive in ceil(N / rpm) bursts a window apart:
    # the last burst (ceil(N / rpm) - 1) windows after the first. Throughput as a share of
    # the limit is that ideal span over the span it took (first to last arrival).
    ideal = (math.ceil(completed / args.rpm) - 1) * args.window
    span = arrivals[-1] - arrivals[0] if arrivals else 0.0
    return {
        "variant": variant,
        "completed": completed,
        "failed": failed,
        "requests_sent": len(statuses),
        "429s": statuses.count(429),
        "429_share": statuses.count(429) / max(len(statuses), 1),
        "seconds": elapsed,
        "throughput_pct_of_limit": 100 * ideal / span
        if span and completed == args.requests
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rpm", type=int, default=120, help="requests the provider allows per window"
    )
    parser.add_argument("--window", type=int, default=10, help="the provider's window in seconds")
    parser.add_argument(
        "--requests", type=int, default=480, help="the fixed workload (a multiple of --rpm)"
    )
    parser.add_argument("--only", help="run one variant")
    args = parser.parse_args()
    variants = ["bare-sdk", "sdk-retries", "llmguard-retry", "llmguard-limit+retry"]
    print(
        f"provider limit: {args.rpm} requests per {args.window} s; workload {args.requests} "
        f"requests, {PROCESSES} processes x {THREADS} threads"
    )
    header = ("variant", "completed", "failed", "sent", "429s", "429 %", "seconds", "% of limit")
    print("{:22} {:>9} {:>6} {:>5} {:>5} {:>6} {:>8} {:>10}".format(*header))
    for variant in [args.only] if args.only else variants:
        r = run(variant, args)
        row = (
            r["variant"],
            r["completed"],
            r["failed"],
            r["requests_sent"],
            r["429s"],
            f"{100 * r['429_share']:.1f}%",
            f"{r['seconds']:.1f}",
            f"{r['throughput_pct_of_limit']:.1f}%",
        )
        print("{:22} {:>9} {:>6} {:>5} {:>5} {:>6} {:>8} {:>10}".format(*row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
