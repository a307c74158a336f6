"""Rules about how llmguard's modules depend on each other, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmguard

PACKAGE = Path(llmguard.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))
SUBMODULES = {path.stem for path in MODULES}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imported_module(node: ast.ImportFrom, this: str) -> str | None:
    """The llmguard module an ``from X import ...`` reads from (``llmguard`` for the
    package itself, ``llmguard._x`` for a module), None for other packages."""
    if node.level:
        # Every llmguard module sits directly in the package: ``.`` is the package.
        base = "llmguard"
        return f"{base}.{node.module}" if node.module else base
    if node.module and (node.module == "llmguard" or node.module.startswith("llmguard.")):
        return node.module
    return None


def crossings(source: str, this: str) -> list[str]:
    """Every use, in one module's source, of an underscore name owned by another llmguard
    module: ``from ._x import _name`` and ``_x._name`` (where ``_x`` is a module)."""
    tree = ast.parse(source)
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> llmguard module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _imported_module(node, this)
            if origin is None:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if origin == "llmguard" and alias.name in SUBMODULES:
                    modules[local] = f"llmguard.{alias.name}"  # ``from . import _x``
                elif _private(alias.name) and origin != this:
                    found.append(f"line {node.lineno}: from {origin} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llmguard.") and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        owner = _module_of(node.value, modules)
        if owner == "llmguard" and node.attr in SUBMODULES:
            continue  # ``llmguard._x``: the module itself
        if owner is not None and owner != this:
            found.append(f"line {node.lineno}: {owner}.{node.attr}")
    return sorted(found, key=lambda line: int(line.split(":")[0].removeprefix("line ")))


def _module_of(expr: ast.expr, modules: dict[str, str]) -> str | None:
    if isinstance(expr, ast.Name):
        if expr.id == "llmguard":
            return "llmguard"
        return modules.get(expr.id)
    if isinstance(expr, ast.Attribute):
        parent = _module_of(expr.value, modules)
        if parent == "llmguard" and expr.attr in SUBMODULES:
            return f"llmguard.{expr.attr}"
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_no_module_uses_another_modules_underscore_names(path: Path) -> None:
    this = "llmguard" if path.stem == "__init__" else f"llmguard.{path.stem}"
    assert crossings(path.read_text(encoding="utf-8"), this) == []


def test_the_check_finds_crossings() -> None:
    source = (
        "from . import _storage, _validate as validate\n"
        "import llmguard._pipeline as pipeline\n"
        "from ._config import _Unset, UNSET, __all__\n"
        "from ._budget import _layer as layer\n"
        "from llmguard._events import _logger\n"
        "def f():\n"
        "    _storage._wrapped(1)\n"
        "    validate.number(2)\n"
        "    pipeline._current.get()\n"
        "    llmguard._ratelimit._scheme\n"
        "    _private_of_this_module()\n"
    )
    assert crossings(source, "llmguard._x") == [
        "line 3: from llmguard._config import _Unset",
        "line 4: from llmguard._budget import _layer",
        "line 5: from llmguard._events import _logger",
        "line 7: llmguard._storage._wrapped",
        "line 9: llmguard._pipeline._current",
        "line 10: llmguard._ratelimit._scheme",
    ]
    # A module's own underscore names are its business.
    assert crossings("from ._x import _helper\n", "llmguard._x") == []


def test_no_test_flushes_a_redis_database() -> None:
    """The tests write under their own key prefix and delete only those keys: a newcomer's
    `pytest` must never empty a Redis database (README, Development)."""
    tests = Path(__file__).resolve().parent
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(tests.rglob("*.py"))
        if path.name != "test_architecture.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "flushdb" in line or "flushall" in line.lower()
    ]
    assert offenders == []
