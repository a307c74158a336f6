from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

import llmguard
from llmguard import _storage
from llmguard._storage import LocalStorage, MemoryStorage, RedisStorage

from ._helpers import in_processes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(backend: str) -> llmguard.Storage:
    """One test body, every backend (closed after the test by conftest)."""
    return llmguard.open_storage(backend)


def test_get_set_delete(storage: llmguard.Storage) -> None:
    assert storage.get("k") is None
    storage.set("k", b"v1")
    storage.set("k", b"v2")
    assert storage.get("k") == b"v2"
    assert storage.delete("k") is True
    assert storage.delete("k") is False
    assert storage.get("k") is None


def test_add_is_set_if_absent(storage: llmguard.Storage) -> None:
    assert storage.add("lock", b"me", ttl=30) is True
    assert storage.add("lock", b"you", ttl=30) is False
    assert storage.get("lock") == b"me"


def test_incr(storage: llmguard.Storage) -> None:
    assert storage.incr("n") == 1
    assert storage.incr("n", 41) == 42
    assert storage.incr("n", -2) == 40
    assert storage.get("n") == b"40"


def test_clear_by_prefix(storage: llmguard.Storage) -> None:
    for key in ("a:1", "a:2", "b:1", "a*:3"):
        storage.set(key, b"x")
    assert storage.clear("a:") == 2
    assert storage.get("b:1") == b"x"
    assert storage.get("a*:3") == b"x"
    assert storage.clear("a*") == 1
    assert storage.clear() >= 1
    assert storage.get("b:1") is None


def test_ttl_expires(storage: llmguard.Storage) -> None:
    import time

    storage.set("short", b"x", ttl=0.05)
    storage.add("lock", b"x", ttl=0.05)
    storage.incr("counter", 5, ttl=0.05)
    storage.incr("counter", 1, ttl=0.05)  # ttl only when created
    time.sleep(0.15)
    assert storage.get("short") is None
    assert storage.add("lock", b"again") is True
    assert storage.incr("counter") == 1


def test_memory_ttl_with_injected_clock() -> None:
    clock = Clock()
    memory = MemoryStorage(clock=clock)
    memory.set("k", b"v", ttl=10)
    clock.now += 9.99
    assert memory.get("k") == b"v"
    clock.now += 0.02
    assert memory.get("k") is None


def _hammer(ready: Any, uri: str, n: int) -> None:
    storage = LocalStorage(uri) if not uri.startswith("redis") else RedisStorage(uri)
    for _ in range(n):
        storage.incr("shared")
        storage.add(f"once:{os.getpid()}", b"1")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_incr_is_atomic_across_processes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = str(tmp_path / "shared") if backend == "local" else request.getfixturevalue("redis_uri")
    in_processes(_hammer, uri, 200)
    storage = LocalStorage(uri) if backend == "local" else RedisStorage(uri)
    assert storage.incr("shared", 0) == 800


def test_local_folder_is_private_and_refuses_pickles(tmp_path: Path) -> None:
    import diskcache

    folder = tmp_path / "private"
    storage = LocalStorage(folder)
    storage.set("safe", b"data")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    with pytest.raises(TypeError, match="plain data"):
        storage.cache.set("obj", {"a": 1})

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned",))

    # Someone with write access plants a pickle: it is refused, never loaded.
    planted = diskcache.Cache(str(folder))
    planted.set("planted", Evil())
    planted.close()
    with pytest.raises(llmguard.StorageError, match="refusing to unpickle"):
        storage.get("planted")


def test_default_storage_is_local_under_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = llmguard.open_storage()
    assert isinstance(storage, LocalStorage)
    assert storage.directory == tmp_path / "llmguard-cache"
    assert llmguard.open_storage() is storage  # one instance per URI per process


def test_xdg_cache_home_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMGUARD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    storage = llmguard.open_storage()
    assert isinstance(storage, LocalStorage)
    assert storage.directory == tmp_path / "xdg" / "llmguard"


