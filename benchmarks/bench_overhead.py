"""Overhead of llmguard's metering, in one run.

    python benchmarks/bench_overhead.py [--calls 20000] [--json results.json]

Measures, as median and p99 of single calls:
- a no-op function taking a 2 KB prompt, bare and with ``@track`` (tokens estimated with
  tiktoken, cost priced, one ``llm_call`` event rendered as JSON to /dev/null);
- the same with events dropped by the log level (llmguard's share without rendering);
- ``count_tokens`` of a 2 KB prompt alone (the floor under the estimate);
and ``import llmguard`` with ``python -X importtime`` (median of several fresh processes).
Every prompt is distinct, so no cache of any kind can flatter the figures.
Targets (issue 2): ``@track`` adds <= 60 us median; ``import llmguard`` <= 150 ms.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import llmguard  # noqa: E402

SENTENCES = (
    "Quarterly revenue grew twelve percent while operating costs fell. ",
    "The board asked for a plain-English summary of the risks. ",
    "Customer churn rose slightly in the enterprise segment. ",
    "Cloud spending on inference doubled after the product launch. ",
)


def prompts(n: int, size: int = 2048) -> list[str]:
    """``n`` distinct prompts of exactly ``size`` characters of English-like text."""
    out = []
    for i in range(n):
        text = f"Request {i}: " + "".join(SENTENCES[(i + j) % 4] for j in range(size // 50 + 2))
        out.append(text[:size])
    return out


def per_call_ns(fn: Callable[[str], object], inputs: list[str]) -> list[int]:
    timings = []
    clock = time.perf_counter_ns
    for text in inputs:
        start = clock()
        fn(text)
        timings.append(clock() - start)
    return timings


def summary(ns: list[int]) -> dict[str, float]:
    ordered = sorted(ns)
    return {
        "median_us": round(statistics.median(ordered) / 1000, 2),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] / 1000, 2),
    }


def import_time_ms(runs: int = 7) -> float:
    values = []
    for _ in range(runs):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import llmguard"],
            capture_output=True,
            text=True,
            check=True,
        )
        for line in result.stderr.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "llmguard":
                values.append(int(parts[1]) / 1000)
    return round(statistics.median(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    llmguard.configure_logging(json=True, file=open(os.devnull, "w"))  # noqa: SIM115

    def noop(text: str, *, model: str = "gpt-4o") -> str:
        return "ok"

    tracked = llmguard.track(noop)
    warm = prompts(500)
    for text in warm:  # load the encoding and the price once, as a running service has
        tracked(text)
        llmguard.count_tokens(text, "gpt-4o")

    inputs = prompts(args.calls)
    gc.collect()
    bare = summary(per_call_ns(noop, inputs))
    track = summary(per_call_ns(tracked, inputs))
    count = summary(per_call_ns(lambda text: llmguard.count_tokens(text, "gpt-4o"), inputs))
    # The same with events dropped by the log level: llmguard's share without rendering.
    llmguard.configure_logging(json=True, file=open(os.devnull, "w"), level="CRITICAL")  # noqa: SIM115
    silent = llmguard.track(noop)
    silent(warm[0])
    filtered = summary(per_call_ns(silent, inputs))
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, {platform.platform()}",
        "calls": args.calls,
        "bare_noop": bare,
        "track_2kb_estimated": track,
        "track_overhead_median_us": round(track["median_us"] - bare["median_us"], 2),
        "track_2kb_events_filtered": filtered,
        "count_tokens_2kb": count,
        "import_llmguard_ms": import_time_ms(),
    }
    for key, value in results.items():
        print(f"{key:28} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
