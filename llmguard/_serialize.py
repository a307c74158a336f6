"""Cache entries: the stored bytes of one result and the call that produced it.

Safe by default: nothing is ever unpickled unless the function opted in with
``serializer="pickle"``. Plain data is JSON (tuples, bytes and non-string dict keys tagged so
they come back as they went in); pydantic models (OpenAI ``ChatCompletion``, Anthropic
``Message``, Responses API objects...) are stored as JSON with their class and rebuilt with
``model_validate``, and only ``pydantic.BaseModel`` subclasses are ever rebuilt.
"""

from __future__ import annotations

import base64
import importlib
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._stream import HELPER_STREAMS

FORMAT = 2
_SCALARS = (str, int, float, bool, type(None))


class EntryError(Exception):
    """A stored entry cannot be read back (corrupt, foreign or of a refused kind)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached result and what its original call used and cost."""

    value: Any
    model: str | None
    cost: Decimal | None
    created: float
    expires: float | None  # logical expiry; a stale entry may live on past it
    stream: bool = False  # value is the list of a stream's chunks, to replay
    helper: tuple[str, dict[str, Any]] | None = None  # a stream helper: its class and options


def _tag(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is list:
        return [_tag(v) for v in value]
    if kind is tuple:
        return {"$tuple": [_tag(v) for v in value]}
    if kind is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: _tag(v) for k, v in value.items()}
        return {"$dict": [[_tag(k), _tag(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode()}
    raise TypeError(kind)


def _untag(data: Any) -> Any:
    if type(data) is list:
        return [_untag(v) for v in data]
    if type(data) is dict:
        if len(data) == 1:
            ((key, inner),) = data.items()
            if key == "$tuple":
                return tuple(_untag(v) for v in inner)
            if key == "$dict":
                return {_untag(k): _untag(v) for k, v in inner}
            if key == "$bytes":
                return base64.b64decode(inner)
        return {k: _untag(v) for k, v in data.items()}
    return data


def _is_pydantic(value: Any) -> bool:
    return _is_pydantic_class(type(value))


def _is_pydantic_class(kind: type) -> bool:
    return any(
        base.__name__ == "BaseModel" and base.__module__.startswith("pydantic")
        for base in kind.__mro__
    )


def encode(
    value: Any,
    *,
    serializer: str,
    model: str | None,
    cost: Decimal | None,
    created: float,
    expires: float | None,
    function: str,
    stream: bool = False,
    helper: tuple[str, dict[str, Any]] | None = None,
) -> bytes:
    """The entry's bytes: one JSON header line, then the payload (UTF-8 text for a str,
    JSON for plain data and pydantic models, pickle bytes only when opted in). TypeError
    for a value the chosen serializer cannot store. ``helper``: the stream was a stream
    helper's, (its class, :func:`helper_options` data)."""
    header: dict[str, Any] = {
        "format": FORMAT,
        "function": function,
        "model": model,
        "cost": None if cost is None else str(cost),
        "created": created,
        "expires": expires,
    }
    payload: bytes
    if stream:
        header["kind"] = "stream"
        if helper is not None:
            header["helper"], header["helper_options"] = helper
        classes: dict[str, int] = {}
        lines = [_chunk(chunk, function, classes) for chunk in value]
        payload = b"\n".join([_json(list(classes)), *lines])
    elif serializer == "pickle":
        import pickle

        header["kind"] = "pickle"
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    elif type(value) is str:
        header["kind"] = "str"
        payload = value.encode("utf-8", "surrogatepass")
    elif _is_pydantic(value):
        header["kind"] = "pydantic"
        header["class"] = f"{type(value).__module__}:{type(value).__qualname__}"
        payload = _json(value.model_dump(mode="json", by_alias=True))
    else:
        try:
            payload = _json(_tag(value))
        except TypeError:
            raise TypeError(
                f"@cached cannot store a {type(value).__module__}.{type(value).__qualname__} "
                f"returned by {function}: return plain data (str, numbers, lists, tuples, dicts, "
                "bytes) or a pydantic model, or opt in to serializer='pickle' (only safe when "
                "nobody else can write the cache storage)"
            ) from None
        header["kind"] = "json"
    return _json(header) + b"\n" + payload


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes, *, function: str, allow_pickle: bool) -> Entry:
    """The entry in ``raw``; EntryError if corrupt, foreign, or a refused kind."""
    try:
        head, _, payload = raw.partition(b"\n")
        header = json.loads(head)
        if header["format"] != FORMAT or header["function"] != function:
            raise EntryError(
                f"entry belongs to {header.get('function')!r}, format {header.get('format')!r}"
            )
        kind = header["kind"]
        helper = None
        if kind == "str":
            value: Any = payload.decode("utf-8", "surrogatepass")
        elif kind == "json":
            value = _untag(json.loads(payload))
        elif kind == "pydantic":
            value = _rebuild(header["class"], json.loads(payload))
        elif kind == "stream":
            paths_line, *lines = payload.split(b"\n")
            # refuse a foreign class now, not mid-stream; chunks are rebuilt as replayed
            stream_classes = [_model_class(path) for path in json.loads(paths_line)]
            value = [(stream_classes, line) for line in lines]
            if header.get("helper") is not None:
                helper = _helper(header["helper"], header["helper_options"])
        elif kind == "pickle":
            if not allow_pickle:
                raise EntryError(
                    "entry is pickled but this function does not use serializer='pickle'"
                )
            import pickle

            value = pickle.loads(payload)
        else:
            raise EntryError(f"unknown entry kind {kind!r}")
        cost = header["cost"]
        return Entry(
            value,
            header["model"],
            None if cost is None else Decimal(cost),
            header["created"],
            header["expires"],
            kind == "stream",
            helper,
        )
    except EntryError:
        raise
    except Exception as exc:
        raise EntryError(describe_error(exc)) from exc


def describe_error(exc: Exception) -> str:
    """What went wrong reading an entry, without the entry's content: a pydantic
    ValidationError says ``input_value=...`` (the cached response itself), so only its
    field paths and error types are kept."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        try:
            found = list(errors(include_url=False, include_context=False, include_input=False))
        except Exception:
            found = []
        where = ", ".join(
            f"{'.'.join(str(part) for part in e.get('loc', ())) or '(root)'} ({e.get('type')})"
            for e in found[:5]
        )
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        return f"ValidationError: {getattr(exc, 'title', '?')}: {where or '?'}{more}"
    return f"{type(exc).__name__}: {exc}"


def _chunk(chunk: Any, function: str, classes: dict[str, int]) -> bytes:
    """One stream chunk as one line: ``<class number> <JSON>`` for a pydantic chunk (only
    the fields the provider sent, rebuilt by pydantic-core straight from the JSON), ``- <JSON>``
    for plain data."""
    if _is_pydantic(chunk):
        path = f"{type(chunk).__module__}:{type(chunk).__qualname__}"
        number = classes.setdefault(path, len(classes))
        data: str = chunk.model_dump_json(by_alias=True, exclude_unset=True)
        return f"{number} {data}".encode()
    try:
        return b"- " + _json(_tag(chunk))
    except TypeError:
        raise TypeError(
            f"@cached cannot store a stream chunk of type {type(chunk).__qualname__} "
            f"from {function}: chunks must be plain data or pydantic models"
        ) from None


def unchunk(item: tuple[list[Any], bytes]) -> Any:
    """A stored stream chunk, rebuilt (its class was checked when the entry was read)."""
    classes, line = item
    number, _, data = line.partition(b" ")
    if number == b"-":
        return _untag(json.loads(data))
    cls = classes[int(number)]
    try:
        return cls.model_validate_json(data)
    except ValueError:  # pydantic's ValidationError
        if not _sdk_model(cls):
            raise
        return cls.construct(**json.loads(data))  # as the SDK built it: see _rebuild


def _sdk_model(cls: Any) -> bool:
    """Whether ``cls`` is an ``openai`` / ``anthropic`` model, built by its SDK's own
    recursive ``construct`` (no validation) from what the provider sends."""
    for base in cls.__mro__:
        if "construct" in vars(base):
            return str(base.__module__).partition(".")[0] in ("openai", "anthropic")
    return False


_classes: dict[str, Any] = {}


def _model_class(path: str) -> Any:
    """The pydantic model class at ``module:qualname``; EntryError for anything else."""
    cls = _classes.get(path)
    if cls is None:
        module_name, _, qualname = path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        from pydantic import BaseModel

        if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
            raise EntryError(f"{path} is not a pydantic model: refusing to rebuild it")
        cls = _classes[path] = obj
    return cls


def _rebuild(path: str, data: Any) -> Any:
    cls = _model_class(path)
    try:
        return cls.model_validate(data)
    except ValueError:  # pydantic's ValidationError
        if not _sdk_model(cls) or not isinstance(data, dict):
            raise
        # What the provider sent, which the SDK took without validating (it builds its
        # responses with its own recursive construct): a field its models declare required
        # may be missing (a proxy or another provider left it out, an older SDK stored it).
        return cls.construct(**data)


def helper_options(options: dict[str, Any]) -> dict[str, Any]:
    """A stream helper's parse options as stored: plain data as JSON, pydantic model classes
    by name (importable ones: not defined inside a function); TypeError (naming the option)
    for anything else."""
    data: dict[str, Any] = {}
    for name, value in options.items():
        try:
            if isinstance(value, type) and _is_pydantic_class(value):
                path = f"{value.__module__}:{value.__qualname__}"
                if _model_class(path) is not value:
                    raise TypeError(path)
                data[name] = {"$class": path}
            else:
                data[name] = _tag(value)
        except Exception:
            raise TypeError(name) from None
    return data


def _helper(path: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A stored stream helper: only the SDK helper classes llmguard knows are rebuilt."""
    if path not in HELPER_STREAMS:
        raise EntryError(f"{path} is not a known stream helper: refusing to rebuild it")
    module, _, name = path.partition(":")
    getattr(importlib.import_module(module), name)  # the SDK is there: fail now, not mid-call
    options: dict[str, Any] = {}
    for key, value in data.items():
        if type(value) is dict and set(value) == {"$class"}:
            options[key] = _model_class(value["$class"])
        else:
            options[key] = _untag(value)
    return path, options
