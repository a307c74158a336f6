from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import llmguard
from llmguard._budget import window_of
from llmguard.testing import CapturedEvents

from ._helpers import in_processes
from .conftest import call


def spender(flavour: str, usage: tuple[int, int] = (1000, 100), **options: Any) -> Any:
    """A function that reports ``usage`` on gpt-4o ($0.0035 by default) under @budget."""
    if flavour == "sync":

        @llmguard.budget(**options)
        def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
            llmguard.record_usage(*usage)
            return "ok"

    else:

        @llmguard.budget(**options)
        async def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:  # type: ignore[misc]
            llmguard.record_usage(*usage)
            return "ok"

    return ask


def test_spend_is_settled_and_the_cap_holds(
    flavour: str, backend: str, events: CapturedEvents
) -> None:
    ask = spender(flavour, usd="0.01", storage=backend, name=f"cap-{flavour}")
    call(ask, "hi")
    call(ask, "hi")
    status = ask.budget_status()
    assert (status.spent_usd, status.reserved_usd, status.remaining_usd) == (
        Decimal("0.007"),
        Decimal(0),
        Decimal("0.003"),
    )
    with pytest.raises(llmguard.BudgetExceeded) as info:
        call(ask, "hi", max_tokens=400)  # worst case 0.0040025 > 0.003 left
    error = info.value
    assert (error.budget, error.limit_usd, error.spent_usd) == (
        f"cap-{flavour}",
        Decimal("0.01"),
        Decimal("0.007"),
    )
    assert error.resets_at == datetime.now(timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0
    ) + timedelta(days=1)
    assert "resets" in str(error)
    assert [e["budget"] for e in events.calls] == [f"cap-{flavour}"] * 3
    assert events.calls[1]["budget_remaining_usd"] == 0.003


def test_the_estimate_is_the_worst_case_on_the_called_model(backend: str) -> None:
    @llmguard.budget(usd="1", storage=backend, max_call_usd="0.002")
    def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        return "ok"

    prompt = " ".join(["word"] * 100)
    ask(prompt, max_tokens=100)  # 100 x 2.5 + 100 x 10 per M = $0.00125
    with pytest.raises(llmguard.CallTooExpensive, match="max_call_usd"):
        ask(prompt, max_tokens=200)  # $0.00225
    ask(prompt, max_tokens=1000, model="gpt-4o-mini")  # $0.000615 on the cheap model


