"""Token counting: tiktoken for OpenAI models, labelled estimates for everything else.

The chat and tools formulas follow the OpenAI cookbook ("How to count tokens with
tiktoken"). Encodings load lazily, once per process; when one cannot be loaded (no network,
no cache) counting falls back to a labelled character estimate and warns once, but never
raises into the caller's call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ._events import warn_once

# Prefixes of OpenAI model names tiktoken may not know yet: counted with o200k_base and
# still treated as exact (OpenAI's current models all use it).
_OPENAI_PREFIXES = (
    "gpt-",
    "o1",
    "o3",
    "o4",
    "chatgpt-",
    "ft:gpt-",
    "gpt4",
    "text-",
    "davinci",
    "babbage",
)
_DEFAULT_ENCODING = "o200k_base"
_CHARS_PER_TOKEN = 4


class TokenCount(int):
    """An ``int`` that also says how it was obtained.

    ``estimate`` is False for an exact tiktoken count of an OpenAI model, True for an
    approximation (another vendor's model counted with an OpenAI encoding, or the
    character fallback). ``method`` names it: ``"tiktoken:o200k_base"``,
    ``"approx:o200k_base"`` or ``"chars"``.
    """

    estimate: bool
    method: str

    def __new__(cls, value: int, *, estimate: bool, method: str) -> TokenCount:
        self = super().__new__(cls, value)
        self.estimate = estimate
        self.method = method
        return self

    def __repr__(self) -> str:
        return f"TokenCount({int(self)}, estimate={self.estimate}, method={self.method!r})"


_VERIFY_SAMPLE = "Verify: <|endoftext|> tiktoken is great! 12345 \u00fc \u4f60\u597d\n\n  spaces"


def _char_count(text: str) -> int:
    return -(-len(text) // _CHARS_PER_TOKEN)


def _length_counter(encoding: Any) -> Callable[[str], int]:
    """A function counting ``encoding``'s tokens in a text, special tokens as plain text.

    Uses tiktoken's buffer encoder when present (it skips building a list of ints, ~7%
    faster) after checking it agrees with ``encode_ordinary``; else ``encode_ordinary``.
    """
    encode = encoding.encode_ordinary
    to_buffer = getattr(getattr(encoding, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
    if to_buffer is not None:
        no_special: set[str] = set()
        try:
            agrees = len(memoryview(to_buffer(_VERIFY_SAMPLE, no_special))) == len(
                encode(_VERIFY_SAMPLE)
            )
        except Exception:
            agrees = False
        if agrees:
            return lambda text: len(memoryview(to_buffer(text, no_special)))
    return lambda text: len(encode(text))


class _Counter:
    """Counts strings for one model: ``count(text)`` is tiktoken's or the char estimate."""

    __slots__ = ("count", "encoding_name", "estimate", "method", "o200k")

    def __init__(self, encoding_name: str, exact: bool) -> None:
        self.encoding_name = encoding_name
        self.o200k = encoding_name == "o200k_base"
        encoding = _load_encoding(encoding_name)
        self.count: Callable[[str], int]
        if encoding is None:
            self.count = _char_count
            self.estimate = True
            self.method = "chars"
        else:
            self.count = _length_counter(encoding)
            self.estimate = not exact
            self.method = f"{'tiktoken' if exact else 'approx'}:{encoding_name}"

    def wrap(self, value: int) -> TokenCount:
        return TokenCount(value, estimate=self.estimate, method=self.method)


_encodings: dict[str, Any] = {}
_counters: dict[str | None, _Counter] = {}
_lock = threading.Lock()


def _load_encoding(name: str) -> Any:
    """The tiktoken encoding ``name``, loaded once; None (and one warning) if it cannot be."""
    if name in _encodings:
        return _encodings[name]
    with _lock:
        if name not in _encodings:
            try:
                import tiktoken

                _encodings[name] = tiktoken.get_encoding(name)
            except Exception as exc:  # no network, no cache, corrupt file: never raise
                _encodings[name] = None
                warn_once(
                    name,
                    "tokenizer_unavailable",
                    encoding=name,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    hint="token counts are estimated from characters (len/4); set "
                    "TIKTOKEN_CACHE_DIR to a folder holding the encoding files",
                )
    return _encodings[name]


