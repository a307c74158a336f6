"""Alerts operators can act on: webhooks (Slack-compatible JSON, posted in the background)
and spend-rate (burn) alerts."""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import llmguard
import llmguard.alerts
from llmguard.alerts import BudgetAlert, BurnAlert, alert_text
from llmguard.testing import CapturedEvents

from ._helpers import run_python

CANARY = "CANARY-webhook-3c1e"


class Receiver:
    """A webhook receiver on a free loopback port. It answers the statuses of ``script`` in
    turn (then 200); with ``hang``, it holds every request until :meth:`release`."""

    def __init__(self, script: tuple[int, ...] = (), hang: bool = False) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.script = list(script)
        self.hang = hang
        self.received = threading.Event()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append((dict(self.headers), body))
                receiver.received.set()
                if receiver.hang:
                    receiver.released.wait(60)
                    return
                status = receiver.script.pop(0) if receiver.script else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # a Slack-like URL: the path is the secret
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T0/B0/s3cr3t-path"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def hanging() -> Iterator[Receiver]:
    server = Receiver(hang=True)
    yield server
    server.close()


def _spender(storage: str, on_alert: Any, **options: Any) -> Any:
    @llmguard.budget(
        usd="0.01",
        storage=storage,
        alert_at=(0.5,),
        on_alert=on_alert,
        on_exceed="warn",
        **options,
    )
    def ask(question: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)  # $0.0035
        return "ok"

    return ask


def test_a_budget_alert_is_posted_as_slack_compatible_json(
    receiver: Receiver, tmp_path: Any, events: CapturedEvents
) -> None:
    hook = llmguard.alerts.webhook(receiver.url, timeout=5, retries=2)
    ask = _spender(f"file://{tmp_path}/s", hook, name="team-search", key=lambda question: "acme")
    for _ in range(3):
        ask(f"{CANARY} what is new?")
    assert hook.flush(10)
    [(headers, body)] = receiver.posts  # the 50% threshold, once
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload["text"] == (
        ":warning: llmguard budget `team-search` (key `acme`) reached 50% of its limit: "
        f"$0.007 of $0.01 spent, $0.003 left; resets {payload['resets_at'][:19]}+00:00."
    )
    assert {k: payload[k] for k in ("event", "budget", "key", "kind", "threshold")} == {
        "event": "budget_alert",
        "budget": "team-search",
        "key": "acme",
        "kind": "threshold",
        "threshold": 0.5,
    }
    assert (payload["limit_usd"], payload["spent_usd"]) == ("0.01", "0.007")
    assert CANARY not in body.decode()
    assert events.of("alert_webhook_failed") == []


def test_on_alert_receives_the_status_and_why(tmp_path: Any) -> None:
    seen: list[llmguard.BudgetStatus] = []
    ask = _spender(f"file://{tmp_path}/s", seen.append, name="why")
    ask("q")
    ask("q")
    [alert] = seen
    assert isinstance(alert, llmguard.BudgetStatus)  # what on_alert always received
    assert isinstance(alert, BudgetAlert)
    assert (alert.kind, alert.threshold, alert.event) == ("threshold", 0.5, "budget_alert")
    assert alert.spent_usd == Decimal("0.007")
    assert "threshold=0.5" in repr(alert)
    assert "reached 50%" in alert_text(alert)


def test_a_hanging_webhook_never_holds_the_call(
    hanging: Receiver, tmp_path: Any, events: CapturedEvents
) -> None:
    slow = llmguard.alerts.webhook(hanging.url, timeout=60, retries=0)
    ask = _spender(f"file://{tmp_path}/s", slow, name="hang")
    started = time.monotonic()
    ask("q")
    ask("q")  # crosses 50%: the alert goes to a receiver that answers in 60 s at best
    elapsed = time.monotonic() - started
    assert hanging.received.wait(10)  # the post was made, from the background
    assert elapsed < 30, "the call waited for the webhook"
    assert not hanging.released.is_set()
    hanging.release()
    assert slow.flush(10)
    assert len(hanging.posts) == 1


def test_a_webhook_that_times_out_is_retried_then_warned_about(
    hanging: Receiver, tmp_path: Any, events: CapturedEvents
) -> None:
    hook = llmguard.alerts.webhook(hanging.url, timeout=0.2, retries=2, backoff=0.01)
    ask = _spender(f"file://{tmp_path}/s", hook, name="timeouts")
    ask("q")
    ask("q")
    assert hook.flush(20)
    assert len(hanging.posts) == 3  # the first attempt and two retries
    [warning] = events.of("alert_webhook_failed")
    assert warning["attempts"] == 3
    assert "timed out" in warning["error"]
    assert warning["url"] == f"http://127.0.0.1:{hanging.server.server_port}"  # no secret path
    assert "s3cr3t" not in json.dumps(warning)
    assert warning["log_level"] == "warning"


