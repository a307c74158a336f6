"""``@track``: meter and log a function's calls, no policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from ._config import UNSET, Unset
from ._pipeline import GuardedFunction, PromptFn, check_options, guard
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")


@overload
def track(fn: Callable[P, R], /) -> GuardedFunction[P, R]: ...


@overload
def track(
    *,
    model: str | Unset | None = ...,
    prompt: PromptFn | Unset | None = ...,
    log_content: bool | Unset = ...,
    tags: TagValues | None = ...,
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]: ...


def track(
    fn: Any = None,
    /,
    *,
    model: str | Unset | None = UNSET,
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Any:
    """Meter every call of the decorated function and log one ``llm_call`` event.

    ``model`` is the model to assume when neither a ``model`` argument nor the return value
    says which one was used. ``prompt`` replaces what counts as the prompt for estimates:
    a callable taking the function's arguments and returning the prompt text or a list of
    chat messages. ``log_content=True`` opts in to putting the prompt and the completion
    text into the event (off by default: events never carry them otherwise). ``tags``
    (``{"feature": "search"}``) go into the event's ``tags`` field, for this function's calls
    and the decorated calls made inside them (see ``llmguard.tags``). Works bare or
    called, on sync and async functions and methods::

        @llmguard.track
        def ask(question: str, *, model: str = "gpt-4o-mini") -> str: ...

        @llmguard.track(model="gpt-4o", prompt=lambda doc, **_: doc.body)
        async def summarize(doc: Document) -> str: ...
    """
    options = {"model": model, "prompt": prompt, "log_content": log_content, "tags": tags}
    if fn is None:
        check_options("track", options)

        def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
            return guard(func, decorator="track", options=options)  # type: ignore[no-any-return]

        return decorate
    return guard(fn, decorator="track", options=options)
