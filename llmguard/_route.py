"""``@route_model``: the cheapest model that will do, and another when one fails.

Rules, first match wins: an explicit ``model=`` from the caller; ``critical=True`` (the
strong model); the budget's spend past ``downgrade_at`` (cheap); ``when(...)`` true
(cheap); the estimated prompt under ``cheap_below_tokens`` (cheap); else the default. The
chosen model is passed as the ``model`` keyword (``param=``). Fallbacks: when the call fails
with a rate limit, overload, server error, timeout or connection error (after any inner
retries), the next model is tried; client errors (400, 401, 404...) are not failed over.
When an inner ``@budget`` refuses a model's worst case (``BudgetExceeded``, before anything
is sent), the cheap model is tried if ``downgrade_at`` is set (route ``downgrade:budget``),
else the next fallback; a ``critical`` call is never downgraded. Every event carries
``route``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Sequence
from typing import Any, ParamSpec, TypeVar

from . import _validate as validate
from ._config import UNSET, Unset
from ._errors import BudgetExceeded, ConfigurationError
from ._pipeline import (
    PROCEED,
    CallRecord,
    GuardedFunction,
    PromptFn,
    UserFunction,
    check_options,
    guard,
)
from ._retry import classify, status_of
from ._tags import TagValues

P = ParamSpec("P")
R = TypeVar("R")


def _fails_over(exc: BaseException) -> bool:
    """Worth trying another model: rate limits (quota too: another model may not share
    it), overloads, server errors, timeouts, connection errors; not client errors."""
    if status_of(exc) == 429:
        return True
    return classify(exc, server_errors=True, retry_on=()) is not None


class _RouteLayer:
    def __init__(
        self,
        *,
        default: str,
        cheap: str | None,
        when: Callable[..., Any] | None,
        cheap_below_tokens: int | None,
        fallbacks: tuple[str, ...],
        downgrade_at: float | None,
        budget: str | None,
        param: str,
        critical_param: str,
    ) -> None:
        self.default = default
        self.cheap = cheap
        self.when = None if when is None else UserFunction(when, "route_model", "when")
        self.cheap_below_tokens = cheap_below_tokens
        self.fallbacks = fallbacks
        self.downgrade_at = downgrade_at
        self.budget = budget
        self.param = param
        self.critical_param = critical_param
        self.call_options = (critical_param,)  # taken out of the call's keywords if need be

    def _explicit(self, call: CallRecord) -> bool:
        if self.param in call.kwargs:
            return True
        index, _ = call.spec.params.get(self.param, (None, None))
        return index is not None and index < len(call.args)

    def _budget_spent(self, call: CallRecord) -> float | None:
        from ._budget import spent_fraction

        return spent_fraction(self.budget or "", call)

    def choose(self, call: CallRecord, critical: bool) -> tuple[str | None, str]:
        """(model to pass, route) for this call."""
        if self._explicit(call):
            return None, "explicit"
        if critical:
            return self.default, "critical"
        if self.cheap is not None:
            if self.downgrade_at is not None:
                spent = self._budget_spent(call)
                if spent is not None and spent >= self.downgrade_at:
                    return self.cheap, "downgrade:budget"
            if self.when is not None and self.when(call):
                return self.cheap, "cheap:when"
            below = self.cheap_below_tokens
            if below is not None and call.prompt_tokens(self.default) < below:
                return self.cheap, "cheap:tokens"
        return self.default, "default"

    def run(self, call: CallRecord) -> Generator[Any, Any, Any]:
        critical = bool(call.option(self.critical_param, False))
        model, route = self.choose(call, critical)
        call.fields["route"] = route
        if model is not None and model != self.default:
            call.fields["route_default"] = self.default  # what "saved by routing" compares to
        if model is None:
            return (yield PROCEED)
        queue = [model, *(m for m in self.fallbacks if m != model)]
        tried: list[str] = []
        failures = 0
        while True:
            candidate = queue.pop(0)
            tried.append(candidate)
            call.kwargs[self.param] = candidate
            try:
                return (yield PROCEED)
            except BudgetExceeded:
                # The budget refused this model's worst case before anything was sent: a
                # cheaper model may still fit (never for critical calls, which want this one).
                if critical:
                    raise
                cheap = self.cheap
                if self.downgrade_at is not None and cheap is not None and cheap not in tried:
                    queue = [cheap, *(m for m in queue if m != cheap)]
                    call.fields["route"] = "downgrade:budget"
                    call.fields["route_default"] = self.default
                    call.fields["downgraded_from"] = candidate
                    continue
                if not queue:
                    raise
            except Exception as exc:
                if not queue or not _fails_over(exc):
                    raise
            failures += 1
            call.fields["route"] = f"fallback:{failures}"
            call.fields["failed_over_from"] = candidate


def route_model(
    default: str,
    *,
    cheap: str | None = None,
    when: Callable[..., Any] | None = None,
    cheap_below_tokens: int | None = None,
    fallbacks: Sequence[str] = (),
    downgrade_at: float | None = None,
    budget: str | None = None,
    param: str = "model",
    critical_param: str = "critical",
    prompt: PromptFn | Unset | None = UNSET,
    log_content: bool | Unset = UNSET,
    tags: TagValues | None = None,
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]:
    """Pick the model for each call, and fall back to others when it fails.

    ``when`` true (given the call's arguments by name), or the estimated prompt under
    ``cheap_below_tokens`` tokens, routes to ``cheap``; so does ``budget``'s spend reaching
    ``downgrade_at`` (a fraction of its limit). ``critical=True`` at the call (or, typed,
    ``fn.with_options(critical=True)(...)``) forces ``default``; an explicit ``model=``
    always wins. ``fallbacks`` are tried in order when a call fails with a rate limit,
    overload, server error, timeout or connection error; when an inner ``@budget`` refuses a
    model's worst case, the cheap model (with ``downgrade_at``) or the next fallback is
    tried before the refusal is raised. The event's ``route`` says why:
    ``default``, ``cheap:when``, ``cheap:tokens``, ``critical``, ``explicit``,
    ``downgrade:budget`` or ``fallback:<n>``::

        @llmguard.route_model("gpt-4o", cheap="gpt-4o-mini", when=lambda t, **_: len(t) < 2000)
        def summarize(text: str, *, model: str = "gpt-4o") -> str: ...
    """
    where = "@route_model"
    validate.text(default, "default", decorator=where, meaning="the model used by default")
    validate.text(cheap, "cheap", decorator=where, allow_none=True, meaning="a model name")
    fallback_models = validate.strings(
        fallbacks, "fallbacks", decorator=where, meaning="model names, tried in order"
    )
    validate.function(when, "when", decorator=where, takes="given the call's arguments by name")
    validate.integer(
        cheap_below_tokens,
        "cheap_below_tokens",
        decorator=where,
        minimum=1,
        maximum=validate.MAX_TOKENS,
        allow_none=True,
        meaning="prompts estimated under this many tokens go to cheap",
    )
    if downgrade_at is not None:
        validate.fraction(
            downgrade_at, "downgrade_at", decorator=where, meaning="of the budget's limit spent"
        )
    validate.text(budget, "budget", decorator=where, allow_none=True, meaning="a budget's name")
    validate.text(param, "param", decorator=where, identifier=True)
    validate.text(critical_param, "critical_param", decorator=where, identifier=True)
    if (
        when is not None or cheap_below_tokens is not None or downgrade_at is not None
    ) and cheap is None:
        raise ConfigurationError(
            "@route_model: when=, cheap_below_tokens= and downgrade_at= need cheap="
        )
    if downgrade_at is not None and budget is None:
        raise ConfigurationError("@route_model(downgrade_at=...) needs budget= (the budget's name)")
    options = {"prompt": prompt, "log_content": log_content, "tags": tags}
    check_options("route_model", options)
    layer = _RouteLayer(
        default=default,
        cheap=cheap,
        when=when,
        cheap_below_tokens=cheap_below_tokens,
        fallbacks=fallback_models,
        downgrade_at=downgrade_at,
        budget=budget,
        param=param,
        critical_param=critical_param,
    )

    def decorate(func: Callable[P, R]) -> GuardedFunction[P, R]:
        target = inspect.unwrap(getattr(func, "__func__", func))
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):
            parameters = None
        if (
            parameters is not None
            and param not in parameters
            and not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        ):
            raise ConfigurationError(
                f"@route_model passes the chosen model as {param}=, but "
                f"{getattr(target, '__qualname__', target)} takes no {param!r} parameter: add "
                f"one, or name yours with param="
            )
        return guard(func, decorator="route_model", layer=layer, options=options)  # type: ignore[no-any-return]

    return decorate
