"""What this package relies on of other projects' private names, in one place.

Every private name of asyncio, anyio, trio, aiohttp and OpenTelemetry that the package
reads or writes is named here, and only here. Each one is checked once, at first use
(not at import), and has a fallback that still works, slower or through a public API;
where none is possible the feature degrades with one warning that says what is lost.
``tests/test_foreign.py`` forces every fallback and runs the feature end to end.

=============================================  ==========================================
what is relied on                              fallback
=============================================  ==========================================
asyncio ``events._get_running_loop``           ``asyncio.get_running_loop()``, its
(the running loop or None, in C; also the      RuntimeError caught (the same answer, one
C half's fast path calls it)                   exception per call outside a loop)
anyio's asyncio scope class, made directly     ``anyio.CancelScope()`` for every scope (the
with ``(deadline=, shield=)`` (learnt from     backend found through sniffio each time),
``type(anyio.CancelScope())``)                 and no fast path on asyncio
anyio's asyncio backend internals for lazy     every scope makes its cancel scope at
scopes (``_task_states``, ``TaskState``, the   entry (anyio before 4.16)
scopes' ``_host_task``, ``_parent_scope`` ...)
trio's ``_core._run.GLOBAL_RUN_CONTEXT``       plain scopes on trio take the Python path
(``task``, ``runner``), read by the C half     (``trio.lowlevel.in_trio_task``)
the loops' dispatch functions                  none: a warning; allocation sites of that
(``asyncio.events.Handle._run``,               loop's tasks may go on into the frames of
``asyncio.runners.Runner.run``,                whoever started the loop
``trio._core._run.unrolled_run``)
aiohttp ``BaseRequest._payload_writer``        the response's public ``write`` and
                                               ``write_eof`` wrapped at prepare (only for
                                               a middleware added with ``install()``)
aiohttp ``WebSocketResponse._post_start``      the response's public ``send_frame``,
                                               ``send_str`` and ``send_bytes`` wrapped
OpenTelemetry's placeholder provider's         ``metrics.get_meter_provider()`` asked
``_real_meter_provider``                       until an SDK is set
=============================================  ==========================================

Each name is a constant below, so that a test can point it at a name that does not
exist and :func:`reset` the answers: that is exactly what a release that dropped it
would look like to this module (taking the name away from the library itself would
break the library, whose own code uses it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: (module, attribute) of asyncio's "running loop or None" (C, in _asyncio).
ASYNCIO_RUNNING_LOOP = ("asyncio.events", "_get_running_loop")
#: What a backend cancel-scope class must take to be made directly.
SCOPE_CLASS_PARAMS = ("deadline", "shield")
#: What a lazy scope needs of anyio's asyncio backend module...
LAZY_BACKEND_NEEDS = ("_task_states", "TaskState")
#: ... and of its cancel scopes: the fields the splice reads and writes.
LAZY_SCOPE_NEEDS = ("_host_task", "_parent_scope", "_child_scopes", "_tasks", "_active",
                    "_cancelling_at_enter")
#: (module, attribute) of trio's run context (a thread-local: ``task`` while a task
#: runs, ``runner`` while trio runs), which the C half reads for plain trio scopes.
TRIO_RUN_CONTEXT = ("trio._core._run", "GLOBAL_RUN_CONTEXT")
#: Where the loops run a task's step: (module, qualified name of the function).
DISPATCH = (
    ("asyncio.events", "Handle._run"),      # task steps and callbacks
    ("asyncio.runners", "Runner.run"),      # under uvloop, whose loop is C
    ("trio._core._run", "unrolled_run"),
)
#: aiohttp: the request's payload writer, which every write of its response goes through.
AIOHTTP_PAYLOAD_WRITER = "_payload_writer"
#: aiohttp: the WebSocketResponse method that hands the frame writer over, after prepare.
AIOHTTP_POST_START = "_post_start"
#: OpenTelemetry API: its placeholder provider's reference to the SDK once one is set.
OTEL_REAL_PROVIDER = "_real_meter_provider"

# answers, by question; reset() forgets them
_found: dict[Any, Any] = {}
_warned: set[str] = set()


def reset() -> None:
    """Forget every answer, so that the next use checks again (for tests)."""
    _found.clear()
    _warned.clear()


def degraded(key: str, message: str) -> None:
    """Say once per process (per ``key``) what is lost where a private name is missing."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"gotcha-async: {message}", RuntimeWarning, stacklevel=3)


