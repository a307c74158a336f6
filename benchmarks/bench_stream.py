"""What streaming through llmguard costs, in one run.

    python benchmarks/bench_stream.py [--chunks 200000]

1. Per-chunk overhead of metering: the same list of real ``openai`` ``ChatCompletionChunk``
   objects (one word each, a usage chunk last) iterated bare and through a
   ``@track``-decorated function's metered stream.
2. Per-chunk overhead of a cached replay: those chunks replayed by an ``@cached`` hit
   (rebuilt from the local storage, metered) against iterating them bare.
3. Time to first chunk against the fake provider: the bare SDK vs the full stack
   (cached miss, route, budget, retry, rate limit).
Target (issue 7): <= 5 us of overhead per chunk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
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
    print(f"bare iteration            {b:.3f} us per chunk")
    print(f"metered by llmguard       {m:.3f} us per chunk  (overhead {m - b:.3f} us)")

    replay_chunks = data[: min(len(data), 20_000)]
    with tempfile.TemporaryDirectory() as folder:

        @llmguard.cached(storage=f"file://{folder}/c")
        def cached_stream(model: str = "gpt-4o-mini") -> object:
            return iter(replay_chunks)

        for _chunk in cached_stream():  # type: ignore[attr-defined]  # the miss stores them
            pass
        replayed = []
        for _ in range(args.runs):
            started = time.perf_counter()
            for _chunk in cached_stream():  # type: ignore[attr-defined]
                pass
            replayed.append((time.perf_counter() - started) / len(replay_chunks) * 1e6)
    r = statistics.median(replayed)
    print(f"cached replay             {r:.3f} us per chunk  (overhead {r - b:.3f} us)")

    from llmguard.testing import FakeLLMServer

    with FakeLLMServer() as fake, tempfile.TemporaryDirectory() as folder:
        client = fake.openai_client()
        messages = [{"role": "user", "content": "first chunk please"}]

        def bare_call(question: str, *, model: str = "gpt-4o") -> object:
            return client.chat.completions.create(model=model, messages=messages, stream=True)

        full = llmguard.guard(
            cache={"storage": f"file://{folder}/c"},
            route={"default": "gpt-4o"},
            budget={"usd": 100, "storage": f"file://{folder}/b"},
            retry=True,
            rate={"rate": "100000/minute", "storage": "memory://ttfc"},
        )(bare_call)

        def first_chunk(fn: object, n: int) -> float:
            times = []
            for i in range(n):
                started = time.perf_counter()
                stream = fn(f"question {i}")  # type: ignore[operator]  # distinct: always a miss
                next(iter(stream))
                times.append((time.perf_counter() - started) * 1e3)
                for _chunk in stream:
                    pass
            return statistics.median(times)

        with FakeLLMServer(reply=lambda request: "word " * 20_000) as long_fake:
            long_client = long_fake.openai_client()
            started = time.perf_counter()
            count = sum(
                1
                for _chunk in long_client.chat.completions.create(
                    model="gpt-4o", messages=messages, stream=True
                )
            )
            sdk = (time.perf_counter() - started) / count * 1e6
        print(f"the bare SDK, from the wire {sdk:.3f} us per chunk (for comparison)")
        first_chunk(bare_call, 20)  # warm up
        first_chunk(full, 20)
        print(f"time to first chunk, bare SDK     {first_chunk(bare_call, 200):.3f} ms")
        print(f"time to first chunk, full stack   {first_chunk(full, 200):.3f} ms")


if __name__ == "__main__":
    main()