def test_exceptions_release_the_reservation(flavour: str, backend: str) -> None:
    def body(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        raise ConnectionError("provider down")

    if flavour == "sync":
        fn = llmguard.budget(usd="0.01", storage=backend)(body)
    else:

        async def abody(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
            return body(text, max_tokens, model)

        fn = llmguard.budget(usd="0.01", storage=backend)(abody)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            call(fn, "x")
    status = fn.budget_status()
    assert (status.spent_usd, status.reserved_usd) == (0, 0)


def test_on_exceed_warn_and_callable(backend: str, events: CapturedEvents) -> None:
    warned = spender("sync", usd="0.004", storage=backend, on_exceed="warn", name="warned")
    warned("a")
    warned("a")  # over, but proceeds and is recorded
    assert warned.budget_status().spent_usd == Decimal("0.007")
    assert len(events.of("budget_exceeded")) == 1
    fallback = spender(
        "sync", usd="0.004", storage=backend, on_exceed=lambda status: "cached answer", name="fb"
    )
    assert fallback("a") == "ok"
    assert fallback("a") == "cached answer"


def test_alerts_once_per_threshold_per_window(backend: str, events: CapturedEvents) -> None:
    alerts: list[llmguard.BudgetStatus] = []
    ask = spender(
        "sync",
        usd="0.01",
        storage=backend,
        alert_at=(0.5, 0.8),
        on_alert=alerts.append,
        on_exceed="warn",
    )
    for _ in range(4):
        ask("x")
    fired = events.of("budget_alert")
    assert [a["threshold"] for a in fired] == [0.5, 0.8]
    assert [a.spent_usd for a in alerts] == [Decimal("0.007"), Decimal("0.0105")]
    assert fired[0]["limit_usd"] == 0.01


def test_keys_and_shared_names(backend: str) -> None:
    @llmguard.budget(usd="0.005", key=lambda user, **_: user, storage=backend, name="per-user")
    def ask(user: str, model: str = "gpt-4o", max_tokens: int = 400) -> str:  # up to $0.004
        llmguard.record_usage(1000, 100)
        return user

    ask("alice")
    ask("bob")
    with pytest.raises(llmguard.BudgetExceeded) as info:
        ask("alice")
    assert info.value.key == "alice"
    assert llmguard.budget_status("per-user", key="bob").spent_usd == Decimal("0.0035")
    llmguard.reset_budget("per-user", key="alice")
    ask("alice")

    one = spender("sync", usd="0.005", storage=backend, name="team")
    two = spender("sync", usd="0.005", storage=backend, name="team")
    one("x", max_tokens=400)
    with pytest.raises(llmguard.BudgetExceeded):
        two("x", max_tokens=400)


def test_unknown_price_is_refused_unless_allowed(backend: str) -> None:
    @llmguard.budget(usd="1", storage=backend)
    def ask(text: str, model: str = "house-model") -> str:
        return text

    with pytest.raises(llmguard.PriceUnknown, match="set_price"):
        ask("x")
    llmguard.set_price("house-model", input_per_mtok=1, output_per_mtok=2)
    assert ask("x") == "x"

    @llmguard.budget(usd="1", storage=backend, unknown_price="allow")
    def lenient(text: str, model: str = "other-house-model") -> str:
        return text

    assert lenient("x") == "x"


def test_unreachable_ledger_fails_closed_or_open(events: CapturedEvents) -> None:
    closed = spender("sync", usd="1", storage="redis://127.0.0.1:1/0")
    with pytest.raises(llmguard.BudgetUnavailable, match="fail_open"):
        closed("x")
    opened = spender("sync", usd="1", storage="redis://127.0.0.1:1/0", fail_open=True, name="open")
    assert opened("x") == "ok"
    assert events.of("budget_unavailable")


def test_reservations_expire(backend: str) -> None:
    now = [1_800_000_000.0]

    @llmguard.budget(
        usd="0.003", storage=backend, reservation_ttl=60, clock=lambda: now[0], name="expiring"
    )
    def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        return "ok"

    layer = ask.__llmguard__.layers[0]  # type: ignore[attr-defined]
    ledger_key = layer._ledger_key("expiring", None, layer._window()[0])
    ok, _, _ = layer.ledger().reserve(
        ledger_key,
        layer.limit_pico,
        2 * 10**9,
        "ghost",
        int((now[0] + 60) * 1000),
        int(now[0] * 1000),
        None,
    )
    assert ok
    assert ask.budget_status().reserved_usd == Decimal("0.002")
    with pytest.raises(llmguard.BudgetExceeded):
        ask("x")  # up to $0.0010025 more does not fit next to the ghost's $0.002
    now[0] += 61
    assert ask.budget_status().reserved_usd == 0
    ask("x")


def test_calendar_windows_in_a_time_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    now = datetime(2026, 3, 29, 15, 30, tzinfo=paris)  # the day clocks go forward
    assert window_of("day", now) == (
        datetime(2026, 3, 29, tzinfo=paris),
        datetime(2026, 3, 30, tzinfo=paris),
    )
    assert window_of("hour", now)[0] == datetime(2026, 3, 29, 15, tzinfo=paris)
    assert window_of("week", now)[0] == datetime(2026, 3, 23, tzinfo=paris)  # Monday
    assert window_of("month", now) == (
        datetime(2026, 3, 1, tzinfo=paris),
        datetime(2026, 4, 1, tzinfo=paris),
    )
    assert window_of("total", now) == (None, None)
    start, end = window_of(timedelta(hours=6), datetime(2026, 1, 1, 13, tzinfo=timezone.utc))
    assert (start.hour, end.hour) == (12, 18)  # type: ignore[union-attr]


def test_windows_roll_over_with_the_clock(backend: str) -> None:
    now = [datetime(2026, 5, 31, 23, 59, tzinfo=timezone.utc).timestamp()]
    ask = spender(
        "sync", usd="0.004", per="month", storage=backend, clock=lambda: now[0], name="monthly"
    )
    ask("x")
    with pytest.raises(llmguard.BudgetExceeded) as info:
        ask("x")
    assert info.value.resets_at == datetime(2026, 6, 1, tzinfo=ZoneInfo("UTC"))
    now[0] += 120  # June
    ask("x")


def test_bad_configuration() -> None:
    for options in (
        {"usd": -1},
        {"usd": "lots"},
        {"usd": 1, "per": "fortnight"},
        {"usd": 1, "on_exceed": "explode"},
        {"usd": 1, "alert_at": (0, 1.5)},
        {"usd": 1, "tz": "Mars/Olympus"},
        {"usd": 1, "storage": "ftp://x"},
    ):
        with pytest.raises(llmguard.ConfigurationError):
            llmguard.budget(**options)
    with pytest.raises(llmguard.ConfigurationError, match="no budget named"):
        llmguard.budget_status("never-declared")


def _spend(ready: Any, storage: str, reply_words: int) -> tuple[list[float], int]:
    import threading

    import llmguard as lg
    from llmguard.testing import capture_calls

    from .conftest import _SHARED_TIKTOKEN  # noqa: F401 - sets TIKTOKEN_CACHE_DIR

    base_url = os.environ["FAKE_LLM_URL"]
    import openai

    client = lg.instrument(openai.OpenAI(base_url=base_url, api_key="x", max_retries=0))

    @lg.budget(usd="0.05", per="total", name="proof", storage=storage)
    def ask(question: str, max_tokens: int = 300, model: str = "gpt-4o") -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens
        )
        return str(reply.choices[0].message.content)

    costs: list[float] = []
    refused = 0
    ready.wait()
    with capture_calls() as events:

        def worker() -> None:
            nonlocal refused
            for _ in range(10):
                try:
                    ask("Summarize the report")
                except lg.BudgetExceeded:
                    refused += 1

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    costs = [e["cost_usd"] for e in events.calls if e["outcome"] == "ok"]
    return costs, refused


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "redis"], indirect=True)
def test_proof_4_processes_x_8_threads_never_pass_the_cap(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmguard.testing import FakeLLMServer

    reply = " ".join(["word"] * 250)  # 250 output tokens on gpt-4o: $0.0025 a call
    with FakeLLMServer(reply=lambda request: reply) as fake:
        monkeypatch.setenv("FAKE_LLM_URL", fake.openai_base_url)
        results = in_processes(_spend, backend, 250)
    costs = [c for r in results for c in r[0]]
    refused = sum(r[1] for r in results)
    total = sum(Decimal(str(c)) for c in costs)
    assert refused > 0  # the cap was reached
    assert total <= Decimal("0.05")
    # Budgets are registered per process: declare the same one here to read its ledger.
    llmguard.budget(usd="0.05", per="total", name="proof", storage=backend)(lambda: None)
    status = llmguard.budget_status("proof")
    assert status.spent_usd == total  # the ledger equals the sum of the logged costs
    assert status.reserved_usd == 0


def _killed_mid_call(ready: Any, storage: str) -> None:
    import llmguard as lg

    @lg.budget(usd="1", per="total", name="killed", storage=storage, reservation_ttl=1)
    def hang(text: str, max_tokens: int = 1000, model: str = "gpt-4o") -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding its reservation

    hang("x")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "redis"], indirect=True)
