"""llmguard.prometheus: metrics read back from a registry, across worker processes, and through
a real Prometheus server scraping the example app (with the Grafana dashboard's queries)."""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import llmguard
import llmguard.prometheus
from llmguard.testing import CapturedEvents, FakeLLMServer, capture_calls

from ._helpers import VirtualClock, in_processes

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    yield CollectorRegistry()
    llmguard.prometheus.uninstrument()


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, found), value in samples(registry).items()
        if sample == name and set(labels.items()) <= set(found)
    )


def test_metrics_of_known_calls(
    registry: CollectorRegistry, fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    llmguard.prometheus.instrument(registry)
    client = fake_llm.openai_client()

    @llmguard.cached
    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda question: question == "hi")
    def ask(question: str, model: str = "gpt-4o") -> Any:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )

    ask("hello there")
    ask("hello there")  # a cache hit
    ask("hi")  # routed to the cheap model
    miss, _hit, routed = events.calls
    function = miss["function"]
    assert (miss["input_tokens"], miss["output_tokens"]) == (9, 6)
    cost = (9 * Decimal("2.50") + 6 * Decimal("10.00")) / 10**6
    assert miss["cost_usd"] == float(cost)
    labels = {"function": function, "model": "gpt-4o", "route": "default"}
    found = samples(registry)

    def value(name: str, **extra: str) -> float | None:
        return found.get((name, frozenset({**labels, **extra}.items())))

    assert value("llmguard_cost_usd_total") == float(cost)
    assert value("llmguard_tokens_total", type="input") == 9
    assert value("llmguard_tokens_total", type="output") == 6
    assert value("llmguard_calls_total", outcome="ok", cache="miss", error="") == 1
    hit_labels = {"function": function, "model": "gpt-4o", "route": ""}  # served before routing
    assert (
        found[
            (
                "llmguard_calls_total",
                frozenset({**hit_labels, "outcome": "ok", "cache": "hit", "error": ""}.items()),
            )
        ]
        == 1
    )
    assert found[
        ("llmguard_saved_usd_total", frozenset({**hit_labels, "by": "cache"}.items()))
    ] == float(cost)
    assert (
        "llmguard_tokens_total",
        frozenset({**hit_labels, "type": "input"}.items()),
    ) not in found
    cheap = {"function": function, "model": "gpt-4o-mini", "route": "cheap:when"}
    on_default = llmguard.calc_cost("gpt-4o", routed["input_tokens"], routed["output_tokens"])
    assert on_default is not None
    saving = on_default - Decimal(str(routed["cost_usd"]))
    assert found[
        ("llmguard_saved_usd_total", frozenset({**cheap, "by": "routing"}.items()))
    ] == float(saving)
    assert total(registry, "llmguard_cost_usd_total") == pytest.approx(
        sum(e["cost_usd"] for e in events.calls), rel=1e-12
    )
    assert total(registry, "llmguard_calls_total") == 3
    text = generate_latest(registry).decode()
    assert "# TYPE llmguard_cost_usd_total counter" in text
    assert "# TYPE llmguard_rate_limit_wait_seconds histogram" in text
    assert "# TYPE llmguard_budget_remaining_usd gauge" in text


def test_retries_and_rate_limit_waits(registry: CollectorRegistry, fake_llm: FakeLLMServer) -> None:
    llmguard.prometheus.instrument(registry)
    clock = VirtualClock()
    client = fake_llm.openai_client()
    fake_llm.fail_next(2, 429, retry_after=0.5)

    @llmguard.retry_on_rate_limit(jitter=None, sleep=clock.sleep)
    @llmguard.rate_limited("1/second", **clock.options())
    def ask(question: str, model: str = "gpt-4o-mini") -> Any:
        return client.chat.completions.create(model=model, messages=MESSAGES)

    with capture_calls() as events:
        ask("a")
    [event] = events.calls
    labels = {"function": event["function"], "model": "gpt-4o-mini", "route": ""}
    assert (
        total(registry, "llmguard_retries_total", status="429", reason="rate_limit", **labels) == 2
    )
    assert total(registry, "llmguard_rate_limit_wait_seconds_count", **labels) == 1
    assert total(registry, "llmguard_rate_limit_wait_seconds_sum", **labels) == event["rate_wait_s"]
    assert event["rate_wait_s"] > 0  # each retry waited for the 1/second window