def test_server_errors_are_retried_refusals_are_not(tmp_path: Any, events: CapturedEvents) -> None:
    flaky = Receiver(script=(500, 503))
    refusing = Receiver(script=(400,))
    try:
        for server in (flaky, refusing):
            hook = llmguard.alerts.webhook(server.url, timeout=5, retries=2, backoff=0.01)
            hook(_status())
            assert hook.flush(10)
        assert len(flaky.posts) == 3  # 500, 503, then delivered
        assert len(refusing.posts) == 1  # a 400 will not change by sending it again
        [warning] = events.of("alert_webhook_failed")
        assert (warning["error"], warning["attempts"]) == ("HTTP 400", 1)
    finally:
        flaky.close()
        refusing.close()


def _status(**changes: Any) -> BudgetAlert:
    fields: dict[str, Any] = {
        "name": "ops",
        "key": None,
        "limit_usd": Decimal(10),
        "spent_usd": Decimal(8),
        "reserved_usd": Decimal(0),
        "remaining_usd": Decimal(2),
        "window_start": datetime(2026, 5, 1, tzinfo=timezone.utc),
        "resets_at": datetime(2026, 5, 2, tzinfo=timezone.utc),
        "kind": "threshold",
        "threshold": 0.8,
    }
    return BudgetAlert(**{**fields, **changes})


def test_a_full_queue_drops_alerts_with_a_warning(
    hanging: Receiver, events: CapturedEvents
) -> None:
    hook = llmguard.alerts.webhook(hanging.url, timeout=30, retries=0, queue_size=1)
    hook(_status())
    assert hanging.received.wait(10)  # the first is being posted
    hook(_status())  # waits in the queue
    hook(_status())  # no room
    [dropped] = events.of("alert_webhook_dropped")
    assert dropped["budget"] == "ops"
    hanging.release()
    assert hook.flush(10)
    assert len(hanging.posts) == 2


def test_alerts_still_queued_are_posted_before_the_process_exits(receiver: Receiver) -> None:
    code = (
        "import datetime, decimal, llmguard\n"
        "from llmguard.alerts import BudgetAlert\n"
        "D = decimal.Decimal\n"
        "at = datetime.datetime(2026, 5, 1, tzinfo=datetime.timezone.utc)\n"
        f"hook = llmguard.alerts.webhook({receiver.url!r})\n"
        "hook(BudgetAlert('exit', None, D(1), D(1), D(0), D(0), at, at, threshold=1.0))\n"
    )
    run_python("-c", code)
    [payload] = receiver.payloads()
    assert payload["budget"] == "exit"


def test_bad_webhook_settings_fail_at_once() -> None:
    for url, options, message in (
        ("ftp://example.com/x", {}, "http:// or https://"),
        ("https://hooks.example.com/x", {"timeout": 0}, "timeout"),
        ("https://hooks.example.com/x", {"retries": -1}, "retries"),
        ("https://hooks.example.com/x", {"queue_size": 0}, "queue_size"),
        ("https://hooks.example.com/x", {"backoff": "1s"}, "backoff"),
    ):
        with pytest.raises(llmguard.ConfigurationError, match=message):
            llmguard.alerts.webhook(url, **options)
    assert "s3cr3t" not in repr(llmguard.alerts.webhook("https://hooks.example.com/s3cr3t"))


def test_alerts_is_loaded_only_when_used() -> None:
    out = run_python(
        "-c",
        "import sys, llmguard\n"
        "print('llmguard.alerts' in sys.modules)\n"
        "print(callable(llmguard.alerts.webhook))\n"
        "print('llmguard.alerts' in sys.modules)\n",
    ).stdout.split()
    assert out == ["False", "True", "True"]


# -- spend-rate (burn) alerts --------------------------------------------------------------

START = datetime(2026, 5, 1, 1, 0, tzinfo=timezone.utc).timestamp()  # 23 h before the reset


def _burner(backend: str, now: list[float], alerts: list[Any], **options: Any) -> Any:
    @llmguard.budget(
        usd=1,
        per="day",
        name="burn",
        storage=backend,
        clock=lambda: now[0],
        alert_at=(),
        on_alert=alerts.append,
        **options,
    )
    def spend(cents: int, model: str = "gpt-4o-mini") -> str:
        llmguard.record_usage(0, 0, cost_usd=Decimal(cents) / 100)
        return "ok"

    return spend


