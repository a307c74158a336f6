"""Real token usage, read from whatever a provider call returned.

Recognised shapes (objects or plain dicts alike):

- OpenAI chat completion: ``usage.prompt_tokens``, ``completion_tokens``,
  ``prompt_tokens_details.cached_tokens``
- OpenAI Responses API: ``usage.input_tokens``, ``output_tokens``,
  ``input_tokens_details.cached_tokens``
- Anthropic message: ``usage.input_tokens`` (uncached part only), ``output_tokens``,
  ``cache_read_input_tokens``, ``cache_creation_input_tokens``
- anything else with ``.model`` and ``.usage`` of one of those shapes.

Everything is normalised to llmguard's convention: ``input_tokens`` is the whole input,
cached and cache-write tokens included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one provider call. ``input_tokens`` includes the cached and cache-write ones."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    model: str | None = None


def sanitize(usage: Usage) -> Usage:
    """``usage`` with impossible counts made possible: negative counts become 0 and cached
    plus cache-write tokens never exceed the whole input. A provider (or a proxy, or a test
    double) reporting such numbers gets one ``impossible_usage`` warning: they are never
    allowed to take spend off a ledger."""
    i, o, c, w = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
    )
    if i >= 0 and o >= 0 and c >= 0 and w >= 0 and c + w <= i:
        return usage
    from ._events import warn_once

    warn_once(
        f"impossible_usage:{usage.model}",
        "impossible_usage",
        model=usage.model,
        input_tokens=i,
        output_tokens=o,
        cached_input_tokens=c,
        cache_write_tokens=w,
        hint="negative token counts are counted as 0",
    )
    c, w = max(c, 0), max(w, 0)
    return Usage(max(i, 0, c + w), max(o, 0), c, w, usage.model)


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_from_usage_object(usage: Any, model: str | None = None) -> Usage | None:
    """Normalise a ``usage`` object or dict of any recognised shape; None if it is not one."""
    found = _from_usage_object(usage, model)
    return None if found is None else sanitize(found)


def _from_usage_object(usage: Any, model: str | None) -> Usage | None:
    if usage is None:
        return None
    prompt = _get(usage, "prompt_tokens")
    if isinstance(prompt, int):  # OpenAI chat completions
        details = _get(usage, "prompt_tokens_details")
        return Usage(
            input_tokens=prompt,
            output_tokens=_int(_get(usage, "completion_tokens")),
            cached_input_tokens=_int(_get(details, "cached_tokens")) if details is not None else 0,
            model=model,
        )
    input_tokens = _get(usage, "input_tokens")
    if not isinstance(input_tokens, int):
        return None
    output_tokens = _int(_get(usage, "output_tokens"))
    details = _get(usage, "input_tokens_details")
    if details is not None:  # OpenAI Responses API: input_tokens includes the cached ones
        return Usage(input_tokens, output_tokens, _int(_get(details, "cached_tokens")), 0, model)
    cache_read = _int(_get(usage, "cache_read_input_tokens"))
    cache_write = _int(_get(usage, "cache_creation_input_tokens"))
    # Anthropic: input_tokens counts only the uncached part.
    return Usage(
        input_tokens + cache_read + cache_write, output_tokens, cache_read, cache_write, model
    )


def usage_from_response(response: Any) -> Usage | None:
    """The usage a provider response reports, or None if ``response`` carries none."""
    if response is None or isinstance(response, (str, bytes, int, float, bool)):
        return None
    usage = _get(response, "usage")
    if usage is None:
        return None
    model = _get(response, "model")
    return usage_from_usage_object(usage, model if isinstance(model, str) else None)


def text_from_response(response: Any) -> str | None:
    """The answer text of a response: a str itself, an OpenAI chat completion's first
    choice, a Responses API ``output_text``, or an Anthropic message's text blocks."""
    if response is None or isinstance(response, str):
        return response
    choices = _get(response, "choices")
    if isinstance(choices, list) and choices:
        content = _get(_get(choices[0], "message"), "content")
        return content if isinstance(content, str) else None
    output_text = _get(response, "output_text")
    if isinstance(output_text, str):
        return output_text
    blocks = _get(response, "content")
    if isinstance(blocks, list):
        texts = [_get(block, "text") for block in blocks]
        return "".join(t for t in texts if isinstance(t, str)) or None
    return None