def test_budgets_remaining_and_refusals(registry: CollectorRegistry) -> None:
    @llmguard.budget(usd="0.01", per="total", name="prom-team")
    def ask(text: str, model: str = "gpt-4o", max_tokens: int = 100) -> str:
        llmguard.record_usage(1000, 100)  # $0.0035
        return "ok"

    @llmguard.budget(usd="1", per="total", key=lambda user, **_: user, name="prom-users")
    def per_user(user: str, model: str = "gpt-4o", max_tokens: int = 100) -> str:
        llmguard.record_usage(1000, 100)
        return "ok"

    llmguard.prometheus.instrument(registry)
    ask("a")
    ask("b")
    per_user("alice")
    with pytest.raises(llmguard.BudgetExceeded):
        ask("c")
    found = samples(registry)
    assert found[("llmguard_budget_remaining_usd", frozenset({("budget", "prom-team")}))] == 0.003
    assert not any(
        "prom-users" in str(key) for key in found if key[0].startswith("llmguard_budget_rem")
    )
    assert total(registry, "llmguard_budget_refusals_total", budget="prom-team") == 1
    llmguard.prometheus.instrument(registry, budget_keys=True)  # replaces the first
    found = samples(registry)
    assert (
        found[
            (
                "llmguard_budget_remaining_usd",
                frozenset({("budget", "prom-users"), ("key", "alice")}),
            )
        ]
        == 0.9965
    )
    assert (
        found[("llmguard_budget_remaining_usd", frozenset({("budget", "prom-team"), ("key", "")}))]
        == 0.003
    )


def test_extra_labels_from_event_fields_and_tags(registry: CollectorRegistry) -> None:
    llmguard.prometheus.instrument(registry, labels=("tenant", "plan"))

    @llmguard.track(model="gpt-4o-mini")
    def ask(text: str, tenant: str) -> str:
        call = llmguard.current_call()
        assert call is not None
        call.set(tenant=tenant, tags={"plan": "pro" if tenant == "acme" else "free"})
        return "answer"

    ask("x", "acme")
    ask("y", "globex")
    ask("z", "acme")
    assert total(registry, "llmguard_calls_total", tenant="acme", plan="pro") == 2
    assert total(registry, "llmguard_calls_total", tenant="globex", plan="free") == 1


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (("tenant-id",), "not a Prometheus label name"),
        (("__name",), "not a Prometheus label name"),
        (("model",), "already a label"),
        (("cache",), "already a label"),
        (("tenant", "tenant"), "twice"),
    ],
)
def test_bad_label_names_fail_at_once(labels: tuple[str, ...], message: str) -> None:
    with pytest.raises(llmguard.ConfigurationError, match=message):
        llmguard.prometheus.instrument(CollectorRegistry(), labels=labels)


def test_instrument_again_replaces_and_uninstrument_stops(registry: CollectorRegistry) -> None:
    f = llmguard.track(model="gpt-4o-mini")(lambda text: "answer")
    llmguard.prometheus.instrument(registry)
    f("x")
    metrics = llmguard.prometheus.instrument(registry)  # no "Duplicated timeseries"
    f("x")
    assert total(registry, "llmguard_calls_total") == 1  # the new metrics start from zero
    metrics.uninstrument()
    f("x")
    assert samples(registry) == {}


def test_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(llmguard.MissingExtra, match=r'pip install "llmguard\[prometheus\]"'):
        llmguard.prometheus.instrument()


# -- several worker processes (prometheus_client's multiprocess mode) --------------------------


def _worker(ready: Any, calls: int) -> tuple[list[dict[str, Any]], str]:
    metrics = llmguard.prometheus.instrument()
    assert metrics.multiprocess

    @llmguard.cached
    @llmguard.track(model="gpt-4o-mini")
    def ask(text: str) -> str:
        return "an answer of a few words"

    with capture_calls() as events:
        for i in range(calls):
            ask(f"question {i % 4} from process {os.getpid() % 2}")
    ready.wait()  # every process has made its calls
    return list(events), generate_latest(metrics.registry).decode()


@pytest.mark.slow
def test_several_worker_processes_are_summed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    results = in_processes(_worker, 6, processes=3)
    events = [e for found, _ in results for e in found if e["event"] == "llm_call"]
    assert len(events) == 18
    spent = sum(e["cost_usd"] for e in events)
    assert spent > 0
    for _, text in results:  # whichever worker serves /metrics, it serves the sum
        families = {f.name: f for f in text_string_to_metric_families(text)}
        calls = sum(
            s.value for s in families["llmguard_calls"].samples if s.name.endswith("_total")
        )
        cost = sum(
            s.value for s in families["llmguard_cost_usd"].samples if s.name.endswith("_total")
        )
        hits = sum(
            s.value
            for s in families["llmguard_calls"].samples
            if s.name.endswith("_total") and s.labels["cache"] == "hit"
        )
        assert calls == 18
        assert cost == pytest.approx(spent, rel=1e-12)
        assert hits == sum(1 for e in events if e.get("cache") == "hit")


