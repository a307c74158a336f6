"""Cache keys of structured arguments (pydantic models, secrets, dataclasses, dates...) and
results that cannot be stored."""

from __future__ import annotations

import dataclasses
import datetime
import zoneinfo
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Secret, SecretBytes, SecretStr

import llmguard
from llmguard.testing import CapturedEvents

from .conftest import call


def keyed() -> Any:
    @llmguard.cached(storage="memory://keys")
    def f(value: Any) -> str:
        return f"private answer for {value!r}"

    return f


class Request(BaseModel):
    token: SecretStr
    q: str


class Tenanted(BaseModel):
    tenant: str = Field(exclude=True)
    q: str


class Loose(BaseModel):
    x: Any


class Outer(BaseModel):
    inner: Request
    note: str = ""


class Extra(BaseModel):
    model_config = ConfigDict(extra="allow")
    q: str


class WithPrivate(BaseModel):
    q: str
    _client: Any = PrivateAttr(default=None)


@dataclasses.dataclass
class Credentials:
    key: SecretBytes
    user: str


def test_secret_fields_are_keyed_by_their_secret_value() -> None:
    f = keyed()
    alice = Request(token=SecretStr("alice-secret"), q="my balance?")
    bob = Request(token=SecretStr("bob-secret"), q="my balance?")
    assert f.cache_key(alice) != f.cache_key(bob)
    assert f.cache_key(alice) == f.cache_key(
        Request(token=SecretStr("alice-secret"), q="my balance?")
    )

    @llmguard.cached(storage="memory://secrets")
    def answer(r: Request) -> str:
        return f"private answer for {r.token.get_secret_value()}"

    assert answer(alice) == "private answer for alice-secret"
    assert answer(bob) == "private answer for bob-secret"  # not served alice's answer
    nested = [Outer(inner=alice), Outer(inner=bob)]
    assert f.cache_key(nested[0]) != f.cache_key(nested[1])
    creds = [Credentials(SecretBytes(b"k1"), "u"), Credentials(SecretBytes(b"k2"), "u")]
    assert f.cache_key(creds[0]) != f.cache_key(creds[1])


def test_secrets_as_arguments_themselves() -> None:
    f = keyed()
    keys = {
        f.cache_key(v)
        for v in (
            SecretStr("a"),
            SecretStr("b"),
            SecretBytes(b"a"),
            Secret[int](1),
            Secret[int](2),
            "a",
            b"a",
        )
    }
    assert len(keys) == 7
    assert f.cache_key(SecretStr("a")) == f.cache_key(SecretStr("a"))


def test_excluded_fields_are_part_of_the_key() -> None:
    runs: list[str] = []

    @llmguard.cached(storage="memory://excluded")
    def f(r: Tenanted) -> str:
        runs.append(r.tenant)
        return f"answer for {r.tenant}"

    assert f(Tenanted(tenant="alice", q="q")) == "answer for alice"
    assert f(Tenanted(tenant="bob", q="q")) == "answer for bob"
    assert f(Tenanted(tenant="alice", q="q")) == "answer for alice"
    assert runs == ["alice", "bob"]


def test_types_stay_apart_inside_a_model() -> None:
    f = keyed()
    for a, b in ((b"abc", "abc"), ((1, 2), [1, 2]), (1.0, 1), (True, 1), ({1}, [1])):
        assert f.cache_key(Loose(x=a)) != f.cache_key(Loose(x=b)), (a, b)
    assert f.cache_key(Loose(x=(1, b"x"))) == f.cache_key(Loose(x=(1, b"x")))


def test_model_class_extra_fields_and_private_attributes() -> None:
    f = keyed()

    class Other(BaseModel):
        x: Any

    assert f.cache_key(Loose(x=1)) != f.cache_key(Other(x=1))
    assert f.cache_key(Extra(q="q", tenant="a")) != f.cache_key(Extra(q="q", tenant="b"))
    assert f.cache_key(Extra(q="q")) != f.cache_key(Extra(q="q", tenant="a"))
    first, second = WithPrivate(q="q"), WithPrivate(q="q")
    first._client, second._client = object(), object()  # not data: not in the key
    assert f.cache_key(first) == f.cache_key(second)


def test_subclasses_of_plain_types_keep_their_attributes() -> None:
    class Tagged(str):
        tenant: str

    f = keyed()
    a, b = Tagged("q"), Tagged("q")
    a.tenant, b.tenant = "alice", "bob"
    assert f.cache_key(a) != f.cache_key(b)
    assert f.cache_key(Tagged("q")) != f.cache_key(a)
    assert f.cache_key(Tagged("q")) == f.cache_key(Tagged("q")) != f.cache_key("q")


def test_timedeltas_and_datetimes_are_exact() -> None:
    f = keyed()
    big = datetime.timedelta(days=999_999_999)
    assert f.cache_key(big) != f.cache_key(big + datetime.timedelta(microseconds=1))
    naive = datetime.datetime(2021, 11, 7, 1, 30)
    assert f.cache_key(naive) != f.cache_key(naive.replace(fold=1))
    paris = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    fixed = paris.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    assert paris.isoformat() == fixed.isoformat()
    assert f.cache_key(paris) != f.cache_key(fixed)
    assert f.cache_key(paris) == f.cache_key(paris.replace())
    t = datetime.time(1, 30, tzinfo=datetime.timezone.utc)
    assert f.cache_key(t) != f.cache_key(t.replace(fold=1)) != f.cache_key(t.replace(tzinfo=None))


def test_ints_past_the_digit_limit_are_keys() -> None:
    f = keyed()
    huge = 10**5000
    keys = {f.cache_key(v) for v in (huge, huge + 1, -huge, 2**2000, 2**2001, -(2**2001))}
    assert len(keys) == 6
    assert f.cache_key(huge) == f.cache_key(10**5000)


def test_a_result_that_cannot_be_stored_is_returned_with_one_warning(
    flavour: str, events: CapturedEvents
) -> None:
    runs: list[int] = []
    huge = 10**5000

    def body() -> Any:
        runs.append(1)
        return {"x": huge}

    if flavour == "sync":

        def fn(text: str) -> Any:
            return body()

    else:

        async def fn(text: str) -> Any:  # type: ignore[misc]
            return body()

    fn.__qualname__ = f"unstorable_{flavour}"
    cached = llmguard.cached(storage=f"memory://unstorable-{flavour}", model="gpt-4o")(fn)
    assert call(cached, "a") == {"x": huge}
    assert call(cached, "a") == {"x": huge}
    assert runs == [1, 1]  # nothing was stored
    (warning,) = events.of("cache_write_failed")
    assert "ValueError" in warning["error"]
    assert cached.cache_info().entries == 0
    assert [e["outcome"] for e in events.calls] == ["ok", "ok"]


def test_a_result_holding_itself_is_returned_unstored() -> None:
    looped: list[Any] = []
    looped.append(looped)

    @llmguard.cached(storage="memory://looped")
    def f(text: str) -> Any:
        return looped

    assert f("a") is looped
    assert f.cache_info().entries == 0


def test_one_string_for_ignore_is_one_name() -> None:
    runs: list[str] = []

    @llmguard.cached(ignore="client", storage="memory://ignore-one")
    def f(text: str, client: object = None) -> str:
        runs.append(text)
        return text

    f("a", object())
    f("a", object())
    assert runs == ["a"]
    with pytest.raises(llmguard.ConfigurationError, match="'xy'"):
        llmguard.cached(ignore="xy")(lambda text: text)
