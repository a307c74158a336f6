from __future__ import annotations

import gzip
import json
import subprocess
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmguard
from llmguard._cli import main
from llmguard._money import decimal_text
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


# -- cost per tenant and per feature; time buckets; budgets; percentiles (issue 15) ------------

CANARY = "CANARY-8d1f-never-in-a-report"
CALLS_COLOUR = (0x0F, 0x76, 0x6E)  # llmguard._html.CALLS_COLOUR


def _tenant_calls(path: Path, tmp_path: Path, *, log_content: bool = False) -> None:
    """Real events: a keyed budget (the tenant), tags from decorators and blocks, and the
    canary in every prompt."""
    llmguard.configure_logging(json=True, file=str(path))
    storage = f"file://{tmp_path}/tenant-state"

    @llmguard.budget(
        usd="0.05",
        name="per-tenant",
        key=lambda tenant, **_: tenant,
        storage=storage,
        alert_at=(0.1,),
    )
    @llmguard.track(tags={"feature": "search"}, log_content=log_content)
    def search(tenant: str, question: str, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)  # $0.0035 on gpt-4o
        return "found it"

    @llmguard.track(model="gpt-4o-mini", tags={"feature": "summary"}, log_content=log_content)
    def summarize(text: str) -> str:
        return "a summary"

    for i in range(12):
        with llmguard.tags(user=f"u{i % 4}"):
            search(("acme", "globex", "acme")[i % 3], f"{CANARY} question {i}")
            if i % 2:
                summarize(f"{CANARY} text {i}")
    llmguard._events.close_owned_stream()


def _restamp(path: Path, start: datetime, gaps: list[float]) -> None:
    """Spread the log's events over time: event i at start + gaps[0] + ... + gaps[i]."""
    out, at = [], start
    for line, gap in zip(path.read_text().splitlines(), gaps, strict=True):
        event = json.loads(line)
        at += timedelta(seconds=gap)
        event["timestamp"] = at.isoformat().replace("+00:00", "Z")
        out.append(json.dumps(event))
    path.write_text("\n".join(out) + "\n")


