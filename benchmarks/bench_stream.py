"""Per-chunk overhead of llmguard's stream metering.

    python benchmarks/bench_stream.py [--chunks 200000]

Iterates the same list of real ``openai`` ``ChatCompletionChunk`` objects (one word each,
a usage chunk last) bare and through a ``@track``-decorated function's metered stream, and
reports the median per-chunk cost of each over repeated runs. Target (issue 7): <= 5 us of
overhead per chunk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import llmguard  # noqa: E402


def chunks(n: int) -> list[object]:
    from openai.types.chat import ChatCompletionChunk

    base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini"}
    out = [
        ChatCompletionChunk.model_validate(
            {
                **base,
                "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}],
            }
        )
        for _ in range(n)
    ]
    usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10}
    out.append(ChatCompletionChunk.model_validate({**base, "choices": [], "usage": usage}))
    return list(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    llmguard.configure_logging(json=True, file=open(os.devnull, "w"))  # noqa: SIM115
    data = chunks(args.chunks)

    @llmguard.track
    def stream(model: str = "gpt-4o-mini") -> object:
        return iter(data)

    bare, metered = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        for _chunk in iter(data):
            pass
        bare.append((time.perf_counter() - started) / len(data) * 1e6)
        started = time.perf_counter()
        for _chunk in stream():  # type: ignore[attr-defined]
            pass
        metered.append((time.perf_counter() - started) / len(data) * 1e6)
    b, m = statistics.median(bare), statistics.median(metered)
    print(f"bare iteration      {b:.3f} us per chunk")
    print(f"metered by llmguard {m:.3f} us per chunk")
    print(f"overhead            {m - b:.3f} us per chunk (target <= 5 us)")


if __name__ == "__main__":
    main()
