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
import sys
import types
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


def _chunk(tag: bytes, data: bytes) -> bytes:
    """A tagged, length-prefixed piece: no encoding of one value is a prefix of another's."""
    return tag + len(data).to_bytes(8, "big") + data


def _encode(value: Any, where: str) -> bytes:
    """Canonical bytes of ``value``: type-tagged, order-free for dicts and sets, injective
    (different values of supported types never share bytes). TypeError if unsupported."""
    kind = type(value)
    if kind is str:
        return _chunk(b"s", value.encode("utf-8", "surrogatepass"))
    if value is None:
        return b"N"
    if kind is bool:
        return b"T" if value else b"F"
    if kind is int:
        if value.bit_length() <= _DECIMAL_BITS:
            return _chunk(b"i", str(value).encode())
        # past Python's int-to-str digit limit (str() raises ValueError): two's complement
        return _chunk(b"I", value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))
    if kind is float:
        return _chunk(b"f", repr(value).encode())
    if kind in (list, tuple):
        return _chunk(b"l" if kind is list else b"t", b"".join(_encode(v, where) for v in value))
    if kind is dict:
        pairs = sorted((_encode(k, where), _encode(v, where)) for k, v in value.items())
        return _chunk(b"d", b"".join(k + v for k, v in pairs))
    if kind in (set, frozenset):
        items = sorted(_encode(v, where) for v in value)
        return _chunk(b"S" if kind is set else b"Z", b"".join(items))
    if kind in (bytes, bytearray):
        return _chunk(b"b" if kind is bytes else b"B", bytes(value))
    if isinstance(value, enum.Enum):
        return _chunk(b"e", _encode(_qualname(kind), where) + _encode(value.value, where))
    if kind in (datetime.datetime, datetime.date, datetime.time):
        text = _encode(kind.__name__, where) + _encode(value.isoformat(), where)
        if kind is not datetime.date and (value.fold or value.tzinfo is not None):
            # what isoformat() leaves out: the fold, and which zone (not just its offset)
            text += _encode([value.fold, _zone(value)], where)
        return _chunk(b"D", text)
    if kind is datetime.timedelta:  # exact: total_seconds() is a float, rounded
        return _chunk(b"r", f"{value.days},{value.seconds},{value.microseconds}".encode())
    if kind is Decimal:
        return _chunk(b"m", str(value).encode())
    uuid = sys.modules.get("uuid")  # a UUID exists only if its module was imported
    if uuid is not None and kind is uuid.UUID:
        return _chunk(b"u", value.bytes)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _chunk(b"c", _encode(_qualname(kind), where) + _encode(fields, where))
    model_fields = getattr(kind, "model_fields", None)
    if isinstance(model_fields, dict) and callable(getattr(value, "model_dump", None)):
        # A pydantic model: its actual field values, every one (excluded from dumps or
        # not) and its extra fields, each through this encoder, so types stay apart inside
        # it as everywhere else. Never model_dump(): it masks secrets ('**********'), drops
        # exclude=True fields and flattens types (bytes/str, tuple/list), so two tenants'
        # requests would share a key. Private attributes are not data and not in the key.
        state = value.__dict__
        fields = {name: state[name] for name in model_fields if name in state}
        extra = getattr(value, "__pydantic_extra__", None) or None
        return _chunk(
            b"p",
            _encode(_qualname(kind), where) + _encode(fields, where) + _encode(extra, where),
        )
    if _is_secret(kind):
        # pydantic's SecretStr, SecretBytes, Secret[T]: by the secret itself, as two
        # tenants' tokens must not share a key. It is never stored: only the key's sha256
        # digest is (a guessable secret could still be confirmed against a stored key by
        # whoever knows every other argument and can read the storage's key names).
        return _chunk(
            b"k", _encode(_qualname(kind), where) + _encode(value.get_secret_value(), where)
        )
    # Subclasses of the plain types (a str Enum is handled above): their class and base value,
    # and their own attributes if they have any.
    bases: tuple[type[Any], ...] = (str, int, float, list, tuple, dict)
    for base in bases:
        if isinstance(value, base):
            text = _encode(_qualname(kind), where) + _encode(base(value), where)
            state = getattr(value, "__dict__", None)
            if state:
                return _chunk(b"X", text + _encode(dict(state), where))
            return _chunk(b"x", text)
    raise TypeError(
        f"cannot make a cache key from argument {where!r} of type {_qualname(kind)}: pass "
        f"plain data (str, numbers, lists, dicts, dataclasses, pydantic models...), or leave "
        f"it out with ignore=({where.split('[', 1)[0]!r},), or derive the key yourself with key="
    )


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


# Ints this long str() converts under any int-to-str digit limit (640 digits at the least).
_DECIMAL_BITS = 2000


def _zone(value: datetime.datetime | datetime.time) -> list[Any] | None:
    """The time zone of an aware datetime or time: its class, name and zone key."""
    tz = value.tzinfo
    if tz is None:
        return None
    key = getattr(tz, "key", None) or getattr(tz, "zone", None)  # zoneinfo, pytz
    return [_qualname(type(tz)), value.tzname(), key if isinstance(key, str) else None]


_SECRET_CLASSES = frozenset(
    {"_SecretBase", "_SecretField", "SecretField", "SecretStr", "SecretBytes"}
)


def _is_secret(kind: type) -> bool:
    """Whether ``kind`` is one of pydantic's secret types (any version), or derives from one."""
    return any(
        base.__name__ in _SECRET_CLASSES and base.__module__.startswith("pydantic")
        for base in kind.__mro__
    )


def canonical(arguments: Mapping[str, Any]) -> bytes:
    """The canonical bytes of bound arguments (names sorted, values type-tagged).

    TypeError for a value that cannot be part of a key: an unsupported type, or a container
    that holds itself (or is nested beyond the recursion limit)."""
    parts = []
    for name in sorted(arguments):
        try:
            parts.append(_encode(name, name) + _encode(arguments[name], name))
        except RecursionError:
            # A cycle (a list holding itself, a dict reachable from its own values...) has no
            # finite encoding; found by the recursion limit, so the common case pays nothing.
            raise TypeError(
                f"cannot make a cache key from argument {name!r}: it contains itself (or is "
                "nested too deeply to encode). Leave it out with "
                f"ignore=({name!r},), or derive the key yourself with key="
            ) from None
    return b"".join(parts)


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