def test_configure_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMGUARD_STORAGE", "memory://env")
    assert llmguard.open_storage().uri == "memory://env"
    llmguard.configure(storage="memory://configured")
    assert llmguard.open_storage().uri == "memory://configured"
    llmguard.configure(storage=None)
    assert llmguard.open_storage().uri == "memory://env"
    llmguard.configure(cache_dir=tmp_path / "elsewhere")
    monkeypatch.delenv("LLMGUARD_STORAGE")
    assert llmguard.open_storage().directory == tmp_path / "elsewhere"  # type: ignore[attr-defined]
    file_storage = llmguard.open_storage(f"file://{tmp_path}/by-uri")
    assert file_storage.directory == tmp_path / "by-uri"  # type: ignore[attr-defined]


def test_redis_uri_opens_redis(redis_uri: str) -> None:
    storage = llmguard.open_storage(redis_uri)
    assert isinstance(storage, RedisStorage)
    storage.set("k", b"v")
    assert storage.get("k") == b"v"


def test_redis_prefix_keeps_every_key_under_it(redis_uri: str) -> None:
    import secrets

    import redis

    mine = llmguard.open_storage(redis_uri)
    assert isinstance(mine, RedisStorage)
    assert mine.prefix.startswith("llmguard-test:")  # the fixture's, from the URI
    neighbour = RedisStorage(f"{mine.connection_uri}?prefix={mine.prefix[:-1]}-neighbour:")
    try:
        for storage in (mine, neighbour):
            storage.set("k", storage.prefix.encode())
            storage.incr("n")
        assert mine.get("k") == mine.prefix.encode()
        assert mine.keys() == ["k", "n"]  # without the prefix, and not the neighbour's
        assert mine.count() == 2
    finally:
        assert neighbour.clear() == 2
        neighbour.close()
    assert mine.get("k") == mine.prefix.encode()  # clearing one prefix spares the other

    # Every policy writes under the prefix: cache entries and locks, budget ledgers, rate
    # limit windows.
    probe = f"probe-{secrets.token_hex(4)}"

    @llmguard.cached(storage=redis_uri, namespace=probe)
    @llmguard.budget(usd=1, per="total", name=probe, storage=redis_uri)
    @llmguard.rate_limited("5/minute", tokens="9000/minute", name=probe, storage=redis_uri)
    def ask(text: str, max_tokens: int = 10, model: str = "gpt-4o") -> str:
        return text

    assert ask("hi") == "hi"
    assert ask.budget_status().spent_usd > 0
    client = redis.Redis.from_url(mine.connection_uri)
    written = [key.decode() for key in client.scan_iter(match=f"*{probe}*")]
    client.close()
    assert len(written) >= 4  # cache entry, ledger, request window, token window
    assert all(key.startswith(mine.prefix) for key in written), written


def test_unknown_scheme_fails_at_configuration() -> None:
    with pytest.raises(llmguard.ConfigurationError, match=r"unknown storage scheme.*redis://"):
        llmguard.configure(storage="mongodb://localhost")
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.configure(storage="")


def test_register_a_backend_by_scheme() -> None:
    made: list[str] = []

    def factory(uri: str) -> llmguard.Storage:
        made.append(uri)
        return MemoryStorage(uri)

    llmguard.register_storage("custom", factory)
    try:
        llmguard.configure(storage="custom://x")
        assert llmguard.open_storage().uri == "custom://x"
        assert made == ["custom://x"]
    finally:
        _storage._registry.pop("custom")
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.register_storage("not a scheme", factory)


def test_backend_failures_are_storage_errors() -> None:
    storage = RedisStorage("redis://127.0.0.1:1/0")
    with pytest.raises(llmguard.StorageError, match=r"127\.0\.0\.1:1") as info:
        storage.get("k")
    assert info.value.__cause__ is not None


