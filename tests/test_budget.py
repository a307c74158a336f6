from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
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
    assert probe.budget_status().reserved_usd > 0
    time.sleep(1.1)
    status = probe.budget_status()
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
    assert ask.budget_status().spent_usd == Decimal("0.0090225")


# -- reading a budget from any process (the definition is stored with the ledger) -----------


def _declare_and_spend(storage: str) -> None:
    import llmguard as lg

    from .conftest import _SHARED_TIKTOKEN  # noqa: F401 - sets TIKTOKEN_CACHE_DIR

    @lg.budget(usd="0.05", per="week", tz="Europe/Paris", name="admin-read", storage=storage)
    def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        lg.record_usage(1000, 100)  # $0.0035
        return "ok"

    @lg.budget(usd="0.01", name="per-tenant", key=lambda tenant, **_: tenant, storage=storage)
    def tenant_ask(tenant: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        lg.record_usage(1000, 100)
        return tenant

    ask("x")
    tenant_ask("alice")
    tenant_ask("alice")
    tenant_ask("bob")


def test_an_admin_process_reads_budgets_it_never_declared(backend: str) -> None:
    if backend.startswith("memory://"):
        pytest.skip("memory:// storage lives in one process: there is no other to read it")
    process = multiprocessing.get_context("spawn").Process(
        target=_declare_and_spend, args=(backend,)
    )
    process.start()
    process.join(60)
    assert process.exitcode == 0
    # This process never declares either budget: it reads them, limits and windows included.
    status = llmguard.budget_status("admin-read", storage=backend)
    paris = ZoneInfo("Europe/Paris")
    monday = window_of("week", datetime.now(paris))[0]
    assert (status.limit_usd, status.spent_usd, status.remaining_usd) == (
        Decimal("0.05"),
        Decimal("0.0035"),
        Decimal("0.0465"),
    )
    assert status.window_start == monday
    assert status.resets_at == datetime.combine(
        (monday + timedelta(days=7)).date(),  # type: ignore[operator]
        datetime.min.time(),
        paris,
    )
    keys = llmguard.budget_keys("per-tenant", storage=backend)
    assert {key: s.spent_usd for key, s in keys.items()} == {
        "alice": Decimal("0.007"),
        "bob": Decimal("0.0035"),
    }
    assert keys["alice"].limit_usd == Decimal("0.01")
    assert llmguard.budget_status("per-tenant", "bob", storage=backend).remaining_usd == Decimal(
        "0.0065"
    )
    llmguard.reset_budget("per-tenant", key="alice", storage=backend)
    assert list(llmguard.budget_keys("per-tenant", storage=backend)) == ["bob"]
    with pytest.raises(llmguard.ConfigurationError, match="pass key="):
        llmguard.budget_status("per-tenant", storage=backend)
    with pytest.raises(llmguard.ConfigurationError, match="has no key="):
        llmguard.budget_keys("admin-read", storage=backend)
    with pytest.raises(llmguard.ConfigurationError, match="no budget named 'never-used'"):
        llmguard.budget_status("never-used", storage=backend)


def test_a_keyed_budget_is_read_per_key(backend: str) -> None:
    @llmguard.budget(usd="0.01", name="keyed", key=lambda user, **_: user, storage=backend)
    def ask(user: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        return user

    ask("alice")
    with pytest.raises(llmguard.ConfigurationError, match="budget_keys"):
        ask.budget_status()  # no invented key=None entry
    assert ask.budget_status("alice").spent_usd == Decimal("0.0035")  # type: ignore[attr-defined]
    assert list(llmguard.budget_keys("keyed")) == ["alice"]
    with pytest.raises(llmguard.ConfigurationError, match="pass key="):
        llmguard.reset_budget("keyed")


# -- names and keys are arbitrary strings ----------------------------------------------------


def test_names_and_keys_never_share_a_ledger(backend: str) -> None:
    def declare(name: str) -> Any:
        @llmguard.budget(usd="1", name=name, key=lambda user, **_: user, storage=backend)
        def ask(user: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
            llmguard.record_usage(1000, 100)  # $0.0035
            return user

        return ask

    vip, team = declare("team:vip"), declare("team")
    vip("alice")
    team("vip:alice")
    team("vip:alice")
    for user in ("", "-", "100%", "a%3Ab", "a:b"):
        team(user)
    assert llmguard.budget_status("team:vip", key="alice").spent_usd == Decimal("0.0035")
    assert llmguard.budget_status("team", key="vip:alice").spent_usd == Decimal("0.007")
    assert llmguard.budget_status("team", key="-").spent_usd == Decimal("0.0035")
    assert {k: s.spent_usd for k, s in llmguard.budget_keys("team:vip").items()} == {
        "alice": Decimal("0.0035")
    }
    assert {k: s.spent_usd for k, s in llmguard.budget_keys("team").items()} == {
        "": Decimal("0.0035"),
        "-": Decimal("0.0035"),
        "100%": Decimal("0.0035"),
        "a%3Ab": Decimal("0.0035"),
        "a:b": Decimal("0.0035"),
        "vip:alice": Decimal("0.007"),
    }


def test_ledger_keys_round_trip_and_never_collide() -> None:
    from llmguard._ledger import ledger_key, ledger_prefix, parse_ledger_key

    texts = ["", "-", "=", "a", "a:b", "a%3Ab", "%", "100%", "%25", ":", "a:-", "é *?[]"]
    built = {}
    for name in texts:
        for key in [None, *texts]:
            text = ledger_key(name, key, "total")
            assert text.count(":") == 4  # llmguard:budget:<name>:<key>:<window>
            parsed = parse_ledger_key(text)
            assert parsed is not None
            assert (parsed.name, parsed.key, parsed.window) == (name, key, "total")
            assert text.startswith(ledger_prefix(name, key))
            built[text] = (name, key)
    assert len(built) == len(texts) * (len(texts) + 1)
    for text, (name, key) in built.items():  # a prefix selects exactly its own ledgers
        assert [t for t in built if t.startswith(ledger_prefix(name, key))] == [text]
    for foreign in (
        "llmguard:budget:team:bob:20260101T000000",  # the old format of a keyed budget
        "llmguard:budget:a:b:-:total",  # the old format of a name with ':'
        "llmguard:budget:50%:-:total",
        "llmguard:budget:team:-:total:alert:0.5",
        "llmguard:budget:team:-:yesterday",
    ):
        assert parse_ledger_key(foreign) is None


def test_cli_reads_and_resets_exactly_one_key(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmguard._cli import main

    @llmguard.budget(usd="1", name="crew", key=lambda user, **_: user, storage=backend)
    def ask(user: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        return user

    ask("bob")
    ask("bob:x")
    # Ledgers in the format of earlier versions (and foreign keys) are skipped, not misread.
    storage = llmguard.open_storage(backend)
    today = datetime.now(timezone.utc).strftime("%Y%m%dT000000")
    for old in (f"llmguard:budget:crew:carol:{today}", f"llmguard:budget:crew:x:y:{today}"):
        storage.set(old, b'{"spent": 5, "res": {}}')
    capsys.readouterr()
    assert main(["budget", "status", "crew", "--storage", backend, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["key"], r["spent_usd"], r["limit_usd"]) for r in rows] == [
        ("bob", "0.0035", "1"),
        ("bob:x", "0.0035", "1"),
    ]
    assert main(["budget", "reset", "crew", "--key", "bob", "--storage", backend]) == 0
    assert llmguard.budget_status("crew", key="bob").spent_usd == 0
    assert llmguard.budget_status("crew", key="bob:x").spent_usd == Decimal("0.0035")
    assert main(["budget", "status", "--storage", backend]) == 0
    table = capsys.readouterr().out
    assert "bob:x" in table
    assert "carol" not in table
    assert main(["budget", "status", "crew", "--key", "bob:x", "--storage", backend]) == 0
    assert "0.9965" in capsys.readouterr().out


# -- one name, one definition -------------------------------------------------------------


def test_declarations_of_one_name_must_agree(backend: str) -> None:
    count = iter(range(100))

    def declare(**options: Any) -> Any:
        def fn() -> None: ...

        fn.__qualname__ = f"function_{next(count)}"  # each declaration on its own function
        return llmguard.budget(name="shared", storage=backend, **options)(fn)

    declare(usd="0.05", per="day")
    declare(usd=Decimal("0.050"), per="day", on_exceed="warn")  # the same limits: accepted
    for options in (
        {"usd": "0.10", "per": "day"},
        {"usd": "0.05", "per": "month"},
        {"usd": "0.05", "per": timedelta(hours=24)},
        {"usd": "0.05", "per": "day", "tz": "Europe/Paris"},
        {"usd": "0.05", "per": "day", "key": lambda: "k"},
    ):
        with pytest.raises(llmguard.ConfigurationError, match=r"already declared with usd=0\.05"):
            declare(**options)
    assert llmguard.budget_status("shared").limit_usd == Decimal("0.05")


def test_the_same_function_defined_again_redefines_its_budget(backend: str) -> None:
    """A re-run notebook cell or a reloaded module: the latest definition is the budget's."""
    for usd in ("0.05", "0.10"):

        @llmguard.budget(usd=usd, name="redefined", storage=backend)
        def ask() -> None: ...

    assert llmguard.budget_status("redefined").limit_usd == Decimal("0.10")


def test_a_different_stored_definition_is_replaced_with_a_warning(
    backend: str, events: CapturedEvents
) -> None:
    from llmguard import _budget

    spender("sync", usd="0.01", name="moved", storage=backend)("x")
    _budget.reset_registry()  # as if this were a later deployment with a new limit
    raised = spender("sync", usd="0.02", name="moved", storage=backend)
    raised("x")
    [warning] = events.of("budget_redefined")
    assert "usd=0.01" in warning["stored"]
    assert "usd=0.02" in warning["declared"]
    _budget.reset_registry()
    assert llmguard.budget_status("moved", storage=backend).limit_usd == Decimal("0.02")


# -- calls in flight: on_exceed="wait" ------------------------------------------------------


def in_parallel(fn: Any, args: list[Any], on_outcome: Any = None) -> list[Any]:
    """Call ``fn(arg)`` for every arg at once (threads, or tasks of one event loop): the
    results or the exceptions raised, in order; ``on_outcome(outcome)`` as each ends."""

    def ended(outcome: Any) -> Any:
        if on_outcome is not None:
            on_outcome(outcome)
        return outcome

    if asyncio.iscoroutinefunction(fn):

        async def one_task(arg: Any) -> Any:
            try:
                return ended(await fn(arg))
            except Exception as exc:
                return ended(exc)

        async def main() -> list[Any]:
            return await asyncio.gather(*(one_task(a) for a in args))

        return asyncio.run(main())
    outcomes: list[Any] = [None] * len(args)
    start = threading.Barrier(len(args))

    def one(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = ended(fn(args[i]))
        except Exception as exc:
            outcomes[i] = ended(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(args))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def worst_case_spender(flavour: str, release: threading.Event, **options: Any) -> Any:
    """Reserves $0.0030025 (300 output tokens on gpt-4o) and spends $0.000425, once
    ``release`` is set (at most 10 s later)."""
    if flavour == "sync":

        @llmguard.budget(prompt=lambda text, **_: text, **options)
        def ask(text: str, max_tokens: int = 300, model: str = "gpt-4o") -> str:
            release.wait(10)
            llmguard.record_usage(10, 40)
            return "ok"

    else:

        @llmguard.budget(prompt=lambda text, **_: text, **options)
        async def ask(text: str, max_tokens: int = 300, model: str = "gpt-4o") -> str:  # type: ignore[misc]
            deadline = time.monotonic() + 10
            while not release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            llmguard.record_usage(10, 40)
            return "ok"

    return ask


def test_calls_in_flight_are_not_spend(flavour: str, backend: str) -> None:
    release = threading.Event()
    refused: list[llmguard.BudgetExceeded] = []

    def count(outcome: Any) -> None:
        if isinstance(outcome, llmguard.BudgetExceeded):
            refused.append(outcome)
            if len(refused) == 7:
                release.set()  # the three calls in flight may end

    ask = worst_case_spender(flavour, release, usd="0.01", name=f"burst-{flavour}", storage=backend)
    in_parallel(ask, ["x"] * 10, count)
    assert len(refused) == 7  # three worst cases fit in $0.01, though each spends $0.000425
    message = str(refused[0])
    assert "spent $0.00 (settled), $0.0090075 reserved by calls in flight" in message
    assert "it would fit once the calls in flight settle: @budget(on_exceed='wait')" in message
    assert (refused[0].spent_usd, refused[0].reserved_usd) == (0, Decimal("0.0090075"))

    release.clear()
    patient = worst_case_spender(
        flavour, release, usd="0.01", name=f"queue-{flavour}", storage=backend, on_exceed="wait"
    )
    timer = threading.Timer(0.05, release.set)  # the first three calls take 50 ms or more
    timer.start()
    assert in_parallel(patient, ["x"] * 10) == ["ok"] * 10
    status = patient.budget_status()
    assert (status.spent_usd, status.reserved_usd) == (Decimal("0.00425"), 0)


def test_wait_refuses_at_once_what_cannot_fit_next_to_the_spend(flavour: str, backend: str) -> None:
    slept: list[float] = []

    async def async_sleep(seconds: float) -> None:
        slept.append(seconds)

    ask = spender(
        flavour,
        usd="0.004",
        storage=backend,
        on_exceed="wait",
        sleep=slept.append,
        async_sleep=async_sleep,
    )
    call(ask, "x")  # $0.0035 spent
    with pytest.raises(llmguard.BudgetExceeded) as info:
        call(ask, "x")  # up to $0.0010025 more can never fit
    assert slept == []
    assert "would fit" not in str(info.value)


def test_wait_gives_up_after_max_wait_and_proceeds_when_room_frees(
    flavour: str, backend: str
) -> None:
    now = [1_800_000_000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def async_sleep(seconds: float) -> None:
        sleep(seconds)

    def declare(max_wait: float) -> Any:
        return spender(
            flavour,
            usage=(1, 100),  # $0.0010025, the worst case reserved
            usd="0.003",
            name="patient",
            storage=backend,
            reservation_ttl=60,
            clock=lambda: now[0],
            on_exceed="wait",
            max_wait=max_wait,
            sleep=sleep,
            async_sleep=async_sleep,
        )

    ask = declare(max_wait=5)
    layer = ask.__llmguard__.layers[0]
    ledger_key = layer._ledger_key("patient", None, layer._window()[0])
    ok, _, _ = layer.ledger().reserve(  # a call in flight elsewhere holds $0.002 for 60 s
        ledger_key, layer.limit_pico, 2 * 10**9, "ghost", int((now[0] + 60) * 1000), 0, None
    )
    assert ok
    with pytest.raises(llmguard.BudgetExceeded, match=r"did not within max_wait=5s"):
        call(ask, "x")
    assert sum(slept) == pytest.approx(5)
    slept.clear()
    assert call(declare(max_wait=120), "x") == "ok"  # the ghost's reservation expired at 60 s
    assert 55 < sum(slept) < 61


# -- a prompt the arguments do not show -------------------------------------------------------

HIDDEN_COST = Decimal("0.0505")  # 20,000 hidden prompt tokens + 50 output tokens on gpt-4o


def hidden_prompt(flavour: str, **options: Any) -> Any:
    """Its arguments show a 3-token prompt (a $0.0005075 worst case); it sends 20,000."""
    if flavour == "sync":

        @llmguard.budget(**options)
        def summarize(doc_id: str, max_tokens: int = 50, model: str = "gpt-4o") -> str:
            time.sleep(0.02)
            llmguard.record_usage(20_000, 50)
            return "summary"

    else:

        @llmguard.budget(**options)
        async def summarize(doc_id: str, max_tokens: int = 50, model: str = "gpt-4o") -> str:  # type: ignore[misc]
            await asyncio.sleep(0.02)
            llmguard.record_usage(20_000, 50)
            return "summary"

    return summarize


def test_hidden_prompts_overshoot_by_at_most_one_call(
    flavour: str, backend: str, events: CapturedEvents
) -> None:
    summarize = hidden_prompt(flavour, usd="0.2", per="total", name="hidden", storage=backend)
    outcomes = in_parallel(summarize, [f"doc-{i}" for i in range(32)])
    assert any(isinstance(o, llmguard.BudgetExceeded) for o in outcomes)
    spent = summarize.budget_status().spent_usd
    assert spent <= Decimal("0.2") + HIDDEN_COST  # one call per process, at most
    assert spent == HIDDEN_COST * sum(o == "summary" for o in outcomes)
    [warning] = events.of("budget_underestimate")
    assert warning["function"] == summarize.__llmguard__.name
    assert "prompt=" in warning["hint"]
    assert (warning["reserved_usd"], warning["cost_usd"]) == (0.0005075, 0.0505)
    refused = next(o for o in outcomes if isinstance(o, llmguard.BudgetExceeded))
    assert refused.estimate_usd == HIDDEN_COST
    assert "the largest cost seen of" in str(refused)


def test_other_processes_start_from_the_learned_floor(backend: str) -> None:
    first = hidden_prompt("sync", usd="0.08", per="total", name="floor", storage=backend)
    first("doc-1")  # $0.0505 spent: $0.0295 left, far more than the $0.0005075 estimate
    # A new layer knows nothing of this process's floor: as in another process, it reads
    # the one stored in the ledger and reserves the $0.0505 that no longer fits.
    second = hidden_prompt("sync", usd="0.08", per="total", name="floor", storage=backend)
    with pytest.raises(llmguard.BudgetExceeded) as info:
        second("doc-2")
    assert info.value.estimate_usd == HIDDEN_COST
    assert second.budget_status().spent_usd == HIDDEN_COST


def test_a_first_call_may_call_its_own_function(flavour: str, backend: str) -> None:
    # The first call of a function runs alone; a call of it made inside must not wait for it.
    if flavour == "sync":

        @llmguard.budget(usd="1", name="recursive", storage=backend, reservation_ttl=30)
        def summarize(text: str, depth: int = 2, model: str = "gpt-4o") -> str:
            return "leaf" if depth == 0 else summarize(text, depth - 1)

    else:

        @llmguard.budget(usd="1", name="recursive", storage=backend, reservation_ttl=30)
        async def summarize(text: str, depth: int = 2, model: str = "gpt-4o") -> str:  # type: ignore[misc]
            return "leaf" if depth == 0 else await summarize(text, depth - 1)

    started = time.monotonic()
    assert call(summarize, "x") == "leaf"
    assert time.monotonic() - started < 10
