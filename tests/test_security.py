"""Hostile or broken storage: never run code, never delete files, never leak secrets."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import llmguard
from llmguard._cli import main
from llmguard._redact import redact_uri, scrub
from llmguard._storage import LocalStorage, RedisStorage, close_storages
from llmguard.testing import CapturedEvents

from .conftest import call

CANARY_PASSWORD = "hunter2canary"


# -- 1. a pickled key never runs -------------------------------------------------------------


class TouchOnLoad:
    """Unpickling this creates ``path`` (the planted key's payload)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class SystemOnLoad:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.path}",))


def _plant_key(folder: Path, key: Any) -> None:
    """A row whose key diskcache stored pickled (raw=0), as anyone able to write the
    folder's database could."""
    import diskcache

    planted = diskcache.Cache(str(folder))
    planted.set(key, b"planted")
    planted.close()
    with sqlite3.connect(folder / "cache.db") as db:
        assert db.execute("SELECT count(*) FROM Cache WHERE raw = 0").fetchone() == (1,)


def _walks(tmp_path: Path) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Every walk over a local storage's keys: (the database it walks, the walk)."""
    folder = tmp_path / "store"
    uri = f"file://{folder}"

    @llmguard.cached(storage=uri)
    def answer(question: str) -> str:
        return question.upper()

    @llmguard.budget(usd="1", name="walked", storage=uri)
    @llmguard.track(model="gpt-4o-mini")
    def spend(text: str) -> str:
        return text

    answer("warm")
    spend("warm")
    return {
        "cache_info": ("entries", answer.cache_info),
        "cache_clear": ("entries", answer.cache_clear),
        "reset_budget": ("state", lambda: llmguard.reset_budget("walked")),
        "cli cache stats": ("entries", lambda: main(["cache", "stats", "--storage", uri])),
        "cli cache clear": ("entries", lambda: main(["cache", "clear", "--storage", uri])),
        "cli budget status": ("state", lambda: main(["budget", "status", "--storage", uri])),
        "cli budget reset": (
            "state",
            lambda: main(["budget", "reset", "walked", "--storage", uri]),
        ),
    }


WALKS = (
    "cache_info",
    "cache_clear",
    "reset_budget",
    "cli cache stats",
    "cli cache clear",
    "cli budget status",
    "cli budget reset",
)


@pytest.mark.parametrize("payload", [TouchOnLoad, SystemOnLoad])
@pytest.mark.parametrize("walk", WALKS)
def test_a_planted_pickled_key_never_runs(
    tmp_path: Path, walk: str, payload: type, events: CapturedEvents
) -> None:
    canary = tmp_path / "canary"
    where, run = _walks(tmp_path)[walk]
    folder = tmp_path / "store" / ("entries" if where == "entries" else "")
    _plant_key(folder, payload(canary))
    close_storages()  # a fresh process, reading the planted database

    run()

    assert not canary.exists(), "unpickling a planted key ran its code"
    refused = events.of("storage_row_refused")
    assert refused
    assert refused[0]["row"] == "a pickled key"


def test_a_pickled_key_is_skipped_and_the_rest_still_walked(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    storage = LocalStorage(folder)
    storage.set("llmguard:x:1", b"1")
    storage.set("llmguard:x:2", b"2")
    storage.close()
    _plant_key(folder, TouchOnLoad(tmp_path / "canary"))

    storage = LocalStorage(folder)
    assert storage.keys("llmguard:x:") == ["llmguard:x:1", "llmguard:x:2"]
    assert storage.count("llmguard:x:") == 2
    assert storage.clear("llmguard:x:") == 2
    assert not (tmp_path / "canary").exists()
    assert storage.refused_rows == 3  # one per walk that met it


# -- 2. a row never opens or deletes a file outside the folder --------------------------------


def _escape_routes(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    """filename column values that lead out of ``store/entries``, and the file each names."""
    outside = tmp_path / "outside"
    (outside / "cd").mkdir(parents=True)
    entries = tmp_path / "store" / "entries"
    entries.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "store", 0o700)
    (entries / "ab").symlink_to(outside, target_is_directory=True)
    (entries / "link.val").symlink_to(tmp_path / "linked-victim.txt")
    return {
        "absolute": (str(tmp_path / "victim.txt"), tmp_path / "victim.txt"),
        "dotdot": ("../../victim.txt", tmp_path / "victim.txt"),
        "dotdot inside a path": ("../entries/../../victim.txt", tmp_path / "victim.txt"),
        "symlinked folder": ("ab/cd/victim.val", outside / "cd" / "victim.val"),
        "symlinked file": ("link.val", tmp_path / "linked-victim.txt"),
    }


def _point_entries_at(folder: Path, filename: str, *, expired: bool = False) -> int:
    """Rewrite every cache entry row of ``folder`` to say its value is in ``filename``."""
    with sqlite3.connect(folder / "entries" / "cache.db") as db:
        changed = db.execute(
            "UPDATE Cache SET mode = 2, value = NULL, filename = ?"
            + (", expire_time = 1" if expired else "")
            + " WHERE key LIKE 'llmguard:cache:%'",
            (filename,),
        ).rowcount
    return int(changed)


@pytest.mark.parametrize(
    "route", ["absolute", "dotdot", "dotdot inside a path", "symlinked folder", "symlinked file"]
)
@pytest.mark.parametrize("operation", ["read", "cache_clear", "cli cache clear", "expire"])
def test_a_planted_row_never_touches_a_file_outside_the_folder(
    tmp_path: Path, route: str, operation: str, events: CapturedEvents
) -> None:
    filename, victim = _escape_routes(tmp_path)[route]
    victim.write_text("precious")
    folder = tmp_path / "store"
    uri = f"file://{folder}"
    runs = []

    @llmguard.cached(storage=uri)
    def answer(question: str) -> str:
        runs.append(question)
        return question.upper()

    assert answer("q") == "Q"
    close_storages()
    assert _point_entries_at(folder, filename, expired=operation == "expire") == 1

    if operation == "read":  # an unreadable entry is deleted: never the file it names
        assert answer("q") == "Q"
        assert runs == ["q", "q"]  # the planted row is a miss, never its file's content
    elif operation == "cache_clear":
        answer.cache_clear()
    elif operation == "cli cache clear":
        assert main(["cache", "clear", "--storage", uri]) == 0
    else:
        assert answer.cache_info().entries == 0  # expires the row

    assert victim.read_text() == "precious"
    assert [e["row"] for e in events.of("storage_row_refused")] == [
        "a row whose file is outside the folder"
    ]
    with sqlite3.connect(folder / "entries" / "cache.db") as db:  # the row itself is gone
        found = db.execute("SELECT count(*) FROM Cache WHERE filename = ?", (filename,))
        assert found.fetchone() == (0,)


def test_a_state_row_pointing_outside_is_dropped_and_reads_as_absent(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "store"
    storage = LocalStorage(folder)
    storage.set("lock", b"token")
    storage.close()
    with sqlite3.connect(folder / "cache.db") as db:
        db.execute(
            "UPDATE Cache SET mode = 2, value = NULL, filename = ? WHERE key = 'lock'",
            (str(victim),),
        )
    storage = LocalStorage(folder)
    assert storage.get("lock") is None  # the file's content is never served
    assert storage.release("lock", b"token") is False
    assert storage.add("lock", b"mine") is True  # the row was dropped
    assert storage.get("lock") == b"mine"
    assert victim.read_text() == "precious"
    assert storage.refused_rows == 1


def test_values_in_files_still_work_and_their_folders_are_tidied(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    big = os.urandom(100_000)  # beyond diskcache's in-database size: kept in a file
    storage.set_entry("big", big)
    files = list((tmp_path / "store" / "entries").rglob("*.val"))
    assert len(files) == 1
    assert storage.get_entry("big") == big
    assert storage.delete_entry("big") is True
    assert not files[0].exists()
    assert not files[0].parent.exists()  # emptied sub-folders go, the folder stays
    assert (tmp_path / "store" / "entries" / "cache.db").exists()
    assert storage.refused_rows == 0


# -- 3. folders others can write are refused; what llmguard creates is private ---------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707, 0o722])
def test_a_folder_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    with pytest.raises(llmguard.StorageError, match=re.escape(f"chmod 700 {folder}")) as info:
        LocalStorage(folder).get("k")
    assert f"mode {mode:o}" in str(info.value)


def test_an_entries_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    LocalStorage(folder).set("k", b"v")
    (folder / "entries").mkdir(mode=0o700)
    os.chmod(folder / "entries", 0o777)
    storage = LocalStorage(folder)
    assert storage.get("k") == b"v"
    with pytest.raises(llmguard.StorageError, match="chmod 700"):
        storage.get_entry("k")


def test_the_cache_runs_without_a_foreign_writable_folder_and_says_why(
    tmp_path: Path, flavour: str, events: CapturedEvents
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    runs = []
    if flavour == "sync":

        @llmguard.cached(storage=f"file://{folder}")
        def answer(question: str) -> str:
            runs.append(question)
            return question.upper()

    else:

        @llmguard.cached(storage=f"file://{folder}")
        async def answer(question: str) -> str:
            runs.append(question)
            return question.upper()

    assert call(answer, "q") == "Q"
    assert call(answer, "q") == "Q"
    assert runs == ["q", "q"]  # never served from (or stored in) the refused folder
    warnings = events.of("cache_unavailable")
    assert len(warnings) == 1
    assert "chmod 700" in warnings[0]["error"]
    assert not (folder / "cache.db").exists()


def test_a_budget_refuses_calls_on_a_foreign_writable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o757)

    @llmguard.budget(usd="1", storage=f"file://{folder}")
    @llmguard.track(model="gpt-4o-mini")
    def spend(text: str) -> str:
        return text

    with pytest.raises(llmguard.BudgetUnavailable, match="chmod 700"):
        spend("x")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away needs root"
)
def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "theirs"
    LocalStorage(folder).set("k", b"v")  # a valid store, 0700...
    os.chown(folder, 54321, 54321)  # ...that belongs to someone else
    close_storages()
    with pytest.raises(llmguard.StorageError, match="belongs to user id 54321") as info:
        LocalStorage(folder).get("k")
    assert "chmod 700" in str(info.value)
    assert main(["budget", "status", "--storage", str(folder)]) == 1
    assert "belongs to user id 54321" in capsys.readouterr().err


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_new_folders_are_0700_and_files_0600_whatever_the_umask(
    tmp_path: Path, open_umask: None
) -> None:
    folder = tmp_path / "fresh"
    storage = LocalStorage(folder)
    storage.set("small", b"v")
    storage.set("big", os.urandom(100_000))  # in a value file, in sub-folders
    storage.set_entry("entry", b"e")
    storage.entries.set("text entry", "x" * 100_000)  # text kept in a file
    assert storage.get("big") is not None
    created = [folder, *folder.rglob("*")]
    assert any(p.name == "cache.db-wal" for p in created)
    assert sum(p.suffix == ".val" for p in created) == 2
    loose = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.lstat().st_mode))
        for p in created
        if stat.S_IMODE(p.lstat().st_mode) & 0o077
    }
    assert loose == {}


