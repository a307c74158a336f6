"""The shared call pipeline every llmguard decorator plugs into.

One :class:`CallRecord` per call of a decorated function lives in a contextvar for the
duration of the call. Stacking llmguard decorators does not nest wrappers: each decorator
applied to an llmguard-wrapped function builds a single new wrapper around the original
function with one more *layer*, so a call has one record and logs one ``llm_call`` event
however many decorators are stacked. A decorated function called inside another gets its
own record, whose ``parent_id`` is the outer call's ``call_id``.

Layers (the policies: cache, rate limit, retry, routing, budget) are written once, as
generators that yield instructions, and driven by two short loops that differ only by
``await``; whether a function is sync or async is decided once, at decoration time::

    def run(self, call):                       # a layer
        if hit := lookup(call):
            return hit                         # short-circuit: the rest is skipped
        yield Sleep(0.5)                       # time.sleep or asyncio.sleep, as fits
        result = yield PROCEED                 # run the inner layers and the function
        return result                          # (exceptions from inside are thrown in)
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Generator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from random import getrandbits
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from . import _validate as validate
from ._config import Unset
from ._errors import ConfigurationError
from ._events import emit, warn_once
from ._keys import Binder
from ._prices import get_price
from ._stream import StreamTally, is_stream
from ._stream import wrap as wrap_stream
from ._tags import CURRENT as CURRENT_TAGS
from ._tags import check_tags, merged
from ._tokens import count_message_tokens, counter_for
from ._usage import Usage, sanitize, text_from_response, usage_from_response

_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "llmguard_call", default=None
)
_children_lock = threading.Lock()
_ZERO = Decimal(0)
_OUTPUT_BUDGET_ARGS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
P = ParamSpec("P")
R = TypeVar("R", covariant=True)
_Q = ParamSpec("_Q")
_T = TypeVar("_T")
_Self = TypeVar("_Self")


class _Proceed:
    def __repr__(self) -> str:
        return "PROCEED"


PROCEED: Any = _Proceed()
"""Yielded by a layer: run the inner layers and the function; the result is sent back."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Yielded by a layer: wait ``seconds`` (``time.sleep`` in sync, ``asyncio.sleep`` in
    async calls, or the injected ``sleep`` / ``async_sleep``)."""

    seconds: float
    sleep: Callable[[float], None] | None = None
    async_sleep: Callable[[float], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class Blocking:
    """Yielded by a layer: run blocking ``fn()`` (in a worker thread for async calls) and
    send back its result."""

    fn: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Call:
    """Yielded by a layer: ``sync()`` in sync calls, ``await async_()`` in async calls; the
    result is sent back. For work that has a native async form (waiting on a future)."""

    sync: Callable[[], Any]
    async_: Callable[[], Awaitable[Any]]


Instruction = Any  # PROCEED | Sleep | Blocking | Call


class CallWatch(Protocol):
    """What a call observer returns for one call it watches (see :func:`add_call_observer`)."""

    def leave(self) -> None:
        """The wrapper is returning or raising: in the context the call started in."""

    def finish(self, fields: dict[str, Any] | None, error: BaseException | None) -> None:
        """The call is settled: ``fields`` are its ``llm_call`` event's (None if metering
        failed). For a returned stream, when the stream has been consumed."""


CallObserver = Callable[["CallRecord"], "CallWatch | None"]
_observers: tuple[CallObserver, ...] = ()
_observers_lock = threading.Lock()


def add_call_observer(observer: CallObserver) -> None:
    """Call ``observer(call)`` as each decorated call starts (inside its context, after its
    record is current); a :class:`CallWatch` it returns hears when the call leaves and ends.
    None by default: a call then pays one tuple test. An observer that raises is skipped
    for that call (one warning)."""
    global _observers
    with _observers_lock:
        _observers = (*_observers, observer)


def remove_call_observer(observer: CallObserver) -> None:
    global _observers
    with _observers_lock:
        _observers = tuple(o for o in _observers if o is not observer)


def _watch(call: CallRecord) -> None:
    watches = []
    for observer in _observers:
        try:
            watch = observer(call)
        except Exception as exc:
            _observer_failed(observer, exc)
            continue
        if watch is not None:
            watches.append(watch)
    if watches:
        call.watches = watches


def _leave(call: CallRecord) -> None:
    for watch in reversed(call.watches or ()):  # contexts are left in reverse order
        try:
            watch.leave()
        except Exception as exc:
            _observer_failed(watch, exc)


def _end_watches(
    call: CallRecord, fields: dict[str, Any] | None, error: BaseException | None
) -> None:
    for watch in reversed(call.watches or ()):
        try:
            watch.finish(fields, error)
        except Exception as exc:
            _observer_failed(watch, exc)


def _observer_failed(observer: object, exc: Exception) -> None:
    name = getattr(observer, "__qualname__", None) or type(observer).__qualname__
    warn_once(name, "llmguard_internal_error", observer=name, error=repr(exc)[:300])


class Layer(Protocol):
    """A policy: ``run`` is a generator of instructions returning the call's result.

    A layer that reads a per-call option the decorated function itself does not take (such
    as ``@route_model``'s ``critical``) names it in a ``call_options`` attribute (a tuple of
    names): the wrapper then takes it out of the call's keyword arguments before any layer
    runs, so that every layer sees the same arguments (the cache key among them, see
    :meth:`CallRecord.option`) and the function never receives it.
    """

    def run(self, call: CallRecord) -> Generator[Instruction, Any, Any]: ...


def _drive_sync(layers: tuple[Layer, ...], index: int, call: CallRecord) -> Any:
    if index == len(layers):
        return call.spec.fn(*call.args, **call.kwargs)
    steps = layers[index].run(call)
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            instruction = steps.send(sent) if thrown is None else steps.throw(thrown)
        except StopIteration as stop:
            return stop.value
        sent = thrown = None
        # Whatever ends an instruction, KeyboardInterrupt and SystemExit included, is thrown
        # into the layer, so that it can release what it holds (a budget reservation, a
        # cache lock) before the exception goes on.
        try:
            if instruction is PROCEED:
                sent = _drive_sync(layers, index + 1, call)
            elif isinstance(instruction, Sleep):
                (instruction.sleep or time.sleep)(instruction.seconds)
            elif isinstance(instruction, Blocking):
                sent = instruction.fn()
            elif isinstance(instruction, Call):
                sent = instruction.sync()
            else:  # pragma: no cover - a programming error in a layer
                raise TypeError(f"layer yielded {instruction!r}")
        except BaseException as exc:
            thrown = exc


async def _drive_async(layers: tuple[Layer, ...], index: int, call: CallRecord) -> Any:
    import asyncio  # here, so that `import llmguard` does not load it for sync applications

    if index == len(layers):
        return await call.spec.fn(*call.args, **call.kwargs)
    steps = layers[index].run(call)
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            instruction = steps.send(sent) if thrown is None else steps.throw(thrown)
        except StopIteration as stop:
            return stop.value
        sent = thrown = None
        # As in _drive_sync: cancellation (task.cancel(), asyncio.wait_for and timeouts) is
        # thrown into the layer too.
        try:
            if instruction is PROCEED:
                sent = await _drive_async(layers, index + 1, call)
            elif isinstance(instruction, Sleep):
                if instruction.async_sleep is not None:
                    await instruction.async_sleep(instruction.seconds)
                elif instruction.sleep is not None:
                    instruction.sleep(instruction.seconds)
                else:
                    await asyncio.sleep(instruction.seconds)
            elif isinstance(instruction, Blocking):
                # Shielded: once started, storage work (a settle, a lock release) finishes
                # in its thread even if this task is cancelled meanwhile.
                sent = await asyncio.shield(asyncio.to_thread(instruction.fn))
            elif isinstance(instruction, Call):
                sent = await instruction.async_()
            else:  # pragma: no cover - a programming error in a layer
                raise TypeError(f"layer yielded {instruction!r}")
        except BaseException as exc:
            thrown = exc


PromptFn = Callable[..., Any]


def original(fn: Any) -> Any:
    """The function an llmguard wrapper wraps (``fn`` itself if it is not one)."""
    inner = getattr(fn, "__llmguard__", None)
    return inner.fn if inner is not None and inner.wrapper is fn else fn


def full_name(fn: Any) -> str:
    """``module.qualname`` of a function: its name in events, cache keys and budgets."""
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(eq=False)
class FunctionSpec:
    """What llmguard knows about one decorated function, computed once at decoration."""

    fn: Callable[..., Any]
    name: str
    is_async: bool
    layers: tuple[Layer, ...] = ()
    model: str | None = None
    prompt: PromptFn | None = None
    log_content: bool = False
    tags: dict[str, str | None] | None = None
    model_index: int | None = None
    model_default: str | None = None
    messages_index: int | None = None
    has_messages_kw: bool = False
    params: dict[str, tuple[int | None, Any]] = field(default_factory=dict, repr=False)
    call_options: tuple[str, ...] = ()
    wrapper: Callable[..., Any] | None = field(default=None, repr=False)
    _binder: Binder | None = field(default=None, repr=False)

    @property
    def binder(self) -> Binder:
        """Binds a call's arguments to the function's parameters by name (built once)."""
        if self._binder is None:
            self._binder = Binder(self.fn)
        return self._binder

    @classmethod
    def build(cls, fn: Callable[..., Any]) -> FunctionSpec:
        spec = cls(
            fn=fn,
            name=full_name(fn),
            is_async=inspect.iscoroutinefunction(fn),
        )
        try:
            parameters = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return spec
        for index, param in enumerate(parameters):
            positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                default = None if param.default is param.empty else param.default
                spec.params[param.name] = (index if positional else None, default)
            if param.name == "model":
                spec.model_index = index if positional else None
                if isinstance(param.default, str):
                    spec.model_default = param.default
            elif param.name == "messages":
                spec.messages_index = index if positional else None
                spec.has_messages_kw = param.kind is not param.POSITIONAL_ONLY
        return spec


class CallRecord:
    """Everything about one call of a decorated function, shared by all its layers.

    Policies read the call's arguments (``args``, ``kwargs``; a layer may change them before
    ``PROCEED``), add event fields with :meth:`set`, and report usage with
    :meth:`add_usage`. ``llmguard.current_call()`` returns the record of the innermost
    decorated call in progress.
    """

    __slots__ = (
        "_bound",
        "args",
        "call_id",
        "children",
        "children_cost",
        "fields",
        "kwargs",
        "last_metering",
        "metering",
        "options",
        "parent",
        "reported_ids",
        "settled",
        "spec",
        "started",
        "tags",
        "unanswered",
        "usages",
        "watches",
    )

    def __init__(
        self,
        spec: FunctionSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        parent: CallRecord | None,
    ) -> None:
        self.spec = spec
        self.args = args
        self.kwargs = kwargs
        self.options: dict[str, Any] = {}
        if spec.call_options and kwargs:  # llmguard's own per-call options: not the function's
            for name in spec.call_options:
                if name in kwargs:
                    self.options[name] = kwargs.pop(name)
        self._bound: tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]] | None = None
        self.parent = parent
        self.call_id = f"{getrandbits(64):016x}"
        self.fields: dict[str, Any] = {}
        self.usages: list[tuple[Usage, Decimal | None]] = []
        self.reported_ids: list[int] = []
        self.unanswered = 0  # provider requests sent that got neither an answer nor an error
        self.metering: Metering | None = None
        self.last_metering: tuple[Any, BaseException | None, int, Metering] | None = None
        self.children = 0
        self.children_cost = _ZERO
        # What budgets already charged for this call and the calls made inside it, per
        # budget ledger ((name, key)): a budget over an enclosing call charges only the rest.
        self.settled: dict[tuple[str, str | None], Decimal] = {}
        self.started = time.perf_counter()
        self.watches: list[CallWatch] | None = None
        self.tags = CURRENT_TAGS.get()  # those in force where the call is made

    @property
    def function(self) -> str:
        """The decorated function's ``module.qualname``."""
        return self.spec.name

    @property
    def parent_id(self) -> str | None:
        return self.parent.call_id if self.parent is not None else None

    def requested_model(self) -> str | None:
        """The model this call asks for: its ``model`` argument, else the decorator's
        ``model=``, else the ``model`` parameter's default."""
        spec = self.spec
        model = self.kwargs.get("model")
        if model is None and spec.model_index is not None and len(self.args) > spec.model_index:
            model = self.args[spec.model_index]
        if isinstance(model, str):
            return model
        return spec.model or spec.model_default

    def argument(self, name: str, default: Any = None) -> Any:
        """The value of parameter ``name`` in this call: passed by keyword or position, else
        the signature's default, else ``default``."""
        if name in self.kwargs:
            return self.kwargs[name]
        index, declared = self.spec.params.get(name, (None, None))
        if index is not None and index < len(self.args):
            return self.args[index]
        return declared if declared is not None else default

    def option(self, name: str, default: Any = None) -> Any:
        """A per-call option declared by a layer's ``call_options`` (``critical``...): taken
        from the call's keywords, or the function's own parameter of that name if it has one."""
        if name in self.options:
            return self.options[name]
        return self.argument(name, default)

    def bound_arguments(self) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults applied, ``self``/``cls`` left
        out: what ``key=`` and ``when=`` functions receive. Raises TypeError exactly when
        the call does not fit the function's signature."""
        cached = self._bound
        if cached is not None and cached[0] is self.args and cached[1] is self.kwargs:
            return cached[2]
        bound = self.spec.binder.bind(self.args, self.kwargs)
        self._bound = (self.args, self.kwargs, bound)
        return bound

    def prompt_tokens(self, model: str | None = None) -> int:
        """This call's prompt in tokens for ``model`` (default: the requested model): chat
        messages with the cookbook formula (tools included), else the prompt texts."""
        model = model or self.requested_model()
        messages, texts = self.prompt()
        if messages is not None:
            return int(count_message_tokens(messages, model, tools=self.argument("tools")))
        counter = counter_for(model)
        return sum(counter.count(text) for text in texts)

    def stream_cost(
        self, tally: StreamTally, error: BaseException | None = None
    ) -> tuple[str | None, Decimal | None]:
        """(model, cost) of a consumed stream: its reported usage, else an estimate of its
        text against this call's prompt; nothing if this call was served (a cache replay),
        its request never sent, or it failed before any chunk; cost None if the model has no
        price."""
        if self.metering is not None:
            return self.metering.model, self.metering.cost
        usage = tally.usage
        model = (
            (usage.model if usage is not None else None) or tally.model or self.requested_model()
        )
        if not tally.sent or (usage is None and error is not None and not tally.chunks):
            return model, _ZERO
        price = get_price(model) if model else None
        if price is None:
            return model, None
        if usage is not None:
            return model, price.cost(
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens,
                usage.cache_write_tokens,
            )
        return model, price.cost(self.prompt_tokens(model), counter_for(model).count(tally.text))

    def streamed_cost(
        self, tally: StreamTally, error: BaseException | None, since: int
    ) -> Decimal | None:
        """What this call spent from its ``since``-th usage report on, the stream it returned
        included once (its usage may already be among the reports: see StreamTally.claim,
        or a nested call's); as the event counts it, a stream without usage is estimated
        only if nothing reported real usage (a generator reading an instrumented stream,
        say) and no nested decorated call was made (they paid: see children_unsettled)."""
        reported = len(self.usages) > since
        owner = tally.owner
        if owner is self or ((reported or self.children) and tally.usage is None):
            # among the reports, or the nested calls paid (as the event counts it)
            cost: Decimal | None = _ZERO
        elif isinstance(owner, CallRecord) and _within(owner, self):
            cost = _ZERO  # a nested decorated call counted it: among the children's cost
        else:
            cost = self.stream_cost(tally, error)[1]
        if reported:
            part = self.usage_totals(since)[1]
            cost = None if cost is None or part is None else cost + part
        return cost

    def children_mark(self, ledger: tuple[str, str | None]) -> tuple[Decimal, Decimal]:
        """Where the nested calls' spend stands now: the cost of the decorated calls made
        inside this one that have finished, and what ``ledger`` was charged for them (see
        :meth:`children_unsettled`)."""
        with _children_lock:
            return self.children_cost, self.settled.get(ledger, _ZERO)

    def children_unsettled(
        self, mark: tuple[Decimal, Decimal], ledger: tuple[str, str | None]
    ) -> Decimal:
        """What the decorated calls made inside this one spent since ``mark`` (they, and the
        calls inside them, finished since), less what a budget on ``ledger`` among them
        already charged for it: what a budget on ``ledger`` over this call has to charge for
        its nested calls. (A nested call whose model has no price adds nothing.)"""
        cost, settled = mark
        with _children_lock:
            spent = self.children_cost - cost
            charged = self.settled.get(ledger, _ZERO) - settled
        return max(spent - charged, _ZERO)

    def add_settled(self, ledger: tuple[str, str | None], cost: Decimal) -> None:
        """A budget on ``ledger`` charged ``cost`` (of what this call's event and its nested
        calls' events count) for this call: a budget on the same ledger over an enclosing
        call will not charge it again."""
        if cost > 0:
            with _children_lock:
                self.settled[ledger] = self.settled.get(ledger, _ZERO) + cost

    def output_budget(self, default: int) -> int:
        """The output tokens this call asks for at most: its ``max_tokens``,
        ``max_completion_tokens`` or ``max_output_tokens`` argument, else ``default``."""
        for name in _OUTPUT_BUDGET_ARGS:
            value = self.argument(name)
            # A negative or non-integer value is no output budget (the provider refuses it):
            # the worst case stays the default, so it can never shrink a reservation.
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return default

    def set(self, **fields: Any) -> None:
        """Add fields to this call's ``llm_call`` event."""
        self.fields.update(fields)

    def add_usage(
        self, usage: Usage, *, cost_usd: Decimal | None = None, source: object = None
    ) -> None:
        """Add one provider call's real usage; several are summed when the call ends.

        ``cost_usd`` is the provider's own figure when it reports one; otherwise the cost is
        computed (after the call, so price loading never counts as latency) from the price
        of ``usage.model``, or of the requested model.
        """
        if source is not None:
            self.reported_ids.append(id(source))
        usage = sanitize(usage)
        if cost_usd is not None and cost_usd < 0:
            cost_usd = _ZERO  # a negative figure never takes spend off a ledger
        if usage.model is None:
            usage = replace(usage, model=self.requested_model())
        self.usages.append((usage, cost_usd))

    def usage_totals(self, since: int = 0) -> tuple[Usage, Decimal | None, list[str]]:
        """The usage reported (from the ``since``-th report on) summed, its cost (None if any
        part's price is unknown) and the distinct models, in order of first use."""
        inputs = outputs = cached = written = 0
        cost: Decimal | None = _ZERO
        models: list[str] = []
        for usage, reported_cost in self.usages[since:]:
            inputs += usage.input_tokens
            outputs += usage.output_tokens
            cached += usage.cached_input_tokens
            written += usage.cache_write_tokens
            if usage.model is not None and usage.model not in models:
                models.append(usage.model)
            part = reported_cost
            if part is None:
                price = get_price(usage.model) if usage.model else None
                if price is not None:
                    part = price.cost(
                        usage.input_tokens,
                        usage.output_tokens,
                        usage.cached_input_tokens,
                        usage.cache_write_tokens,
                    )
            cost = None if cost is None or part is None else cost + part
        return Usage(inputs, outputs, cached, written, models[0] if models else None), cost, models

    def meter(self, result: Any = None, error: BaseException | None = None) -> Metering:
        """What this call has used and cost so far, with ``result`` / ``error`` as its
        outcome, unless :meth:`serve_cached` fixed it. Asked again about the same outcome
        (the same result object and error, no usage reported since), it answers from the last
        time instead of estimating again; a re-run by a retry or fallback is a new outcome."""
        if self.metering is not None:
            return self.metering
        last = self.last_metering
        if (
            last is not None
            and last[0] is result
            and last[1] is error
            and last[2] == len(self.usages)
        ):
            return last[3]
        metering = _settle(self, result, error)  # may take in the result's own usage
        self.last_metering = (result, error, len(self.usages), metering)
        return metering

    def serve_cached(
        self, model: str | None, saved_usd: Decimal | None, source: str = "cache"
    ) -> None:
        """Record that no provider was paid for this call: its result was another call's
        (from the cache, or shared by ``@debounced``), worth ``saved_usd``."""
        self.metering = Metering(model, 0, 0, _ZERO, source)
        self.fields["saved_usd"] = None if saved_usd is None else float(saved_usd)

    def prompt(self) -> tuple[Any, list[str]]:
        """What this call sends as its prompt: ``(messages, [])`` for chat messages, else
        ``(None, texts)``. From ``prompt=`` when the decorator has one, else the ``messages``
        argument, else every string argument but ``model``."""
        spec, args, kwargs = self.spec, self.args, self.kwargs
        if spec.prompt is not None:
            prompt = spec.prompt(*args, **kwargs)
            return (None, [prompt]) if isinstance(prompt, str) else (prompt, [])
        messages = kwargs.get("messages") if spec.has_messages_kw else None
        if messages is None and spec.messages_index is not None and len(args) > spec.messages_index:
            messages = args[spec.messages_index]
        if messages is not None and not isinstance(messages, str):
            return messages, []
        texts = [v for i, v in enumerate(args) if type(v) is str and i != spec.model_index]
        texts.extend(v for k, v in kwargs.items() if type(v) is str and k != "model")
        return None, texts

    def __repr__(self) -> str:
        return f"<CallRecord {self.spec.name} call_id={self.call_id}>"


