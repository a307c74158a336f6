from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmguard
from llmguard._cache import parse_duration
from llmguard._storage import RedisStorage
from llmguard.testing import CapturedEvents, FakeLLMServer

from ._helpers import in_processes
from .conftest import call


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_cached(flavour: str, body: Any, **options: Any) -> Any:
    """``body`` as a sync or async function decorated with ``@cached(**options)``."""
    if flavour == "sync":

        def fn(text: str, n: int = 1, *, model: str = "gpt-4o") -> Any:
            return body(text, n, model=model)

    else:

        async def fn(text: str, n: int = 1, *, model: str = "gpt-4o") -> Any:  # type: ignore[misc]
            return body(text, n, model=model)

    fn.__qualname__ = f"{body.__qualname__}_{flavour}"
    return llmguard.cached(**options)(fn)


def test_miss_then_hit_logs_cost_and_savings(
    flavour: str, backend: str, events: CapturedEvents
) -> None:
    runs: list[str] = []

    def body(text: str, n: int, *, model: str) -> str:
        runs.append(text)
        return f"summary of {text}"

    fn = make_cached(flavour, body, ttl="1h", storage=backend)
    assert call(fn, "the quarterly report") == "summary of the quarterly report"
    assert call(fn, "the quarterly report") == "summary of the quarterly report"
    assert call(fn, text="the quarterly report", n=1) == "summary of the quarterly report"
    assert runs == ["the quarterly report"]
    miss, hit, hit2 = events.calls
    assert miss["cache"] == "miss"
    assert miss["cost_source"] == "estimate"
    assert miss["cost_usd"] > 0
    for event in (hit, hit2):
        assert (event["cache"], event["cost_usd"], event["cost_source"]) == ("hit", 0.0, "cache")
        assert event["saved_usd"] == miss["cost_usd"]
        assert event["input_tokens"] == event["output_tokens"] == 0
        assert event["model"] == "gpt-4o"
    info = fn.cache_info()
    assert (info.hits, info.misses, info.stale_hits, info.entries) == (2, 1, 0, 1)
    assert info.saved_usd == 2 * Decimal(str(miss["cost_usd"]))
    fn.cache_clear()
    assert fn.cache_info() == (0, 0, 0, Decimal(0), 0)
    call(fn, "the quarterly report")
    assert len(runs) == 2


def test_hit_does_not_count_tokens_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmguard import _pipeline

    fn = llmguard.cached(lambda text, model="gpt-4o": "x" * 50)
    fn("prompt")
    estimates: list[object] = []
    monkeypatch.setattr(_pipeline, "_estimate", lambda *a: estimates.append(a))
    fn("prompt")
    assert estimates == []


def test_usage_of_the_original_call_is_kept(
    fake_llm: FakeLLMServer, events: CapturedEvents
) -> None:
    client = fake_llm.openai_client()

    @llmguard.cached
    def ask(question: str, model: str = "gpt-4o-mini") -> Any:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )

    first = ask("What is caching?")
    second = ask("What is caching?")
    assert type(second) is type(first)  # the SDK's ChatCompletion, rebuilt
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert len(fake_llm.requests) == 1
    miss, hit = events.calls
    assert miss["cost_source"] == "usage"
    assert hit["saved_usd"] == miss["cost_usd"]
    assert hit["model"] == "gpt-4o-mini"


def test_anthropic_message_round_trips(fake_llm: FakeLLMServer) -> None:
    client = fake_llm.anthropic_client()

    @llmguard.cached
    def ask(question: str) -> Any:
        return client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=20,
            messages=[{"role": "user", "content": question}],
        )

    first, second = ask("hi"), ask("hi")
    assert type(second) is type(first)
    assert second.content[0].text == first.content[0].text
    assert len(fake_llm.requests) == 1


# -- keys -------------------------------------------------------------------------------


