"""Money is printed as money everywhere: ``$20.00`` and ``$0.00000075``, never ``2E+1``."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

import llmguard
from llmguard._cli import main
from llmguard._html import render_html
from llmguard._ledger import PICO, usd_of
from llmguard._money import decimal_text, format_usd
from llmguard._report import build, render_table

EXPONENT = re.compile(r"\d[eE][+-]?\d")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("2E+1"), "$20.00"),
        (Decimal("20"), "$20.00"),
        (Decimal("7.5E-7"), "$0.00000075"),
        (Decimal("1E-12"), "$0.000000000001"),
        (Decimal("0.00045180"), "$0.0004518"),
        (Decimal("1.5"), "$1.50"),
        (Decimal("1E+9"), "$1000000000.00"),
        (Decimal("123456789012.000000000001"), "$123456789012.000000000001"),
        (Decimal("-5.1"), "-$5.10"),
        (Decimal("-7.5E-7"), "-$0.00000075"),
        (Decimal("-0"), "$0.00"),
        (Decimal("0E-12"), "$0.00"),
        (0, "$0.00"),
        (20, "$20.00"),
        (1.25e-05, "$0.0000125"),
        ("0.5", "$0.50"),
    ],
)
def test_format_usd(value: object, text: str) -> None:
    assert format_usd(value) == text


def test_decimal_text_is_exact_without_exponent() -> None:
    assert decimal_text(Decimal("2E+1")) == "20"
    assert decimal_text(Decimal("7.5E-7")) == "0.00000075"
    assert decimal_text(Decimal("1E-12")) == "0.000000000001"
    assert decimal_text(Decimal("-1.50")) == "-1.5"
    assert Decimal(decimal_text(Decimal("123456789.000000000001"))) == Decimal(
        "123456789.000000000001"
    )


def test_pico_dollars_convert_without_exponent() -> None:
    assert str(usd_of(20 * PICO)) == "20"  # not 2E+1
    assert usd_of(750_000) == Decimal("0.00000075")
    assert usd_of(1) == Decimal("1E-12")


def _tiny_budget(usd: object, **options: object) -> object:
    llmguard.set_price("tiny-model", input_per_mtok="0.75", output_per_mtok=0)

    @llmguard.budget(usd=usd, name=f"tiny-{usd}", **options)  # type: ignore[arg-type]
    def ask(text: str, *, model: str = "tiny-model", max_tokens: int = 0) -> str:
        llmguard.record_usage(1, 0)  # 1 token at $0.75 per million: $0.00000075
        return "ok"

    return ask


def test_budget_status_repr_prints_money() -> None:
    ask = _tiny_budget(20)
    fresh = repr(ask.budget_status())
    assert "limit_usd=$20.00" in fresh
    assert "remaining_usd=$20.00" in fresh
    assert str(ask.budget_status().remaining_usd) == "20"
    ask("hi")  # type: ignore[operator]
    text = repr(ask.budget_status())
    assert "spent_usd=$0.00000075" in text
    assert "reserved_usd=$0.00" in text
    assert "remaining_usd=$19.99999925" in text
    assert not EXPONENT.search(text), text


def test_budget_status_repr_of_extremes() -> None:
    status = llmguard.BudgetStatus(
        name="big",
        key="alice",
        limit_usd=Decimal("1E+9"),
        spent_usd=Decimal("1E-12"),
        reserved_usd=Decimal("0"),
        remaining_usd=Decimal("999999999.999999999999"),
        window_start=datetime(2026, 1, 1, tzinfo=timezone.utc),
        resets_at=None,
    )
    assert repr(status) == (
        "BudgetStatus(name='big', key='alice', limit_usd=$1000000000.00, "
        "spent_usd=$0.000000000001, reserved_usd=$0.00, remaining_usd=$999999999.999999999999, "
        "window_start=2026-01-01T00:00:00+00:00, resets_at=None)"
    )


def test_budget_exceeded_message_prints_money() -> None:
    ask = _tiny_budget("0.000001")
    ask("hi")  # type: ignore[operator]
    with pytest.raises(llmguard.BudgetExceeded) as info:
        ask("hi")  # type: ignore[operator]
    message = str(info.value)
    assert (
        "limit $0.000001, spent $0.00000075 (settled), $0.00 reserved by calls in flight, this call up to $0.00000075"
        in (message)
    )
    assert not EXPONENT.search(message), message


def test_call_too_expensive_message_prints_money() -> None:
    ask = _tiny_budget(20, max_call_usd="1E-12")
    with pytest.raises(llmguard.CallTooExpensive) as info:
        ask("hi")  # type: ignore[operator]
    assert "up to $0.00000075 on tiny-model" in str(info.value)
    assert "max_call_usd $0.000000000001" in str(info.value)


def test_cache_info_repr_prints_money() -> None:
    llmguard.set_price("tiny-model", input_per_mtok="0.75", output_per_mtok=0)

    @llmguard.cached
    def ask(text: str, *, model: str = "tiny-model") -> str:
        llmguard.record_usage(1, 0)
        return "ok"

    ask("hi")
    ask("hi")
    assert "saved_usd=$0.00000075" in repr(ask.cache_info())


def _events_log(tmp_path: Path) -> Path:
    log = tmp_path / "log.jsonl"
    events = [
        {"event": "llm_call", "function": "f", "model": "m", "cost_usd": 7.5e-07},
        {"event": "llm_call", "function": "f", "model": "m", "cost_usd": 1e-12},
        {"event": "llm_call", "function": "g", "model": "m", "cost_usd": 20},
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    return log


def test_report_table_json_and_html_print_money(tmp_path: Path) -> None:
    from llmguard._report import read_events

    report = build(read_events([str(_events_log(tmp_path))]))
    table = render_table(report)
    assert "spent            $20.000000750001" in table
    assert "$0.000000750001" in table  # f's row
    assert "$20.00 " in table  # g's row
    assert not EXPONENT.search(table), table
    assert report.as_dict()["groups"]["f"]["cost_usd"] == "0.000000750001"
    page = render_html(report)
    assert "$20.000000750001" in page
    assert not EXPONENT.search(page.split("<style>")[0] + page.split("</style>")[1])


def test_cli_budget_status_prints_money(capsys: pytest.CaptureFixture[str]) -> None:
    ask = _tiny_budget(20)
    ask("hi")  # type: ignore[operator]
    capsys.readouterr()
    assert main(["budget", "status", "tiny-20"]) == 0
    out = capsys.readouterr().out
    assert "$20.00" in out
    assert "$0.00000075" in out
    assert "$19.99999925" in out
    assert main(["budget", "status", "tiny-20", "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["limit_usd"], row["spent_usd"]) == ("20", "0.00000075")


def test_cli_estimate_and_prices_print_money(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llmguard.set_price("tiny-model", input_per_mtok="0.75", output_per_mtok=20)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hi")
    assert main(["estimate", str(prompt), "--model", "tiny-model", "--output-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "$0.00000075" in out
    assert "$0.00002075" in out
    assert not EXPONENT.search(out), out
    assert main(["prices", "tiny-model"]) == 0
    out = capsys.readouterr().out
    assert "$0.75" in out
    assert "$20.00" in out
