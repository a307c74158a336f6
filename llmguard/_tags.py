"""Tags: who and what a call was for (``user``, ``feature``...), on its ``llm_call`` event.

``with llmguard.tags(user="u42", feature="search"):`` sets tags for every decorated call made
inside the block, in this thread or task and the tasks it starts (a contextvar: asyncio
tasks copy it when created, nested calls see it). ``@track(tags={...})`` (and every other
decorator's ``tags=``) gives a function's calls tags of their own, which also hold for the
decorated calls made inside them. The innermost setting of a name wins; ``None`` removes a
name. The event carries them as one ``tags`` field, a flat ``{name: text}`` dict, only when
there are some.

Names are label names (``[A-Za-z_][A-Za-z0-9_]*``, not starting with ``__``), so they can
become Prometheus labels and CSV columns as they are; values are text (numbers and bools
are turned into text, as they would be in a label).
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from ._errors import ConfigurationError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_VALUE = 200  # characters: a tag is a label, not a document
EMPTY: Mapping[str, str] = MappingProxyType({})

TagValues = Mapping[str, str | int | float | bool | None]
"""What ``tags=`` takes: tag names to text (numbers and bools become text; None removes)."""

CURRENT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "llmguard_tags", default=EMPTY
)


def check_tags(values: Mapping[str, Any], what: str) -> dict[str, str | None]:
    """``values`` as tags (text values; None kept: it removes a name), or ConfigurationError
    naming ``what`` for a bad name or value."""
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"{what} must be a dict of tag names to values, got {values!r}")
    checked: dict[str, str | None] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("__"):
            raise ConfigurationError(
                f"{what}: tag name {name!r} must be letters, digits and '_', not starting "
                "with a digit or '__' (it becomes a report column and a metrics label)"
            )
        if value is None:
            checked[name] = None
            continue
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigurationError(
                f"{what}: tag {name}={value!r} must be text (or a number or bool, turned into "
                "text), not a {type(value).__name__}"
            )
        text = str(value)
        if len(text) > _MAX_VALUE:
            raise ConfigurationError(
                f"{what}: tag {name} is {len(text)} characters long: a tag is a label for "
                f"grouping calls (at most {_MAX_VALUE} characters), not content"
            )
        checked[name] = text
    return checked


def merged(base: Mapping[str, str], changes: Mapping[str, str | None]) -> Mapping[str, str]:
    """``base`` with ``changes`` applied (a None value removes the name)."""
    if not changes:
        return base
    out = dict(base)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return MappingProxyType(out)


@contextmanager
def _scope(changes: Mapping[str, str | None]) -> Iterator[Mapping[str, str]]:
    token = CURRENT.set(merged(CURRENT.get(), changes))
    try:
        yield CURRENT.get()
    finally:
        CURRENT.reset(token)


def tags(**values: str | int | float | bool | None) -> Any:
    """Tag every decorated call made inside the block::

        with llmguard.tags(user="u42", feature="search"):
            answer = ask(question)  # its llm_call event has tags={"user": "u42", ...}

    Nested blocks add to (and override) the outer ones; ``name=None`` removes a name. The
    tags follow the code into nested decorated calls and into asyncio tasks created inside
    the block (``asyncio.to_thread`` too); a thread started by hand, or a
    ``concurrent.futures`` pool, runs in its own context: enter the block there. The block
    yields the tags in force.
    """
    return _scope(check_tags(values, "llmguard.tags()"))


def current() -> Mapping[str, str]:
    """The tags in force here (read-only)."""
    return CURRENT.get()