@pytest.fixture
def tenant_log(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.jsonl"
    _tenant_calls(path, tmp_path)
    lines = len(path.read_text().splitlines())
    # about ten minutes, with a three-minute pause in the middle: empty buckets
    gaps = [17.0 if i != lines // 2 else 190.0 for i in range(lines)]
    _restamp(path, datetime(2026, 5, 1, 12, 0, 5, tzinfo=timezone.utc), gaps)
    return path


def _sums(calls: list[dict[str, Any]], group: Any) -> dict[str, tuple[int, Decimal]]:
    out: dict[str, tuple[int, Decimal]] = {}
    for event in calls:
        name = group(event) or "-"
        count, cost = out.get(name, (0, Decimal(0)))
        out[name] = (count + 1, cost + Decimal(str(event["cost_usd"])))
    return out


def test_cost_per_tenant_and_per_tag_in_every_format(
    tenant_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _events(tenant_log)
    assert len(calls) == 18
    outputs = [tenant_log.read_text()]
    for by, group in (
        ("key", lambda e: e.get("budget_key")),
        ("tag:feature", lambda e: e.get("tags", {}).get("feature")),
        ("tag:user", lambda e: e.get("tags", {}).get("user")),
    ):
        expected = _sums(calls, group)
        assert main(["report", str(tenant_log), "--by", by, "--format", "json"]) == 0
        out = capsys.readouterr().out
        groups = json.loads(out)["groups"]
        assert {k: (g["calls"], Decimal(g["cost_usd"])) for k, g in groups.items()} == expected
        assert main(["report", str(tenant_log), "--by", by, "--format", "csv"]) == 0
        csv_out = capsys.readouterr().out
        rows = [line.split(",") for line in csv_out.splitlines()]
        assert rows[0][:3] == [by, "calls", "cost_usd"]
        assert {r[0]: (int(r[1]), Decimal(r[2])) for r in rows[1:]} == expected
        assert main(["report", str(tenant_log), "--by", by]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[-len(expected) - 1].split()[0] == by  # the header row
        outputs += [out, csv_out, table]
    by_key = _sums(calls, lambda e: e.get("budget_key"))
    assert (by_key["acme"], by_key["globex"]) == ((8, Decimal("0.028")), (4, Decimal("0.014")))
    assert by_key["-"][0] == 6  # the summaries: no budget
    page = tmp_path / "tenants.html"
    assert main(["report", str(tenant_log), "--html", str(page)]) == 0
    html = page.read_text()
    outputs += [capsys.readouterr().out, html]
    for table_id in ("by-table", "by-key-table", "by-tag-feature-table", "by-tag-user-table"):
        assert f'id="{table_id}"' in html
    assert "<td>acme</td><td>8</td><td>$0.028</td>" in html
    assert "<td>search</td><td>12</td><td>$0.042</td>" in html
    for text in outputs:  # prompts appear nowhere without log_content=True
        assert CANARY not in text
    for bad in ("tag:", "tag:no-such", "tenant"):
        with pytest.raises(SystemExit) as exit_:
            main(["report", str(tenant_log), "--by", bad])
        assert exit_.value.code == 2
        assert "tag:<name>" in capsys.readouterr().err


def test_log_content_puts_prompts_in_events_but_never_in_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "content.jsonl"
    _tenant_calls(path, tmp_path, log_content=True)
    assert CANARY in path.read_text()  # opted in: the events carry the prompts
    page = tmp_path / "content.html"
    for by in ("function", "key", "tag:feature"):
        for fmt in ("table", "json", "csv"):
            assert main(["report", str(path), "--by", by, "--format", fmt]) == 0
            assert CANARY not in capsys.readouterr().out
    assert main(["report", str(path), "--html", str(page)]) == 0
    assert CANARY not in page.read_text()
    assert main(["top", str(path), "--once"]) == 0
    assert CANARY not in capsys.readouterr().out


def _synthetic(times: list[float], cost: str = "0.001") -> list[dict[str, Any]]:
    return [
        {
            "event": "llm_call",
            "function": "app.f",
            "model": "gpt-4o",
            "cost_usd": float(cost),
            "timestamp": datetime.fromtimestamp(t, timezone.utc).isoformat(),
        }
        for t in times
    ]


@pytest.mark.parametrize(
    ("span", "step"),
    [
        (12, 1),  # a demo: seconds
        (60, 5),
        (3600, 300),  # an hour: 5 minutes
        (86400, 3600),  # a day: hours
        (30 * 86400, 86400),  # a month: days
        (365 * 86400, 28 * 86400),  # a year: four weeks
        (60 * 365 * 86400, 1820 * 86400),  # a bad timestamp: still a chart
    ],
)
def test_time_buckets_are_sized_to_the_span_of_the_log(span: int, step: int) -> None:
    from llmguard._report import MAX_BUCKETS, build

    start = 1_777_000_000.0
    report = build(_synthetic([start + span * i / 50 for i in range(51)]))
    assert report.timeline.step == step
    slots = report.timeline.slots()
    assert 1 < len(slots) <= MAX_BUCKETS
    assert sum(b.calls for _, b in slots if b is not None) == 51


@given(
    st.lists(st.floats(min_value=0, max_value=90 * 86400), min_size=1, max_size=200),
    st.randoms(),
)
@settings(max_examples=60, deadline=None)
def test_every_event_is_in_the_bucket_of_its_time_whatever_the_order(
    offsets: list[float], rng: Any
) -> None:
    from llmguard._report import MAX_BUCKETS, build

    times = [1_700_000_000 + o for o in offsets]
    shuffled = list(times)
    rng.shuffle(shuffled)
    report = build(_synthetic(shuffled))
    timeline = report.timeline
    step = timeline.step
    slots = timeline.slots()
    assert len(slots) <= MAX_BUCKETS
    expected: dict[datetime, int] = {}
    for t in times:
        start = datetime.fromtimestamp(int(t) // step * step, timezone.utc)
        expected[start] = expected.get(start, 0) + 1
    assert {start: b.calls for start, b in slots if b is not None} == expected
    # and the smallest step that fits: one size down would need more than MAX_BUCKETS
    if timeline.level > 0:
        from llmguard._report import STEPS

        finer = STEPS[timeline.level - 1]
        assert int(max(times)) // finer - int(min(times)) // finer + 1 > MAX_BUCKETS


def test_percentiles_are_the_values_of_calls() -> None:
    from llmguard._report import build

    events = _synthetic([1_777_000_000.0 + i for i in range(100)])
    for i, event in enumerate(events):
        event["cost_usd"] = (i + 1) / 1000  # 0.001 .. 0.1
        event["latency_ms"] = float(100 - i)  # 100 .. 1
    spread = build(events).as_dict()["distribution"]
    assert spread["cost_usd"] == {
        "calls": 100,
        "p50": "0.05",
        "p95": "0.095",
        "p99": "0.099",
        "max": "0.1",
    }
    assert spread["latency_ms"] == {
        "calls": 100,
        "p50": "50",
        "p95": "95",
        "p99": "99",
        "max": "100",
    }
    assert build([]).as_dict()["distribution"]["cost_usd"] == {"calls": 0}


def test_budgets_spend_over_time_against_their_limit(
    tenant_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _events(tenant_log)
    assert main(["report", str(tenant_log), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    budgets = {(b["budget"], b["key"]): b for b in report["budgets"]}
    for tenant in ("acme", "globex"):
        mine = [e for e in calls if e.get("budget_key") == tenant]
        assert budgets[("per-tenant", tenant)]["spent_usd"] == decimal_text(
            mine[-1]["budget_spent_usd"]
        )
        assert budgets[("per-tenant", tenant)]["limit_usd"] == "0.05"
        assert budgets[("per-tenant", tenant)]["alerts"] == 1
    assert report["totals"]["budget_alerts"] == 2
    page = tmp_path / "b.html"
    assert main(["report", str(tenant_log), "--html", str(page)]) == 0
    html = page.read_text()
    assert 'id="budget-chart-0"' in html
    assert "Budget per-tenant: spend in its window vs its limit $0.05" in html
    assert html.count('class="limit"') == 1
    assert html.count('class="spend"') == 2  # one line per key
    # one point per bucket holding the key's calls, at its latest spend in that bucket
    assert html.count("spent in its window</title></circle>") == len(
        {
            (e["budget_key"], _bucket_of(e, report["timeline"]["step_s"]))
            for e in calls
            if "budget_key" in e
        }
    )
    assert 'id="spread-table"' in html
    assert 'id="cost-histogram"' in html
    assert 'id="latency-histogram"' in html


def _bucket_of(event: dict[str, Any], step: int) -> int:
    at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    return int(at.timestamp()) // step


def _screenshot(browser: str, page: Path, shot: Path, tmp_path: Path, size: str) -> None:
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
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--window-size={size}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )


@pytest.mark.slow
def test_the_browser_draws_one_bar_per_bucket_of_calls(tenant_log: Path, tmp_path: Path) -> None:
    import os
    import re
    import shutil

    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium on this machine")
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["report", str(tenant_log), "--html", str(page)]) == 0
    html = page.read_text()
    step = int(re.search(r'id="calls-chart" data-step-s="(\d+)"', html).group(1))  # type: ignore[union-attr]
    assert step == 30  # about ten minutes of events: 30-second buckets
    buckets = {_bucket_of(e, step) for e in _events(tenant_log)}
    assert 6 < len(buckets) < max(buckets) - min(buckets) + 1  # some buckets are empty
    _screenshot(browser, page, shot, tmp_path, "1000,1800")
    image = Image.open(shot).convert("RGB")
    width, height = image.size
    pixels = image.load()
    rows = [y for y in range(height) if any(pixels[x, y] == CALLS_COLOUR for x in range(width))]
    assert rows, "the calls chart's bars are not drawn"
    baseline = max(rows)  # every bar stands on the axis: the lowest row crosses them all
    runs, inside = 0, False
    for x in range(width):
        hit = pixels[x, baseline] == CALLS_COLOUR
        runs += hit and not inside
        inside = hit
    assert runs == len(buckets)
    red = sum(1 for x in range(width) for y in range(height) if pixels[x, y] == (0xB9, 0x1C, 0x1C))
    assert red > 100, "the budget's limit line is not drawn"
