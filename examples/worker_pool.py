"""A multi-process worker pool sharing one rate limit and one budget through Redis: four
processes summarize a queue of documents, never together faster than the limit, and all
stop when the shared budget is spent. Offline against llmguard's fake provider; with the
real API when OPENAI_API_KEY is set. Needs a Redis (REDIS_URL, default
redis://127.0.0.1:6379/0).

    pip install "llmguard[redis,openai]"
    python examples/worker_pool.py
"""

from __future__ import annotations

import multiprocessing
import os

from openai import OpenAI

import llmguard

REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


client: OpenAI | None = None  # each worker process makes its own


# Declared at import, so the main process knows the budget too (to reset it, or to read it
# with llmguard.budget_status, which any process can also do from the ledger in Redis).
@llmguard.budget(usd="0.02", per="total", name="worker-pool-example", storage=REDIS)
@llmguard.retry_on_rate_limit(max_tries=6)
@llmguard.rate_limited("30/minute", name="worker-pool-example", storage=REDIS)
def summarize(doc: str, *, model: str = "gpt-4o", max_tokens: int = 200) -> str:
    assert client is not None
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Summarize: {doc}"}],
        max_tokens=max_tokens,
    )
    return response.choices[0].message.content or ""


def worker(
    base_url: str | None, documents: list[str], out: multiprocessing.Queue[tuple[int, int]]
) -> None:
    global client
    client = llmguard.instrument(
        OpenAI(max_retries=0)
        if base_url is None
        else OpenAI(base_url=base_url, api_key="offline", max_retries=0)
    )
    done = stopped = 0
    for doc in documents:
        try:
            summarize(doc)
            done += 1
        except llmguard.BudgetExceeded:
            stopped += 1
    out.put((done, stopped))


def main() -> None:
    from llmguard.testing import FakeLLMServer

    llmguard.reset_budget("worker-pool-example")  # a fresh run starts from a fresh budget
    fake = (
        None
        if os.environ.get("OPENAI_API_KEY")
        else FakeLLMServer(reply=lambda r: "word " * 180).start()
    )
    documents = [f"Report {i}" for i in range(24)]
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[int, int]] = context.Queue()
    workers = [
        context.Process(
            target=worker,
            args=(None if fake is None else fake.openai_base_url, documents[i::4], out),
        )
        for i in range(4)
    ]
    for process in workers:
        process.start()
    results = [out.get(timeout=300) for _ in workers]
    for process in workers:
        process.join()
    done = sum(r[0] for r in results)
    stopped = sum(r[1] for r in results)
    print(f"{done} documents summarized, {stopped} refused once the shared $0.02 budget was spent")
    print(f"spent ${llmguard.budget_status('worker-pool-example').spent_usd} of $0.02")
    if fake is not None:
        fake.stop()


if __name__ == "__main__":
    main()