def find_spec(name: str) -> Any:
    """A top-level package's spec, without importing it; None where the import system
    cannot answer: a package that is not there, or a process shutting down
    (sys.meta_path is None; modules already imported are still answered from
    sys.modules)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError, TypeError):
        return None


def _lookup(module: str, qualname: str) -> Any:
    """module.qualname if the module is imported and has it, else None."""
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


# -- asyncio ---------------------------------------------------------------------------


def running_loop_public() -> asyncio.AbstractEventLoop | None:
    """The running loop or None, through the public API (the fallback)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def running_loop() -> Callable[[], asyncio.AbstractEventLoop | None]:
    """A function returning the running asyncio loop or None, as cheap as there is.

    asyncio's own ``_get_running_loop`` (the same object every time: the C half is
    handed it for its fast path), or :func:`running_loop_public`.
    """
    fn = _found.get("running_loop")
    if fn is None:
        fn = _lookup(*ASYNCIO_RUNNING_LOOP)
        if not callable(fn):
            fn = running_loop_public
        _found["running_loop"] = fn
    return fn


# -- anyio -----------------------------------------------------------------------------


def _takes(cls: type, names: tuple[str, ...]) -> bool:
    """Can cls be called with no argument, and with these keywords?"""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
           for p in params.values()):
        return False
    kinds = {p.kind for p in params.values()}
    return inspect.Parameter.VAR_KEYWORD in kinds or all(n in params for n in names)


def learn_scope_class(backend: str, cls: type) -> None:
    """Note the class of a scope ``anyio.CancelScope()`` made on ``backend``.

    It is made directly from then on (anyio finds the backend through sniffio on every
    call, most of a scope's cost) if it takes ``deadline`` and ``shield`` and nothing
    it needs; otherwise every scope is made through ``anyio.CancelScope()``.
    """
    key = ("scope_class", backend)
    if key not in _found:
        _found[key] = cls if _takes(cls, SCOPE_CLASS_PARAMS) else None


def scope_class(backend: str) -> Any:
    """The backend's cancel-scope class to make directly, or None (not known yet, or
    not usable: make scopes with ``anyio.CancelScope()``)."""
    return _found.get(("scope_class", backend))


def lazy_possible(cls: type) -> bool:
    """Does anyio's asyncio backend (its CancelScope, cls) have what a lazy scope needs?

    Its task states (a ``WeakKeyDictionary``, whose ``data`` dict the C half reads),
    ``TaskState(parent_id, cancel_scope)``, and the scopes' private fields that the
    splice reads and writes (anyio 4.16 and later have them); without them every
    scope takes the full path. ``GOTCHA_EAGER_SCOPES=1`` says no, to compare.
    """
    key = ("lazy", cls)
    found = _found.get(key)
    if found is None:
        backend = sys.modules.get(cls.__module__)
        states = getattr(backend, LAZY_BACKEND_NEEDS[0], None)
        task_state = getattr(backend, LAZY_BACKEND_NEEDS[1], None)
        try:
            state_params = inspect.signature(task_state).parameters if task_state else {}
            probe = cls()
        except Exception:
            state_params, probe = {}, None
        found = _found[key] = bool(
            not os.environ.get("GOTCHA_EAGER_SCOPES")
            and isinstance(getattr(states, "data", None), dict)
            and list(state_params)[:2] == ["parent_id", "cancel_scope"]
            and probe is not None
            and all(hasattr(probe, name) for name in LAZY_SCOPE_NEEDS)
        )
    return found


