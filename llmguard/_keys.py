"""Cache keys: arguments bound to the signature, a canonical encoding, and a code digest.

``f(x)``, ``f(text=x)`` and ``f(x, default)`` bind to the same arguments; the canonical
encoding is type-tagged (``1``, ``1.0``, ``True`` and ``"1"`` are different keys) and
order-free for dicts and sets; the digest of the function's own code (bytecode, constants
and names, nested code objects included, line numbers not) changes when its prompt template
is edited.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import inspect
import json
import types
import uuid
from collections.abc import Callable, Collection, Mapping
from decimal import Decimal
from typing import Any

from ._errors import ConfigurationError


class Binder:
    """Maps a call's ``(args, kwargs)`` to ``{parameter: value}`` with defaults applied,
    minus ``self``/``cls`` and ignored parameters.

    Plain signatures (no positional-only, ``*args`` or ``**kwargs``) take a fast path that
    avoids ``inspect.Signature.bind``; anything unusual falls back to it.
    """

    def __init__(self, fn: Callable[..., Any], ignore: Collection[str] = ()) -> None:
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        names = [p.name for p in params]
        unknown = [name for name in ignore if name not in names]
        if unknown:
            raise ConfigurationError(
                f"ignore= names {', '.join(map(repr, unknown))}, which "
                f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of "
                f"{getattr(fn, '__qualname__', fn)}{self.signature}"
            )
        self.skip_first = bool(params) and params[0].name in ("self", "cls")
        self.ignored = frozenset(ignore) | ({params[0].name} if self.skip_first else set())
        self.names = tuple(names)
        self.positional = tuple(
            p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        self.plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by name; raises TypeError exactly when the call would."""
        if self.plain and len(args) <= len(self.positional):
            bound = dict(zip(self.positional, args, strict=False))
            fast = True
            for name, value in kwargs.items():
                if name in bound or (name not in self.defaults and name not in self.names):
                    fast = False
                    break
                bound[name] = value
            if fast:
                for name in self.names:
                    if name not in bound:
                        if name not in self.defaults:
                            fast = False
                            break
                        bound[name] = self.defaults[name]
            if fast:
                for name in self.ignored:
                    bound.pop(name, None)
                return bound
        full = self.signature.bind(*args, **kwargs)
        full.apply_defaults()
        return {k: v for k, v in full.arguments.items() if k not in self.ignored}


def _canon(value: Any, where: str) -> Any:
    """A JSON-able, type-tagged, order-free form of ``value`` (TypeError if unsupported)."""
    kind = type(value)
    if kind is str:
        return value
    if value is None or kind is bool:
        return [kind.__name__, value]
    if kind is int:
        return ["int", str(value)]
    if kind is float:
        return ["float", repr(value)]
    if kind in (list, tuple):
        return [kind.__name__, [_canon(item, where) for item in value]]
    if kind is dict:
        items = [(_dump(_canon(k, where)), _canon(v, where)) for k, v in value.items()]
        return ["dict", sorted(items, key=lambda pair: pair[0])]
    if kind in (set, frozenset):
        return [kind.__name__, sorted(_dump(_canon(item, where)) for item in value)]
    if kind in (bytes, bytearray):
        return [kind.__name__, bytes(value).hex()]
    if isinstance(value, enum.Enum):
        return ["enum", _qualname(kind), _canon(value.value, where)]
    if kind in (datetime.datetime, datetime.date, datetime.time):
        return [kind.__name__, value.isoformat()]
    if kind is datetime.timedelta:
        return ["timedelta", repr(value.total_seconds())]
    if kind is Decimal:
        return ["decimal", str(value)]
    if kind is uuid.UUID:
        return ["uuid", str(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return ["dataclass", _qualname(kind), _canon(fields, where)]
    dump = getattr(value, "model_dump", None)
    if callable(dump) and hasattr(kind, "model_fields"):
        return ["pydantic", _qualname(kind), _canon(dump(mode="json"), where)]
    # Subclasses of the plain types (a str Enum is handled above): encode as their base.
    bases: tuple[type[Any], ...] = (str, int, float, list, tuple, dict)
    for base in bases:
        if isinstance(value, base):
            return ["sub", _qualname(kind), _canon(base(value), where)]
    raise TypeError(
        f"cannot make a cache key from argument {where!r} of type {_qualname(kind)}: pass "
        f"plain data (str, numbers, lists, dicts, dataclasses, pydantic models...), or leave "
        f"it out with ignore=({where.split('[', 1)[0]!r},), or derive the key yourself with key="
    )


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def canonical(arguments: Mapping[str, Any]) -> bytes:
    """The canonical bytes of bound arguments (names sorted, values type-tagged)."""
    return _dump([[name, _canon(arguments[name], name)] for name in sorted(arguments)]).encode()


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def code_digest(fn: Any) -> str:
    """A digest of ``fn``'s own code: bytecode, constants and names, recursively through
    nested functions, lambdas and comprehensions; not line numbers or file names."""
    fn = inspect.unwrap(fn)
    fn = getattr(fn, "__func__", fn)
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is None:
        inner = getattr(fn, "func", None)  # functools.partial
        return code_digest(inner) if inner is not None else ""
    h = hashlib.sha256()
    _feed(h, code)
    return h.hexdigest()[:16]


def _feed(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(b"<code>")
            _feed(h, const)
        else:
            h.update(repr(const).encode())
            h.update(b"\x00")
