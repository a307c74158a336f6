"""A mistyped storage argument is refused, not taken for a folder; operator commands never
create a storage folder; a password in anything URI-like is masked when shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import llmguard
from llmguard._cli import main
from llmguard._redact import redact_uri, secrets_of

TYPO = "redis:/:secretpw@127.0.0.1:1/0"  # one slash: a typo for redis://


@pytest.mark.parametrize("uri", [TYPO, "::::", "redis:127.0.0.1:6379", "rediss:/h", "x:/a://b"])
def test_a_uri_without_a_valid_scheme_separator_is_refused(uri: str) -> None:
    with pytest.raises(llmguard.ConfigurationError, match="malformed URI") as raised:
        llmguard.cached(storage=uri)
    assert "secretpw" not in str(raised.value)


@pytest.mark.parametrize("path", ["/tmp/a:b", "./x:y", "folder/sub:dir", "a@b:c", "plain"])
def test_a_folder_path_with_a_colon_after_a_slash_is_still_a_folder(path: str) -> None:
    llmguard.cached(storage=path)  # accepted: a folder path, not a malformed URI


def test_a_malformed_uri_is_masked_when_shown() -> None:
    assert redact_uri(TYPO) == "redis:/:***@127.0.0.1:1/0"
    assert "secretpw" in secrets_of(TYPO)
    assert redact_uri("redis:user:pw@host") == "redis:user:***@host"
    assert redact_uri("/tmp/a:b@c") == "/tmp/a:b@c"  # a path: nothing to mask
    assert redact_uri("redis://:pw@host/0") == "redis://:***@host/0"  # unchanged


@pytest.mark.parametrize(
    "command",
    [["budget", "status"], ["cache", "stats"], ["budget", "reset", "b"], ["cache", "clear"]],
)
def test_a_mistyped_redis_uri_is_a_usage_error_and_creates_nothing(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main([*command, "--storage", TYPO]) == 2
    captured = capsys.readouterr()
    assert "secretpw" not in captured.out + captured.err
    assert "malformed URI" in captured.err
    assert "redis:/:***@127.0.0.1:1/0" in captured.err
    assert sorted(os.listdir(tmp_path)) == before  # was: ./redis:/:secretpw@127.0.0.1:1/0


@pytest.mark.parametrize(
    "command",
    [["budget", "status"], ["cache", "stats"], ["budget", "reset", "b"], ["cache", "clear"]],
)
def test_operator_commands_never_create_a_storage_folder(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for storage in ("missing", str(tmp_path / "also-missing"), f"file://{tmp_path}/third"):
        assert main([*command, "--storage", storage]) == 1
        captured = capsys.readouterr()
        assert "nothing there" in captured.err
        assert captured.out == ""
    monkeypatch.setenv("LLMGUARD_CACHE_DIR", str(tmp_path / "default-missing"))
    assert main(command) == 1  # the default folder too
    assert "nothing there" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_operator_commands_read_a_folder_that_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "store"
    folder.mkdir(mode=0o700)
    assert main(["cache", "stats", "--storage", str(folder)]) == 0
    assert "no cache entries" in capsys.readouterr().out
    assert main(["budget", "status", "--storage", str(folder)]) == 0