def current_task_source() -> Any:
    """What the C half asks for a loop's current task on a lazy scope's entry.

    ``asyncio.current_task`` itself, except where it is the pure-Python function of
    3.11, ``_current_tasks.get(loop)``: then that dict (the C tasks' own, which
    ``_asyncio`` keeps current), read without a frame at every entry.
    """
    fn = asyncio.current_task
    tasks: Any = asyncio.tasks
    current = getattr(tasks, "_current_tasks", None)
    code = getattr(fn, "__code__", None)
    if (
        type(current) is dict
        and code is not None
        and getattr(fn, "__globals__", None) is vars(tasks)
        and code.co_name == "current_task"
        and "_current_tasks" in code.co_names
    ):
        return current
    return fn


def task_states(cls: type) -> dict[Any, Any]:
    """The dict under anyio's task states (weak references to tasks -> TaskState),
    which the C half reads on entry; only once :func:`lazy_possible` said yes."""
    backend = sys.modules[cls.__module__]
    return getattr(backend, LAZY_BACKEND_NEEDS[0]).data  # type: ignore[no-any-return]


def splice(cls: type, host: asyncio.Task[Any], outer: Any, cancelling0: int,
           ancestors: list[Any]) -> Any:
    """An entered anyio cancel scope for a lazy scope of host, where anyio would have put it.

    The lazy scope was entered while ``outer`` was the innermost anyio scope of its
    task (None: none). The anyio scopes the task entered since are inside it: the
    new scope goes between them and ``outer``, in the task's chain and in the
    parent/child links anyio delivers cancellation through. ``ancestors`` are the
    cancel scopes of enclosing Contexts made real since (each one's place is below
    them too). anyio's own ``__enter__`` cannot do this: it runs in the task, and
    only on top of its chain. Only once :func:`lazy_possible` said yes for cls.
    """
    backend: Any = sys.modules[cls.__module__]
    scope = cls()
    scope._host_task = host
    scope._active = True
    scope._cancelling_at_enter = cancelling0
    state = backend._task_states.get(host)
    top = state.cancel_scope if state is not None else None
    # inner: the outermost anyio scope entered inside; parent: where the walk stopped
    inner, parent = None, top
    while parent is not None and parent is not outer and parent not in ancestors:
        inner, parent = parent, parent._parent_scope
    if parent is None and outer is not None:
        inner, parent = None, top  # a chain anyio rearranged (TaskGroup.start): innermost
    scope._parent_scope = parent
    if inner is None:
        scope._tasks.add(host)
        if parent is not None:
            parent._tasks.discard(host)
            parent._child_scopes.add(scope)
        if state is None:
            backend._task_states[host] = backend.TaskState(None, scope)
        else:
            state.cancel_scope = scope
    else:
        inner._parent_scope = scope
        scope._child_scopes.add(inner)
        if parent is not None:
            parent._child_scopes.discard(inner)
            parent._child_scopes.add(scope)
    return scope


# -- trio ------------------------------------------------------------------------------


def trio_run_context() -> Any:
    """trio's run context for the C half, or None (plain trio scopes take the Python
    path). Asked from inside a trio task, where ``task`` and ``runner`` are set."""
    if "trio_run" not in _found:
        context = _lookup(*TRIO_RUN_CONTEXT)
        ok = context is not None and hasattr(context, "runner") and hasattr(context, "task")
        _found["trio_run"] = context if ok else None
        # trio is imported now: check the dispatch function install() was given by
        # file name (trio need not have been imported then)
        module, qualname = DISPATCH[2]
        if _code_of(module, qualname) is None:
            _warn_dispatch(module, qualname)
    return _found["trio_run"]


# -- the loops' dispatch frames --------------------------------------------------------


def _code_of(module: str, qualname: str) -> Any:
    code = getattr(_lookup(module, qualname), "__code__", None)
    return code if inspect.iscode(code) else None