def test_equivalent_calls_share_one_key() -> None:
    @llmguard.cached
    def f(text: str, style: str = "short", *, opts: dict[str, int] | None = None) -> str:
        return text

    key = f.cache_key("x")
    assert f.cache_key(text="x") == key
    assert f.cache_key("x", "short") == key
    assert f.cache_key(style="short", text="x") == key
    assert f.cache_key("x", opts={"a": 1, "b": 2}) == f.cache_key("x", opts={"b": 2, "a": 1})
    assert f.cache_key("x", "long") != key
    assert f.cache_key("x").startswith("llmguard:cache:default:tests.test_cache.")


def test_types_are_part_of_the_key() -> None:
    @llmguard.cached
    def f(value: Any) -> Any:
        return value

    keys = {
        f.cache_key(v)
        for v in (1, 1.0, True, "1", [1], (1,), {1}, frozenset({1}), b"1", None, 0, False)
    }
    assert len(keys) == 12


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Options:
    temperature: float
    tags: list[str]


SUPPORTED = [
    "text",
    7,
    2.5,
    True,
    None,
    [1, "a"],
    (1, "a"),
    {"k": [1, {"n": None}]},
    {1, 2},
    frozenset({"a"}),
    b"\x00\x01",
    Colour.RED,
    datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
    datetime.date(2026, 1, 2),
    Decimal("1.10"),
    uuid.UUID(int=5),
    Options(0.2, ["x"]),
]


@pytest.mark.parametrize("value", SUPPORTED, ids=lambda v: type(v).__name__)
def test_canonical_encoding_of_supported_types(value: Any) -> None:
    @llmguard.cached
    def f(value: Any) -> Any:
        return value

    assert f.cache_key(value) == f.cache_key(value)


def test_pydantic_arguments() -> None:
    from pydantic import BaseModel

    class Query(BaseModel):
        text: str
        k: int = 3

    @llmguard.cached
    def f(query: Query) -> str:
        return query.text

    assert f.cache_key(Query(text="a")) == f.cache_key(Query(text="a", k=3))
    assert f.cache_key(Query(text="a")) != f.cache_key(Query(text="a", k=4))


def test_unsupported_argument_names_it_and_suggests_ignore() -> None:
    @llmguard.cached
    def f(text: str, client: object) -> str:
        return text

    with pytest.raises(TypeError, match=r"'client'.*ignore=\('client',\).*key="):
        f("x", object())


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.tuples(inner, inner)
            | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=8,
    )


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (1 == 1.0 == True do not count)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b) or (a != a and b != b)


@settings(max_examples=400, deadline=None)
@given(a=json_values(), b=json_values())
def test_different_values_never_collide(a: Any, b: Any) -> None:
    @llmguard.cached
    def f(value: Any) -> Any:
        return value

    assert (f.cache_key(a) == f.cache_key(b)) == _same(a, b)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.integers(), min_size=2, max_size=6), st.randoms())
def test_dict_and_keyword_order_never_matter(data: dict[str, int], rnd: Any) -> None:
    @llmguard.cached
    def f(value: Any, a: int = 0, b: int = 0) -> Any:
        return value

    items = list(data.items())
    rnd.shuffle(items)
    assert f.cache_key(data, a=1, b=2) == f.cache_key(dict(items), b=2, a=1)


def test_self_and_cls_are_not_part_of_the_key(events: CapturedEvents) -> None:
    runs: list[str] = []

    class Bot:
        def __init__(self, name: str) -> None:
            self.name = name

        @llmguard.cached
        def ask(self, question: str) -> str:
            runs.append(question)
            return question.upper()

        @llmguard.cached
        @classmethod
        def build(cls, question: str) -> str:
            runs.append("build")
            return question

        @llmguard.cached
        @staticmethod
        def static(question: str) -> str:
            runs.append("static")
            return question

    assert Bot("a").ask("hi") == Bot("b").ask("hi") == "HI"
    assert Bot.build("q") == Bot.build("q")
    assert Bot.static("q") == Bot("c").static("q")
    assert runs == ["hi", "build", "static"]
    assert Bot("a").ask.cache_key("hi") == Bot.ask.cache_key("hi")
    assert Bot.ask.cache_info().hits == 1


