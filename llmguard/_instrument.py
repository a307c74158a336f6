"""Real usage reported from inside a decorated function.

``instrument(client)`` patches an OpenAI or Anthropic client *instance* so that every
``create`` call made while a decorated function runs adds its real usage and model to that
call's record. ``record_usage()`` does the same by hand for any other provider.
"""

from __future__ import annotations

import functools
import inspect
from decimal import Decimal
from typing import Any, TypeVar

from ._errors import ConfigurationError
from ._pipeline import current_call
from ._retry import status_of
from ._stream import StreamTally, is_stream
from ._stream import wrap as wrap_stream
from ._usage import Usage, usage_from_response

C = TypeVar("C")

# (resource path, method) pairs looked for on a client; absent ones are skipped.
_TARGETS = (
    (("chat", "completions"), "create"),
    (("chat", "completions"), "parse"),
    (("chat", "completions"), "stream"),
    (("beta", "chat", "completions"), "create"),
    (("beta", "chat", "completions"), "parse"),
    (("beta", "chat", "completions"), "stream"),
    (("responses",), "create"),
    (("responses",), "parse"),
    (("responses",), "stream"),
    (("messages",), "create"),
    (("messages",), "stream"),
    (("beta", "messages"), "create"),
    (("beta", "messages"), "stream"),
)
_MARK = "__llmguard_instrumented__"


def _report(response: Any) -> Any:
    """Add ``response``'s usage to the call in progress; a stream (or a stream helper's
    manager) is returned metered, to report its usage when it ends, once: the decorated
    function may return it too, and it is still one provider call."""
    call = current_call()
    if call is None:
        return response
    if is_stream(response):

        def on_end(tally: StreamTally, error: BaseException | None) -> None:
            usage = tally.usage
            if usage is not None and tally.claim(call):
                call.add_usage(usage)

        return wrap_stream(response, on_end)
    usage = usage_from_response(response)
    if usage is not None:
        call.add_usage(usage, source=response)
    return response


def _answered(call: Any, exc: BaseException | None) -> None:
    """A request ended: with a response, or an error the provider answered with (an HTTP
    status: it did no billable work). A timeout, a dropped connection, an interrupt or a
    cancellation leave it unanswered: the provider may have done (and billed) the work, so
    ``@budget`` charges its worst case."""
    if call is not None and (exc is None or status_of(exc) is not None):
        call.unanswered -= 1


async def _report_when_done(awaitable: Any, call: Any) -> Any:
    try:
        response = await awaitable
    except BaseException as exc:
        _answered(call, exc)
        raise
    _answered(call, None)
    return _report(response)


def _wrap(method: Any) -> Any:
    # Async SDK methods are often plain functions returning a coroutine, so decide on the
    # returned value rather than on the method.
    @functools.wraps(method)
    def create(*args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if call is not None:
            call.unanswered += 1
        try:
            response = method(*args, **kwargs)
        except BaseException as exc:
            _answered(call, exc)
            raise
        if inspect.isawaitable(response):
            return _report_when_done(response, call)
        _answered(call, None)
        return _report(response)

    setattr(create, _MARK, True)
    return create


def _resource(client: Any, path: tuple[str, ...]) -> Any:
    obj = client
    for name in path:
        try:
            obj = getattr(obj, name)
        except Exception:  # missing, or an SDK resource that fails to import
            return None
    return obj


def instrument(client: C) -> C:
    """Report the real usage of ``client``'s calls to the decorated call they happen in.

    Works on ``openai.OpenAI`` / ``AsyncOpenAI`` (chat completions: ``create``, ``parse``,
    ``stream``, also under ``beta``; the Responses API: ``create``, ``parse``, ``stream``) and
    ``anthropic.Anthropic`` / ``AsyncAnthropic`` (messages: ``create``, ``stream``, also
    under ``beta``). Streams are reported when they end, each once.
    Patches this client instance only (clients derived later with ``with_options()`` are
    not patched); calling it twice is harmless. Returns the client::

        client = llmguard.instrument(OpenAI())

        @llmguard.track
        def answer(question: str) -> str:
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=[...])
            return reply.choices[0].message.content   # the event still has real usage
    """
    patched = 0
    for path, name in _TARGETS:
        resource = _resource(client, path)
        method = getattr(resource, name, None) if resource is not None else None
        if method is None:
            continue
        if not getattr(method, _MARK, False):
            setattr(resource, name, _wrap(method))
        patched += 1
    if not patched:
        raise ConfigurationError(
            f"instrument() does not know {type(client).__module__}.{type(client).__name__}: it "
            "takes openai.OpenAI/AsyncOpenAI or anthropic.Anthropic/AsyncAnthropic clients; "
            "report other providers' usage with llmguard.record_usage()"
        )
    return client


def record_usage(
    input_tokens: int,
    output_tokens: int,
    *,
    model: str | None = None,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    cost_usd: float | str | Decimal | None = None,
) -> bool:
    """Add a provider call's real usage to the decorated call in progress.

    ``input_tokens`` is the whole input, cached and cache-write tokens included. Give
    ``cost_usd`` when the provider reports the cost itself; otherwise it is computed from the
    price of ``model`` (default: the call's model). Several reports in one call are summed.
    Returns False (and does nothing) outside a decorated call.
    """
    call = current_call()
    if call is None:
        return False
    for name, value in (
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("cached_input_tokens", cached_input_tokens),
        ("cache_write_tokens", cache_write_tokens),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"record_usage: {name} must be an int >= 0, got {value!r}")
    if cached_input_tokens + cache_write_tokens > input_tokens:
        raise ValueError(
            "record_usage: input_tokens is the whole input and must include cached_input_tokens "
            "and cache_write_tokens"
        )
    cost = None
    if cost_usd is not None:
        try:
            cost = Decimal(str(cost_usd))
        except ArithmeticError:  # decimal.InvalidOperation: not a number at all
            cost = None
        if (
            cost is None
            or not cost.is_finite()
            or not 0 <= cost <= 10_000  # no real LLM call costs $10,000
            or isinstance(cost_usd, bool)
        ):
            # Reported after the provider was paid: never fail the call for it, and never
            # take a nonsense figure (inf, NaN, negative) as what the call cost.
            from ._events import warn_once

            warn_once(
                "record_usage_cost",
                "impossible_usage",
                cost_usd=str(cost_usd)[:40],
                hint="record_usage(cost_usd=...) was not an amount from $0 to $10,000: the "
                "cost is computed from the tokens and the model's price instead",
            )
            cost = None
    call.add_usage(
        Usage(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, model),
        cost_usd=cost,
    )
    return True
