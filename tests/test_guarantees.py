"""Cost, budget and tenancy guarantees on the paths real applications take (issue 11):
interrupts and cancellations, negative numbers, another tenant's refusal, per-call options,
``key=`` / ``when=`` functions, and downgrades when a budget refuses the default model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard.testing import CapturedEvents, FakeLLMServer

from .conftest import call


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield f"file://{tmp_path}/store"
    else:
        yield request.getfixturevalue("redis_uri")


# -- interrupts and cancellations release what a call holds --------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_releases_the_budget_reservation(
    backend: str, interrupt: type[BaseException]
) -> None:
    @llmguard.budget(usd="1", storage=backend, name="interrupted")
    def ask(text: str, model: str = "gpt-4o") -> str:
        raise interrupt()

    with pytest.raises(interrupt):
        ask("hello")
    # The exception (and so the call's frames) is still alive here: nothing may wait for GC.
    status = llmguard.budget_status("interrupted")
    assert (status.spent_usd, status.reserved_usd) == (0, 0)


@pytest.mark.parametrize("how", ["cancel", "wait_for", "timeout"])
def test_a_cancelled_task_releases_the_budget_reservation(backend: str, how: str) -> None:
    entered = asyncio.Event()

    @llmguard.budget(usd="1", storage=backend, name=f"cancelled-{how}")
    async def ask(text: str, model: str = "gpt-4o") -> str:
        entered.set()
        await asyncio.sleep(60)
        return "never"

    async def main() -> None:
        if how == "cancel":
            task = asyncio.create_task(ask("hello"))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "wait_for":
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ask("hello"), 0.05)
        else:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):  # type: ignore[attr-defined,unused-ignore]
                    await ask("hello")

    if how == "timeout" and not hasattr(asyncio, "timeout"):
        pytest.skip("asyncio.timeout needs Python 3.11")
    asyncio.run(main())
    status = llmguard.budget_status(f"cancelled-{how}")
    assert (status.spent_usd, status.reserved_usd) == (0, 0)


def test_a_cancelled_cache_leader_releases_its_lock(backend: str) -> None:
    entered = asyncio.Event()

    @llmguard.cached(storage=backend, lock_timeout=60)
    async def slow(text: str) -> str:
        entered.set()
        await asyncio.sleep(60)
        return "never"

    async def main() -> None:
        task = asyncio.create_task(slow("x"))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # Another process could take the lock now, rather than wait lock_timeout for it.
    storage = llmguard.open_storage(backend)
    assert storage.add(slow.cache_key("x") + ":lock", b"other", 10)


def test_an_interrupted_cache_leader_releases_its_lock(backend: str) -> None:
    @llmguard.cached(storage=backend, lock_timeout=60)
    def interrupted(text: str) -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted("x")
    storage = llmguard.open_storage(backend)
    assert storage.add(interrupted.cache_key("x") + ":lock", b"other", 10)


def test_retries_never_retry_an_interrupt() -> None:
    runs: list[int] = []

    @llmguard.retry_on_rate_limit(max_tries=5, sleep=lambda s: None)
    def ask(text: str) -> str:
        runs.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ask("x")
    assert runs == [1]


# -- negative and absurd numbers never take spend off a ledger --------------------------------


def test_a_negative_max_tokens_does_not_shrink_the_reservation(backend: str) -> None:
    runs: list[int] = []

    @llmguard.budget(usd="0.001", storage=backend, name="negative-max")
    def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        runs.append(1)
        return "ok"

    # With the default output budget (1,024 tokens of gpt-4o: $0.01) the call cannot fit.
    for _ in range(20):
        with pytest.raises(llmguard.BudgetExceeded):
            ask("hi", max_tokens=-1_000_000)
    assert runs == []
    assert llmguard.budget_status("negative-max").reserved_usd == 0


def test_negative_provider_usage_is_counted_as_zero(backend: str, events: CapturedEvents) -> None:
    @llmguard.budget(usd="1", storage=backend, name="negative-usage")
    def ask(text: str, model: str = "gpt-4o") -> dict[str, Any]:
        return {
            "model": "gpt-4o",
            "usage": {"prompt_tokens": -1_000_000, "completion_tokens": -5},
        }

    ask("hi")
    ask("hi")
    status = llmguard.budget_status("negative-usage")
    assert (status.spent_usd, status.reserved_usd) == (0, 0)
    assert [(e["input_tokens"], e["output_tokens"], e["cost_usd"]) for e in events.calls] == [
        (0, 0, 0.0),
        (0, 0, 0.0),
    ]
    [warning] = events.of("impossible_usage")
    assert warning["input_tokens"] == -1_000_000


@pytest.mark.parametrize("cost", ["-5", float("inf"), float("nan"), "1e400", "abc", True])
def test_a_nonsense_recorded_cost_is_replaced_by_the_priced_tokens(
    backend: str, cost: Any, events: CapturedEvents
) -> None:
    @llmguard.budget(usd="1", storage=backend, name="nonsense-cost")
    def ask(text: str, model: str = "gpt-4o") -> str:
        llmguard.record_usage(10, 10, cost_usd=cost)  # after the provider was paid
        return "ok"

    assert ask("hi") == "ok"  # never fails the call that was paid for
    assert llmguard.budget_status("nonsense-cost").spent_usd == Decimal("0.000125")
    assert events.calls[0]["cost_usd"] == 0.000125
    assert events.of("impossible_usage")


def test_absurd_provider_usage_cannot_overflow_the_ledger(backend: str) -> None:
    @llmguard.budget(usd="1", storage=backend, name="absurd-usage")
    def ask(text: str, max_tokens: int = 10, model: str = "gpt-4o") -> dict[str, Any]:
        return {"model": "gpt-4o", "usage": {"prompt_tokens": 10**20, "completion_tokens": 1}}

    ask("hi")
    status = llmguard.budget_status("absurd-usage")
    assert status.spent_usd == 10_000  # charged, at most $10,000 a call: the cap holds
    with pytest.raises(llmguard.BudgetExceeded):
        ask("hi")


def test_budget_limits_stay_within_what_a_ledger_can_count() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="usd"):
        llmguard.budget(usd=10**7)


# -- a request sent and never answered may have been billed ---------------------------------


def test_a_timed_out_request_is_charged_its_worst_case(
    flavour: str, tmp_path: Path, events: CapturedEvents
) -> None:
    with FakeLLMServer(latency=1.0) as fake:
        aio = flavour == "async"
        client = llmguard.instrument(
            fake.openai_client(async_client=aio, timeout=0.1, max_retries=0)
        )
        budget = llmguard.budget(
            usd="1", storage=f"file://{tmp_path}/l", name=f"timeouts-{flavour}"
        )
        messages = [{"role": "user", "content": "hello"}]
        if aio:

            async def aask(max_tokens: int = 100, model: str = "gpt-4o") -> Any:
                return await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens
                )

            fn = budget(aask)
        else:

            def ask(max_tokens: int = 100, model: str = "gpt-4o") -> Any:
                return client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens
                )

            fn = budget(ask)
        with pytest.raises(Exception, match=r"(?i)time"):
            call(fn)
        assert len(fake.requests) == 1  # it reached the provider
    status = llmguard.budget_status(f"timeouts-{flavour}")
    assert status.reserved_usd == 0
    assert status.spent_usd > 0  # the worst case reserved: the provider may have done the work
    assert events.calls[0]["cost_source"] == "unanswered"
    assert events.calls[0]["budget_charged_unanswered"] is True
    assert Decimal(str(events.calls[0]["budget_charged_usd"])) == status.spent_usd


def test_a_provider_error_answer_is_not_charged(tmp_path: Path) -> None:
    with FakeLLMServer() as fake:
        client = llmguard.instrument(fake.openai_client(max_retries=0))
        fake.fail_next(1, 500)

        @llmguard.budget(usd="1", storage=f"file://{tmp_path}/l", name="answered-error")
        def ask(max_tokens: int = 100, model: str = "gpt-4o") -> Any:
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=max_tokens
            )

        with pytest.raises(Exception, match=r"500|Internal|server"):
            ask()
    assert llmguard.budget_status("answered-error").spent_usd == 0


def test_impossible_prices_cost_nothing() -> None:
    price = llmguard.get_price("gpt-4o")
    assert price is not None
    assert price.cost(-1000, -1000) == 0
    assert price.cost(-1000, 10, cached_input_tokens=-5) >= 0


@pytest.mark.parametrize(
    "options",
    [
        {"default_output_tokens": -5000},
        {"default_output_tokens": 1.5},
        {"reservation_ttl": float("inf")},
        {"reservation_ttl": float("nan")},
        {"reservation_ttl": True},
    ],
)
def test_absurd_budget_options_fail_at_decoration(options: dict[str, Any]) -> None:
    with pytest.raises(llmguard.ConfigurationError, match=next(iter(options))):
        llmguard.budget(usd="1", **options)


# -- a follower never receives another tenant's refusal --------------------------------------


def _tenants(storage: str, runs: list[str], started: threading.Event | None) -> Any:
    def tenant(user: str, **_: Any) -> str:
        if user == "alice" and started is not None:
            started.set()
            time.sleep(0.3)  # let bob arrive and wait on alice's flight
        return user

    @llmguard.cached(ignore=("user",), storage=storage)
    @llmguard.budget(usd="0.01", key=tenant, storage=storage, name="tenants")
    def answer(user: str, question: str, max_tokens: int = 10, model: str = "gpt-4o") -> str:
        runs.append(user)
        llmguard.record_usage(100, 10)
        return f"answer to {question}"

    return answer


def test_a_follower_never_gets_the_leaders_budget_refusal(backend: str) -> None:
    runs: list[str] = []
    started = threading.Event()
    answer = _tenants(backend, runs, started)
    # alice has spent her budget; bob has spent nothing.
    ledger_filler = _tenants(backend, [], None)
    with llmguard.bypass_cache():
        for _ in range(100):
            try:
                ledger_filler("alice", "filler")
            except llmguard.BudgetExceeded:
                break
    results: dict[str, Any] = {}

    def ask(user: str) -> None:
        try:
            results[user] = answer(user, "same question")
        except llmguard.LLMGuardError as exc:
            results[user] = exc

    alice = threading.Thread(target=ask, args=("alice",))
    alice.start()
    assert started.wait(5)
    bob = threading.Thread(target=ask, args=("bob",))
    bob.start()
    alice.join()
    bob.join()
    assert isinstance(results["alice"], llmguard.BudgetExceeded)
    assert results["alice"].key == "alice"
    assert results["bob"] == "answer to same question"  # bob ran as his own leader
    assert runs == ["bob"]


def test_async_followers_never_get_the_leaders_budget_refusal(redis_uri: str) -> None:
    runs: list[str] = []

    @llmguard.budget(usd="0.01", key=lambda user: user, storage=redis_uri, name="tenants")
    def spend_it_all(user: str, max_tokens: int = 10, model: str = "gpt-4o") -> None:
        llmguard.record_usage(10_000, 1_000)  # $0.035: alice's budget is gone

    spend_it_all("alice")

    async def main() -> list[Any]:
        @llmguard.cached(ignore=("user",), storage=redis_uri)
        @llmguard.budget(usd="0.01", key=lambda user: user, storage=redis_uri, name="tenants")
        async def aanswer(
            user: str, question: str, max_tokens: int = 10, model: str = "gpt-4o"
        ) -> str:
            runs.append(user)
            llmguard.record_usage(100, 10)
            return f"answer to {question}"

        return await asyncio.gather(
            aanswer("alice", "same"), aanswer("bob", "same"), return_exceptions=True
        )

    alice, bob = asyncio.run(main())
    assert isinstance(alice, llmguard.BudgetExceeded)
    assert alice.key == "alice"
    assert bob == "answer to same"


def test_followers_still_share_the_upstream_error() -> None:
    """The function's own failure is not a policy's: waiting callers share it (one call)."""
    runs: list[int] = []
    gate = threading.Barrier(8)

    @llmguard.cached
    def failing(text: str) -> str:
        runs.append(1)
        time.sleep(0.2)
        raise RuntimeError("upstream 500")

    errors: list[BaseException] = []

    def worker() -> None:
        gate.wait()
        try:
            failing("same")
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1
    assert len(errors) == 8


# -- per-call options are declared once and every layer knows them ---------------------------


def routed_and_cached(flavour: str, runs: list[str]) -> Any:
    if flavour == "sync":

        @llmguard.cached
        @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda text: len(text) < 100)
        def summarize(text: str, *, model: str = "gpt-4o") -> str:
            runs.append(model)
            return f"{model}: {text}"

        return summarize

    @llmguard.cached
    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda text: len(text) < 100)
    async def asummarize(text: str, *, model: str = "gpt-4o") -> str:
        runs.append(model)
        return f"{model}: {text}"

    return asummarize


def test_critical_calls_are_cached_under_their_own_key(
    flavour: str, events: CapturedEvents
) -> None:
    runs: list[str] = []
    summarize = routed_and_cached(flavour, runs)
    assert call(summarize, "short") == "gpt-4o-mini: short"
    assert call(summarize, "short", critical=True) == "gpt-4o: short"
    assert call(summarize, "short", critical=True) == "gpt-4o: short"
    assert call(summarize.with_options(critical=True), "short") == "gpt-4o: short"
    assert call(summarize, "short") == "gpt-4o-mini: short"
    assert runs == ["gpt-4o-mini", "gpt-4o"]
    assert [e["cache"] for e in events.calls] == ["miss", "miss", "hit", "hit", "hit"]
    assert summarize.cache_key("short", critical=True) != summarize.cache_key("short")


def test_with_options_refuses_options_nobody_takes() -> None:
    runs: list[str] = []
    summarize = routed_and_cached("sync", runs)
    with pytest.raises(llmguard.ConfigurationError, match="critical"):
        summarize.with_options(urgent=True)

    @llmguard.cached
    def plain(text: str) -> str:
        return text

    with pytest.raises(llmguard.ConfigurationError, match="none"):
        plain.with_options(critical=True)


# -- key= and when= get the call's arguments by name -----------------------------------------


def test_budget_and_rate_limit_keys_get_arguments_by_name(tmp_path: Path) -> None:
    storage = f"file://{tmp_path}/store"

    @llmguard.budget(usd="1", key=lambda user, **_: user, storage=storage, name="research")
    @llmguard.rate_limited("100/minute", key=lambda user: user, storage=storage)
    def research(user: str, question: str, model: str = "gpt-4o-mini") -> str:
        llmguard.record_usage(1000, 100)
        return "ok"

    assert research("alice", "q") == "ok"  # README's own key= used to raise TypeError here
    assert research(question="q", user="bob") == "ok"
    assert llmguard.budget_status("research", key="alice").spent_usd > 0
    assert llmguard.budget_status("research", key="bob").spent_usd > 0


def test_a_failing_key_function_names_its_decorator_and_option() -> None:
    @llmguard.budget(usd="1", key=lambda user: user["id"])
    def ask(user: str, model: str = "gpt-4o") -> str:
        return "ok"

    with pytest.raises(llmguard.ConfigurationError, match=r"@budget\(key=\.\.\.\)") as info:
        ask("alice")
    assert isinstance(info.value.__cause__, TypeError)


def test_a_call_that_does_not_fit_the_signature_raises_the_functions_own_error() -> None:
    @llmguard.budget(usd="1", key=lambda user: user)
    def ask(user: str, model: str = "gpt-4o") -> str:
        return "ok"

    with pytest.raises(TypeError, match="unexpected keyword"):
        ask("alice", nope=1)  # type: ignore[call-arg]


def test_when_gets_arguments_by_name_and_star_args_get_them_as_passed() -> None:
    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda *a, **k: a == ("x",))
    def raw(text: str, *, model: str = "gpt-4o") -> str:
        return model

    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda text: text == "x")
    def named(text: str, *, model: str = "gpt-4o") -> str:
        return model

    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda q, **_: q == "x")
    def other_names(text: str, *, model: str = "gpt-4o") -> str:
        return model

    assert named(text="x") == "gpt-4o-mini"
    assert raw("x") == "gpt-4o-mini"
    assert other_names("x") == "gpt-4o-mini"  # names that are not the function's: as passed


def test_cache_key_functions_get_arguments_by_name() -> None:
    @llmguard.cached(key=lambda question: question.lower())
    def ask(user: str, question: str) -> str:
        return f"{user}: {question}"

    assert ask("alice", "Hello") == "alice: Hello"
    assert ask("bob", "HELLO") == "alice: Hello"  # the same key
    assert ask.cache_key("x", "hello") == ask.cache_key(question="HELLO", user="y")


# -- a budget that cannot take the default model's worst case downgrades ---------------------


def test_budget_refusal_downgrades_to_the_cheap_model(
    tmp_path: Path, events: CapturedEvents
) -> None:
    storage = f"file://{tmp_path}/store"

    @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", downgrade_at=0.9, budget="downgrades")
    @llmguard.budget(usd="0.005", storage=storage, name="downgrades")
    def ask(text: str, max_tokens: int = 1000, *, model: str = "gpt-4o") -> str:
        return model

    # gpt-4o's worst case ($0.01 for 1,000 output tokens) does not fit $0.005; mini's does.
    assert ask("hi") == "gpt-4o-mini"
    assert events.calls[-1]["route"] == "downgrade:budget"
    assert events.calls[-1]["downgraded_from"] == "gpt-4o"
    with pytest.raises(llmguard.BudgetExceeded):
        ask("hi", critical=True)  # never downgraded
    status = llmguard.budget_status("downgrades")
    assert status.reserved_usd == 0
    assert status.spent_usd < Decimal("0.005")


def test_budget_refusal_moves_to_a_fallback(tmp_path: Path) -> None:
    @llmguard.route_model("gpt-4o", fallbacks=["gpt-4o-mini"])
    @llmguard.budget(usd="0.005", storage=f"file://{tmp_path}/store", name="fallbacks")
    def ask(text: str, max_tokens: int = 1000, *, model: str = "gpt-4o") -> str:
        return model

    assert ask("hi") == "gpt-4o-mini"


# -- one response, one bill ------------------------------------------------------------------


def test_an_outer_call_returning_an_inner_response_does_not_bill_it_again(
    flavour: str, events: CapturedEvents
) -> None:
    response = {"model": "gpt-4o", "usage": {"prompt_tokens": 1000, "completion_tokens": 100}}

    if flavour == "sync":

        @llmguard.track
        def inner(text: str) -> dict[str, Any]:
            return dict(response)

        @llmguard.track
        def outer(text: str) -> dict[str, Any]:
            return inner(text)

    else:

        @llmguard.track
        async def inner(text: str) -> dict[str, Any]:  # type: ignore[misc]
            return dict(response)

        @llmguard.track
        async def outer(text: str) -> dict[str, Any]:  # type: ignore[misc]
            return await inner(text)

    call(outer, "x")
    inner_event, outer_event = events.calls
    assert inner_event["cost_usd"] == 0.0035
    assert outer_event["cost_source"] == "children"
    assert outer_event["cost_usd"] == 0.0
    assert outer_event["children_cost_usd"] == 0.0035


def test_an_on_alert_callback_that_raises_does_not_fail_the_call(
    tmp_path: Path, events: CapturedEvents
) -> None:
    def broken(alert: llmguard.BudgetStatus) -> None:
        raise RuntimeError("pager down")

    @llmguard.budget(
        usd="0.01", alert_at=(0.1,), on_alert=broken, storage=f"file://{tmp_path}/s", name="al"
    )
    def ask(text: str, max_tokens: int = 10, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        return "ok"

    assert ask("x") == "ok"  # crossed 10%: the alert fired, its callback raised
    assert ask("x") == "ok"
    [warning] = events.of("alert_callback_failed")
    assert "pager down" in warning["error"]
    assert llmguard.budget_status("al").spent_usd == Decimal("0.007")
