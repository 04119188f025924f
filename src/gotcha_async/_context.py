"""Context, limit, move_on_limit, run, current and LimitExceeded.

The C core (``_meter``) charges every allocation to the innermost :class:`Context` of
the task that makes it, found through the ContextVar below. Everything about what a
broken limit *means* -- cancellation, exceptions, messages -- lives here.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import sys
import tracemalloc
import types
from collections.abc import Awaitable, Callable, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

if sys.version_info >= (3, 13):
    from typing import TypeVar as DefaultTypeVar
else:
    from typing_extensions import TypeVar as DefaultTypeVar

import anyio

from . import _foreign, _hook, _meter
from ._hook import HardLimitError, ensure_installed, machinery_dirs, scope_var
from ._units import (
    _MAX,
    RESOURCES,
    USED,
    Limit,
    check_bool,
    check_ceiling,
    check_limit,
    sampling_rate,
    scaled,
)

__all__ = [
    "Context",
    "HardLimitError",
    "LimitExceeded",
    "Usage",
    "current",
    "limit",
    "move_on_limit",
    "run",
]

T = TypeVar("T")
# Usage() alone means Usage[int]: what used() returns
N = DefaultTypeVar("N", int, "int | None", default=int)

_NO_LIMITS = (None, None, None, None)

_scope_var = scope_var
_PACKAGE_DIR = os.path.join(os.path.dirname(__file__), "")
# asyncio's debug mode is on under -X dev or PYTHONASYNCIODEBUG (asyncio.run(debug=True) and
# loop.set_debug() too, which this does not see: only then is the loop asked per scope)
_DEBUG_POSSIBLE = sys.flags.dev_mode or bool(os.environ.get("PYTHONASYNCIODEBUG"))
# asyncio's own where it has it (_foreign): the same function the C half calls
_get_running_loop = _foreign.running_loop()
_new_meter = _meter.Meter.__new__


class Usage(NamedTuple, Generic[N]):
    """Bytes, objects and calls: what a scope used, its limits, or what remains.

    ``b, o, c = ctx.used()``. In :meth:`Context.limits` and :meth:`Context.remains`
    a field is ``None`` where no limit applies.
    """

    bytes: N
    objects: N
    calls: N


class Memory(NamedTuple):
    """Memory a scope holds: allocated inside it and not yet freed, now and at peak."""

    current: int
    peak: int


class LimitExceeded(Exception):
    """Raised by :func:`limit` and :func:`run` when the scope's own limit was exceeded.

    The scope whose limit broke is the one that raises: a scope cancelled because an
    *ancestor* broke its limit lets the cancellation through, and the ancestor raises.

    :ivar context: the :class:`Context` whose limit broke
    :ivar resource: ``"bytes"``, ``"objects"``, ``"calls"`` or ``"memory"``
    :ivar used: what the scope had used of that resource (for a refused hard
        allocation: what it would have reached)
    :ivar limit: the limit
    """

    def __init__(
        self, context: Context | None, resource: str, used: int, limit: int, details: str = ""
    ) -> None:
        self.context = context
        self.resource = resource
        self.used = used
        self.limit = limit
        self.details = details
        what = USED[resource] if resource in USED else f"{resource} used"
        super().__init__(f"{resource} limit exceeded: {used:,} {what}, limit {limit:,}{details}")

    def __reduce__(self) -> tuple[Any, ...]:
        # the Context does not travel: it lives in one process's allocator
        return (type(self), (None, self.resource, self.used, self.limit, self.details))


#: What a hard scope may still allocate past its ceiling after each time it stops the
#: code, so that the stopped code's ``except``/``finally`` blocks can run.
GRACE: dict[str, int] = dict(zip(RESOURCES, _meter.grace(), strict=True))
#: The smallest allocation a hard scope may refuse outright (a ``MemoryError`` at that
#: very line: one larger on its own than the ceiling, or from code already told to
#: stop); everything else past the ceiling is stopped by an interrupt.
REFUSE_MIN: int = _meter.refuse_min()


def _loop_waker() -> Any:
    """A thread-safe way to run a callback on the current event loop, or None."""
    loop = _get_running_loop()
    if loop is not None:
        return loop
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
    return None


def _new_cancel_scope(deadline: float, shield: bool) -> tuple[Any, Any]:
    """(an anyio cancel scope, the loop's waker), or (None, None) outside a loop.

    anyio.CancelScope() finds the backend through sniffio on every call, which is
    most of its cost; which loop runs here is cheaper to see directly, and the
    backend's class is made directly once known (_foreign.scope_class).
    """
    loop = _get_running_loop()
    if loop is not None:
        cls = _foreign.scope_class("asyncio")
        if cls is not None:
            if not _fast_path and not _DEBUG_POSSIBLE and _hook._installed:
                _enable_fast_path(cls)
            return cls(deadline=deadline, shield=shield), loop
    else:
        trio = sys.modules.get("trio")
        if trio is None:
            # synchronous code (no loop, no trio): answered without asking anyio, whose
            # answer imports a module the first time, which fails at interpreter
            # shutdown (a scope in an atexit handler or a finalizer)
            return None, None
        in_task = getattr(trio.lowlevel, "in_trio_task", None)
        if in_task is not None:
            if not in_task():
                return None, None
            # trio's own scope: anyio's trio scope only forwards to one
            if not _fast_trio and _hook._installed:
                _enable_fast_trio(trio)
            token = trio.lowlevel.current_trio_token()
            return trio.CancelScope(deadline=deadline, shield=shield), token
    try:
        scope = anyio.CancelScope(deadline=deadline, shield=shield)
    except anyio.NoEventLoopError:
        return None, None
    waker = _loop_waker()
    _foreign.learn_scope_class("asyncio" if loop is not None else "trio", type(scope))
    return scope, waker


_fast_path = False
# anyio's asyncio scope class, once lazy scopes are on (see _materialize)
_lazy_class: Any = None


def _enable_fast_path(cls: type) -> None:
    """From now on the C half enters and leaves plain scopes on asyncio itself.

    Not in asyncio's debug mode, where entering marks the scope quiet (see
    _before_enter), nor before the hook is installed. Where anyio's backend has what
    a lazy scope needs (_foreign.lazy_possible, checked once), a plain scope is lazy:
    it makes no cancel scope until something asks for a cancellation (see
    Context._materialize).
    """
    global _fast_path, _lazy_class
    if not _foreign.lazy_possible(cls):
        _meter.set_fast(_get_running_loop, cls)
    else:
        _lazy_class = cls
        _meter.set_fast(_get_running_loop, cls, _foreign.current_task_source(),
                        _foreign.task_states(cls))
    _fast_path = True


_fast_trio = False


def _enable_fast_trio(trio: Any) -> None:
    """From now on the C half enters and leaves plain scopes on trio itself.

    It reads trio's run context (what ``trio.lowlevel.in_trio_task`` and
    ``current_trio_token`` read); where trio has none by that name
    (_foreign.trio_run_context), scopes take the Python path.
    """
    global _fast_trio
    _fast_trio = True
    context = _foreign.trio_run_context()
    if context is not None:
        _meter.set_fast_trio(context, trio.CancelScope)


def _forget_fast_paths() -> None:
    """Ask _foreign again: the next scope on each loop sets the fast paths up anew
    (tests that force a fallback; the C half keeps what it was given until then)."""
    global _fast_path, _fast_trio, _get_running_loop
    _meter.set_fast(None, None)
    _meter.set_fast_trio(None, None)
    _fast_path = _fast_trio = False
    _get_running_loop = _foreign.running_loop()


def _call_soon(waker: Any, callback: Callable[[], object]) -> None:
    try:
        if isinstance(waker, asyncio.AbstractEventLoop):
            # a fresh context: the callback's own allocations are nobody's work
            waker.call_soon_threadsafe(callback, context=contextvars.Context())
        else:
            waker.run_sync_soon(callback)
    except RuntimeError:
        pass  # that loop is closed: nothing is left to cancel there


def _is_cancellation(exc: BaseException | None) -> bool:
    if isinstance(exc, asyncio.CancelledError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.Cancelled)


def _only_refusals(exc: BaseException | None) -> bool:
    """Is exc a hard refusal's MemoryError (alone or in a group with cancellations)?"""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_refusals(e) or _is_cancellation(e) for e in exc.exceptions)
    return False