def test_ignore_and_key_callable() -> None:
    runs: list[str] = []

    @llmguard.cached(ignore=("client", "trace_id"))
    def f(text: str, client: object = None, trace_id: str = "") -> str:
        runs.append(text)
        return text

    f("a", object(), "t1")
    f("a", object(), "t2")
    assert runs == ["a"]

    @llmguard.cached(key=lambda user, text: text.lower())
    def g(user: object, text: str) -> str:
        runs.append(text)
        return text

    g(object(), "Hello")
    g(object(), "HELLO")
    assert runs == ["a", "Hello"]


def test_code_and_version_are_part_of_the_key() -> None:
    def define(template: str, version: str | None = None) -> Any:
        scope: dict[str, Any] = {}
        exec(f"def summarize(text):\n    return {template!r}.format(text)", scope)
        fn = scope["summarize"]
        fn.__module__ = "tests.generated"
        return llmguard.cached(version=version)(fn)

    v1, v2 = define("Summarize: {}"), define("Summarise briefly: {}")
    assert v1.cache_key("x") != v2.cache_key("x")
    assert define("Summarize: {}").cache_key("x") == v1.cache_key("x")
    assert define("Summarize: {}", version="prompt-v2").cache_key("x") != v1.cache_key("x")
    assert v1("x") == "Summarize: x"
    assert v2("x") == "Summarise briefly: x"  # not served v1's entry


def test_nested_code_changes_the_digest() -> None:
    from llmguard._keys import code_digest

    def outer_a() -> Any:
        return lambda: "prompt A"

    def outer_b() -> Any:
        return lambda: "prompt B"

    assert code_digest(outer_a) != code_digest(outer_b)


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "text",
        3,
        2.5,
        None,
        True,
        [1, [2]],
        (1, (2, "x")),
        {"a": (1,)},
        {1: "int key", (1, 2): "tuple"},
        b"\xff",
        {"$tuple": "not a tag"},
    ],
)
def test_plain_values_round_trip_with_their_types(value: Any, backend: str) -> None:
    @llmguard.cached(storage=backend)
    def f(i: int) -> Any:
        return value

    f(1)
    hit = f(1)
    assert hit == value
    assert _same(hit, value)
    assert f.cache_info().hits == 1


def test_other_values_are_refused_unless_pickle_is_chosen() -> None:
    @dataclasses.dataclass
    class Result:
        text: str

    @llmguard.cached
    def refused(i: int) -> Result:
        return Result("x")

    with pytest.raises(TypeError, match="serializer='pickle'"):
        refused(1)

    @llmguard.cached(serializer="pickle")
    def allowed(i: int) -> Options:
        return Options(0.5, ["a"])

    assert allowed(1) == allowed(1) == Options(0.5, ["a"])
    assert allowed.cache_info().hits == 1


def test_exceptions_are_never_cached_and_cache_if_refuses(flavour: str) -> None:
    runs: list[int] = []

    def body(text: str, n: int, *, model: str) -> str:
        runs.append(n)
        if text == "boom":
            raise ValueError("upstream failed")
        return "" if text == "empty" else text

    fn = make_cached(flavour, body, cache_if=bool)
    for _ in range(2):
        with pytest.raises(ValueError, match="upstream failed"):
            call(fn, "boom")
    call(fn, "empty")
    call(fn, "empty")
    call(fn, "ok")
    call(fn, "ok")
    assert len(runs) == 5
    assert fn.cache_info().entries == 1


