"""Cost of a cache hit, in one run.

    python benchmarks/bench_cache.py [--calls 20000] [--redis redis://127.0.0.1:6379/0]

A function taking a 2 KB prompt and returning a 500-character answer, called repeatedly
with the same prompt, so every call after the first is a hit. Median and p99 of single
calls for: ``@cached`` on local disk (its ``llm_call`` event rendered as JSON to /dev/null,
and with events dropped by the log level), ``@cached`` on Redis over loopback,
``diskcache.Cache.memoize``, ``joblib.Memory`` (if installed), ``functools.lru_cache`` and
a raw ``diskcache`` get (the floor for anything on disk). On Redis it writes only under a
key prefix of its own run (``?prefix=llmguard-bench:<random>:``) and deletes those keys at
the end: nothing else in the database is touched.
Targets (issue 3): ``@cached`` hit <= 40 us median on local disk, <= 300 us with Redis.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import per_call_ns, prompts, summary

import llmguard

ANSWER = "A concise summary of the report. " * 15


def answer(text: str, *, model: str = "gpt-4o") -> str:
    return ANSWER


def bench(name: str, fn: object, text: str, calls: int) -> None:
    fn(text)  # type: ignore[operator]  # the miss
    result = summary(per_call_ns(fn, [text] * calls))  # type: ignore[arg-type]
    print(f"{name:44} median {result['median_us']:8.2f} us   p99 {result['p99_us']:8.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    print(f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    text = prompts(1)[0]
    devnull = open(os.devnull, "w")  # noqa: SIM115
    with tempfile.TemporaryDirectory() as folder:
        import diskcache

        llmguard.configure_logging(json=True, file=devnull)
        local = llmguard.cached(storage=f"file://{folder}/llmguard")(answer)
        bench("@cached, local disk (event rendered)", local, text, args.calls)
        llmguard.configure_logging(json=True, file=devnull, level="CRITICAL")
        quiet = llmguard.cached(storage=f"file://{folder}/llmguard-quiet")(answer)
        bench("@cached, local disk (event filtered)", quiet, text, args.calls)
        llmguard.configure_logging(json=True, file=devnull)
        separator = "&" if "?" in args.redis else "?"
        redis_uri = f"{args.redis}{separator}prefix=llmguard-bench:{secrets.token_hex(6)}:"
        try:
            remote = llmguard.cached(storage=redis_uri, namespace="bench")(answer)
            bench("@cached, Redis on loopback (event rendered)", remote, text, args.calls // 4)
        except llmguard.StorageError as exc:
            print(f"@cached, Redis: skipped ({exc})")
        finally:
            try:
                llmguard.open_storage(redis_uri).clear()  # this run's keys, and only those
            except llmguard.StorageError:
                pass

        dc = diskcache.Cache(f"{folder}/diskcache")
        bench("diskcache.Cache.memoize", dc.memoize()(answer), text, args.calls)
        try:
            import joblib

            memory = joblib.Memory(f"{folder}/joblib", verbose=0)
            bench("joblib.Memory.cache", memory.cache(answer), text, args.calls // 10)
        except ImportError:
            print("joblib.Memory: skipped (pip install joblib)")
        bench("functools.lru_cache", functools.lru_cache(maxsize=None)(answer), text, args.calls)
        raw = diskcache.Cache(f"{folder}/raw")
        raw.set("key", ANSWER)
        bench("raw diskcache get (the floor)", lambda _t: raw.get("key"), text, args.calls)


if __name__ == "__main__":
    main()