#: A scope's checked arguments, as Context._apply takes them: (limits, whether it has
#: a ceiling, ceilings, track_memory, sampling rate, whether the C half needs them).
_Recipe = tuple[tuple[Any, ...], bool, tuple[Any, ...], bool, int, bool]
_PLAIN: _Recipe = (_NO_LIMITS, False, _NO_LIMITS, False, 0, False)


# limit(), limit(bytes=n), limit(memory=m) and both, the scopes made most often: the
# recipe of each (bytes, memory) of plain ints asked for (n alone without memory=), up
# to _SIMPLE_MAX of them
_SIMPLE: dict[Any, _Recipe] = {None: _PLAIN}
_SIMPLE_MAX = 1024
_NOT_SIMPLE = object()


def _recipe(
    bytes: Limit,
    objects: Limit,
    calls: Limit,
    memory: Limit,
    hard: bool,
    ceiling: float | None,
    track_memory: bool,
    exact_memory: bool,
) -> _Recipe:
    """Check a scope's arguments once: the middlewares make every request's scope of a
    route from one recipe, and limit(), limit(bytes=n) and limit(memory=m) with plain
    ints are checked once each (_SIMPLE).

    :raises TypeError: for an argument of the wrong type
    :raises ValueError: for a bad limit or ceiling
    """
    key: Any = _NOT_SIMPLE
    if (
        (bytes is None or type(bytes) is int) and (memory is None or type(memory) is int)
        and objects is None and calls is None and hard is False and ceiling is None
        and track_memory is False and exact_memory is False
    ):
        key = bytes if memory is None else (bytes, memory)
        recipe = _SIMPLE.get(key)
        if recipe is not None:
            return recipe
    limits: tuple[int | None, ...] = (bytes, objects, calls, memory)  # type: ignore[assignment]
    # the common cases (None, a plain int in range) without a call each
    if not (
        (bytes is None or (type(bytes) is int and 0 <= bytes <= _MAX))
        and (objects is None or (type(objects) is int and 0 <= objects <= _MAX))
        and (calls is None or (type(calls) is int and 0 <= calls <= _MAX))
        and (memory is None or (type(memory) is int and 0 <= memory <= _MAX))
    ):
        limits = (
            check_limit("bytes", bytes),
            check_limit("objects", objects),
            check_limit("calls", calls),
            check_limit("memory", memory),
        )
    # the checks inline (this runs for every scope), the raising in check_bool
    if type(hard) is not bool:
        check_bool("hard", hard)
    if type(track_memory) is not bool:
        check_bool("track_memory", track_memory)
    if type(exact_memory) is not bool:
        check_bool("exact_memory", exact_memory)
    if hard:
        if ceiling is not None:
            check_ceiling(ceiling, hard)  # raises: hard=True is ceiling=1
        ceilings = limits
    elif ceiling is not None:
        # the middlewares' default (an int) without a call
        factor = (ceiling, 1) if type(ceiling) is int and ceiling >= 1 \
            else check_ceiling(ceiling, hard)
        b, o, c, m = limits
        ceilings = (scaled(b, factor), scaled(o, factor), scaled(c, factor),
                    scaled(m, factor))
    else:
        ceilings = _NO_LIMITS
    has_ceiling = hard or ceiling is not None
    # only a scope that tracks held memory itself samples at its own rate
    track = track_memory or limits[3] is not None
    rate = sampling_rate(limits[3], exact_memory) if track else 0
    setup = has_ceiling or track_memory or limits != _NO_LIMITS
    recipe = (limits, has_ceiling, ceilings, track_memory, rate, setup)
    if key is not _NOT_SIMPLE:
        if len(_SIMPLE) >= _SIMPLE_MAX:
            _SIMPLE.clear()
            _SIMPLE[None] = _PLAIN
        _SIMPLE[key] = recipe
    return recipe