def _encoding_for(model: str | None) -> tuple[str, bool]:
    """(encoding name, exact?) for ``model``: tiktoken's own map first."""
    if not model:
        return _DEFAULT_ENCODING, False
    name = model.lower()
    if "/" in name:  # "openai/gpt-4o", "anthropic/claude-..."
        name = name.rsplit("/", 1)[1]
    try:
        from tiktoken.model import encoding_name_for_model

        return encoding_name_for_model(name), True
    except KeyError:
        pass
    except Exception:  # tiktoken not importable at all
        return _DEFAULT_ENCODING, False
    return _DEFAULT_ENCODING, name.startswith(_OPENAI_PREFIXES)


def counter_for(model: str | None) -> _Counter:
    """The cached counter for ``model`` (one encoding lookup per model per process)."""
    counter = _counters.get(model)
    if counter is None:
        counter = _Counter(*_encoding_for(model))
        _counters[model] = counter
    return counter


def reset_tokenizers() -> None:
    """Forget loaded encodings and per-model counters (tests use this)."""
    with _lock:
        _encodings.clear()
        _counters.clear()


def count_tokens(text: str, model: str | None = None) -> TokenCount:
    """Tokens in ``text`` for ``model``.

    Exact for OpenAI models (tiktoken); for other vendors' models (``claude-*``,
    ``gemini-*``, ...) an approximation with an OpenAI encoding, labelled
    ``estimate=True``.

    >>> import llmguard
    >>> llmguard.count_tokens("tiktoken is great!", "gpt-4o")  # doctest: +SKIP
    TokenCount(6, estimate=False, method='tiktoken:o200k_base')
    """
    counter = counter_for(model)
    return counter.wrap(counter.count(text))


def _text_of(value: Any) -> str:
    """The countable text of a message field: str, list of content parts, or JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        parts: list[str] = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") not in ("image_url", "image", "input_image"):
                    parts.append(json.dumps(part, default=str))
        return "".join(parts)
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, default=str, sort_keys=True)


def _messages_tokens(counter: _Counter, messages: Iterable[Any], model: str | None) -> int:
    if model is not None and "gpt-3.5-turbo-0301" in model:
        per_message, per_name = 4, -1
    else:
        per_message, per_name = 3, 1
    total = 0
    for message in messages:
        if hasattr(message, "model_dump"):
            message = message.model_dump(exclude_none=True)
        total += per_message
        for key, value in message.items():
            total += counter.count(_text_of(value))
            if key == "name":
                total += per_name
    return total + 3  # every reply is primed with <|start|>assistant<|message|>


def _tools_tokens(counter: _Counter, tools: Sequence[Mapping[str, Any]]) -> int:
    if not tools:
        return 0
    # The cookbook's constants: gpt-4o / gpt-4o-mini (o200k) vs gpt-4 / gpt-3.5-turbo.
    func_init = 7 if counter.o200k else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    total = 0
    for tool in tools:
        function = tool.get("function", tool)
        total += func_init
        description = str(function.get("description", "")).removesuffix(".")
        total += counter.count(f"{function.get('name', '')}:{description}")
        properties = (function.get("parameters") or {}).get("properties") or {}
        if properties:
            total += prop_init
            for key, prop in properties.items():
                total += prop_key
                if "enum" in prop:
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + counter.count(str(item))
                prop_description = str(prop.get("description", "")).removesuffix(".")
                total += counter.count(f"{key}:{prop.get('type', '')}:{prop_description}")
    return total + func_end


def count_message_tokens(
    messages: Iterable[Any],
    model: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> TokenCount:
    """Prompt tokens of a chat request, as the OpenAI cookbook counts them.

    ``messages`` are chat messages (dicts or SDK message objects); ``tools`` are
    function-calling tool definitions. On the cookbook's examples this gives 124 for
    gpt-4o, 129 for gpt-4, and 101 with its ``get_current_weather`` tool on gpt-4o.
    """
    counter = counter_for(model)
    total = _messages_tokens(counter, messages, model)
    if tools:
        total += _tools_tokens(counter, tools)
    return counter.wrap(total)