def test_a_killed_process_releases_its_reservation_after_expiry(backend: str) -> None:
    in_processes(_killed_mid_call, backend, processes=1, killed_by=signal.SIGKILL)
    probe = llmguard.budget(
        usd="1", per="total", name="killed", storage=backend, reservation_ttl=1
    )(lambda: None)
    assert probe.budget_status().reserved_usd > 0  # type: ignore[attr-defined]
    time.sleep(1.1)
    status = probe.budget_status()  # type: ignore[attr-defined]
    assert (status.reserved_usd, status.spent_usd) == (0, 0)


def test_async_budget_under_concurrency(backend: str) -> None:
    @llmguard.budget(usd="0.01", storage=backend, name="async-cap")
    async def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        await asyncio.sleep(0.01)
        llmguard.record_usage(1, 100)  # $0.0010025, exactly the worst case reserved
        return "ok"

    async def main() -> list[Any]:
        return await asyncio.gather(*(ask("x") for _ in range(20)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert sum(o == "ok" for o in outcomes) == 9  # 9 x $0.0010025 fit in $0.01, 10 do not
    assert all(isinstance(o, llmguard.BudgetExceeded) for o in outcomes if o != "ok")
    assert ask.budget_status().spent_usd == Decimal("0.0090225")  # type: ignore[attr-defined]
