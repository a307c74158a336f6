"""Hostile or broken storage: each policy has one failure mode, the same on every backend
(README, "When storage fails"): ``@cached`` runs the call uncached, ``@budget`` refuses it
(``BudgetUnavailable``) unless ``fail_open=True``, ``@rate_limited`` lets it through unless
``on_storage_error="raise"``; one warning per outage per policy, one ``storage_recovered``
when the storage answers again. (``memory://`` cannot fail.)"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

import llmguard
from llmguard._storage import LocalStorage
from llmguard.testing import CapturedEvents

from ._helpers import FaultyRedis, run_python
from .conftest import call

WARNINGS = ("cache_unavailable", "budget_unavailable", "rate_limit_unavailable")


@dataclass
class Policies:
    """One function per policy, on one storage."""

    cached: Any
    budgeted: Any
    budgeted_open: Any
    limited: Any
    strict: Any
    runs: list[str] = field(default_factory=list)

    def all(self) -> list[Any]:
        return [self.cached, self.budgeted, self.budgeted_open, self.limited, self.strict]


def policies(uri: str, flavour: str = "sync") -> Policies:
    runs: list[str] = []

    def body(text: str) -> str:
        runs.append(text)
        return text

    def fn(name: str) -> Any:
        if flavour == "sync":

            def sync(text: str) -> str:
                return body(text)

            sync.__qualname__ = name
            return llmguard.track(model="gpt-4o-mini")(sync)

        async def asynchronous(text: str) -> str:
            return body(text)

        asynchronous.__qualname__ = name
        return llmguard.track(model="gpt-4o-mini")(asynchronous)

    def budget(name: str, **options: Any) -> Any:
        return llmguard.budget(usd="1", storage=uri, name=name, **options)(fn(name))

    found = Policies(
        cached=llmguard.cached(storage=uri)(fn("cached")),
        budgeted=budget("closed"),
        budgeted_open=budget("open", fail_open=True),
        limited=llmguard.rate_limited("1000/second", storage=uri)(fn("limited")),
        strict=llmguard.rate_limited("1000/second", storage=uri, on_storage_error="raise")(
            fn("strict")
        ),
    )
    found.runs = runs
    return found


def assert_failure_modes(p: Policies, events: CapturedEvents, cause: type | None) -> None:
    """Every policy, twice, on a failing storage: its documented failure mode, one warning
    each, and every error a caller sees an LLMGuardError with the backend's own chained."""
    started = time.monotonic()
    before = len(p.runs)
    for _ in range(2):
        assert call(p.cached, "a") == "a"  # fails open: runs uncached
        with pytest.raises(llmguard.BudgetUnavailable) as closed:  # fails closed
            call(p.budgeted, "a")
        assert isinstance(closed.value.__cause__, llmguard.StorageError)
        assert call(p.budgeted_open, "a") == "a"
        assert call(p.limited, "a") == "a"  # rate limits fail open by default
        with pytest.raises(llmguard.StorageError) as raised:
            call(p.strict, "a")
    assert len(p.runs) - before == 6  # cached, budgeted_open, limited: twice each
    if cause is None:
        assert raised.value.__cause__ is None  # llmguard's own refusal
    else:
        assert isinstance(raised.value.__cause__, cause)
    assert [e["event"] for e in events if e["event"] in WARNINGS] == [
        "cache_unavailable",
        "budget_unavailable",
        "rate_limit_unavailable",
    ]  # once per outage each, whatever the number of calls
    assert all(e["storage"] and "error" in e for e in events if e["event"] in WARNINGS)
    assert not events.of("storage_recovered")
    assert time.monotonic() - started < 30  # bounded: a hung storage times out


