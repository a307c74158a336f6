from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Generator
from decimal import Decimal
from typing import Any

import pytest

import llmguard
from llmguard._pipeline import PROCEED, Blocking, CallRecord, Sleep, guard
from llmguard.testing import CapturedEvents

from .conftest import call, make

PROMPT = "Summarize the quarterly report for the board in plain English. " * 4


def test_one_event_with_the_documented_fields(flavour: str, events: CapturedEvents) -> None:
    def summarize(text: str, *, model: str = "gpt-4o") -> str:
        return "A short summary."

    fn = make(flavour, summarize)
    assert call(fn, PROMPT) == "A short summary."
    [event] = events.calls
    expected_in = llmguard.count_tokens(PROMPT, "gpt-4o")
    expected_out = llmguard.count_tokens("A short summary.", "gpt-4o")
    assert event["event"] == "llm_call"
    assert event["log_level"] == "info"
    assert (
        event["function"]
        == f"{__name__}.test_one_event_with_the_documented_fields.<locals>.summarize"
    )
    assert event["model"] == "gpt-4o"
    assert (event["input_tokens"], event["output_tokens"]) == (expected_in, expected_out)
    assert event["cached_input_tokens"] == 0
    assert event["cost_source"] == "estimate"
    assert event["tokens_method"] == "tiktoken:o200k_base"
    assert Decimal(str(event["cost_usd"])) == llmguard.calc_cost(
        "gpt-4o", expected_in, expected_out
    )
    assert (event["outcome"], event["error"], event["parent_id"]) == ("ok", None, None)
    assert len(event["call_id"]) == 16
    assert event["latency_ms"] >= 0


def test_events_never_contain_prompt_or_completion(flavour: str, events: CapturedEvents) -> None:
    fn = make(flavour, lambda text, model="gpt-4o": "SECRET-COMPLETION")
    call(fn, "SECRET-PROMPT " + PROMPT)
    rendered = repr(events)
    assert "SECRET-PROMPT" not in rendered
    assert "SECRET-COMPLETION" not in rendered


def test_model_from_argument_decorator_and_default(flavour: str, events: CapturedEvents) -> None:
    def ask(question: str, model: str = "gpt-4o") -> str:
        return "ok"

    fn = make(flavour, ask)
    call(fn, "hi", "gpt-4o-mini")
    call(fn, "hi", model="gpt-4")
    call(fn, "hi")
    fixed = make(flavour, lambda question: "ok", model="gpt-4o-mini")
    call(fixed, "hi")
    assert [e["model"] for e in events.calls] == ["gpt-4o-mini", "gpt-4", "gpt-4o", "gpt-4o-mini"]


def test_messages_argument_counted_with_chat_formula(flavour: str, events: CapturedEvents) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    fn = make(flavour, lambda messages, model="gpt-4o": None)
    call(fn, messages)
    call(fn, messages=messages, model="gpt-4")
    first, second = events.calls
    assert first["input_tokens"] == llmguard.count_message_tokens(messages, "gpt-4o")
    assert second["input_tokens"] == llmguard.count_message_tokens(messages, "gpt-4")
    assert first["output_tokens"] == 0


def test_all_string_arguments_but_the_model_count(flavour: str, events: CapturedEvents) -> None:
    fn = make(flavour, lambda a, b, n, *, style, model="gpt-4o": "")
    call(fn, "alpha beta", "gamma", 3, style="formal", model="gpt-4o")
    expected = sum(llmguard.count_tokens(s, "gpt-4o") for s in ("alpha beta", "gamma", "formal"))
    assert events.calls[0]["input_tokens"] == expected


def test_prompt_override(flavour: str, events: CapturedEvents) -> None:
    fn = make(
        flavour, lambda doc, ignored: "", model="gpt-4o", prompt=lambda doc, ignored: doc["body"]
    )
    call(fn, {"body": "the real prompt text"}, "not the prompt " * 50)
    assert events.calls[0]["input_tokens"] == llmguard.count_tokens(
        "the real prompt text", "gpt-4o"
    )
    msgs = [{"role": "user", "content": "hi"}]
    fn2 = make(flavour, lambda x: "", model="gpt-4o", prompt=lambda x: msgs)
    call(fn2, 1)
    assert events.calls[1]["input_tokens"] == llmguard.count_message_tokens(msgs, "gpt-4o")


