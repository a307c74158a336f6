from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

import llmguard
from llmguard import _prices


def test_issue_price_examples() -> None:
    assert llmguard.calc_cost("gpt-4o", 1000, 100) == Decimal("0.0035")
    assert llmguard.calc_cost("gpt-4o-mini", 1000, 100) == Decimal("0.00021")
    assert llmguard.calc_cost("gpt-4o", 1000, 100, cached_input_tokens=600) == Decimal("0.00275")
    # Anthropic usage {input_tokens: 3, cache_creation_input_tokens: 12304, output_tokens: 550}
    assert llmguard.calc_cost(
        "claude-3-7-sonnet", 3 + 12304, 550, cache_write_tokens=12304
    ) == Decimal("0.054399")


def test_dated_model_names_match() -> None:
    assert llmguard.calc_cost("gpt-4o-2024-08-06", 1000, 100) == Decimal("0.0035")


def test_unknown_model_is_none_and_warns_once(events: Any) -> None:
    assert llmguard.calc_cost("my-private-model", 10, 10) is None
    assert llmguard.get_price("my-private-model") is None
    warnings = events.of("unknown_model_price")
    assert len(warnings) == 1
    assert warnings[0]["model"] == "my-private-model"
    assert "set_price" in warnings[0]["hint"]


def test_set_price_adds_and_overrides() -> None:
    llmguard.set_price("my-private-model", input_per_mtok=1, output_per_mtok="2.5")
    assert llmguard.calc_cost("my-private-model", 1_000_000, 1_000_000) == Decimal("3.5")
    llmguard.set_price("gpt-4o", input_per_mtok=1, output_per_mtok=1, cached_input_per_mtok=0.1)
    assert llmguard.calc_cost("gpt-4o", 1000, 0, cached_input_tokens=1000) == Decimal("0.0001")
    assert llmguard.get_price("GPT-4O") is not None
    assert llmguard.get_price("gpt-4o").source == "override"  # type: ignore[union-attr]


def test_set_price_float_is_exact() -> None:
    llmguard.set_price("m", input_per_mtok=0.1, output_per_mtok=0.2)
    total = sum((llmguard.calc_cost("m", 1, 1) for _ in range(10)), Decimal(0))
    assert total == Decimal("0.000003")


def test_missing_cache_prices_fall_back_to_input_price() -> None:
    llmguard.set_price("m", input_per_mtok=2, output_per_mtok=4)
    assert llmguard.calc_cost("m", 1000, 0, cached_input_tokens=500) == Decimal("0.002")


@pytest.mark.parametrize("bad", [-1, "abc", float("nan"), None])
def test_set_price_rejects_bad_numbers(bad: Any) -> None:
    with pytest.raises(llmguard.ConfigurationError):
        llmguard.set_price("m", input_per_mtok=bad, output_per_mtok=1)


def test_tiered_prices_apply_on_total_input() -> None:
    small = llmguard.calc_cost("claude-sonnet-4-5", 200_000, 0)
    large = llmguard.calc_cost("claude-sonnet-4-5", 200_001, 0)
    assert small == Decimal("0.6")
    assert large == Decimal("1.200006")


def test_price_looked_up_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []
    real = _prices._lookup_genai_prices

    def counting(model: str) -> Any:
        lookups.append(model)
        return real(model)

    monkeypatch.setattr(_prices, "_lookup_genai_prices", counting)
    for _ in range(5):
        llmguard.calc_cost("gpt-4o", 10, 10)
        llmguard.calc_cost("unknown-x", 10, 10)
    assert lookups == ["gpt-4o", "unknown-x"]
