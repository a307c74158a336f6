"""A missing optional dependency fails early, saying which extra to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import llmguard
from llmguard.testing import FakeLLMServer

REDIS = "redis://127.0.0.1:6379/6"
HINT = 'pip install "llmguard[redis]"'


@pytest.fixture
def no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)


def test_redis_storage_without_redis_fails_at_decoration(no_redis: None) -> None:
    decorators = [
        lambda: llmguard.cached(storage=REDIS),
        lambda: llmguard.budget(usd=1, storage=REDIS),
        lambda: llmguard.rate_limited("10/second", storage=REDIS),
        lambda: llmguard.configure(storage=REDIS),
    ]
    for apply in decorators:
        with pytest.raises(llmguard.MissingExtra) as info:
            apply()
        assert HINT in str(info.value)
        assert isinstance(info.value, llmguard.ConfigurationError)
        assert (info.value.module, info.value.extra) == ("redis", "redis")


def test_opening_a_redis_storage_without_redis(no_redis: None) -> None:
    with pytest.raises(llmguard.MissingExtra, match=r"pip install \"llmguard\[redis\]\""):
        llmguard.open_storage(REDIS)


def test_fake_server_clients_without_their_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with FakeLLMServer() as fake:
        with pytest.raises(llmguard.MissingExtra, match=r"llmguard\[openai\]"):
            fake.openai_client()
        with pytest.raises(llmguard.MissingExtra, match=r"llmguard\[anthropic\]"):
            fake.anthropic_client()


def test_a_missing_dependency_of_an_installed_extra_is_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmguard._errors import require

    # The package is installed, but something it imports is not: that error is the truth.
    (tmp_path / "extra_pkg_xyz").mkdir()
    (tmp_path / "extra_pkg_xyz" / "__init__.py").write_text("import dependency_gone_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="dependency_gone_xyz"):
        require("extra_pkg_xyz", extra="x", what="this")
    with pytest.raises(llmguard.MissingExtra, match=r"pip install \"llmguard\[x\]\""):
        require("not_installed_pkg_xyz", extra="x", what="this")


def test_redis_from_the_environment_without_redis_names_the_extra(
    no_redis: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMGUARD_STORAGE", REDIS)  # read at call time: the first call says it

    @llmguard.rate_limited("10/second")
    def limited(x: int) -> int:
        return x

    @llmguard.cached
    def cached(x: int) -> int:
        return x

    for fn in (limited, cached):
        with pytest.raises(llmguard.MissingExtra, match=r"pip install \"llmguard\[redis\]\""):
            fn(1)