def test_a_folder_that_is_a_file_is_a_storage_error_at_call_time(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(llmguard.StorageError, match="not a folder"):  # found when used
        LocalStorage(blocker).get("k")
    with pytest.raises(llmguard.ConfigurationError, match="not a folder"):  # found when set
        llmguard.configure(storage=f"file://{blocker}")


def test_count_and_release(storage: llmguard.Storage) -> None:
    storage.set("p:1", b"x")
    storage.set("p:2", b"x")
    storage.set("q:1", b"x")
    assert storage.count("p:") == 2
    assert storage.add("lock", b"mine", ttl=30)
    assert storage.release("lock", b"theirs") is False
    assert storage.get("lock") == b"mine"
    assert storage.release("lock", b"mine") is True
    assert storage.get("lock") is None


def test_entries_region(storage: llmguard.Storage) -> None:
    storage.set_entry("e:1", b"value", ttl=30)
    assert storage.get_entry("e:1") == b"value"
    assert storage.count_entries("e:") == 1
    assert storage.clear_entries("e:") == 1
    assert storage.get_entry("e:1") is None
    storage.set_entry("e:2", b"v")
    assert storage.delete_entry("e:2") is True


def test_local_entries_are_evicted_but_state_never_is(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "small", size_limit=200_000)
    for i in range(50):
        storage.incr(f"counter:{i}")
    blob = os.urandom(20_000)
    for i in range(60):
        storage.set_entry(f"entry:{i}", blob)
    storage.entries.cull()
    assert storage.entries.volume() <= 400_000  # the database's own pages count too
    assert storage.count_entries("entry:") < 60
    assert storage.get_entry("entry:59") == blob  # newest kept, oldest evicted
    assert storage.get_entry("entry:0") is None
    assert storage.count("counter:") == 50


def test_size_limit_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert llmguard.open_storage().size_limit == 2**30  # type: ignore[attr-defined]
    assert llmguard.open_storage(f"file://{tmp_path}/a?size_limit=12345").size_limit == 12345  # type: ignore[attr-defined]
    llmguard.configure(cache_size_limit=999_999)
    assert llmguard.open_storage(f"file://{tmp_path}/b").size_limit == 999_999  # type: ignore[attr-defined]
    llmguard.configure(cache_size_limit=None)
    monkeypatch.setenv("LLMGUARD_CACHE_SIZE_LIMIT", "4096")
    assert llmguard.open_storage(f"file://{tmp_path}/c").size_limit == 4096  # type: ignore[attr-defined]
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.configure(cache_size_limit=0)
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.open_storage(f"file://{tmp_path}/d?size_limit=lots")


def test_local_limits_storage_counters_and_housekeeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``limits`` Storage methods that llmguard's own strategies do not call."""
    import sqlite3
    import time

    from llmguard._limits_storage import DiskCacheLimitsStorage

    storage = DiskCacheLimitsStorage(f"llmguard+file://{tmp_path}/limits")
    assert storage.check() is True
    before = time.time()
    assert storage.incr("k", 60, 3) == 3
    assert storage.get("k") == 3
    assert before + 59 < storage.get_expiry("k") <= time.time() + 60
    assert storage.decr("k", 2) == 1
    assert storage.decr("k", 5) == 0  # never below zero
    assert storage.decr("k") == 0
    assert storage.get("missing") == 0
    assert before <= storage.get_expiry("missing") <= time.time()  # no window: resets now
    storage.incr("other", 60)
    storage.clear("k")
    assert (storage.get("k"), storage.get("other")) == (0, 1)
    storage.local.set("budget:state", b"kept")  # llmguard's other state in the same folder
    assert storage.reset() == 1
    assert storage.get("other") == 0
    assert storage.local.get("budget:state") == b"kept"

    class Broken:
        def get(self, *args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(DiskCacheLimitsStorage, "_cache", property(lambda self: Broken()))
    assert storage.check() is False