def test_ttl_expiry_with_an_injected_clock(flavour: str, backend: str) -> None:
    clock = Clock()
    runs: list[int] = []
    fn = make_cached(
        flavour, lambda text, n, model: runs.append(n) or n, ttl="30m", clock=clock, storage=backend
    )
    call(fn, "a", 1)
    clock.now += 29 * 60
    call(fn, "a", 1)
    clock.now += 2 * 60
    call(fn, "a", 1)
    assert runs == [1, 1]


def test_stale_if_error_serves_the_expired_entry(
    flavour: str, backend: str, events: CapturedEvents
) -> None:
    clock = Clock()
    state = {"fail": False}

    def body(text: str, n: int, *, model: str) -> str:
        if state["fail"]:
            raise ConnectionError("provider down")
        return f"fresh {n}"

    fn = make_cached(
        flavour, body, ttl=60, stale_if_error=True, stale_ttl="1h", clock=clock, storage=backend
    )
    assert call(fn, "q", 1) == "fresh 1"
    clock.now += 120
    state["fail"] = True
    assert call(fn, "q", 1) == "fresh 1"
    stale = events.calls[-1]
    assert (stale["cache"], stale["stale_error"], stale["outcome"], stale["cost_usd"]) == (
        "stale",
        "ConnectionError",
        "ok",
        0.0,
    )
    assert fn.cache_info().stale_hits == 1
    with pytest.raises(ConnectionError):
        call(fn, "other", 1)  # nothing stale to fall back on
    plain = make_cached(flavour, body, ttl=60, clock=clock, storage=backend)
    state["fail"] = False
    call(plain, "q", 2)
    clock.now += 120
    state["fail"] = True
    with pytest.raises(ConnectionError):
        call(plain, "q", 2)


def test_bypass_cache(flavour: str, events: CapturedEvents) -> None:
    runs: list[int] = []
    fn = make_cached(flavour, lambda text, n, model: runs.append(n) or len(runs))
    call(fn, "a")
    with llmguard.bypass_cache():
        assert call(fn, "a") == 2
    assert call(fn, "a") == 2  # the bypassing call stored its fresh result
    assert [e["cache"] for e in events.calls] == ["miss", "bypass", "hit"]


def test_bypass_cache_inside_async_code() -> None:
    runs: list[int] = []

    @llmguard.cached
    async def fn(text: str) -> int:
        runs.append(1)
        return len(runs)

    async def main() -> list[int]:
        first = await fn("a")
        with llmguard.bypass_cache():
            second = await fn("a")
        return [first, second, await fn("a")]

    assert asyncio.run(main()) == [1, 2, 2]


def test_bad_configuration_fails_at_decoration() -> None:
    def f(text: str) -> str:
        return text

    for options, message in [
        ({"ttl": -5}, "> 0"),
        ({"ttl": "7 days"}, "unit"),
        ({"ttl": "7y"}, "unit"),
        ({"ignore": ("client",)}, "not a parameter"),
        ({"serializer": "yaml"}, "serializer"),
        ({"storage": "ftp://x"}, "unknown storage scheme"),
        ({"cache_if": "yes"}, "callable"),
        ({"namespace": ""}, "namespace"),
    ]:
        with pytest.raises(llmguard.ConfigurationError, match=message):
            llmguard.cached(**options)(f)


def test_parse_duration() -> None:
    assert parse_duration("90s", "ttl") == 90
    assert parse_duration("30m", "ttl") == 1800
    assert parse_duration("12h", "ttl") == 43200
    assert parse_duration("7d", "ttl") == 604800
    assert parse_duration(datetime.timedelta(minutes=2), "ttl") == 120
    assert parse_duration(None, "ttl") is None
    assert parse_duration("1.5h", "ttl") == 5400