class UserFunction:
    """A function the user gives a decorator (``key=``, ``when=``), called with the call's
    arguments *by name* (see :meth:`CallRecord.bound_arguments`) when the parameters it
    requires are the decorated function's own.

    It then receives only the parameters it names, or all of them if it takes ``**kwargs``
    (``lambda user, **_: user`` and ``lambda user: user`` both work on ``research("alice",
    "q")``). One that requires other names (``lambda q, **_: ...``), takes ``*args`` or has
    positional-only parameters gets the call's arguments as they were passed. An exception
    it raises is re-raised as :class:`ConfigurationError` naming the decorator and the
    option, with the original chained.
    """

    __slots__ = ("_modes", "decorator", "fn", "names", "option", "positional", "required")

    def __init__(self, fn: Callable[..., Any], decorator: str, option: str) -> None:
        if not callable(fn):
            raise ConfigurationError(f"@{decorator}({option}=...) must be callable, got {fn!r}")
        self.fn = fn
        self.decorator = decorator
        self.option = option
        self.names: frozenset[str] | None = None  # None: every argument
        self.required: frozenset[str] = frozenset()
        self.positional = False
        self._modes: dict[FunctionSpec, bool] = {}
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin: give it the arguments as passed
            self.positional = True
            return
        if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params):
            self.positional = True  # it wants positions: give it the call as it was made
            return
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            self.names = frozenset(p.name for p in params)
        self.required = frozenset(
            p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD
        )

    def by_name(self, parameters: Collection[str]) -> bool:
        """Whether it is given the arguments by name for a function with ``parameters``."""
        return not self.positional and self.required.issubset(parameters)

    def __call__(self, call: CallRecord) -> Any:
        mode = self._modes.get(call.spec)
        if mode is None:
            mode = self._modes[call.spec] = self.by_name(call.spec.params)
        if mode:
            return self.call_bound(call.bound_arguments())
        return self.call_with(call.args, call.kwargs)

    def call_bound(self, bound: Mapping[str, Any]) -> Any:
        """Call it with ``bound`` (arguments by name)."""
        names = self.names
        given = dict(bound) if names is None else {k: v for k, v in bound.items() if k in names}
        return self.call_with((), given)

    def call_with(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        try:
            return self.fn(*args, **kwargs)
        except Exception as exc:
            raise ConfigurationError(
                f"@{self.decorator}({self.option}=...) raised {type(exc).__name__}: {exc}. It "
                "is called with the call's arguments by name when the parameters it requires "
                "are the function's (only those it names, or all of them if it takes "
                "**kwargs), e.g. lambda user, **_: user"
            ) from exc


class TagsLayer:
    """Puts a function's own ``tags=`` in force while it runs, so that the decorated calls
    made inside carry them too (one per function, whichever decorators gave tags)."""

    def run(self, call: CallRecord) -> Generator[Instruction, Any, Any]:
        own = call.spec.tags
        if not own:
            return (yield PROCEED)
        token = CURRENT_TAGS.set(merged(CURRENT_TAGS.get(), own))
        try:
            return (yield PROCEED)
        finally:
            try:
                CURRENT_TAGS.reset(token)
            except ValueError:  # closed from another context: that one was never changed
                pass


class GuardedFunction(Protocol[P, R]):
    """A function decorated by llmguard: called as before, plus :meth:`with_options`."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def with_options(self, **options: Any) -> Callable[P, R]:
        """The function with llmguard per-call options set (``critical=True`` for
        ``@route_model``): ``summarize.with_options(critical=True)(text)``. Typed, unlike
        passing ``critical=True`` to the function itself, which works too."""
        ...

    # A decorated method is bound like any function: ``obj.method(...)`` is typed
    # without ``self`` (as a plain callable: its attributes are read on the class).
    @overload
    def __get__(self: _Self, instance: None, owner: type[Any] | None = None) -> _Self: ...

    @overload
    def __get__(
        self: GuardedFunction[Concatenate[_T, _Q], R],
        instance: _T,
        owner: type[Any] | None = None,
    ) -> Callable[_Q, R]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any: ...


def current_call() -> CallRecord | None:
    """The record of the innermost llmguard-decorated call in progress, or None."""
    return _current.get()


def _estimate(call: CallRecord, result: Any) -> tuple[str | None, int, int, str]:
    """(model, input tokens, output tokens, method) estimated from arguments and result."""
    model = call.requested_model()
    counter = counter_for(model)
    input_tokens = call.prompt_tokens(model)
    output_tokens = counter.count(result) if isinstance(result, str) else 0
    return model, input_tokens, output_tokens, counter.method


def _within(call: CallRecord, outer: CallRecord) -> bool:
    """Whether ``call`` was made (directly or not) inside ``outer``."""
    parent = call.parent
    while parent is not None:
        if parent is outer:
            return True
        parent = parent.parent
    return False


def _finish(call: CallRecord, result: Any, error: BaseException | None) -> None:
    """Settle usage and cost, tell the parent call, emit the ``llm_call`` event."""
    latency_ms = round((time.perf_counter() - call.started) * 1000, 3)
    try:
        fields = _event_fields(call, result, error)
    except Exception as exc:  # metering must never break the caller's call
        warn_once(
            call.spec.name,
            "llmguard_internal_error",
            function=call.spec.name,
            error=repr(exc)[:300],
        )
        if call.watches is not None:
            _end_watches(call, None, error)
        return
    fields["latency_ms"] = latency_ms
    fields.update(call.fields)
    parent = call.parent
    if parent is not None and result is not None and not isinstance(result, str):
        # This call metered its result: a caller returning that very response object must
        # not bill its usage again.
        parent.reported_ids.append(id(result))
    emit("info" if error is None else "warning", "llm_call", fields)
    if call.watches is not None:
        _end_watches(call, fields, error)


@dataclass(slots=True)
class Metering:
    """What one call used and cost, settled once per call (see :meth:`CallRecord.meter`).

    ``source`` is ``usage``, ``estimate``, ``unknown``, ``none`` (raised before any usage),
    ``children`` (nested decorated calls paid) or ``cache`` (served by ``@cached``).
    """

    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost: Decimal | None
    source: str
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    method: str | None = None
    models: list[str] = field(default_factory=list)


def _settle(call: CallRecord, result: Any, error: BaseException | None) -> Metering:
    if error is None and result is not None and not isinstance(result, str):
        usage = usage_from_response(result)
        if usage is not None and id(result) not in call.reported_ids:
            call.add_usage(usage, source=result)
    if call.usages:
        totals, cost, models = call.usage_totals()
        return Metering(
            model=totals.model or call.requested_model(),
            input_tokens=totals.input_tokens,
            output_tokens=totals.output_tokens,
            cost=cost,
            source="usage" if cost is not None else "unknown",
            cached_input_tokens=totals.cached_input_tokens,
            cache_write_tokens=totals.cache_write_tokens,
            models=models,
        )
    if error is not None or call.children:
        # Nothing billed here as far as we know: an error without usage, or an outer call
        # whose provider calls were made (and logged) by nested decorated calls.
        source = "none" if error is not None else "children"
        if error is not None and call.unanswered:
            source = "unanswered"  # sent, never answered: billed or not, nobody can say
        return Metering(call.requested_model(), None, None, _ZERO, source)
    model, input_tokens, output_tokens, method = _estimate(call, result)
    price = get_price(model) if model else None
    if model is None:
        warn_once(
            call.spec.name,
            "unknown_model",
            function=call.spec.name,
            hint="no model argument, return value or decorator model=; use @track(model=...)",
        )
    if price is None:
        return Metering(model, input_tokens, output_tokens, None, "unknown", method=method)
    cost = price.cost(input_tokens, output_tokens)
    return Metering(model, input_tokens, output_tokens, cost, "estimate", method=method)


def _finish_stream(call: CallRecord, tally: StreamTally, error: BaseException | None) -> None:
    """A returned stream ended (or was closed, failed, or was dropped unfinished): meter what
    was consumed, its usage counted once (not again if an instrumented client or a nested
    decorated call already counted it)."""
    if call.metering is None and not tally.sent:  # a stream helper never entered
        call.metering = Metering(call.requested_model(), 0, 0, _ZERO, "none")
    usage = tally.usage if call.metering is None else None
    if usage is not None:
        if tally.claim(call):
            call.add_usage(usage)
    elif call.metering is None and error is not None and tally.chunks and tally.claim(call):
        call.metering = call.meter(tally.text)  # failed after output arrived: estimate it
    call.fields["stream_chunks"] = tally.chunks
    if tally.abandoned:
        call.fields["stream_abandoned"] = True
    _finish(call, tally.text, error)


def stream_context(call: CallRecord) -> tuple[contextvars.ContextVar[Any], CallRecord]:
    """What is set while a returned generator computes a chunk: its code runs as part of
    ``call`` (its instrumented provider calls and nested decorated calls report there)."""
    return _current, call


def _metered_stream(call: CallRecord, result: Any) -> Any:
    """A returned stream, metered when the caller has consumed it. A generator's own code
    runs as the caller reads it: it runs as part of this call (its instrumented provider
    calls and nested decorated calls report here)."""
    return wrap_stream(
        result,
        functools.partial(_finish_stream, call),
        count_only=call.metering is not None,  # served: its cost is known
        context=stream_context(call),
    )


def _event_fields(call: CallRecord, result: Any, error: BaseException | None) -> dict[str, Any]:
    metering = call.meter(result, error)
    cost = metering.cost
    parent = call.parent
    if parent is not None:
        with _children_lock:
            parent.children += 1
            parent.children_cost += (cost or _ZERO) + call.children_cost
            for ledger, charged in call.settled.items():
                parent.settled[ledger] = parent.settled.get(ledger, _ZERO) + charged
    fields: dict[str, Any] = {
        "function": call.spec.name,
        "call_id": call.call_id,
        "parent_id": parent.call_id if parent is not None else None,
        "model": metering.model,
        "input_tokens": metering.input_tokens,
        "cached_input_tokens": metering.cached_input_tokens,
        "cache_write_tokens": metering.cache_write_tokens,
        "output_tokens": metering.output_tokens,
        "cost_usd": None if cost is None else float(cost),
        "cost_source": metering.source,
        "outcome": "ok" if error is None else "error",
        "error": None if error is None else type(error).__name__,
    }
    if metering.method is not None:
        fields["tokens_method"] = metering.method
    tags = merged(call.tags, call.spec.tags) if call.spec.tags else call.tags
    if tags:
        fields["tags"] = dict(tags)
    if len(metering.models) > 1:
        fields["models"] = metering.models
    if call.spec.log_content:  # opted in: the prompt and completion go into the event
        messages, texts = call.prompt()
        fields["prompt"] = messages if messages is not None else "\n".join(texts)
        fields["completion"] = text_from_response(result)
    if call.children:
        fields["children"] = call.children
        fields["children_cost_usd"] = float(call.children_cost)
    return fields


def _make_wrapper(spec: FunctionSpec) -> Callable[..., Any]:
    """The one place that decides between the sync and the async wrapper."""
    fn = spec.fn
    layers = spec.layers

    if spec.is_async:

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = CallRecord(spec, args, kwargs, _current.get())
            token = _current.set(call)
            try:  # at once: whatever ends the call, even an interrupt, resets the context
                if _observers:
                    _watch(call)
                result = await (_drive_async(layers, 0, call) if layers else fn(*args, **kwargs))
            except BaseException as exc:
                _current.reset(token)
                if call.watches is not None:
                    _leave(call)
                _finish(call, None, exc)
                raise
            _current.reset(token)
            if call.watches is not None:
                _leave(call)
            if is_stream(result):  # metered when the caller has consumed it
                return _metered_stream(call, result)
            _finish(call, result, None)
            return result

        return async_wrapper

    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        call = CallRecord(spec, args, kwargs, _current.get())
        token = _current.set(call)
        try:  # at once: whatever ends the call, even an interrupt, resets the context
            if _observers:
                _watch(call)
            result = _drive_sync(layers, 0, call) if layers else fn(*args, **kwargs)
        except BaseException as exc:
            _current.reset(token)
            if call.watches is not None:
                _leave(call)
            _finish(call, None, exc)
            raise
        _current.reset(token)
        if call.watches is not None:
            _leave(call)
        if is_stream(result):  # metered when the caller has consumed it
            return _metered_stream(call, result)
        _finish(call, result, None)
        return result

    return sync_wrapper


def check_options(decorator: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the metering options every llmguard decorator takes (at decoration time):
    ``model``, ``prompt``, ``log_content`` and ``tags``; UNSET ones are dropped."""
    given = {k: v for k, v in options.items() if not isinstance(v, Unset)}
    unknown = set(given) - {"model", "prompt", "log_content", "tags"}
    if unknown:
        raise ConfigurationError(f"@{decorator} got unknown options: {', '.join(sorted(unknown))}")
    where = f"@{decorator}"
    if "model" in given:
        validate.text(
            given["model"], "model", decorator=where, allow_none=True, meaning="a model name"
        )
    if "prompt" in given:
        validate.function(
            given["prompt"],
            "prompt",
            decorator=where,
            takes="given the function's arguments, returning the prompt text or messages",
        )
    if "log_content" in given:
        validate.flag(given["log_content"], "log_content", decorator=where)
    if given.get("tags") is not None:
        given["tags"] = check_tags(given["tags"], f"@{decorator}(tags=...)")
    return given


def guard(
    fn: Any,
    *,
    decorator: str,
    layer: Layer | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """Wrap ``fn`` for metering, adding ``layer`` as the new outermost policy.

    If ``fn`` is already an llmguard wrapper, the result is one wrapper around the original
    function with the layers of both. Classmethod and staticmethod objects are unwrapped and
    rewrapped. ``options`` are metering options (see :func:`check_options`); ``decorator``
    names the caller in error messages.
    """
    if isinstance(fn, (classmethod, staticmethod)):
        return type(fn)(guard(fn.__func__, decorator=decorator, layer=layer, options=options))
    if isinstance(fn, str):
        raise ConfigurationError(
            f"@{decorator} got the string {fn!r} where a function was expected: pass options by "
            f"keyword, e.g. @{decorator}(model={fn!r})"
        )
    if not callable(fn):
        raise ConfigurationError(f"@{decorator} must decorate a function, got {type(fn).__name__}")
    given = check_options(decorator, options or {})
    inner: FunctionSpec | None = getattr(fn, "__llmguard__", None)
    if inner is not None and inner.wrapper is fn:  # stacked on another llmguard decorator
        spec = replace(inner, wrapper=None)
    else:
        spec = FunctionSpec.build(fn)
    for name, value in given.items():
        if name == "tags":  # stacked decorators' tags add up, the outer one's winning
            value = {**(spec.tags or {}), **(value or {})} or None
        setattr(spec, name, value)
    if layer is not None:
        spec.layers = (layer, *spec.layers)
    if spec.tags and not any(isinstance(each, TagsLayer) for each in spec.layers):
        spec.layers = (TagsLayer(), *spec.layers)
    declared = [name for each in spec.layers for name in getattr(each, "call_options", ())]
    spec.call_options = tuple(dict.fromkeys(n for n in declared if n not in spec.params))
    wrapper = _make_wrapper(spec)
    functools.update_wrapper(wrapper, fn)
    wrapper.__llmguard__ = spec  # type: ignore[attr-defined]
    wrapper.with_options = functools.partial(_with_options, wrapper, frozenset(declared))  # type: ignore[attr-defined]
    spec.wrapper = wrapper
    return wrapper


def _with_options(
    wrapper: Callable[..., Any], known: frozenset[str], **options: Any
) -> Callable[..., Any]:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"{full_name(wrapper)}.with_options() got {', '.join(unknown)}: the options its "
            f"decorators take per call are {', '.join(sorted(known)) or 'none'}"
        )
    bound = functools.partial(wrapper, **options)
    functools.update_wrapper(bound, wrapper)
    return bound