def test_usage_from_return_value_wins(flavour: str, events: CapturedEvents) -> None:
    response = {
        "model": "gpt-4o-2024-08-06",
        "usage": {
            "prompt_tokens": 1000,
            "completion_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": 600},
        },
    }
    fn = make(flavour, lambda text, model="gpt-4o-mini": response)
    call(fn, PROMPT)
    [event] = events.calls
    assert event["model"] == "gpt-4o-2024-08-06"
    assert (event["input_tokens"], event["cached_input_tokens"], event["output_tokens"]) == (
        1000,
        600,
        100,
    )
    assert (event["cost_usd"], event["cost_source"]) == (0.00275, "usage")
    assert "tokens_method" not in event


def test_unknown_model_cost_is_none_not_zero(flavour: str, events: CapturedEvents) -> None:
    fn = make(flavour, lambda text, model="house-model-7": "ok")
    call(fn, "hello")
    call(fn, "hello")
    assert [e["cost_usd"] for e in events.calls] == [None, None]
    assert [e["cost_source"] for e in events.calls] == ["unknown", "unknown"]
    assert len(events.of("unknown_model_price")) == 1


def test_no_model_at_all_warns_once_per_function(flavour: str, events: CapturedEvents) -> None:
    fn = make(flavour, lambda text: "ok")
    call(fn, "hello")
    call(fn, "hello")
    assert events.calls[0]["model"] is None
    assert events.calls[0]["cost_usd"] is None
    assert len(events.of("unknown_model")) == 1


def test_error_outcome_is_warning_and_reraised_unchanged(
    flavour: str, events: CapturedEvents
) -> None:
    boom = KeyError("boom")

    def fail(text: str, model: str = "gpt-4o") -> str:
        raise boom

    fn = make(flavour, fail)
    with pytest.raises(KeyError) as info:
        call(fn, "x")
    assert info.value is boom
    [event] = events.calls
    assert (event["outcome"], event["error"], event["log_level"]) == (
        "error",
        "KeyError",
        "warning",
    )
    assert (event["cost_usd"], event["cost_source"]) == (0.0, "none")


def test_usage_reported_before_an_error_still_counts(flavour: str, events: CapturedEvents) -> None:
    def work(text: str, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)
        raise RuntimeError("after the provider call")

    fn = make(flavour, work)
    with pytest.raises(RuntimeError):
        call(fn, "x")
    assert (events.calls[0]["cost_usd"], events.calls[0]["cost_source"]) == (0.0035, "usage")


def test_record_usage_sums_several_calls_and_models(flavour: str, events: CapturedEvents) -> None:
    def work(text: str) -> str:
        assert llmguard.record_usage(1000, 100, model="gpt-4o")
        assert llmguard.record_usage(1000, 100, model="gpt-4o-mini")
        assert llmguard.record_usage(10, 10, model="house", cost_usd="0.5")
        return "done"

    fn = make(flavour, work)
    call(fn, "x")
    [event] = events.calls
    assert (event["input_tokens"], event["output_tokens"]) == (2010, 210)
    assert Decimal(str(event["cost_usd"])) == Decimal("0.0035") + Decimal("0.00021") + Decimal(
        "0.5"
    )
    assert event["models"] == ["gpt-4o", "gpt-4o-mini", "house"]
    assert event["model"] == "gpt-4o"


def test_record_usage_outside_a_call_and_bad_values() -> None:
    assert llmguard.record_usage(1, 1) is False

    @llmguard.track
    def bad() -> None:
        llmguard.record_usage(10, 1, cached_input_tokens=20)

    with pytest.raises(ValueError, match="whole input"):
        bad()


def test_stacked_decorators_share_one_record(flavour: str, events: CapturedEvents) -> None:
    seen: list[CallRecord] = []

    class Spy:
        def run(self, call_: CallRecord) -> Generator[Any, Any, Any]:
            seen.append(call_)
            result = yield PROCEED
            return result

    def body(text: str, model: str = "gpt-4o") -> str:
        seen.append(llmguard.current_call())  # type: ignore[arg-type]
        return "ok"

    inner = make(flavour, body)
    middle = guard(inner, decorator="spy", layer=Spy())
    outer = llmguard.track(model="gpt-4o-mini")(guard(middle, decorator="spy", layer=Spy()))
    assert call(outer, "hello", model="gpt-4") == "ok"
    assert len(events.calls) == 1
    assert len(seen) == 3
    assert seen[0] is seen[1] is seen[2]
    assert outer.__wrapped__ is not None
    assert inspect.signature(outer) == inspect.signature(body)
    assert outer.__llmguard__.fn is inner.__wrapped__  # one wrapper around the original