# -- a real Prometheus server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


class Lines:
    """A subprocess's stdout, read line by line in a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r}; got {self.seen}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def _panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, Grafana's variables given the values an
    unfiltered dashboard has ("All")."""
    values = {
        "$__rate_interval": "1m",
        "$__range": "5m",
        "$function": ".*",
        "$model": ".*",
        "$tenant": ".*",
    }
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"an unknown variable in {panel['title']!r}: {expr}"
            found.append((panel["title"], expr))
    return found


@pytest.mark.slow
def test_prometheus_scrapes_the_example_app_and_the_dashboard_has_data(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus server binary is not installed (Debian: apt-get install prometheus; "
            ".ci/run installs it)"
        )
    app_port, prometheus_port = _free_port(), _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: llmguard-example\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{app_port}']\n"
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115 - closed with the process
    )
    api = f"http://127.0.0.1:{prometheus_port}"
    log = tmp_path / "events.jsonl"
    app: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 20
        while True:  # ready before the app starts: it scrapes the whole run
            try:
                urllib.request.urlopen(f"{api}/-/ready", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "Prometheus did not get ready"
                time.sleep(0.1)
        app = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "examples" / "prometheus_app.py"),
                f"--port={app_port}",
                f"--log={log}",
                "--workers=3",
                "--calls=12",
                "--serve-seconds=120",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        out = Lines(app.stdout)
        out.wait_for("serving", timeout=30)
        done = out.wait_for("done:", timeout=60)
        assert "failed" not in done

        events = [json.loads(line) for line in log.read_text().splitlines()]
        calls = [e for e in events if e["event"] == "llm_call"]
        assert len(calls) == 3 * 16  # 12 summaries and 4 drafts a worker
        spent = sum(Decimal(str(e["cost_usd"])) for e in calls if e["cost_usd"] is not None)
        assert spent > 0

        def query(promql: str) -> list[dict[str, Any]]:
            answer = _get(f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
            assert answer["status"] == "success", answer
            return list(answer["data"]["result"])

        deadline = time.monotonic() + 15
        while True:  # until a scrape after the workers' last call
            result = query("sum(llmguard_cost_usd_total)")
            if result and math.isclose(float(result[0]["value"][1]), spent, rel_tol=1e-9):
                break
            assert time.monotonic() < deadline, f"Prometheus has {result}, the log says {spent}"
            time.sleep(0.5)
        # The same total as llmguard's own report of the log.
        report = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, llmguard._cli; sys.exit(llmguard._cli.main())",
                "report",
                str(log),
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert Decimal(json.loads(report.stdout)["totals"]["cost_usd"]) == spent
        assert float(query("sum(llmguard_calls_total)")[0]["value"][1]) == len(calls)
        retried = sum(1 for e in events if e["event"] == "llm_retry")
        assert retried == 3
        assert float(query('sum(llmguard_retries_total{status="429"})')[0]["value"][1]) == retried
        remaining = {
            r["metric"]["budget"]: float(r["value"][1])
            for r in query("llmguard_budget_remaining_usd")
        }
        assert set(remaining) == {"example-daily", "example-drafts"}
        daily = sum(
            Decimal(str(e["cost_usd"]))
            for e in calls
            if e.get("budget") == "example-daily" and e["cost_usd"] is not None
        )
        assert Decimal(str(remaining["example-daily"])) == Decimal(5) - daily

        time.sleep(2)  # two more scrapes: rates over the window see the whole run
        dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
        queries = _panel_queries(dashboard)
        titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
        assert titles == {title for title, _ in queries}  # every panel has a query
        deadline = time.monotonic() + 20  # a loaded machine may miss a scrape or two
        while True:
            empty = []
            for title, promql in queries:
                result = query(promql)
                numbers = [float(r["value"][1]) for r in result]
                if not any(math.isfinite(n) for n in numbers):
                    empty.append((title, promql, result))
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert empty == []
        tenants = {
            r["metric"].get("tenant") for r in query("sum by (tenant) (llmguard_cost_usd_total)")
        }
        assert {"acme", "globex", "initech"} <= tenants
    finally:
        for process in (app, server):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queries = _panel_queries(dashboard)
    wanted = {
        "llmguard_cost_usd_total",
        "llmguard_calls_total",
        "llmguard_saved_usd_total",
        "llmguard_retries_total",
        "llmguard_rate_limit_wait_seconds_bucket",
        "llmguard_budget_remaining_usd",
        "llmguard_budget_refusals_total",
        "llmguard_tokens_total",
    }
    used = {name for _, promql in queries for name in re.findall(r"llmguard_\w+", promql)}
    assert wanted <= used
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "function", "model", "tenant"}