def test_a_symlinked_database_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir(mode=0o700)
    (folder / "cache.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(llmguard.StorageError):
        LocalStorage(folder).get("k")
    assert not (tmp_path / "elsewhere.db").exists()


# -- 4. a cached response never shows up in a warning -----------------------------------------


class CachedAnswer(BaseModel):
    text: str
    tokens: int


def test_an_unreadable_pydantic_entry_is_reported_without_its_content(
    events: CapturedEvents,
) -> None:
    secret = "CANARY-the-cached-response-text"
    runs = []

    @llmguard.cached
    def answer(question: str) -> CachedAnswer:
        runs.append(question)
        return CachedAnswer(text=secret, tokens=3)

    answer("q")
    storage = llmguard.open_storage()
    key = answer.cache_key("q")
    raw = storage.get_entry(key)
    assert raw is not None
    head, _, payload = raw.partition(b"\n")
    data = json.loads(payload)
    del data["tokens"]  # e.g. a field the model class now requires
    storage.set_entry(key, head + b"\n" + json.dumps(data).encode())

    assert answer("q").text == secret
    assert runs == ["q", "q"]
    [warning] = events.of("cache_entry_unreadable")
    assert secret not in repr(list(events))
    assert "tokens (missing)" in warning["error"]
    assert "ValidationError" in warning["error"]


# -- 5. a password in a storage URI is never shown --------------------------------------------


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pw-secret@host/0", "redis://user:***@host/0"),
        ("rediss://token@host/0", "rediss://***@host/0"),
        ("redis://:p@ss/w@rd@host:1/0", "redis://:***@host:1/0"),
        ("unix://:secret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://host/0?password=secret&db=2", "redis://host/0?password=***&db=2"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("file:///home/me/cache@v2", "file:///home/me/cache@v2"),
        ("/home/me/user:pw@folder", "/home/me/user:pw@folder"),
        ("memory://", "memory://"),
    ],
)
def test_redact_uri(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown
    assert scrub(f"failed for {uri}", uri) == f"failed for {shown}"


UNREACHABLE = [
    f"redis://:{CANARY_PASSWORD}@127.0.0.1:1/0",
    f"redis://someone:{CANARY_PASSWORD}@127.0.0.1:1/0",
    f"redis://127.0.0.1:1/0?password={CANARY_PASSWORD}",
]


@pytest.mark.parametrize("uri", UNREACHABLE)
def test_storage_errors_and_reprs_never_show_the_password(uri: str) -> None:
    storage = RedisStorage(uri)
    assert CANARY_PASSWORD not in repr(storage)
    with pytest.raises(llmguard.StorageError) as info:
        storage.get("k")
    assert CANARY_PASSWORD not in str(info.value)
    assert CANARY_PASSWORD not in repr(info.value)
    assert CANARY_PASSWORD not in info.value.uri
    assert "127.0.0.1:1" in str(info.value)
    assert CANARY_PASSWORD not in repr(llmguard.open_storage(uri))


def test_backend_messages_are_scrubbed_of_the_password() -> None:
    error = llmguard.StorageError(
        f"auth failed for {UNREACHABLE[0]} with {CANARY_PASSWORD}", uri=UNREACHABLE[0]
    )
    assert CANARY_PASSWORD not in str(error)


def test_configuration_errors_never_show_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(llmguard.ConfigurationError) as info:
        llmguard.configure(storage=f"rediz://:{CANARY_PASSWORD}@host/0")
    assert CANARY_PASSWORD not in str(info.value)
    with pytest.raises(llmguard.ConfigurationError) as opened:  # a malformed port
        llmguard.configure(storage=f"redis://:{CANARY_PASSWORD}@127.0.0.1:notaport/0")
    assert CANARY_PASSWORD not in str(opened.value)
    assert "notaport" in str(opened.value)


@pytest.mark.parametrize("uri", UNREACHABLE)
def test_budget_unavailable_and_events_never_show_the_password(
    uri: str, events: CapturedEvents
) -> None:
    @llmguard.budget(usd="1", storage=uri)
    @llmguard.track(model="gpt-4o-mini")
    def closed(text: str) -> str:
        return text

    @llmguard.budget(usd="1", storage=uri, fail_open=True)
    @llmguard.track(model="gpt-4o-mini")
    def open_(text: str) -> str:
        return text

    @llmguard.cached(storage=uri)
    def cached(text: str) -> str:
        return text

    with pytest.raises(llmguard.BudgetUnavailable) as info:
        closed("x")
    assert CANARY_PASSWORD not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)
    assert open_("x") == "x"
    assert cached("x") == "x"
    kinds = {e["event"] for e in events}
    assert {"budget_unavailable", "cache_unavailable"} <= kinds
    assert CANARY_PASSWORD not in repr(list(events))