def test_a_spend_rate_that_would_exhaust_the_budget_alerts_once_per_episode(
    backend: str, events: CapturedEvents
) -> None:
    now = [START]
    alerts: list[Any] = []
    spend = _burner(backend, now, alerts, burn_alert="1h")
    other: list[Any] = []  # another process: its own function, the same budget and storage
    elsewhere = _burner(backend, now, other, burn_alert=BurnAlert(window="1h"))

    spend(1)  # $0.01 in the last hour: $0.24 by the reset at this rate
    now[0] += 30 * 60
    spend(5)  # $0.06 in the last hour, $1.41 by the reset: burning
    now[0] += 60
    spend(1)  # still burning: the same episode
    elsewhere(1)  # in another process too
    fired = events.of("budget_burn_alert")
    assert len(fired) == 1
    event = fired[0]
    assert {k: event[k] for k in ("budget", "key", "window_s", "limit_usd", "spent_usd")} == {
        "budget": "burn",
        "key": None,
        "window_s": 3600.0,
        "limit_usd": 1.0,
        "spent_usd": 0.06,
    }
    assert (event["window_spent_usd"], event["rate_usd_per_hour"]) == (0.06, 0.06)
    assert event["projected_usd"] == pytest.approx(0.06 + 0.06 * 22.5)
    assert event["resets_at"] == "2026-05-02T00:00:00+00:00"
    exhausts = datetime.fromisoformat(event["exhausts_at"])
    expected = datetime(2026, 5, 1, 1, 30, tzinfo=timezone.utc) + timedelta(hours=0.94 / 0.06)
    assert abs(exhausts - expected) < timedelta(seconds=1)
    [alert] = alerts
    assert (alert.kind, alert.event, alert.rate_usd_per_hour) == (
        "burn",
        "budget_burn_alert",
        Decimal("0.06"),
    )
    assert other == []
    assert "is burning fast: $0.06 in the last 1h ($0.06/h)" in alert_text(alert)

    now[0] = START + 3 * 3600  # two quiet hours: the rate fell back, re-armed
    spend(1)
    elsewhere(1)
    assert len(events.of("budget_burn_alert")) == 1
    now[0] += 10 * 60
    elsewhere(20)  # a new episode, seen first by the other process
    spend(1)
    assert len(events.of("budget_burn_alert")) == 2
    assert (len(alerts), len(other)) == (1, 1)  # each process told its own on_alert once


def test_the_next_window_is_a_new_episode(events: CapturedEvents, tmp_path: Any) -> None:
    now = [datetime(2026, 5, 1, 22, 0, tzinfo=timezone.utc).timestamp()]
    spend = _burner(f"file://{tmp_path}/s", now, [], burn_alert="1h")
    spend(60)  # $0.60 an hour with 2 h left: burning
    assert len(events.of("budget_burn_alert")) == 1
    now[0] += 2 * 3600 + 60  # the next day: its own flag
    spend(60)
    assert len(events.of("budget_burn_alert")) == 2


def test_no_burn_alert_without_the_option_or_when_spent(
    events: CapturedEvents, tmp_path: Any
) -> None:
    now = [START]
    spend = _burner(f"file://{tmp_path}/a", now, [])
    spend(60)
    assert events.of("budget_burn_alert") == []
    spent = _burner(f"file://{tmp_path}/b", now, [], burn_alert="15m", on_exceed="warn")
    spent(120)  # over the limit already: the thresholds say so, not a forecast
    assert events.of("budget_burn_alert") == []


def test_bad_burn_alert_settings_fail_at_decoration() -> None:
    for options, message in (
        ({"burn_alert": "soon"}, "burn_alert window"),
        ({"burn_alert": 0}, "burn_alert window"),
        ({"burn_alert": "1h", "per": "total"}, "never does"),
        ({"burn_alert": BurnAlert(window="1h", rearm=0)}, "rearm"),
        ({"burn_alert": BurnAlert(window="1h", rearm=1.5)}, "rearm"),
        ({"burn_alert": "2h", "per": timedelta(hours=1)}, "longer than the budget's window"),
    ):
        with pytest.raises(llmguard.ConfigurationError, match=message):
            llmguard.budget(usd=1, **options)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX")
def test_a_forked_worker_posts_its_own_alerts(receiver: Receiver) -> None:
    import os

    hook = llmguard.alerts.webhook(receiver.url, timeout=5)
    hook(_status(name="parent"))
    assert hook.flush(10)
    with warnings.catch_warnings():  # 3.12+ warns about forking a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its own queue and thread
        try:
            hook(_status(name="child"))
            os._exit(0 if hook.flush(10) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [p["budget"] for p in receiver.payloads()] == ["parent", "child"]
