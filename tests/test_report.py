from __future__ import annotations

import gzip
import json
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard._cli import main
from llmguard.testing import FakeLLMServer

from ._helpers import run_python


@pytest.fixture
def log(tmp_path: Path, fake_llm: FakeLLMServer) -> Path:
    """A real event log: cached, routed, retried, budgeted and failing calls."""
    path = tmp_path / "events.jsonl"
    llmguard.configure_logging(json=True, file=str(path))
    client = llmguard.instrument(fake_llm.openai_client())
    storage = f"file://{tmp_path}/state"

    @llmguard.cached(storage=storage)
    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda q, **_: q.startswith("short"))
    @llmguard.budget(usd="1", name="report-test", storage=storage, alert_at=(0.000001,))
    @llmguard.retry_on_rate_limit(jitter=None, sleep=lambda s: None)
    def ask(question: str, *, model: str = "gpt-4o") -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )
        return str(reply.choices[0].message.content)

    @llmguard.track(model="gpt-4o")
    def broken(text: str) -> str:
        raise ValueError("bad input")

    ask("short question")
    ask("short question")  # cache hit
    fake_llm.fail_next(1, 429, retry_after=1)
    ask("a long question about the quarterly report")  # retried once, then default model
    with pytest.raises(ValueError):
        broken("x")
    with path.open("a") as fh:
        fh.write("not json at all\n")
        fh.write(json.dumps({"event": "something_else"}) + "\n")
    return path


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "llm_call":
            out.append(event)
    return out


