"""What subscribing to llmguard's events costs a call, in one run.

    python benchmarks/bench_subscribe.py [--calls 2000] [--rounds 25] [--json results.json]

A ``@track``-decorated function that returns an OpenAI-shaped response dict (real usage: no
tokenizer in the way), its ``llm_call`` event dropped by the log level, so that what is left
is llmguard's own work. Measured, interleaved round by round so that the machine's drift hits
every variant alike (median over rounds of each round's median per call):

- nothing subscribed;
- one subscriber that does nothing (the cost of the hook itself);
- one subscriber appending each event to a list;
- ``llmguard.prometheus.instrument()`` (a fresh registry) and ``llmguard.otel.instrument()``
  (the SDK's MeterProvider with an in-memory reader, TracerProvider without exporters), when
  installed: what the exporters add.

Run it with ``PYTHONPATH=<an older llmguard>`` to measure that version's bare call (the
variants it lacks are skipped): "nothing subscribed" must cost the same as before the hook.
Targets (issue 15): nothing subscribed, no measurable overhead; one subscriber <= 2 us a call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import llmguard  # noqa: E402

RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150},
}


@llmguard.track
def ask(question: str, *, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return RESPONSE


def round_median_ns(calls: int) -> float:
    clock = time.perf_counter_ns
    timings = []
    for _ in range(calls):
        start = clock()
        ask("q")
        timings.append(clock() - start)
    return statistics.median(timings)


def variants() -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
    """name -> (start, stop): what each variant switches on before its round and off after."""
    found: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
        "nothing subscribed": (lambda: None, lambda _: None)
    }
    subscribe = getattr(llmguard, "subscribe", None)
    if subscribe is None:  # an llmguard from before the hook
        return found

    def nothing(event: dict[str, Any]) -> None:
        pass

    seen: list[dict[str, Any]] = []
    found["one subscriber (does nothing)"] = (lambda: subscribe(nothing), lambda s: s.unsubscribe())
    found["one subscriber (list.append)"] = (
        lambda: subscribe(seen.append),
        lambda s: (s.unsubscribe(), seen.clear()),
    )
    try:
        import prometheus_client

        from llmguard import prometheus

        found["llmguard.prometheus"] = (
            lambda: prometheus.instrument(prometheus_client.CollectorRegistry()),
            lambda m: m.uninstrument(),
        )
    except ImportError:
        pass
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        from llmguard import otel

        meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        tracers = TracerProvider()
        found["llmguard.otel (metrics and spans)"] = (
            lambda: otel.instrument(meters, tracers),
            lambda i: i.uninstrument(),
        )
        found["llmguard.otel (metrics only)"] = (
            lambda: otel.instrument(meters, traces=False),
            lambda i: i.uninstrument(),
        )
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and variant")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--bare", action="store_true", help="only 'nothing subscribed' (to compare versions)"
    )
    args = parser.parse_args()

    llmguard.configure_logging(json=True, file=open(os.devnull, "w"), level="CRITICAL")  # noqa: SIM115
    for _ in range(2000):  # the price, the logger: loaded once, as in a running service
        ask("q")
    chosen = variants()
    if args.bare:
        chosen = {"nothing subscribed": chosen["nothing subscribed"]}
    medians: dict[str, list[float]] = {name: [] for name in chosen}
    gc.collect()
    for _ in range(args.rounds):
        for name, (start, stop) in chosen.items():
            handle = start()
            ask("q")
            medians[name].append(round_median_ns(args.calls))
            stop(handle)
    base = statistics.median(medians["nothing subscribed"])
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, {platform.platform()}",
        "llmguard": getattr(llmguard, "__file__", "?"),
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "per_call_us": {},
    }
    print(f"{'variant':<36} {'per call':>10} {'added':>9} {'rounds min-max':>18}")
    for name, values in medians.items():
        median = statistics.median(values)
        results["per_call_us"][name] = {
            "median": round(median / 1000, 3),
            "added": round((median - base) / 1000, 3),
            "min": round(min(values) / 1000, 3),
            "max": round(max(values) / 1000, 3),
        }
        print(
            f"{name:<36} {median / 1000:>8.2f}us {(median - base) / 1000:>+7.2f}us "
            f"{min(values) / 1000:>8.2f}-{max(values) / 1000:.2f}us"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