def test_decorator_order_cached_outermost_skips_the_layers_below(events: CapturedEvents) -> None:
    from collections.abc import Generator

    from llmguard._pipeline import PROCEED, CallRecord, guard

    entered: list[str] = []

    class Inner:
        def run(self, call_: CallRecord) -> Generator[Any, Any, Any]:
            entered.append("inner")
            return (yield PROCEED)

    @llmguard.cached
    def f(text: str, model: str = "gpt-4o") -> str:
        return text

    inner = guard(f.__wrapped__, decorator="inner", layer=Inner())
    stacked = llmguard.cached(inner)
    stacked("a")
    stacked("a")
    assert entered == ["inner"]
    assert len(events.calls) == 2  # one event per call, however many decorators


# -- stampede protection ------------------------------------------------------------------


def test_64_threads_one_upstream_call(backend: str) -> None:
    runs: list[int] = []
    gate = threading.Barrier(64)

    @llmguard.cached(storage=backend)
    def slow(text: str) -> str:
        runs.append(1)
        threading.Event().wait(0.2)
        return text.upper()

    results: list[str] = []

    def worker() -> None:
        gate.wait()
        results.append(slow("same"))

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == [1]
    assert results == ["SAME"] * 64


def test_waiting_threads_get_the_leaders_exception() -> None:
    runs: list[int] = []
    gate = threading.Barrier(16)

    @llmguard.cached
    def failing(text: str) -> str:
        runs.append(1)
        threading.Event().wait(0.2)
        raise RuntimeError("upstream 500")

    errors: list[BaseException] = []

    def worker() -> None:
        gate.wait()
        try:
            failing("same")
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == [1]
    assert len(errors) == 16


def test_64_tasks_one_upstream_call(backend: str) -> None:
    runs: list[int] = []

    @llmguard.cached(storage=backend)
    async def slow(text: str) -> str:
        runs.append(1)
        await asyncio.sleep(0.2)
        return text.upper()

    async def main() -> list[str]:
        return await asyncio.gather(*(slow("same") for _ in range(64)))

    assert asyncio.run(main()) == ["SAME"] * 64
    assert runs == [1]


def _process_worker(ready: Any, storage: str, counter: str) -> list[str]:
    import threading as th

    import llmguard as lg
    from llmguard._storage import open_storage

    @lg.cached(storage=storage)
    def slow(text: str) -> str:
        open_storage(counter).incr("runs")
        th.Event().wait(0.5)
        return text.upper()

    gate = th.Barrier(16)
    out: list[str] = []

    def worker() -> None:
        gate.wait()
        out.append(slow("same"))

    threads = [th.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "redis"], indirect=True)
def test_4_processes_x_16_threads_one_upstream_call(backend: str, tmp_path: Path) -> None:
    counter = f"file://{tmp_path}/counter"
    outputs = in_processes(_process_worker, backend, counter)
    assert sum(len(out) for out in outputs) == 64
    assert all(value == "SAME" for out in outputs for value in out)
    assert llmguard.open_storage(counter).get("runs") == b"1"


def test_a_crashed_lock_holder_blocks_only_until_the_lock_expires(backend: str) -> None:
    naps: list[float] = []

    @llmguard.cached(storage=backend, lock_timeout=0.3, sleep=naps.append)
    def f(text: str) -> str:
        return text

    storage = llmguard.open_storage(backend)
    storage.add(f.cache_key("x") + ":lock", b"crashed-holder", ttl=0.3)
    import time

    started = time.monotonic()
    assert f("x") == "x"
    assert time.monotonic() - started < 5
    assert naps  # it waited (politely) for the holder first


# -- faults -------------------------------------------------------------------------------


def test_corrupt_entry_is_a_miss_with_one_warning(backend: str, events: CapturedEvents) -> None:
    runs: list[int] = []

    @llmguard.cached(storage=backend)
    def f(text: str) -> str:
        runs.append(1)
        return text

    storage = llmguard.open_storage(backend)
    for junk in (
        b"\x00not json",
        b'{"format": 2, "function": "someone.else", "kind": "str"}\nhello',
    ):
        storage.set_entry(f.cache_key("x"), junk)
        assert f("x") == "x"
    assert f("x") == "x"
    assert runs == [1, 1]
    assert len(events.of("cache_entry_unreadable")) == 1