def test_nested_decorated_calls_have_parent_ids(flavour: str, events: CapturedEvents) -> None:
    inner = make(
        flavour,
        lambda text, model="gpt-4o-mini": {
            "model": "gpt-4o-mini",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
        },
    )

    if flavour == "sync":

        @llmguard.track
        def outer(text: str) -> str:
            inner(text)
            inner(text)
            return "done"

    else:

        @llmguard.track
        async def outer(text: str) -> str:  # type: ignore[misc]
            await inner(text)
            await inner(text)
            return "done"

    call(outer, "x")
    first, second, parent = events.calls
    assert first["parent_id"] == second["parent_id"] == parent["call_id"]
    assert parent["parent_id"] is None
    assert parent["cost_source"] == "children"
    assert parent["cost_usd"] == 0.0  # its provider calls are counted once, in the children
    assert parent["children"] == 2
    assert parent["children_cost_usd"] == 0.00042


def test_concurrent_asyncio_tasks_keep_their_own_records(events: CapturedEvents) -> None:
    @llmguard.track
    async def one(i: int, model: str = "gpt-4o") -> int:
        llmguard.record_usage(i, 0)
        await asyncio.sleep(0.001 * (5 - i))
        llmguard.record_usage(i, 0)
        return i

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(1, 5)))

    assert asyncio.run(main()) == [1, 2, 3, 4]
    assert sorted(e["input_tokens"] for e in events.calls) == [2, 4, 6, 8]


def test_threads_keep_their_own_records(events: CapturedEvents) -> None:
    @llmguard.track
    def one(i: int, model: str = "gpt-4o") -> int:
        llmguard.record_usage(i, 0)
        return i

    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e["input_tokens"] for e in events.calls) == list(range(1, 9))


class Assistant:
    prefix = "Answer: "

    @llmguard.track
    def ask(self, question: str, model: str = "gpt-4o") -> str:
        return self.prefix + question

    @llmguard.track
    async def aask(self, question: str, model: str = "gpt-4o") -> str:
        return self.prefix + question

    @llmguard.track
    @classmethod
    def build(cls, question: str, model: str = "gpt-4o") -> str:
        return cls.prefix + question

    @classmethod
    @llmguard.track
    def build2(cls, question: str, model: str = "gpt-4o") -> str:
        return cls.prefix + question

    @llmguard.track
    @staticmethod
    def static(question: str, model: str = "gpt-4o") -> str:
        return "static " + question


def test_methods_classmethods_staticmethods(events: CapturedEvents) -> None:
    assistant = Assistant()
    assert assistant.ask("hi") == "Answer: hi"
    assert asyncio.run(assistant.aask("hi")) == "Answer: hi"
    assert Assistant.build("hi") == "Answer: hi"
    assert Assistant.build2("hi") == "Answer: hi"
    assert Assistant.static("hi") == "static hi"
    assert assistant.static("hi") == "static hi"
    names = [e["function"].rsplit(".", 2)[-2:] for e in events.calls]
    assert names == [
        ["Assistant", n] for n in ("ask", "aask", "build", "build2", "static", "static")
    ]
    # self is not a prompt: only the question is counted
    assert events.calls[0]["input_tokens"] == llmguard.count_tokens("hi", "gpt-4o")


def test_wrapper_preserves_metadata() -> None:
    def documented(text: str, *, model: str = "gpt-4o") -> str:
        """Docstring."""
        return text

    async def adocumented(text: str) -> str:
        return text

    wrapped = llmguard.track(documented)
    assert wrapped.__name__ == "documented"
    assert wrapped.__doc__ == "Docstring."
    assert wrapped.__wrapped__ is documented  # type: ignore[attr-defined]
    assert inspect.signature(wrapped) == inspect.signature(documented)
    assert inspect.iscoroutinefunction(llmguard.track(adocumented))
    assert not inspect.iscoroutinefunction(wrapped)
    partial = functools.partial(documented, model="gpt-4")
    assert llmguard.track(partial)("x") == "x"


def test_bad_configuration_fails_at_decoration() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="model='gpt-4o'"):
        llmguard.track("gpt-4o")  # type: ignore[call-overload]
    with pytest.raises(llmguard.ConfigurationError, match="must decorate a function"):
        llmguard.track(42)  # type: ignore[call-overload]
    with pytest.raises(llmguard.ConfigurationError, match="model name"):
        llmguard.track(model=4)  # type: ignore[call-overload]
    with pytest.raises(llmguard.ConfigurationError, match="prompt"):
        llmguard.track(prompt="text")  # type: ignore[call-overload]