@pytest.mark.parametrize("uri", UNREACHABLE)
@pytest.mark.parametrize(
    "command",
    [
        ["budget", "status"],
        ["budget", "reset", "some-budget"],
        ["cache", "stats"],
        ["cache", "clear"],
    ],
)
def test_cli_says_which_storage_is_unreachable_without_the_password(
    uri: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--storage", uri]) == 1
    out, err = capsys.readouterr()
    assert CANARY_PASSWORD not in out + err
    assert "Traceback" not in err
    assert err.startswith("llmguard: storage unavailable:")
    assert redact_uri(uri) in err
    assert len(err.strip().splitlines()) == 1


def test_cli_hides_the_password_of_llmguard_storage_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMGUARD_STORAGE", UNREACHABLE[0])
    assert main(["cache", "stats"]) == 1
    out, err = capsys.readouterr()
    assert CANARY_PASSWORD not in out + err
    assert ":***@127.0.0.1:1" in err


def test_cli_output_shows_storages_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"memory://someone:{CANARY_PASSWORD}@shared"
    assert main(["cache", "stats", "--storage", uri]) == 0
    assert main(["cache", "clear", "--storage", uri]) == 0
    assert main(["budget", "status", "--storage", uri]) == 0
    out, err = capsys.readouterr()
    assert CANARY_PASSWORD not in out + err
    assert out.count("memory://someone:***@shared") == 3