def test_pickled_entry_is_never_loaded_by_a_json_function(
    tmp_path: Path, events: CapturedEvents
) -> None:
    uri = f"file://{tmp_path}/c"

    @llmguard.cached(storage=uri, serializer="pickle")
    def producer(text: str) -> str:
        return text

    producer("x")
    raw = llmguard.open_storage(uri).get_entry(producer.cache_key("x"))

    @llmguard.cached(storage=uri)
    def consumer(text: str) -> str:
        return "computed"

    llmguard.open_storage(uri).set_entry(
        consumer.cache_key("x"), raw.replace(b"producer", b"consumer")
    )  # type: ignore[union-attr]
    assert consumer("x") == "computed"
    assert "pickled" in events.of("cache_entry_unreadable")[0]["error"]


def test_foreign_class_is_never_rebuilt(tmp_path: Path, events: CapturedEvents) -> None:
    uri = f"file://{tmp_path}/c"

    @llmguard.cached(storage=uri)
    def f(text: str) -> str:
        return "computed"

    planted = (
        b'{"format":2,"function":"tests.test_cache.test_foreign_class_is_never_rebuilt.<locals>.f",'
        b'"model":null,"cost":null,"created":0,"expires":null,"kind":"pydantic",'
        b'"class":"subprocess:Popen"}\n["echo","pwned"]'
    )
    llmguard.open_storage(uri).set_entry(f.cache_key("x"), planted)
    assert f("x") == "computed"
    assert "not a pydantic model" in events.of("cache_entry_unreadable")[0]["error"]


def test_unwritable_folder_runs_uncached_with_one_warning(
    tmp_path: Path, events: CapturedEvents
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    runs: list[int] = []

    @llmguard.cached(storage=f"file://{blocker}/cache")
    def f(text: str) -> str:
        runs.append(1)
        return text

    assert f("x") == f("x") == "x"
    assert runs == [1, 1]
    assert len(events.of("cache_unavailable")) == 1


def test_full_disk_on_write_runs_uncached_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: CapturedEvents
) -> None:
    from llmguard._storage import LocalStorage

    def full(self: Any, key: str, value: bytes, ttl: float | None = None) -> None:
        raise llmguard.StorageError(
            "set failed: OSError: [Errno 28] No space left on device", uri="x"
        )

    monkeypatch.setattr(LocalStorage, "set_entry", full)

    @llmguard.cached(storage=f"file://{tmp_path}/c")
    def f(text: str) -> str:
        return text

    assert f("x") == f("x") == "x"
    assert len(events.of("cache_write_failed")) == 1


def test_redis_unreachable_fails_open(flavour: str, events: CapturedEvents) -> None:
    runs: list[int] = []
    fn = make_cached(
        flavour, lambda text, n, model: runs.append(n) or n, storage="redis://127.0.0.1:1/0"
    )
    assert call(fn, "a") == call(fn, "a") == 1
    assert runs == [1, 1]
    assert len(events.of("cache_unavailable")) == 1
    assert [e["outcome"] for e in events.calls] == ["ok", "ok"]