def test_metering_failure_never_breaks_the_call(flavour: str, events: CapturedEvents) -> None:
    def bad_prompt(text: str) -> str:
        raise ZeroDivisionError

    fn = make(flavour, lambda text: "fine", model="gpt-4o", prompt=bad_prompt)
    assert call(fn, "x") == "fine"
    assert call(fn, "x") == "fine"
    assert events.calls == []
    assert len(events.of("llmguard_internal_error")) == 1


# -- layers: policy logic written once, driven sync and async ---------------------------


class RetryTwice:
    """A test policy: retry on ValueError after a sleep, then short-circuit on 'cached'."""

    def __init__(self, sleeps: list[float]) -> None:
        self.sleeps = sleeps

    def run(self, call_: CallRecord) -> Generator[Any, Any, Any]:
        if call_.args and call_.args[0] == "cached":
            return "from cache"
        blocking = yield Blocking(lambda: threading.current_thread().name)
        call_.set(blocking_thread=blocking)
        for attempt in (1, 2, 3):
            try:
                result = yield PROCEED
            except ValueError:
                if attempt == 3:
                    raise
                yield Sleep(0.25 * attempt, sleep=self.sleeps.append, async_sleep=self._async_sleep)
            else:
                call_.set(attempts=attempt)
                return result
        raise AssertionError("unreachable")

    async def _async_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def test_layers_drive_the_same_logic_sync_and_async(flavour: str, events: CapturedEvents) -> None:
    sleeps: list[float] = []
    failures = iter([ValueError("1"), ValueError("2")])

    def flaky(text: str, model: str = "gpt-4o") -> str:
        error = next(failures, None)
        if error:
            raise error
        return "ok"

    fn = guard(make(flavour, flaky), decorator="retry", layer=RetryTwice(sleeps))
    assert call(fn, "hello") == "ok"
    assert call(fn, "cached") == "from cache"
    assert sleeps == [0.25, 0.5]
    first, second = events.calls
    assert first["attempts"] == 3
    assert second.get("attempts") is None
    if flavour == "async":
        assert first["blocking_thread"] != threading.current_thread().name
    else:
        assert first["blocking_thread"] == threading.current_thread().name


def test_layer_gives_up_and_the_exception_propagates(flavour: str, events: CapturedEvents) -> None:
    def always(text: str, model: str = "gpt-4o") -> str:
        raise ValueError("nope")

    sleeps: list[float] = []
    fn = guard(make(flavour, always), decorator="retry", layer=RetryTwice(sleeps))
    with pytest.raises(ValueError, match="nope"):
        call(fn, "x")
    assert sleeps == [0.25, 0.5]
    assert events.calls[0]["error"] == "ValueError"


def test_plain_sleep_in_async_uses_asyncio(events: CapturedEvents) -> None:
    class Nap:
        def run(self, call_: CallRecord) -> Generator[Any, Any, Any]:
            yield Sleep(0.001)
            return (yield PROCEED)

    @llmguard.track(model="gpt-4o")
    async def fn() -> str:
        return "ok"

    wrapped = guard(fn, decorator="nap", layer=Nap())

    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        result = await wrapped()
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result == "ok"
    assert ticks > 0  # the loop kept running while the layer slept


def test_reported_usage_is_priced_after_the_call(
    monkeypatch: pytest.MonkeyPatch, events: CapturedEvents
) -> None:
    from llmguard import _pipeline

    priced_during: list[object] = []
    real = _pipeline.get_price

    def spy(model: str) -> Any:
        priced_during.append(llmguard.current_call())
        return real(model)

    monkeypatch.setattr(_pipeline, "get_price", spy)

    @llmguard.track
    def work() -> str:
        llmguard.record_usage(1000, 100, model="gpt-4o")
        assert priced_during == []  # not priced inside the call, so not counted as latency
        return "ok"

    work()
    assert priced_during == [None]
    assert events.calls[0]["cost_usd"] == 0.0035


def test_log_content_is_an_explicit_opt_in(flavour: str, events: CapturedEvents) -> None:
    fn = make(flavour, lambda question, model="gpt-4o": "the answer", log_content=True)
    call(fn, "the question", model="gpt-4o")
    messages = [{"role": "user", "content": "hi"}]
    chat = make(flavour, lambda messages, model="gpt-4o": "hello", log_content=True)
    call(chat, messages)
    first, second = events.calls
    assert (first["prompt"], first["completion"]) == ("the question", "the answer")
    assert (second["prompt"], second["completion"]) == (messages, "hello")
    with pytest.raises(llmguard.ConfigurationError, match="True or False"):
        llmguard.track(log_content="yes")  # type: ignore[call-overload]
