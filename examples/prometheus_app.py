"""Prometheus metrics from an application with several worker processes: each worker makes
cached, routed, budgeted, retried and rate-limited calls, and the main process serves the
sum over all workers on http://127.0.0.1:9464/metrics (prometheus_client's multiprocess
mode). Offline against llmguard's fake provider, which answers a few 429s; with the real API
when OPENAI_API_KEY is set. Point Prometheus at it, and load examples/grafana-dashboard.json
into Grafana.

    pip install "llmguard[openai,prometheus]"
    python examples/prometheus_app.py --log llmguard.jsonl   # serves until Ctrl-C
    llmguard report llmguard.jsonl                           # the same totals
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from openai import OpenAI

import llmguard

TENANTS = ("acme", "globex", "initech")
TOPICS = ("invoices", "churn", "pricing", "hiring", "roadmap")
client: OpenAI | None = None  # each worker process makes its own


def tenant(name: str) -> None:
    """Label this call's event (and so its metrics) with the tenant it serves."""
    call = llmguard.current_call()
    if call is not None:
        call.set(tenant=name)


# Declared at import: the main process knows the budgets too, and serves their gauges.
@llmguard.cached(ttl="1h")
@llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda text, **_: len(text) < 60)
@llmguard.budget(usd="5", per="day", name="example-daily")
@llmguard.retry_on_rate_limit(max_tries=6)
@llmguard.rate_limited("10/second", name="example-provider")
def summarize(text: str, customer: str, *, model: str = "gpt-4o", max_tokens: int = 60) -> str:
    tenant(customer)
    assert client is not None
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Summarize: {text}"}],
        max_tokens=max_tokens,
    )
    return response.choices[0].message.content or ""


@llmguard.budget(usd="0.001", per="total", name="example-drafts")
@llmguard.retry_on_rate_limit(max_tries=6)
def draft(topic: str, customer: str, *, model: str = "gpt-4o", max_tokens: int = 20) -> str:
    tenant(customer)
    assert client is not None
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Draft a note on {topic}"}],
        max_tokens=max_tokens,
    )
    return response.choices[0].message.content or ""


def worker(number: int, base_url: str | None, calls: int, log: str | None) -> None:
    """One worker process: its own client, its own metrics (written to the shared folder)."""
    global client
    import llmguard.prometheus

    if log:
        llmguard.configure_logging(json=True, file=log)
    llmguard.prometheus.instrument(labels=("tenant",))
    client = llmguard.instrument(
        OpenAI(max_retries=0)
        if base_url is None
        else OpenAI(base_url=base_url, api_key="offline", max_retries=0)
    )
    for i in range(calls):
        customer = TENANTS[(number + i) % len(TENANTS)]
        topic = TOPICS[i % len(TOPICS)]
        if i % 3 == 0:  # a long report: the strong model
            text = f"The {topic} report for {customer}: " + "figures and commentary. " * 12
        else:  # a short note: the cheap model; the same note twice is a cache hit
            text = f"{topic} note for {customer}"
        summarize(text, customer)
        if i % 3 == 1:
            try:
                draft(topic, customer)
            except llmguard.BudgetExceeded:
                pass  # the drafts budget is small on purpose: refusals are metrics too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9464, help="where /metrics is served")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--calls", type=int, default=12, help="calls of summarize per worker")
    parser.add_argument("--log", help="append the workers' events to this JSON-lines file")
    parser.add_argument("--serve-seconds", type=float, default=None, help="default: forever")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # run as worker n
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.base_url, args.calls, args.log)
        return

    # prometheus_client's multiprocess mode: every process writes its values to files in
    # this folder (set before prometheus_client is imported, and empty at start).
    folder = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        folder = tempfile.mkdtemp(prefix="llmguard-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from prometheus_client import start_http_server

    import llmguard.prometheus
    from llmguard.testing import FakeLLMServer

    metrics = llmguard.prometheus.instrument(labels=("tenant",))
    server, _ = start_http_server(args.port, addr="127.0.0.1", registry=metrics.registry)
    print(f"serving http://127.0.0.1:{server.server_port}/metrics", flush=True)

    for name in ("example-daily", "example-drafts"):
        llmguard.reset_budget(name)  # a fresh run starts from fresh budgets
    fake = None
    if not os.environ.get("OPENAI_API_KEY"):
        fake = FakeLLMServer(reply=lambda r: "A short summary of it.").start()
        fake.fail_next(3, 429, retry_after=0.05)  # the provider pushes back a little
    # Worker processes, as a pre-forking server (gunicorn, uvicorn --workers) has them.
    command = [sys.executable, os.path.abspath(__file__), "--calls", str(args.calls)]
    if args.log:
        command += ["--log", args.log]
    if fake is not None:
        command += ["--base-url", fake.openai_base_url]
    workers = [subprocess.Popen([*command, "--worker", str(n)]) for n in range(args.workers)]
    failed = [code for code in (p.wait() for p in workers) if code != 0]
    status = llmguard.budget_status("example-daily")
    print(
        f"done: {args.workers} workers, spent ${status.spent_usd} of the daily $5"
        + (f"; {len(failed)} workers failed" if failed else ""),
        flush=True,
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as with Ctrl-C
    try:
        if args.serve_seconds is None:
            while True:
                time.sleep(3600)
        time.sleep(args.serve_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        if fake is not None:
            fake.stop()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