def test_every_number_is_the_sum_of_its_events(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(log), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    calls = _events(log)
    totals = report["totals"]
    assert totals["calls"] == len(calls) == 4
    assert Decimal(totals["cost_usd"]) == sum(Decimal(str(e["cost_usd"])) for e in calls)
    assert Decimal(totals["saved_cache_usd"]) == sum(
        Decimal(str(e.get("saved_usd") or 0)) for e in calls
    )
    routed = [e for e in calls if e.get("route_default")]
    expected_routing = sum(
        llmguard.calc_cost(e["route_default"], e["input_tokens"], e["output_tokens"])
        - Decimal(str(e["cost_usd"]))  # type: ignore[operator]
        for e in routed
    )
    assert Decimal(totals["saved_routing_usd"]) == expected_routing > 0
    assert totals["cache_hits"] == 1
    assert totals["cache_hit_rate"] == round(1 / 3, 4)
    assert totals["retries"] == 1
    assert totals["errors_by_type"] == {"ValueError": 1}
    assert totals["budget_alerts"] >= 1
    assert totals["skipped_lines"] == 2
    groups = report["groups"]
    assert sum(g["calls"] for g in groups.values()) == 4
    assert sum(Decimal(g["cost_usd"]) for g in groups.values()) == Decimal(totals["cost_usd"])


def test_breakdowns_gzip_several_files_and_since(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zipped = tmp_path / "old.jsonl.gz"
    zipped.write_bytes(gzip.compress(log.read_bytes()))
    assert main(["report", str(log), str(zipped), "--by", "model", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["calls"] == 8
    assert set(report["groups"]) == {"gpt-4o", "gpt-4o-mini"}
    for by in ("day", "budget", "route", "function"):
        assert main(["report", str(log), "--by", by, "--format", "csv"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"{by},calls,cost_usd")
        assert sum(int(line.split(",")[1]) for line in lines[1:]) == 4
    assert main(["report", str(log), "--since", "1h", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["calls"] == 4
    old = tmp_path / "old.jsonl"
    old.write_text(log.read_text().replace('"timestamp": "20', '"timestamp": "19'))
    assert main(["report", str(old), "--since", "7d", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["calls"] == 0
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 1
    assert main(["report", str(log), "--since", "soon"]) == 2


def test_table_and_html(log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html_path = tmp_path / "report.html"
    assert main(["report", str(log), "--html", str(html_path)]) == 0
    out = capsys.readouterr().out
    assert "saved by cache" in out
    assert "skipped lines    2" in out
    assert "rate-limit queue" in out  # what it sums is said: not wall time
    assert "summed over calls" in out
    page = html_path.read_text()
    assert "Rate-limit queueing, summed over calls" in page
    assert page.startswith("<!doctype html>")
    assert 'id="cost-chart"' in page
    assert 'id="savings-chart"' in page
    assert page.count('class="bar"') >= 3
    assert "http://" not in page  # self-contained: no CDN, no network
    assert "https://" not in page


def test_operator_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = f"file://{tmp_path}/ops"

    @llmguard.cached(storage=storage)
    @llmguard.budget(usd="1", name="ops", key=lambda user, **_: user, storage=storage)
    def ask(user: str, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        return user

    ask("alice")
    ask("bob")
    capsys.readouterr()  # the calls' own events (structlog's default prints to stdout)
    assert main(["budget", "status", "--storage", storage, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["budget"], r["key"], r["spent_usd"], r["limit_usd"]) for r in rows} == {
        ("ops", "alice", "0.0035", "1"),
        ("ops", "bob", "0.0035", "1"),
    }
    assert main(["budget", "status", "ops", "--key", "bob", "--storage", storage]) == 0
    assert "0.9965" in capsys.readouterr().out
    assert main(["budget", "status", "unknown", "--storage", storage]) == 1
    assert main(["budget", "reset", "ops", "--key", "alice", "--storage", storage]) == 0
    assert llmguard.budget_status("ops", key="alice", storage=storage).spent_usd == 0
    assert main(["budget", "reset", "never", "--storage", storage]) == 1
    capsys.readouterr()
    assert main(["cache", "stats", "--storage", storage, "--format", "json"]) == 0
    [stats] = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 2
    assert stats["function"].endswith("test_operator_commands.<locals>.ask")
    assert main(["cache", "clear", "--function", stats["function"], "--storage", storage]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert ask.cache_info().entries == 0  # type: ignore[attr-defined]


def test_commands_honour_llmguard_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMGUARD_STORAGE", f"file://{tmp_path}/env")

    @llmguard.cached
    def f(x: int) -> int:
        return x

    f(1)
    capsys.readouterr()
    assert main(["cache", "stats", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["entries"] == 1


@pytest.mark.slow
def test_demo_runs_offline_and_writes_its_reports(tmp_path: Path) -> None:
    result = run_python(
        *("-m", "llmguard._cli", "demo", "--fast", "--out", str(tmp_path)),
        env={"LLMGUARD_CACHE_DIR": str(tmp_path / "state")},
        without=(),
        timeout=120,
    )
    out = result.stdout
    for step in ("1. Caching", "2. Routing", "3. A burst", "4. A runaway loop", "stopped after"):
        assert step in out
    assert "answers from the cache" in out
    log = tmp_path / "llmguard-demo.jsonl"
    assert (tmp_path / "llmguard-demo.html").read_text().count('class="bar"') > 0
    events = _events(log)
    assert any(e.get("cache") == "hit" for e in events)
    assert {e["model"] for e in events} >= {"gpt-4o", "gpt-4o-mini"}
    assert any(e.get("error") == "BudgetExceeded" for e in events)
    assert "The HTML report:" in out
    # The waits are shown while they happen, and are real.
    assert "   ... waiting " in out
    assert "for the retry-after of a 429 (@retry_on_rate_limit)" in out
    assert sum(e.get("rate_wait_s", 0) for e in events) > 0
    assert log.read_text().count('"event": "llm_retry"') == 2
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_html_report_renders_its_charts_in_a_real_browser(log: Path, tmp_path: Path) -> None:
    import os
    import shutil

    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium on this machine")
    html_path, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["report", str(log), "--by", "model", "--html", str(html_path)]) == 0
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,1300",
            f"--screenshot={shot}",
            html_path.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    colours = {
        colour: count for count, colour in Image.open(shot).convert("RGB").getcolors(1 << 24)
    }
    blue = colours.get((0x25, 0x63, 0xEB), 0)  # the first series' bars
    green = colours.get((0x16, 0xA3, 0x4A), 0)  # the second series'
    ink = sum(count for colour, count in colours.items() if sum(colour) < 200)  # text and axes
    assert blue > 500, "the cost chart's bars are not drawn"
    assert green > 500, "the savings chart's bars are not drawn"
    assert ink > 2000, "no text: a blank or broken page"


def test_progress_is_reported_while_reading(log: Path) -> None:
    from llmguard._report import read_events

    seen: list[tuple[str, float]] = []
    events = list(
        read_events([str(log)], progress=lambda path, fraction: seen.append((path, fraction)))
    )
    assert events
    fractions = [fraction for path, fraction in seen if path == str(log)]
    assert fractions == sorted(fractions)
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions[-1] == 1.0