def test_waiting_tasks_get_the_leaders_exception() -> None:
    runs: list[int] = []

    @llmguard.cached
    async def failing(text: str) -> str:
        runs.append(1)
        await asyncio.sleep(0.1)
        raise RuntimeError("upstream 500")

    async def main() -> list[BaseException | str]:
        return await asyncio.gather(*(failing("same") for _ in range(16)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert runs == [1]
    assert all(isinstance(o, RuntimeError) for o in outcomes)


def test_redis_expires_entries_by_its_own_ttl(redis_uri: str) -> None:
    import redis

    @llmguard.cached(storage=redis_uri, ttl="90s")
    def f(text: str) -> str:
        return text

    @llmguard.cached(storage=redis_uri, ttl="90s", stale_if_error=True, stale_ttl="1h")
    def g(text: str) -> str:
        return text

    @llmguard.cached(storage=redis_uri)
    def forever(text: str) -> str:
        return text

    f("x")
    g("x")
    forever("x")
    storage = llmguard.open_storage(redis_uri)
    assert isinstance(storage, RedisStorage)
    client = redis.Redis.from_url(storage.connection_uri)
    prefix = storage.prefix  # this test's own: the URI's ?prefix=
    assert prefix
    assert 85_000 < client.pttl(prefix + f.cache_key("x")) <= 90_000
    assert 3_680_000 < client.pttl(prefix + g.cache_key("x")) <= 3_690_000  # ttl + stale_ttl
    assert client.pttl(prefix + forever.cache_key("x")) == -1
    client.close()


def test_async_methods(backend: str) -> None:
    runs: list[str] = []

    class Bot:
        @llmguard.cached(storage=backend)
        async def ask(self, question: str) -> str:
            runs.append(question)
            return question[::-1]

    async def main() -> list[str]:
        return [await Bot().ask("abc"), await Bot().ask("abc")]

    assert asyncio.run(main()) == ["cba", "cba"]
    assert runs == ["abc"]


def test_lock_storage_error_runs_the_call_uncached_with_one_warning(
    flavour: str, monkeypatch: pytest.MonkeyPatch, events: CapturedEvents
) -> None:
    store = llmguard.open_storage("memory://lock-fails")

    def add(key: str, value: bytes, ttl: float | None = None) -> bool:
        raise llmguard.StorageError("add failed: ConnectionError: reset by peer", uri="x")

    monkeypatch.setattr(store, "add", add)
    runs: list[int] = []
    fn = make_cached(flavour, lambda text, n, model: runs.append(n) or n, storage=store.uri)
    assert call(fn, "a") == call(fn, "a") == 1
    assert runs == [1, 1]  # the storage failed: nothing is stored, every call runs
    assert store.count_entries() == 0
    [warning] = events.of("cache_unavailable")
    assert "reset by peer" in warning["error"]
    assert [e["outcome"] for e in events.calls] == ["ok", "ok"]


def test_release_storage_error_keeps_the_result_with_one_warning(
    flavour: str, monkeypatch: pytest.MonkeyPatch, events: CapturedEvents
) -> None:
    store = llmguard.open_storage("memory://release-fails")

    def release(key: str, token: bytes) -> bool:
        raise llmguard.StorageError("release failed: ConnectionError: reset by peer", uri="x")

    monkeypatch.setattr(store, "release", release)
    runs: list[int] = []
    fn = make_cached(flavour, lambda text, n, model: runs.append(n) or n, storage=store.uri)
    assert call(fn, "a") == call(fn, "a") == 1
    assert runs == [1]  # stored before the lock's release failed: the second call is a hit
    assert [e["cache"] for e in events.calls] == ["miss", "hit"]
    assert len(events.of("cache_unavailable")) == 1


def test_release_storage_error_after_a_stream_still_stores_it(
    monkeypatch: pytest.MonkeyPatch, events: CapturedEvents
) -> None:
    store = llmguard.open_storage("memory://stream-release-fails")

    def release(key: str, token: bytes) -> bool:
        raise llmguard.StorageError("release failed: ConnectionError: reset by peer", uri="x")

    monkeypatch.setattr(store, "release", release)
    runs: list[int] = []

    @llmguard.cached(storage=store.uri)
    def pieces(text: str) -> Iterator[str]:
        runs.append(1)
        yield from text.split()

    assert list(pieces("a b c")) == list(pieces("a b c")) == ["a", "b", "c"]
    assert runs == [1]
    assert [e["cache"] for e in events.calls] == ["miss", "hit"]
    assert len(events.of("cache_unavailable")) == 1
