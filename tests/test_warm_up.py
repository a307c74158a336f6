from __future__ import annotations

import sys

import pytest

import llmguard
from llmguard import _events, _prices, _tokens
from llmguard.testing import CapturedEvents


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing loaded yet: no encoding, counter, price or logger (restored afterwards)."""
    monkeypatch.setattr(_tokens, "_encodings", {})
    monkeypatch.setattr(_tokens, "_counters", {})
    monkeypatch.setattr(_prices, "_cache", {})
    monkeypatch.setattr(_events, "_logger", None)


def test_warm_up_loads_encodings_prices_and_the_logger(cold: None) -> None:
    llmguard.warm_up(models=["gpt-4o", "gpt-4", "claude-3-5-haiku-latest"])
    assert set(_tokens._counters) == {"gpt-4o", "gpt-4", "claude-3-5-haiku-latest"}
    assert set(_tokens._encodings) == {"o200k_base", "cl100k_base"}
    assert all(encoding is not None for encoding in _tokens._encodings.values())
    assert _tokens._counters["gpt-4o"].method == "tiktoken:o200k_base"
    assert _tokens._counters["gpt-4"].method == "tiktoken:cl100k_base"
    assert set(_prices._cache) == {"gpt-4o", "gpt-4", "claude-3-5-haiku-latest"}
    assert all(price is not None for price in _prices._cache.values())
    assert "genai_prices" in sys.modules
    assert _events._logger is not None
    # The first call finds everything loaded: nothing new is looked up.
    counters, prices = dict(_tokens._counters), dict(_prices._cache)
    llmguard.track(lambda text, model="gpt-4o": "ok")("hello")
    assert _tokens._counters == counters
    assert _prices._cache == prices


def test_warm_up_without_models_loads_the_default_encoding(
    cold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = {"o200k_base": object()}  # already loaded by another test: not loaded again
    monkeypatch.setattr(_tokens, "_encodings", loaded)
    monkeypatch.setattr(_tokens, "_length_counter", lambda encoding: len)
    llmguard.warm_up()
    assert list(_tokens._counters) == [None]
    assert _tokens._counters[None].method == "approx:o200k_base"
    assert _prices._cache == {}  # no model named, no price looked up
    assert _events._logger is not None
    llmguard.warm_up("gpt-4o-mini")  # one name is a model, not a list of characters
    assert list(_tokens._counters) == [None, "gpt-4o-mini"]
    assert list(_prices._cache) == ["gpt-4o-mini"]


def test_warm_up_warns_about_an_unknown_model_at_start_up(events: CapturedEvents) -> None:
    llmguard.warm_up(models=["no-such-model-xyz"])
    assert [(e["event"], e["model"]) for e in events.of("unknown_model_price")] == [
        ("unknown_model_price", "no-such-model-xyz")
    ]


def test_warm_up_refuses_what_is_not_a_model_name() -> None:
    with pytest.raises(llmguard.ConfigurationError, match="model names"):
        llmguard.warm_up(models=["gpt-4o", None])  # type: ignore[list-item]