def _corrupt_folder(folder: Path) -> None:
    """Overwrite both SQLite databases of a local storage in place (same inode)."""
    for database in (folder / "cache.db", folder / "entries" / "cache.db"):
        size = max(database.stat().st_size, 8192)
        with open(database, "r+b") as handle:
            handle.write(b"\x00garbage" * (size // 8))


def _corrupt_keys(uri: str) -> None:
    """Give every key llmguard wrote under the URI's prefix a value of another type."""
    from llmguard._storage import split_redis_prefix

    connection, prefix = split_redis_prefix(uri)
    client = redis.Redis.from_url(connection)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        assert keys
        for key in keys:
            kind = client.type(key)
            client.delete(key)
            if kind == b"string":
                client.hset(key, "not", "a string")
            else:
                client.set(key, b"not a " + kind)
    finally:
        client.close()


SCENARIOS = [
    ("local", "unreachable"),
    ("local", "corrupt"),
    ("local", "foreign-writable"),
    ("redis", "unreachable"),
    ("redis", "hung"),
    ("redis", "corrupt"),
    ("redis", "read-only"),
]


@pytest.mark.parametrize(("backend", "failure"), SCENARIOS, indirect=["backend"])
def test_each_policy_follows_its_failure_mode(
    backend: str, failure: str, flavour: str, events: CapturedEvents
) -> None:
    server = None
    uri, cause, healthy_first = backend, None, True
    folder = Path(backend.removeprefix("file://"))
    if failure == "unreachable" and backend.startswith("file://"):
        folder.write_text("a file where the folder's parent should be")
        uri, cause, healthy_first = f"{backend}/state", NotADirectoryError, False
    elif failure == "foreign-writable":
        folder.mkdir()
        os.chmod(folder, 0o777)
        healthy_first = False
    elif failure == "corrupt" and backend.startswith("file://"):
        filled = LocalStorage(folder)  # databases that were fine once, then damaged at rest
        filled.set("state", b"1")
        filled.set_entry("entry", b"1")
        filled.close()
        _corrupt_folder(folder)
        cause, healthy_first = sqlite3.DatabaseError, False
    elif failure == "corrupt":
        cause = redis.ResponseError  # WRONGTYPE
    else:  # through a Redis that fails on demand
        server = FaultyRedis.before(backend)
        uri = server.uri(backend)
        if failure == "hung":
            uri += "&socket_timeout=0.3&socket_connect_timeout=0.3"
        cause = {
            "unreachable": redis.ConnectionError,
            "hung": redis.TimeoutError,
            "read-only": redis.ReadOnlyError,
        }[failure]
    p = policies(uri, flavour)
    try:
        if healthy_first:
            for fn in p.all():
                assert call(fn, "a") == "a"
            assert not [e for e in events if e["log_level"] == "warning"]
            if server is not None:
                server.set_mode(
                    {"unreachable": "down", "read-only": "readonly"}.get(failure, failure)
                )
            else:
                _corrupt_keys(uri)
        assert_failure_modes(p, events, cause)
    finally:
        if server is not None:
            server.close()


class Outage:
    """A storage that can be broken and mended: a local folder replaced by a file (and put
    back), or a Redis behind a server that goes down (and up)."""

    def __init__(self, backend: str) -> None:
        self.server = None if backend.startswith("file://") else FaultyRedis.before(backend)
        self.uri = backend if self.server is None else self.server.uri(backend)
        self.folder = Path(backend.removeprefix("file://"))

    def fail(self) -> None:
        if self.server is not None:
            self.server.set_mode("down")
        else:
            shutil.rmtree(self.folder)
            self.folder.write_text("not a folder any more")

    def mend(self) -> None:
        if self.server is not None:
            self.server.set_mode("up")
        else:
            self.folder.unlink()


@pytest.mark.parametrize("backend", ["local", "redis"], indirect=True)
def test_outage_warnings_fire_once_per_outage_and_again_after_recovery(
    backend: str, flavour: str, events: CapturedEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        LocalStorage, "CHECK_INTERVAL", 0.0, raising=False
    )  # notice the folder at once
    outage = Outage(backend)
    p = policies(outage.uri, flavour)
    try:
        for fn in (p.cached, p.limited):
            assert call(fn, "warm") == "warm"
        for n in (1, 2):
            outage.fail()
            for text in ("x", "y", "x"):
                assert call(p.cached, text) == text
                assert call(p.limited, text) == text
            assert len(events.of("cache_unavailable")) == n
            assert len(events.of("rate_limit_unavailable")) == n
            assert len(events.of("storage_recovered")) == n - 1
            outage.mend()
            before, text = len(p.runs), f"back {n}"
            assert call(p.limited, text) == text
            assert call(p.cached, text) == text
            assert call(p.cached, text) == text  # served from the cache: the storage answers
            assert len(p.runs) - before == 2
            recovered = events.of("storage_recovered")
            assert len(recovered) == n  # the first success after the outage, once
            assert recovered[-1]["log_level"] == "info"
            assert recovered[-1]["outage_s"] >= 0
            assert set(recovered[-1]["warned"]) == {"cache_unavailable", "rate_limit_unavailable"}
    finally:
        if outage.server is not None:
            outage.server.close()


def test_a_corrupt_rate_limit_window_is_a_storage_error_not_a_crash(
    tmp_path: Path, events: CapturedEvents
) -> None:
    import limits

    folder = tmp_path / "state"
    window = "llmguard:limits:" + limits.parse("5/second").key_for("llmguard", "corrupt")
    LocalStorage(folder).set(window, b"{not json")  # what no rate limiter wrote

    @llmguard.rate_limited("5/second", storage=f"file://{folder}", name="corrupt")
    @llmguard.track(model="gpt-4o-mini")
    def allowed(text: str) -> str:
        return text

    @llmguard.rate_limited(
        "5/second", storage=f"file://{folder}", name="corrupt", on_storage_error="raise"
    )
    def strict(text: str) -> str:
        return text

    assert allowed("a") == "a"
    assert len(events.of("rate_limit_unavailable")) == 1
    with pytest.raises(llmguard.StorageError, match="get_moving_window failed") as raised:
        strict("a")
    assert isinstance(raised.value.__cause__, ValueError)  # json's own error, chained


def test_on_storage_error_is_checked_at_decoration() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="on_storage_error"):
        llmguard.rate_limited("1/second", on_storage_error="ignore")  # type: ignore[arg-type]


# -- a hung Redis ------------------------------------------------------------------------


def test_redis_clients_time_out_by_default_and_the_uri_can_say_how_fast(redis_uri: str) -> None:
    from llmguard._ratelimit import limits_storage

    for uri, expected in ((redis_uri, 5.0), (f"{redis_uri}&socket_timeout=0.25", 0.25)):
        limits, _ = limits_storage(uri)
        pool = limits.storage.connection_pool.connection_kwargs
        assert pool["socket_timeout"] == expected  # limits' own client sets no timeout
        assert pool["socket_connect_timeout"] == 5.0
        storage = llmguard.open_storage(uri)
        assert storage.client.connection_pool.connection_kwargs["socket_timeout"] == expected  # type: ignore[attr-defined]
    with pytest.raises(llmguard.ConfigurationError, match="socket_timeout"):
        llmguard.rate_limited("1/second", storage=f"{redis_uri}&socket_timeout=soon")


# -- configure() takes effect for calls made after it ---------------------------------------


def test_configure_cache_dir_moves_every_policy_to_the_new_folder(
    tmp_path: Path, flavour: str
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    llmguard.configure(cache_dir=first)
    p = policies("local", flavour)  # decorated before the move, default storage

    @llmguard.rate_limited("1/hour", block=False)
    def one(text: str) -> str:
        return text

    for fn in (p.cached, p.budgeted, one):
        assert call(fn, "a") == "a"
    spent = p.budgeted.budget_status().spent_usd
    assert spent > 0
    assert p.runs == ["a", "a"]

    llmguard.configure(cache_dir=second)
    assert call(p.cached, "a") == "a"  # a miss in the new folder: runs, and is stored there
    assert call(p.cached, "a") == "a"
    assert p.runs[2:] == ["a"]
    assert p.cached.cache_info().entries == 1
    assert p.budgeted.budget_status().spent_usd == 0  # a ledger of its own in the new folder
    assert call(p.budgeted, "a") == "a"
    assert p.budgeted.budget_status().spent_usd == spent
    assert call(one, "a") == "a"  # a window of its own in the new folder
    with pytest.raises(llmguard.RateLimitExceeded):
        call(one, "a")
    for folder in (first, second):
        assert (folder / "cache.db").exists()
        assert (folder / "entries" / "cache.db").exists()

    llmguard.configure(cache_dir=first)  # and back: the first folder's state is all there
    assert p.budgeted.budget_status().spent_usd == spent
    with pytest.raises(llmguard.RateLimitExceeded):
        call(one, "a")


# -- a cache folder that is a file -------------------------------------------------------


def test_a_cache_folder_that_is_a_file_fails_at_configuration_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(llmguard.ConfigurationError, match="not a folder"):
        llmguard.configure(cache_dir=blocker)
    with pytest.raises(llmguard.ConfigurationError, match="not a folder"):
        llmguard.configure(storage=f"file://{blocker}")
    for storage in (f"file://{blocker}", str(blocker), None):
        if storage is None:
            monkeypatch.setenv("LLMGUARD_CACHE_DIR", str(blocker))
        with pytest.raises(llmguard.ConfigurationError, match="not a folder"):
            llmguard.cached(storage=storage)
        with pytest.raises(llmguard.ConfigurationError, match="not a folder"):
            llmguard.budget(usd="1", storage=storage)
        with pytest.raises(llmguard.ConfigurationError, match="not a folder"):
            llmguard.rate_limited("1/second", storage=storage)


def test_a_cache_folder_that_became_a_file_follows_each_policys_failure_mode(
    tmp_path: Path, flavour: str, events: CapturedEvents
) -> None:
    folder = tmp_path / "state"
    p = policies(f"file://{folder}", flavour)  # fine when decorated
    folder.write_text("a file now")  # found only when called
    assert_failure_modes(p, events, NotADirectoryError)


# -- a cache folder deleted while in use -------------------------------------------------


def test_a_deleted_folder_is_reopened_not_written_to_in_secret(
    tmp_path: Path, events: CapturedEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalStorage, "CHECK_INTERVAL", 0.0, raising=False)
    folder = tmp_path / "state"
    mine = LocalStorage(folder)
    mine.set("before", b"1")
    mine.set_entry("entry", b"1")
    shutil.rmtree(folder)  # a temp cleaner
    theirs = LocalStorage(folder)  # another process, started since
    theirs.set("theirs", b"2")
    mine.set("mine", b"3")
    assert mine.get("theirs") == b"2"
    assert theirs.get("mine") == b"3"  # one folder again, not two
    assert mine.get("before") is None  # what the deleted folder held is gone
    mine.set_entry("entry", b"4")
    assert theirs.get_entry("entry") == b"4"
    replaced = events.of("storage_folder_replaced")
    assert len(replaced) == 1
    assert replaced[0]["storage"] == f"file://{folder}"
    assert "temp" in replaced[0]["hint"]


def test_the_folder_is_compared_with_the_disk_at_most_once_a_second(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    mine = LocalStorage(folder)
    mine.set("k", b"1")
    shutil.rmtree(folder)
    mine.set("k", b"2")  # within the second: still the handle it had
    assert not folder.exists()
    with mine.atomic():  # a transaction (every ledger operation) checks at once
        mine.set("k", b"3")
    assert LocalStorage(folder).get("k") == b"3"


_SPEND = """
import sys
import llmguard

@llmguard.budget(usd="0.01", storage=sys.argv[1], name="shared")
def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
    llmguard.record_usage(int(sys.argv[2]), 100)
    return "ok"

ask("hi")
print(ask.budget_status().spent_usd)
"""


@pytest.mark.slow
def test_a_deleted_folder_does_not_split_a_budget_between_processes(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/shared"

    @llmguard.budget(usd="0.01", storage=uri, name="shared")
    def ask(text: str, max_tokens: int = 100, model: str = "gpt-4o") -> str:
        llmguard.record_usage(1000, 100)  # $0.0035 on gpt-4o
        return "ok"

    assert ask("hi") == "ok"  # this process opened the folder
    shutil.rmtree(tmp_path / "shared")  # a temp cleaner
    other = run_python("-c", _SPEND, uri, "2000")  # another process: $0.006 in a new folder
    assert Decimal(other.stdout.strip()) == Decimal("0.006")
    # This process must see that spend: the budget is one, not one per copy of the folder.
    assert ask.budget_status().spent_usd == Decimal("0.006")
    assert ask("hi") == "ok"  # 0.0095 of 0.01
    with pytest.raises(llmguard.BudgetExceeded):
        ask("hi")
    third = run_python("-c", _SPEND.replace('ask("hi")\n', ""), uri, "0")
    assert Decimal(third.stdout.strip()) == Decimal("0.0095")


# -- a read-only folder ------------------------------------------------------------------

_READ_ONLY = """
import os, sys, time
import llmguard
from llmguard.testing import capture_calls

folder, phase = sys.argv[1], sys.argv[2]
uri = f"file://{folder}"

@llmguard.cached(storage=uri)
@llmguard.track(model="gpt-4o-mini")
def cached(text): return text

@llmguard.budget(usd="1", storage=uri, name="ro")
@llmguard.track(model="gpt-4o-mini")
def budgeted(text): return text

@llmguard.rate_limited("1000/second", storage=uri)
@llmguard.track(model="gpt-4o-mini")
def limited(text): return text

if phase == "fill":
    cached("a"), budgeted("a"), limited("a")
    sys.exit(0)
with capture_calls() as events:
    for _ in range(3):
        assert cached("a") == "a"
        assert cached("b") == "b"
        try:
            budgeted("a")
            raise AssertionError("a budget on a read-only folder let a call through")
        except llmguard.BudgetUnavailable:
            pass
        assert limited("a") == "a"
warned = sorted(e["event"] for e in events if e["log_level"] == "warning" and e["event"] != "llm_call")
print(",".join(warned), len([e for e in events if e["event"] == "storage_recovered"]))
"""


def _without_root_powers() -> None:
    """In a child about to exec, as root: drop the capabilities that let root write where
    permissions say no (root writes a read-only folder anyway)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_folder_follows_each_policys_failure_mode_without_flapping(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if root and not sys.platform.startswith("linux"):
        pytest.skip("root writes a read-only folder, and only Linux lets a child drop that")
    folder = tmp_path / "state"

    def run(phase: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _READ_ONLY, str(folder), phase],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            preexec_fn=_without_root_powers if root else None,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    run("fill")
    try:
        for path in [folder, *folder.rglob("*")]:
            os.chmod(path, 0o500 if path.is_dir() else 0o400)
        warned, recovered = run("read-only").split()
    finally:
        for path in [folder, *folder.rglob("*")]:
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
    assert warned.split(",") == [
        "budget_unavailable",
        "cache_unavailable",
        "rate_limit_unavailable",
    ]  # once each over three rounds: reads that succeed do not end a write outage
    assert recovered == "0"
