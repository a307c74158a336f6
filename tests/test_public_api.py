from __future__ import annotations

import pickle
import traceback
import typing
from decimal import Decimal

import pytest

import llmguard
import llmguard.testing

from ._helpers import run_python


def test_all_is_exactly_the_public_surface() -> None:
    public = {name for name in dir(llmguard) if not name.startswith(("_", "@"))} | {"__version__"}
    public -= {"testing", "otel", "prometheus"}  # submodules, imported by this or other tests
    assert set(llmguard.__all__) == public
    assert sorted(llmguard.__all__) == llmguard.__all__
    for name in llmguard.__all__:
        assert getattr(llmguard, name) is not None
    for name in llmguard.testing.__all__:
        assert getattr(llmguard.testing, name) is not None


def test_errors_share_one_base() -> None:
    for error in (llmguard.ConfigurationError, llmguard.StorageError):
        assert issubclass(error, llmguard.LLMGuardError)
    assert issubclass(llmguard.ConfigurationError, ValueError)


def test_import_loads_nothing_heavy() -> None:
    code = (
        "import sys, llmguard\n"
        "heavy = {'tiktoken', 'genai_prices', 'diskcache', 'limits', 'backoff', 'redis', 'openai', 'asyncio',"
        " 'anthropic', 'structlog', 'opentelemetry', 'prometheus_client', 'llmguard.otel',"
        " 'llmguard.prometheus', 'llmguard._monitor'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = run_python("-c", code).stdout
    assert out.strip() == "[]"


def test_exporter_modules_load_their_packages_only_when_used() -> None:
    code = (
        "import sys, llmguard.otel, llmguard.prometheus\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus_client'))))\n"
    )
    out = run_python("-c", code).stdout
    assert out.strip() == "[]"


def test_py_typed_is_shipped() -> None:
    from importlib.resources import files

    assert files("llmguard").joinpath("py.typed").is_file()


PUBLIC_CLASSES = [
    name for name in llmguard.__all__ if isinstance(getattr(llmguard, name, None), type)
]


@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_public_classes_report_the_package_as_their_module(name: str) -> None:
    kind = getattr(llmguard, name)
    assert kind.__module__ == "llmguard"
    assert repr(kind) == f"<class 'llmguard.{name}'>"
    # Their annotations still resolve (pydantic and FastAPI read them this way).
    typing.get_type_hints(kind)


def test_a_traceback_names_the_public_class() -> None:
    try:
        raise llmguard.ConfigurationError("bad")
    except llmguard.ConfigurationError:
        shown = traceback.format_exc()
    assert "llmguard.ConfigurationError: bad" in shown
    assert "_errors" not in shown.splitlines()[-1]


def test_public_values_still_pickle() -> None:
    picklable = [
        llmguard.LLMGuardError("boom"),
        llmguard.ConfigurationError("bad option"),
        llmguard.BudgetUnavailable("ledger down"),
        llmguard.PriceUnknown("no price"),
        llmguard.Usage(input_tokens=3, output_tokens=4, model="gpt-4o"),
        llmguard.BudgetStatus(
            name="daily",
            key=None,
            limit_usd=Decimal("1"),
            spent_usd=Decimal("0.25"),
            reserved_usd=Decimal(0),
            remaining_usd=Decimal("0.75"),
            window_start=None,
            resets_at=None,
        ),
        llmguard.CacheInfo(hits=1, misses=2, stale_hits=0, saved_usd=Decimal("0.5"), entries=2),
    ]
    for value in picklable:
        copy = pickle.loads(pickle.dumps(value))
        assert type(copy) is type(value)
        if isinstance(value, Exception):
            assert copy.args == value.args
        else:
            assert copy == value or copy is value
    assert pickle.loads(pickle.dumps(llmguard.Unset())) is llmguard.Unset()