def _warn_dispatch(module: str, qualname: str) -> None:
    degraded(
        f"dispatch:{module}", f"{module}.{qualname} was not found: allocation sites "
        f"recorded in {module.split('.')[0]} tasks may go on into the frames of the code "
        "that started the loop",
    )


def dispatch_frames() -> tuple[tuple[str, str], ...]:
    """The functions from which the event loops run a task's step, as (file, name).

    Every frame older than one of these belongs to whoever started the loop (a
    ``main()``, pytest's runner), never to the task: an allocation site's walk of the
    stack stops there. uvloop runs the step from C, whose caller is asyncio's runner.
    Read from the functions themselves where their module is imported (asyncio is);
    a loop that is not imported yet (trio) is found by its file, without importing it.
    """
    found = _found.get("dispatch")
    if found is not None:
        return found  # type: ignore[no-any-return]
    places: list[tuple[str, str]] = []
    for module, qualname in DISPATCH:
        code = _code_of(module, qualname)
        if code is not None:
            places.append((code.co_filename, code.co_name))
            continue
        package, *rest = module.split(".")
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue  # not installed: nothing to find
        name = qualname.rsplit(".", 1)[-1]
        files = [os.path.join(p, *rest) + ".py" for p in spec.submodule_search_locations]
        files = [f for f in files if os.path.isfile(f)]
        if module in sys.modules or not files:
            _warn_dispatch(module, qualname)
            continue
        places.extend((f, name) for f in files)
    found = _found["dispatch"] = tuple(places)
    return found


# -- aiohttp ---------------------------------------------------------------------------


def wrap_payload_writer(request: Any, wrap: Callable[[Any], Any]) -> bool:
    """Put ``wrap(writer)`` in place of the request's payload writer; False where
    aiohttp has none by that name (checked on the first request): the caller then
    guards the response's public methods instead."""
    ok = _found.get("aiohttp_writer")
    if ok is None:
        ok = _found["aiohttp_writer"] = hasattr(request, AIOHTTP_PAYLOAD_WRITER)
    if not ok:
        return False
    writer = getattr(request, AIOHTTP_PAYLOAD_WRITER)
    if writer is None:
        return False
    setattr(request, AIOHTTP_PAYLOAD_WRITER, wrap(writer))
    return True


def wrap_ws_writer(response: Any, wrap: Callable[[Any], Any]) -> bool:
    """Have a WebSocketResponse hand ``wrap(writer)`` to itself instead of its frame
    writer (an instance attribute, for this one response); False where its
    ``_post_start(request, protocol, writer)`` is not there (checked once): the caller
    then guards the response's public send methods instead."""
    ok = _found.get("aiohttp_post_start")
    if ok is None:
        method = getattr(type(response), AIOHTTP_POST_START, None)
        try:
            params = list(inspect.signature(method).parameters) if callable(method) else []
        except (TypeError, ValueError):
            params = []
        ok = _found["aiohttp_post_start"] = params == ["self", "request", "protocol", "writer"]
    if not ok:
        return False
    post_start = getattr(response, AIOHTTP_POST_START)

    def guarded_post_start(request: Any, protocol: Any, writer: Any) -> None:
        post_start(request, protocol, wrap(writer))

    setattr(response, AIOHTTP_POST_START, guarded_post_start)
    return True


# -- OpenTelemetry ---------------------------------------------------------------------


def otel_sdk_is_set(placeholder: Any) -> Callable[[], bool]:
    """A function telling whether an SDK provider has been set since ``placeholder``
    (the API's global provider while none is) was read.

    The placeholder learns of the SDK when it is set (the API's own way of handing its
    instruments over): asking it costs an attribute read; otherwise
    ``metrics.get_meter_provider()`` is asked, which reads the environment.
    """
    if hasattr(placeholder, OTEL_REAL_PROVIDER):
        return lambda: getattr(placeholder, OTEL_REAL_PROVIDER) is not None
    from opentelemetry import metrics

    return lambda: metrics.get_meter_provider() is not placeholder
