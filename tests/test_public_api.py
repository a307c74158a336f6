from __future__ import annotations

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