class Context(_meter.Meter, anyio.CancelScope):
    """A cancel scope that counts what its work allocates, with optional limits.

    Everything that runs in the task while it is inside the scope is charged to it,
    with every task started from inside it and every worker thread those tasks use
    (``anyio.to_thread``, ``asyncio.to_thread``): they inherit the scope with the
    rest of their contextvars. Charges also go to every enclosing scope. No other
    task is ever charged.

    **When a limit is delivered.** A limit is exceeded when usage goes strictly
    above it. A *soft* limit (the default) lets the allocation that breaks it
    through and cancels the scope at the task's next checkpoint (the next ``await``
    that yields). Code that never reaches a checkpoint is not stopped by a soft
    limit: give it a *ceiling*.

    A *ceiling* stops the code itself, checkpoint or not. ``ceiling=2`` puts one at
    twice every limit (cancel at the next checkpoint past the limit, and never let
    the code go past twice it); ``hard=True`` is ``ceiling=1``. Past a ceiling:

    - an allocation of at least :data:`REFUSE_MIN <gotcha_async.REFUSE_MIN>`
      (64 KiB) that would cross it is refused before it is made if it is on its own
      larger than the ceiling, or the code was already told to stop: the code gets a
      ``MemoryError`` at that very line (``bytearray(2 * GiB)`` never happens);
    - growth in smaller steps is stopped at the next bytecode boundary of the
      scope's own code, where a :class:`HardLimitError` (a ``MemoryError``) is
      raised, the way Ctrl-C is delivered; in a worker thread that waits for the
      GIL: one to three switch intervals (5 ms each) of allocation.

    Either way the scope is cancelled as for a soft limit. After each stop a grace
    of :data:`GRACE <gotcha_async.GRACE>` (64 KiB, 1,000 objects, 1,000 calls) lets
    ``except``/``finally`` blocks run; code that swallows the error and keeps
    allocating is stopped again past it, with no grace after four stops. Nothing is
    ever refused or raised in the event loop's, anyio's or this package's code (nor
    in the standard-library helpers they run through: the import system, ``os``,
    ``io``, ``functools``, ``traceback`` and a few more), in finalizers, signal
    handlers or the garbage collector's C work, or while an exception is being
    raised or handled: CPython survives a failed large allocation anywhere, not a
    failed small one inside its own machinery, so small allocations are never
    refused at all.

    **What propagates.** A plain ``Context`` used as a context manager behaves like
    :func:`move_on_limit`: it catches its own cancellation and a hard refusal's
    ``MemoryError``, and :meth:`exceeded` says what happened. :func:`limit` raises
    :class:`LimitExceeded` instead. Another exception from the body propagates
    unchanged. A cancellation from an enclosing scope (a deadline, a cancelled task
    group, an ancestor's broken limit) always passes through untouched.

    **Nesting.** A scope entered inside another one, in the same task or in a task
    started from it, is its child; ``parent`` may also be given explicitly for pure
    accounting. Exceeding an ancestor's limit cancels the ancestor, which cancels
    everything inside it.

    **Shield and deadline** work as on :class:`anyio.CancelScope`. A shield keeps
    outer cancellation out; it does not stop the scope's own limits.

    **Outside an event loop** a Context can be created and used for pure accounting
    (:meth:`add`, :meth:`used`) and entered with a plain ``with`` in synchronous code:
    allocations are counted and hard limits refused, but there is nothing to cancel.

    A Context can be entered only once (:class:`RuntimeError` otherwise).

    :param bytes: limit on bytes allocated (int, size string such as ``"64 MiB"``, or None)
    :param objects: limit on object allocations
    :param calls: limit on allocator calls
    :param memory: limit on the peak of memory held (allocated here and not yet freed)
    :param hard: stop the code at the limit itself instead of at the next
        checkpoint (``ceiling=1``)
    :param ceiling: a multiple (>= 1) of every limit past which the code is stopped
        whether it reaches a checkpoint or not
    :param parent: the Context to charge as well; by default the scope current when
        this one is entered
    :param shield: shield the scope from cancellation by enclosing scopes
    :param track_memory: count memory held even without a ``memory`` limit
        (see :meth:`memory`)
    :param exact_memory: record every block for held memory instead of sampling
        (see :meth:`memory`; about twice the cost of a plain scope)
    :raises TypeError: for a limit of the wrong type
    :raises ValueError: for a negative or malformed limit, a ceiling below 1, or
        ``hard=True`` with a ceiling
    """

    # _scope, _waker, _done, _deadline, _shield and _cancel_pending are Meter's, in
    # C: entering and leaving read them there without a Python frame
    # _limits, _hard, _fail and _cancel_reason too, set by one call: Meter._apply
    __slots__ = ()

    # No __new__ here: Meter's comes first in the MRO, so anyio.CancelScope.__new__
    # (which would hand back the backend's own class) is never reached.

    def __init__(
        self,
        *,
        bytes: Limit = None,
        objects: Limit = None,
        calls: Limit = None,
        memory: Limit = None,
        hard: bool = False,
        ceiling: float | None = None,
        parent: Context | None = None,
        shield: bool = False,
        track_memory: bool = False,
        exact_memory: bool = False,
    ) -> None:
        self._init(bytes, objects, calls, memory, hard, ceiling, parent, shield, track_memory,
                   exact_memory, False)

    def _init(
        self,
        bytes: Limit,
        objects: Limit,
        calls: Limit,
        memory: Limit,
        hard: bool,
        ceiling: float | None,
        parent: Context | None,
        shield: bool,
        track_memory: bool,
        exact_memory: bool,
        fail: bool,
    ) -> None:
        # positional, so that limit() and move_on_limit() pass their arguments on
        # without a keyword call through type.__call__ (half the cost of making one)
        recipe = _recipe(bytes, objects, calls, memory, hard, ceiling, track_memory,
                         exact_memory)
        if type(shield) is not bool:
            check_bool("shield", shield)
        if parent is not None and not isinstance(parent, Context):
            raise TypeError(f"parent must be a Context or None, not {parent!r}")
        self._apply(recipe, parent, shield, fail)

    # -- entering and leaving --------------------------------------------------------

    if TYPE_CHECKING:

        def __enter__(self) -> Context: ...
        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool: ...
        async def __aenter__(self) -> Context: ...
        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool: ...

    # __enter__, __exit__, __aenter__ and __aexit__ are Meter's, in C: the scope
    # variable is set as their very last step and reset as their very first, so that a
    # KeyboardInterrupt can never land between the two halves. These are the halves;
    # for a plain scope on asyncio (no deadline, shield or early cancel; no broken
    # limit, nobody awaiting it) the C half does their work itself, without a frame.

    def _before_enter(self) -> Any:
        """Everything of entering but the scope variable; returns the cancel scope to
        enter (None outside a loop)."""
        ensure_installed()
        if self.parent is None:
            outer = _scope_var.get(None)
            if outer is not None:
                self._set_parent(outer)
        # outside a loop (synchronous code) scope is None: count, stop, cancel nothing
        scope, self._waker = _new_cancel_scope(self._deadline, self._shield)
        if scope is not None:
            if self._cancel_pending:
                scope.cancel(self._cancel_reason)
            loop = _get_running_loop()
            if _DEBUG_POSSIBLE and loop is not None and loop.get_debug():
                # the loop's debug bookkeeping (a stack per call_soon) is not the body's
                self._quiet_machinery = True
        self._scope = scope
        return scope

    def _live_scope(self) -> Any:
        """The cancel scope, made now if the scope is lazy; None outside a loop or
        once a lazy scope that never needed one has exited."""
        scope = self._scope
        if scope is None and self._host is not None:
            scope = self._materialize()
        return scope

    def _materialize(self) -> Any:
        """Make a lazy scope real: the anyio cancel scope it would have entered.

        A plain scope on asyncio (no deadline, no shield, no cancel before entry)
        notes its task and the task's innermost anyio scope at entry, and nothing
        else. The first thing that needs a cancel scope (a broken limit,
        :meth:`cancel`, setting ``deadline`` or ``shield``) makes one, spliced into
        anyio's chain where entering it would have put it, so from then on
        everything is anyio's own: level-triggered delivery, child scopes and task
        groups, uncancel() counts, nesting with asyncio.timeout.
        """
        ancestors = []
        ctx = self.parent
        while ctx is not None:
            if ctx._scope is not None:
                ancestors.append(ctx._scope)
            ctx = ctx.parent
        scope = _foreign.splice(_lazy_class, self._host, self._anyio_outer, self._cancelling0,
                                ancestors)
        self._scope = scope
        self._host = None
        self._anyio_outer = None
        return scope

    def _after_exit(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        broken = self._broken()
        scope = self._live_scope() if broken is not None else self._scope
        if scope is not None:
            if broken is not None and not scope.cancel_called:
                # the delivery may not have come yet (no safe point since the trip):
                # a scope whose own limit broke is cancelled by the time it exits
                scope.cancel()
            swallowed = bool(scope.__exit__(exc_type, exc, tb))
        else:
            swallowed = False
        if self._done is not None:
            self._signal_done()
        if broken is None:
            return swallowed
        if exc is not None and not swallowed and _is_cancellation(exc):
            return False  # an enclosing scope's cancellation: not ours to turn
        if not self._fail:
            # a hard stop is a MemoryError raised in the scope's code; a library may turn
            # it into an error of its own (pandas' C parser reports a failed read() as
            # ParserError, the MemoryError dropped): that is still the stop
            return (swallowed or exc is None or _only_refusals(exc) or
                    (isinstance(exc, Exception) and self._stopped()))
        error = self._limit_exceeded(*broken)
        try:
            if exc is None or swallowed:
                raise error from None
            raise error from exc
        finally:
            # the error's traceback holds this frame: kept in its locals, the error and
            # what it was raised from (their frames, the buffers the stopped code held)
            # would wait in a cycle for the collector instead of going with the error
            del error, exc, tb

    # -- what it used ----------------------------------------------------------------

    def used(self) -> Usage[int]:
        """Bytes, objects and allocator calls charged to this scope so far."""
        return self._counts()  # type: ignore[no-any-return]

    def limits(self) -> Usage[int | None]:
        """This scope's own limits on bytes, objects and calls (``None``: unlimited)."""
        return Usage(*self._limits[:3])

    def remains(self) -> Usage[int | None]:
        """What can still be allocated before a limit breaks, field by field.

        Each resource on its own, as in Go gotcha: a field is the smallest remainder of
        that resource along the chain of scopes (this one and its ancestors), 0 where a
        scope is past its limit, and ``None`` where no scope in the chain limits it. A
        resource keeps its remainder while another one is exceeded.
        """
        out: list[int | None] = [None, None, None]
        scope: Context | None = self
        while scope is not None:  # a loop, not recursion: parent chains can be long
            if scope is not self and scope._state == 2:
                scope = scope.parent  # an ancestor that exited limits nothing any more
                continue
            for i, (lim, used) in enumerate(zip(scope._limits[:3], scope._counts(), strict=True)):
                if lim is not None:
                    own = max(lim - used, 0)
                    value = out[i]
                    out[i] = own if value is None else min(value, own)
            scope = scope.parent
        return Usage(*out)

    # exceeded() -> bool: whether this scope's own limit or any ancestor's has been
    # exceeded. Inherited from Meter, in C: the ASGI middleware asks per message.

    def memory(self) -> Memory | None:
        """Memory this scope holds: allocated inside it and not freed yet, and the peak.

        Memory freed by another task or thread is credited back to this scope. Only
        scopes with a ``memory`` limit, ``track_memory=True``, or inside such a scope
        track held memory; for the others this returns ``None``.

        **Sampled by default**, as production heap profilers do: one sample every
        *rate* bytes allocated on average. The base rate is the ``memory`` limit / 1024
        (clamped to 256 B .. 1 MiB; 16 KiB with no limit). A scope samples at 4 times
        it while it holds less than a 16th of every ``memory`` limit of its chain, and
        at 4/5 of it while it holds more. A block of size *s* is recorded with probability
        1 - exp(-*s*/rate) and stands for *s* / (1 - exp(-*s*/rate)) bytes, so the
        figures are unbiased estimates; blocks of *rate* bytes or more are always
        recorded at their exact size. Near the limit the standard error is 1/32
        (3.1%) of the limit, as at the base rate throughout: a scope holding 90% of its
        limit in small blocks is stopped by mistake about once in 10,000 times
        (measured: 2 in 20,000), one holding 95% of it 3.5% of the time, one holding
        80% of it never was (0 in 20,000). The cost is about 256 samples per limit's
        worth of allocation while the scope holds under a 16th of its limit (1,280
        above it): a request that allocates 3% of its limit and holds less records some
        11 blocks (4% more instructions than a plain scope on a small JSON handler,
        about 12% more time). With
        ``exact_memory=True`` every block is recorded and the figures are exact, for
        about twice the cost of a plain scope.
        """
        return self._memory()  # type: ignore[no-any-return]

    def allocation_sites(
        self,
        limit: int | None = 10,
        *,
        key_type: str = "lineno",
        filters: Sequence[tracemalloc.Filter | tracemalloc.DomainFilter] = (),
    ) -> list[tracemalloc.Statistic]:
        """Where the memory this scope still holds was allocated, biggest first.

        Each ``tracemalloc.Statistic`` gives a site (file and line with
        ``key_type="lineno"``, or up to four frames with ``"traceback"``), the bytes
        held from it and the number of blocks recorded there. Sites are recorded by
        the scope itself, on every supported version, with no need for tracemalloc:
        the innermost frames of user code when each block was recorded, the event
        loops', anyio's and this package's frames left out. With sampling (the
        default, see :meth:`memory`) sizes are estimates and counts are of sampled
        blocks. ``filters`` (``tracemalloc.Filter``) narrow the result. Only Python's
        allocators are seen: memory that extensions allocate themselves, such as
        numpy's array data, is never attributed to a scope.

        :param limit: how many sites at most; None for all
        :raises RuntimeError: if the scope does not track held memory
        """
        from ._memory import allocation_sites

        return allocation_sites(self, limit, key_type=key_type, filters=filters)

    def add(self, bytes: int = 0, objects: int = 0, calls: int = 0) -> None:
        """Charge this scope and every ancestor by hand.

        :raises TypeError: for a value that is not an int
        :raises ValueError: for a negative value
        """
        for name, value in (("bytes", bytes), ("objects", objects), ("calls", calls)):
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, not {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
            if value > _MAX:
                raise ValueError(f"{name} is too large: {value!r} (at most {_MAX:,})")
        self._add(bytes, objects, calls)

    def reset(self) -> None:
        """Zero this scope's own counters (not its ancestors'), and its held-memory peak."""
        self._reset()

    # -- the cancel scope ------------------------------------------------------------

    def cancel(self, reason: str | None = None) -> None:
        """Cancel this scope now (before it is entered: as soon as it is entered).

        :param reason: passed on to the cancel scope, as :meth:`anyio.CancelScope.cancel`
            does (it shows in the cancellation's message)
        """
        scope = self._live_scope()
        if scope is not None:
            scope.cancel(reason)
        else:
            self._cancel_pending = True
            self._cancel_reason = reason
        self._signal_done()

    @property
    def cancel_called(self) -> bool:
        """Whether :meth:`cancel` was called, by the user or by a broken limit (read-only)."""
        return self._scope.cancel_called if self._scope is not None else self._cancel_pending

    @property
    def cancelled_caught(self) -> bool:
        """Whether this scope caught its own cancellation on exit (read-only)."""
        return self._scope.cancelled_caught if self._scope is not None else False

    @property
    def shield(self) -> bool:
        """Whether cancellation from enclosing scopes is kept out (read-write)."""
        return self._scope.shield if self._scope is not None else self._shield

    @shield.setter
    def shield(self, value: bool) -> None:
        check_bool("shield", value)
        self._shield = value
        scope = self._live_scope() if value else self._scope
        if scope is not None:
            scope.shield = value

    @property
    def deadline(self) -> float:
        """When the scope is cancelled automatically, on the loop's clock (read-write)."""
        return self._scope.deadline if self._scope is not None else self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._deadline = value
        scope = self._live_scope() if value != math.inf else self._scope
        if scope is not None:
            scope.deadline = value

    # -- being done ------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, None]:
        """Wait until the scope is done: exceeded, cancelled, past its deadline or exited.

        Like Go's ``<-ctx.Done()``. Returns at once if it is done already.
        """
        return self._wait().__await__()

    def _is_done(self) -> bool:
        return self._state == 2 or self.cancel_called or self.exceeded()

    async def _wait(self) -> None:
        if self._is_done():
            return
        if self._done is None:
            self._done = (anyio.Event(), _loop_waker())
        with anyio.CancelScope(deadline=self.deadline):
            await self._done[0].wait()

    def _signal_done(self) -> None:
        if self._done is not None:
            event, waker = self._done
            _call_soon(waker, event.set)

    def _on_trip(self) -> None:
        if self._state != 1 or self._waker is None:
            self._signal_done()
        elif self._interrupted_own_work():
            # a task of ours, at a bytecode boundary of user code: cancel() is what
            # that code could have called itself, and delivery is at its very next
            # checkpoint on every backend
            self._cancel_for_limit()
        else:
            _call_soon(self._waker, self._cancel_for_limit)

    def _interrupted_own_work(self) -> bool:
        """Did the pending call interrupt user code of this scope's work, on its loop?"""
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            frame = frame.f_back
        if frame is None or frame.f_code.co_filename.startswith(machinery_dirs()):
            return False
        scope = _scope_var.get(None)
        while scope is not None and scope is not self:
            scope = scope.parent
        if scope is None:
            return False
        waker = self._waker
        if isinstance(waker, asyncio.AbstractEventLoop):
            return _get_running_loop() is waker
        try:
            return bool(waker == sys.modules["trio"].lowlevel.current_trio_token())
        except RuntimeError:
            return False

    def _cancel_for_limit(self) -> None:
        # on the scope's own loop, as a callback: never in the middle of a step
        if self._state == 1:
            scope = self._live_scope()
            if scope is not None:
                scope.cancel()
        self._signal_done()

    def _limit_exceeded(self, resource: int, used: int) -> LimitExceeded:
        name = RESOURCES[resource]
        limit = self._limits[resource]
        assert limit is not None
        from ._memory import sites_report

        return LimitExceeded(self, name, used, limit, sites_report(self))

    # -- display ---------------------------------------------------------------------

    def __str__(self) -> str:
        b, o, c = self._counts()
        text = f"{o} objects allocated, {b} bytes, {c} calls"
        held = self._memory()
        if held is not None:
            text += f", {held[0]} bytes held (peak {held[1]})"
        if self.exceeded():
            text += " (exceeded)"
        return text

    def __repr__(self) -> str:
        parts = []
        for name, used, lim in zip(RESOURCES, self._counts(), self._limits, strict=False):
            parts.append(f"{name}={used}" + ("" if lim is None else f"/{lim}"))
        state = ("new", "active", "exited")[self._state]
        flags = " hard" if self._hard else ""
        return f"<gotcha_async.Context {' '.join(parts)} {state}{flags}>"


_meter.set_types(Usage, Memory)


def limit(
    *,
    bytes: Limit = None,
    objects: Limit = None,
    calls: Limit = None,
    memory: Limit = None,
    hard: bool = False,
    ceiling: float | None = None,
    shield: bool = False,
    track_memory: bool = False,
    exact_memory: bool = False,
) -> Context:
    """A scope that raises :class:`LimitExceeded` on exit if its own limit was exceeded.

    ``async with gotcha.limit(bytes=10 * gotcha.MiB) as ctx:`` (a plain ``with``
    works too). It is :func:`move_on_limit` plus a raise: the body is cancelled at its
    next checkpoint once a limit breaks (or, with ``hard=True``, the allocation is
    refused), and the exit raises even if no checkpoint came. The parent is the scope
    current when it is entered. See :class:`Context` for the parameters.
    """
    ctx: Context = _new_meter(Context)
    if shield is not False and type(shield) is not bool:
        check_bool("shield", shield)
    ctx._apply(_recipe(bytes, objects, calls, memory, hard, ceiling, track_memory, exact_memory),
               None, shield, True)
    return ctx


def move_on_limit(
    *,
    bytes: Limit = None,
    objects: Limit = None,
    calls: Limit = None,
    memory: Limit = None,
    hard: bool = False,
    ceiling: float | None = None,
    shield: bool = False,
    track_memory: bool = False,
    exact_memory: bool = False,
) -> Context:
    """A scope whose body is cancelled when a limit breaks, and which never raises for it.

    After the block, ``ctx.exceeded()`` tells whether it was cut short. See
    :class:`Context` for the parameters.
    """
    ctx: Context = _new_meter(Context)
    if shield is not False and type(shield) is not bool:
        check_bool("shield", shield)
    ctx._apply(_recipe(bytes, objects, calls, memory, hard, ceiling, track_memory, exact_memory),
               None, shield, False)
    return ctx


async def run(
    async_fn: Callable[..., Awaitable[T]],
    *args: Any,
    bytes: Limit = None,
    objects: Limit = None,
    calls: Limit = None,
    memory: Limit = None,
    hard: bool = False,
    ceiling: float | None = None,
) -> T:
    """Await ``async_fn(*args)`` inside :func:`limit`; return its result.

    The counterpart of Go gotcha's ``Trace``.

    :raises LimitExceeded: if the call exceeded one of the limits
    """
    with limit(
        bytes=bytes, objects=objects, calls=calls, memory=memory, hard=hard, ceiling=ceiling
    ):
        return await async_fn(*args)
    raise AssertionError("unreachable")  # pragma: no cover - limit() never swallows


def current() -> Context | None:
    """The innermost scope of the calling task (or thread) that has not exited, or ``None``.

    A task started inside a scope keeps it in its context after the scope exits; an
    exited scope is frozen, so its nearest live ancestor is the current one then.
    """
    scope = _scope_var.get(None)
    while scope is not None and scope._state == 2:
        scope = scope.parent
    return scope
