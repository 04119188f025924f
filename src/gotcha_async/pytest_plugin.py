"""pytest plugin: allocation budgets for tests (``@pytest.mark.gotcha``).

Registered through the ``pytest11`` entry point ``gotcha``, so it is active wherever
gotcha-async is installed. It offers:

- the marker ``@pytest.mark.gotcha(bytes=..., objects=..., calls=..., memory=...,
  hard=False, leaks=...)``: the test fails if its body goes over the budget, or is
  reported at teardown if it still holds more than ``leaks`` once it has ended;
- a session-wide default budget, ``--gotcha-bytes``, ``--gotcha-objects``,
  ``--gotcha-calls``, ``--gotcha-memory``, ``--gotcha-leaks``, ``--gotcha-hard`` (ini
  ``gotcha_bytes`` and so on), which a test's marker overrides key by key;
- the flag ``--gotcha-report`` (ini ``gotcha_report = true``): a table of what every
  test's body allocated, biggest first, at the end of the session, and
  ``--gotcha-top=N`` (ini ``gotcha_top``) for the N biggest; both with the lines that
  allocated what the biggest bodies held as they returned;
- ``--gotcha-json=PATH`` (ini ``gotcha_json``): the same figures, with each test's
  budget, outcome and sites, as a JSON file for CI dashboards;
- the fixture ``gotcha_context``: the :class:`~gotcha_async.Context` measuring the
  running test's body.

Under pytest-xdist the workers measure and the controller reports: the figures travel
on each call report (``gotcha_usage``, a dict of JSON types). With subtests there is
one row per test, and pytest's reporting of each subtest, done from inside the body,
runs outside the body's scope.

What is measured is the test function's body only: the scope is entered when the test
function is called and left when it returns, so fixture setup and teardown are not
charged. For a coroutine test (pytest-asyncio, anyio on asyncio or trio) the scope is
entered *inside* the coroutine, in the task that runs it: a scope entered around the
call from outside would not be seen there, since the task's contextvars were copied
before.

This module imports nothing from gotcha_async when it is loaded (pytest loads it in
every session of an environment where gotcha-async is installed): the scope machinery
is imported on first need only, for a marked test, a default budget, the report, the
JSON file or the fixture. A session that uses none of them never imports the engine.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import inspect
import json
import os
import sys
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gotcha_async import Context

__all__ = ["gotcha_context"]

MARKER = "gotcha"
# _units.RESOURCES and _units.UNITS, which this module cannot import at load (a test
# keeps them the same)
_LIMIT_ARGS = ("bytes", "objects", "calls", "memory")
_UNITS = {"bytes": "bytes", "objects": "objects", "calls": "allocator calls",
          "memory": "bytes of memory held"}
_MARKER_ARGS = (*_LIMIT_ARGS, "hard", "leaks")
_SECTION = "gotcha"
# sites shown per test, in a failure and in the report
SITES_SHOWN = 5
# tests whose sites --gotcha-report prints when --gotcha-top does not say
REPORT_SITES_TESTS = 5

# the validated marker arguments of an item (limits as ints), set at collection
_BUDGET = pytest.StashKey[dict[str, Any]]()
# the one run of the item's body being measured, from setup to the end of teardown
_BODY = pytest.StashKey["_Body"]()
# the budget failure this plugin raised for the item's call phase, if any
_FAILED_BUDGET = pytest.StashKey[str]()
# the --gotcha-report table, when the report is on
_REPORT = pytest.StashKey["_Report"]()
# the --gotcha-json file, when asked for
_JSON = pytest.StashKey["_JsonReport"]()
# the session-wide default budget (limits as ints, hard, leaks), when one is given
_DEFAULTS = pytest.StashKey[dict[str, Any]]()
# set when every test body is measured (the report, the JSON file): on pytest-xdist's
# workers too, which measure and send the figures to the controller on their reports
_MEASURE = pytest.StashKey[bool]()
# the bytes the body still held after the teardown, when leaks were checked
_LEAKED = pytest.StashKey[int]()
# set when this session wrapped pytest's subtest methods (see _wrap_subtests)
_WRAPPED_KEY = pytest.StashKey[bool]()

# the body being run by the current task or thread, so that pytest's own work done
# from inside it (subtests' reports) can be taken out of its scope
_IN_BODY: contextvars.ContextVar[_Body | None] = contextvars.ContextVar(
    "gotcha_in_body", default=None
)

# the attribute carrying a call report's usage; a plain dict of JSON types, so that
# pytest-xdist serialises it from the workers to the controller like any other field
REPORT_ATTR = "gotcha_usage"
# the attribute carrying, on a teardown report, the bytes found leaked (an int)
LEAKED_ATTR = "gotcha_leaked"


# -- options and marker ------------------------------------------------------------------


def _option(
    group: pytest.OptionGroup,
    parser: pytest.Parser,
    name: str,
    help: str,
    ini_help: str,
    metavar: str | None = None,
) -> None:
    """--gotcha-NAME and its ini twin gotcha_NAME: a flag without a metavar, else a value."""
    dest = f"gotcha_{name.replace('-', '_')}"
    if metavar is None:
        group.addoption(f"--gotcha-{name}", action="store_true", default=None,
                        help=f"{help} (ini: {dest})")
        parser.addini(dest, type="bool", default=False, help=f"as --gotcha-{name}: {ini_help}")
    else:
        group.addoption(f"--gotcha-{name}", dest=dest, metavar=metavar, default=None,
                        help=f"{help} (ini: {dest})")
        parser.addini(dest, default="", help=f"as --gotcha-{name}: {ini_help}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gotcha", "allocation budgets (gotcha-async)")
    for name, what, example in (
        ("bytes", "bytes allocated", "'64 MiB' or '1.5GB'"),
        ("objects", "object allocations", "'100k' or 250000"),
        ("calls", "allocator calls", "'100k' or 250000"),
        ("memory", "peak memory held", "'64 MiB' or '1.5GB'"),
    ):
        _option(group, parser, name,
                f"default limit on the {what} of every test's body, e.g. {example}; "
                "@pytest.mark.gotcha overrides it per test",
                f"default limit on each test body's {what}", metavar="LIMIT")
    _option(group, parser, "hard", "make the default limits hard", "the default limits are hard")
    _option(group, parser, "leaks",
            "fail a test whose body still holds more than LIMIT of what it allocated once "
            "it has returned, e.g. '1 KiB'; @pytest.mark.gotcha(leaks=...) overrides it",
            "default limit on the memory a test body leaks", metavar="LIMIT")
    _option(group, parser, "report",
            "measure every test's body and print a table of the bytes, objects and "
            "allocator calls each one used, biggest first",
            "per-test allocation table at the end of the session")
    _option(group, parser, "top",
            "print the report for the N biggest test bodies only, each with the lines that "
            "allocated the memory it held, e.g. 10; implies --gotcha-report",
            "the report lists the N biggest test bodies", metavar="N")
    _option(group, parser, "json",
            "measure every test's body and write what each used, its budget and outcome "
            "to PATH as JSON, e.g. reports/gotcha.json",
            "the path of the JSON usage report", metavar="PATH")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gotcha(bytes=None, objects=None, calls=None, memory=None, hard=False, "
        "leaks=None): fail the test if its body allocates more than this (the arguments "
        "of gotcha_async.limit) or still holds more than leaks once it returned; "
        "fixtures are not charged",
    )
    defaults = _session_defaults(config)
    if defaults is not None:
        config.stash[_DEFAULTS] = defaults
    top = _top(config)
    report = _report_enabled(config) or top is not None
    path = _json_path(config)
    if report or path is not None:
        config.stash[_MEASURE] = True
    if defaults is not None or config.stash.get(_MEASURE, False):
        _wrap_subtests()
        config.stash[_WRAPPED_KEY] = True
    if hasattr(config, "workerinput"):
        # a pytest-xdist worker: it measures, and its reports carry the figures to the
        # controller, which prints the table and writes the file
        return
    if report:
        table = _Report(config, top)
        config.stash[_REPORT] = table
        config.pluginmanager.register(table, "gotcha-report")
    if path is not None:
        json_report = _JsonReport(path)
        config.stash[_JSON] = json_report
        config.pluginmanager.register(json_report, "gotcha-json")


def _setting(config: pytest.Config, name: str) -> tuple[str, Any]:
    """(how to name it in an error, value): the command line wins over the ini file."""
    value = config.getoption(f"gotcha_{name}", None)
    if value is not None:
        return f"--gotcha-{name}", value
    return f"ini option gotcha_{name}", config.getini(f"gotcha_{name}")


def _session_defaults(config: pytest.Config) -> dict[str, Any] | None:
    """The session's default budget, validated; None when none is given."""
    given: dict[str, Any] = {}
    for name in (*_LIMIT_ARGS, "leaks"):
        where, value = _setting(config, name)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        # _units only: sizes are parsed without the allocator hook being loaded
        from gotcha_async._units import check_limit

        try:
            given[name] = check_limit(where, value.strip())
        except ValueError as exc:
            raise pytest.UsageError(f"gotcha: {exc}") from None
    if not given:
        return None
    hard = config.getoption("gotcha_hard", None)
    given["hard"] = bool(hard if hard is not None else config.getini("gotcha_hard"))
    return given


def _top(config: pytest.Config) -> int | None:
    """--gotcha-top (or its ini twin) as a number of tests; None when not given."""
    where, value = _setting(config, "top")
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    if not text.isdecimal() or int(text) < 1:
        raise pytest.UsageError(
            f"gotcha: {where}: expected a number of tests >= 1, got {value!r}"
        )
    return int(text)


def _json_path(config: pytest.Config) -> str | None:
    path = config.getoption("gotcha_json", None) or config.getini("gotcha_json")
    if not path:
        return None
    return os.path.abspath(os.path.expanduser(str(path)))


def _report_enabled(config: pytest.Config) -> bool:
    # the flag wins when given; otherwise the ini value
    flag = config.getoption("gotcha_report", None)
    if flag is not None:
        return bool(flag)
    return bool(config.getini("gotcha_report"))


def _measures_everything(config: pytest.Config) -> bool:
    return config.stash.get(_MEASURE, False)


def _budget_from_marker(mark: pytest.Mark) -> dict[str, Any]:
    """Validate the arguments of a ``gotcha`` marker; return them normalised.

    :raises ValueError: naming the bad argument (the caller turns it into a usage error)
    """
    if mark.args:
        raise ValueError(
            "takes keyword arguments only (bytes=, objects=, calls=, memory=, hard=, "
            f"leaks=), got positional {', '.join(repr(a) for a in mark.args)}"
        )
    unknown = [name for name in mark.kwargs if name not in _MARKER_ARGS]
    if unknown:
        raise ValueError(
            f"unknown argument {unknown[0]!r} "
            "(expected bytes, objects, calls, memory, hard, leaks)"
        )
    # the scopes' own validators, with their messages, which name the parameter
    from gotcha_async._units import check_limit, check_limit_args

    budget = dict(mark.kwargs)
    leaks = budget.pop("leaks", _UNSET)
    try:
        # only what the marker gives: the rest comes from the session's defaults
        budget = check_limit_args(budget)
        if leaks is not _UNSET:
            budget["leaks"] = check_limit("leaks", leaks)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return budget


_UNSET = object()


def _effective_budget(
    defaults: dict[str, Any] | None, marked: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The session's defaults overridden key by key by the marker; None if no limit."""
    budget: dict[str, Any] = dict.fromkeys(_LIMIT_ARGS)
    budget["hard"] = False
    budget["leaks"] = None
    if defaults is not None:
        budget.update(defaults)
    if marked is not None:
        budget.update(marked)
    if all(budget[name] is None for name in (*_LIMIT_ARGS, "leaks")):
        return None
    return budget


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    # Checked at collection, like --strict-markers checks marker names: a typo in a
    # budget is a mistake in the test suite, reported before anything runs.
    defaults = config.stash.get(_DEFAULTS, None)
    errors = []
    for item in items:
        mark = item.get_closest_marker(MARKER)
        if mark is None and defaults is None:
            continue
        try:
            marked = _budget_from_marker(mark) if mark is not None else None
        except ValueError as exc:
            errors.append(f"{item.nodeid}: bad @pytest.mark.gotcha arguments: {exc}")
            continue
        if mark is None and not isinstance(item, pytest.Function):
            continue  # a doctest or another plugin's item: nothing to measure
        budget = _effective_budget(defaults, marked)
        if budget is not None:
            item.stash[_BUDGET] = budget
    if errors:
        raise pytest.UsageError(*errors)


# -- measuring the body ------------------------------------------------------------------


class _Outside:
    """``with outside:`` runs pytest's own work, done from inside a test body, outside
    the body's scope (its charges go to a sink nobody reads).

    Entering a scope charges its own bookkeeping to the scope around it, until the
    scope variable is switched; so the next scope is made while inside the current
    one, and entering one costs the body some 2 KiB (measured: 2.3 KiB, 21 objects),
    against the 10 KiB and more of a subtest's report.
    """

    def __init__(self) -> None:
        from gotcha_async import Context

        self._sink = Context()
        self._next = Context(parent=self._sink)
        self._entered: list[Context] = []

    def __enter__(self) -> None:
        from gotcha_async import Context

        child = self._next
        child.__enter__()
        self._entered.append(child)
        self._next = Context(parent=self._sink)

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._entered.pop().__exit__(*exc))


class _Body:
    """One run of a test's body: its scope, and what was seen as the body returned."""

    def __init__(self, ctx: Context, sites: bool, leaks: int | None) -> None:
        self.ctx = ctx
        self.want_sites = sites
        self.leaks = leaks
        self.entered = False
        self.finished = False
        # where the memory the body held as it returned was allocated (site rows)
        self.sites: list[dict[str, Any]] = []
        # (bytes, site rows) still held once the body's frame was cleared, if checked
        self.leaked: tuple[int, list[dict[str, Any]]] | None = None
        self.outside = _Outside()
        # an empty contextvars context, made here (outside the scope): what runs in it
        # sees no scope, and costs the body nothing
        self._nowhere = contextvars.Context()
        self.ok = False
        # the modules imported before the body: what a first import keeps is the
        # module's for the process's life, not a leak of the test's
        self.modules: frozenset[str] = frozenset(sys.modules) if leaks is not None \
            else frozenset()

    def returned(self, frame: Any, ok: bool) -> None:
        """Called inside the scope as the body's function has returned (or raised),
        with the function's frame, whose locals are still alive, or None."""
        ctx = self.ctx
        if self.want_sites:
            # read with no scope current: entering one would charge the body 2 KiB
            self.sites = self._nowhere.run(_site_rows, ctx)
        if not ok:
            return  # the traceback keeps the frame, and pytest shows its locals
        self.ok = True
        if frame is not None:
            # in the scope: finalizers of the body's objects are the body's work
            frame.clear()

    def check_leaks(self) -> None:
        """What the body still holds once the test has ended: after its teardown, when
        pytest has let go of what it kept of the call (captured output, log records and
        their arguments) and fixtures of what the body gave them. The scope has exited,
        but frees are still credited to it."""
        if self.leaks is None or not self.ok:
            return
        imported = {getattr(sys.modules.get(name), "__file__", None)
                    for name in sys.modules.keys() - self.modules}
        imported.discard(None)
        self.leaked = _leaked(self.ctx, imported)  # type: ignore[arg-type]
        if self.leaked[0] > self.leaks:
            # Cycles the body made are not leaks, only not collected yet. A full
            # collection takes 40 ms in a suite of 400 tests: only when it may matter.
            gc.collect()
            self.leaked = _leaked(self.ctx, imported)  # type: ignore[arg-type]


def _new_body(item: pytest.Item, budget: dict[str, Any] | None) -> _Body:
    from gotcha_async import Context

    limits = {name: budget[name] for name in _LIMIT_ARGS} if budget is not None else {}
    leaks = budget["leaks"] if budget is not None else None
    # Sites come from the scope's own table of held blocks: a scope records them only
    # if it tracks held memory, sampled (about 12% more time on a small body) unless
    # leaks are checked, which need every block (about twice a plain scope's cost).
    sites = budget is not None or _measures_everything(item.config)
    ctx = Context(**limits, hard=budget["hard"] if budget is not None else False,
                  track_memory=sites or leaks is not None,
                  exact_memory=leaks is not None)
    return _Body(ctx, sites, leaks)


def _forget_run(item: pytest.Item) -> None:
    """Drop what one run of the test left in its stash."""
    for key in (_BODY, _FAILED_BUDGET):
        if key in item.stash:  # type: ignore[misc]  # keys of different value types
            del item.stash[key]  # type: ignore[misc]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture is set up, so that gotcha_context finds the Context. A fresh
    # one per run: a Context can be entered once, and rerun plugins run setup again.
    _forget_run(item)
    if _LEAKED in item.stash:
        del item.stash[_LEAKED]
    if not isinstance(item, pytest.Function):
        return  # a doctest, a YAML item...: no test function to measure
    budget = item.stash.get(_BUDGET, None)
    if budget is not None or _measures_everything(item.config):
        item.stash[_BODY] = _new_body(item, budget)


@pytest.fixture
def gotcha_context(request: pytest.FixtureRequest) -> Context:
    """The :class:`gotcha_async.Context` that measures this test's body.

    It is entered when the test function is called and left when it returns: it
    charges everything the body allocates, in the test's own task or thread, in tasks
    it starts and in worker threads they use. Fixture setup and teardown are not
    charged (they run outside the body), nor is pytest's own work.

    During the body ``gotcha_context.used()`` is the running total and
    ``gotcha.current() is gotcha_context`` (until the body enters a scope of its own);
    in the teardown of a fixture that requests it, ``used()`` is the final total.

    For a ``@pytest.mark.gotcha`` test it carries the marker's limits; otherwise it has
    no limits and only measures (requesting it is enough to have the body measured).
    """
    item = request.node
    body: _Body | None = item.stash.get(_BODY, None)
    if body is None:
        body = item.stash[_BODY] = _new_body(item, None)
    return body.ctx


class _FrameGrab:
    """The frame of the test function, caught by one profile event as it starts.

    Holding its frame object makes CPython hand the frame's locals over to it when the
    function returns, instead of freeing them: what the body still held as it
    returned, its locals included, can then be read before they go. The profile
    function is removed at the test's first event (entering the scope, in between,
    makes a few calls); nothing is done when a profiler is already set.
    """

    __slots__ = ("code", "frame", "hook")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        self.frame: Any = None
        # the bound method made once, outside the scope, and compared by identity
        self.hook = self._event

    def start(self) -> None:
        if self.code is not None and sys.getprofile() is None:
            sys.setprofile(self.hook)

    def _event(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is self.code:
            self.frame = frame
            sys.setprofile(None)

    def stop(self) -> Any:
        if sys.getprofile() is self.hook:
            sys.setprofile(None)  # the test's code never ran
        return self.frame


def _measured(fn: Callable[..., Any], body: _Body) -> Callable[..., Any]:
    """fn, running inside the body's scope.

    ``functools.wraps`` keeps the name, the signature and the attributes that other
    plugins look at (pytest-asyncio and anyio check for a coroutine function, so the
    wrapper of a coroutine function is one too).
    """
    ctx = body.ctx
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def measured_async(*args: Any, **kwargs: Any) -> Any:
            body.entered = True
            token = _IN_BODY.set(body)
            try:
                # entered in the task that runs the test: that task's contextvars are
                # where the allocator hook looks for the scope
                with ctx:
                    coro = fn(*args, **kwargs)
                    frame = getattr(coro, "cr_frame", None)  # see _FrameGrab
                    try:
                        result = await coro
                    except BaseException:
                        body.returned(frame, ok=False)
                        raise
                    body.returned(frame, ok=True)
                    return result
            finally:
                body.finished = True
                _IN_BODY.reset(token)

        return measured_async

    @functools.wraps(fn)
    def measured(*args: Any, **kwargs: Any) -> Any:
        body.entered = True
        token = _IN_BODY.set(body)
        grab = _FrameGrab(fn)
        try:
            grab.start()
            with ctx:
                try:
                    result = fn(*args, **kwargs)
                except BaseException:
                    body.returned(grab.stop(), ok=False)
                    raise
                body.returned(grab.stop(), ok=True)
                return result
        finally:
            grab.stop()
            body.finished = True
            _IN_BODY.reset(token)

    return measured


def _measured_example(fn: Callable[..., Any], ctx: Context) -> Callable[..., Any]:
    """The coroutine function fn, each call inside a new scope whose parent is ctx.

    A Context can be entered only once, and a Hypothesis test calls its inner test
    once per example.
    """
    from gotcha_async import Context

    @functools.wraps(fn)
    async def measured_example(*args: Any, **kwargs: Any) -> Any:
        with Context(parent=ctx):
            return await fn(*args, **kwargs)

    return measured_example


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    body = item.stash.get(_BODY, None)
    if body is None or not isinstance(item, pytest.Function):
        return (yield)
    ctx = body.ctx
    # Swapped here rather than in pytest_pyfunc_call: pytest-asyncio wraps item.obj
    # in its event-loop runner in runtest(), before pytest_pyfunc_call runs.
    original = item.obj
    item.obj = _measured(original, body)
    # A Hypothesis test is a sync function that runs its async inner test once per
    # example, in a task pytest-asyncio set up before the body was entered: each
    # example then gets a scope of its own, charging the test's.
    given = getattr(original, "hypothesis", None)
    inner = getattr(given, "inner_test", None)
    if inner is not None and inspect.iscoroutinefunction(inner):
        given.inner_test = _measured_example(inner, ctx)  # type: ignore[union-attr]
    try:
        result = yield
    finally:
        item.obj = original
        if inner is not None and inspect.iscoroutinefunction(inner):
            # anyio leaves its own wrapper in place: put the test back as it was
            given.inner_test = inner  # type: ignore[union-attr]
    # Only a body that finished normally is failed for its budget: its own failure,
    # skip or xfail is the better report (the budget then gets a report section).
    # Raising Failed, rather than rewriting the report afterwards, keeps xfail working.
    budget = item.stash.get(_BUDGET, None)
    if budget is None:
        return result
    if not body.entered:
        if item.get_closest_marker(MARKER) is None:
            return result  # only the session's default: not worth a warning per test
        # e.g. an async unittest method, which unittest calls itself: rather than a
        # budget that silently never applies, say so
        item.warn(
            pytest.PytestWarning(
                "@pytest.mark.gotcha: the body of this test was not run through "
                "pytest's test function, so it was not measured"
            )
        )
        return result
    reason = _over_budget(ctx, budget)
    if reason is not None:
        item.stash[_FAILED_BUDGET] = reason
        pytest.fail(reason, pytrace=False)
    return result


def _over_budget(ctx: Context, budget: dict[str, Any]) -> str | None:
    """The one-line reason why ctx broke its budget, or None if it did not."""
    broken = ctx._broken()
    if broken is None:
        return None
    index, reached = broken
    resource = _LIMIT_ARGS[index]
    limit = budget[resource]
    if resource == "memory":
        held = ctx.memory()
        actual = held.peak if held is not None else reached
    else:
        actual = ctx.used()[index]
    hard = " (hard)" if budget["hard"] else ""
    limited = f"Test was limited to {limit:,} {_UNITS[resource]}{hard}"
    if reached > actual:
        # a hard limit refused the allocation: it never happened, so say what it asked
        counted = "bytes" if resource == "memory" else resource
        return (
            f"{limited} but an allocation that would have reached {reached:,} {counted} "
            "was refused"
        )
    if resource == "memory":
        return f"{limited} but held {reached:,} bytes at peak"
    if resource == "calls":
        return f"{limited} but made {reached:,} calls"
    return f"{limited} but allocated {reached:,} {resource}"


def _leak_reason(body: _Body) -> str | None:
    if body.leaked is None or body.leaks is None or body.leaked[0] <= body.leaks:
        return None
    return (
        f"Test was limited to {body.leaks:,} bytes of leaks but still held "
        f"{body.leaked[0]:,} bytes its body allocated once it had ended"
    )


# -- where the bytes went --------------------------------------------------------------------


def _package_dirs(*names: str) -> tuple[str, ...]:
    dirs = []
    for name in names:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.append(os.path.dirname(path) + os.sep)
    return tuple(dirs)


def _site_rows(ctx: Context) -> list[dict[str, Any]]:
    """Where the memory ctx holds was allocated, biggest first: file, line, bytes,
    blocks (sampled: sizes are estimates)."""
    rows = []
    for stat in ctx.allocation_sites(SITES_SHOWN):
        frame = stat.traceback[0]
        rows.append({"file": frame.filename, "line": frame.lineno, "bytes": stat.size,
                     "blocks": stat.count})
    return rows


def _leaked(ctx: Context, imported: set[str]) -> tuple[int, list[dict[str, Any]]]:
    """What ctx still holds that counts as a leak, and where it was allocated.

    Left out: blocks allocated by pytest or pluggy on the body's behalf (captured
    warnings and log records are held by pytest until the test's teardown), by the
    ``logging`` and ``warnings`` modules for the same reason, by the top level of
    modules the body imported first (``imported``: a module is kept for the process's
    life) and by this package.
    """
    # the innermost frame only: the body's own frames are called from pytest's
    others = (
        *_package_dirs("_pytest", "pluggy", "pytest", "logging", "gotcha_async"),
        os.path.join(os.path.dirname(os.__file__), "warnings.py"),
    )
    total = 0
    by_line: dict[tuple[str, int], list[int]] = {}
    for size, frames in ctx._held_blocks():
        if frames:
            if frames[0][0].startswith(others) or frames[0][0] in imported:
                continue
            site = frames[0]
        else:
            site = ("<no Python frame>", 0)
        total += size
        entry = by_line.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    rows = [{"file": f, "line": line, "bytes": b, "blocks": n}
            for (f, line), (b, n) in sorted(by_line.items(), key=lambda kv: -kv[1][0])]
    return total, rows[:SITES_SHOWN]


def _format_sites(rows: list[dict[str, Any]], root: str | None) -> str:
    from gotcha_async._memory import format_size

    lines = []
    for row in rows:
        path = row["file"]
        if root and path.startswith(root + os.sep):
            path = path[len(root) + 1 :]
        blocks = "block" if row["blocks"] == 1 else "blocks"
        lines.append(f"  {format_size(row['bytes']):>10} in {row['blocks']:,} {blocks} "
                     f"at {path}:{row['line']}")
    return "\n".join(lines)


# -- the call report ---------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    body = item.stash.get(_BODY, None)
    if body is not None and _IN_BODY.get() is body and not body.finished:
        # a subtest's report, made from inside the body: pytest's work, not the body's,
        # and not a row (the test's own report comes once the body has finished)
        with body.outside:
            return (yield)
    report = yield
    if call.when == "teardown" and _LEAKED in item.stash:
        setattr(report, LEAKED_ATTR, item.stash[_LEAKED])
    if call.when != "call" or body is None or not body.finished:
        return report
    ctx = body.ctx
    b, o, c = ctx.used()
    held = ctx.memory()
    budget = item.stash.get(_BUDGET, None)
    setattr(report, REPORT_ATTR, {
        "bytes": b, "objects": o, "calls": c,
        "memory_peak": held.peak if held is not None else None,
        "budget": budget,
        "over_budget": _over_budget(ctx, budget) if budget is not None else None,
        # known after the teardown: see pytest_runtest_teardown
        "leaked": None,
        "sites": body.sites,
    })
    if budget is None:
        return report
    root = str(item.config.rootpath)
    if _FAILED_BUDGET not in item.stash:
        # the body failed (or was skipped) on its own: say that it was over budget too
        reason = _over_budget(ctx, budget)
        if reason is None:
            return report
        report.sections.append((_SECTION, reason))
    if body.sites:
        report.sections.append(
            (f"{_SECTION}: where the memory held as the body returned was allocated",
             _format_sites(body.sites, root))
        )
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> Generator[None, None, None]:
    body = _IN_BODY.get()
    if body is None or body.finished:
        return (yield)
    # a subtest's report, logged from inside the body (terminal, junitxml, xdist)
    with body.outside:
        return (yield)


# pytest's subtests do part of their reporting outside any hook, from inside the body:
# capturing the subtest's output, making its report. These methods are wrapped to run
# in an empty contextvars context, where no scope is current: nothing of them is
# charged (64 bytes, the context object), where entering a scope would cost the body
# 2 KiB a subtest. The hooks above cover any other caller (pytest-subtests, on pytest 8).
_SUBTEST_METHODS = (
    ("_pytest.subtests", "_SubTestContextManager", "__enter__"),
    ("_pytest.subtests", "_SubTestContextManager", "__exit__"),
    ("_pytest.unittest", "TestCaseFunction", "addSubTest"),
)
_WRAPPED = "__gotcha_outside__"


def _outside_body(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def outside(*args: Any, **kwargs: Any) -> Any:
        body = _IN_BODY.get()
        if body is None or body.finished:
            return method(*args, **kwargs)
        return contextvars.Context().run(method, *args, **kwargs)

    setattr(outside, _WRAPPED, method)
    return outside


def _wrap_subtests() -> None:
    for module_name, cls_name, name in _SUBTEST_METHODS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        method = getattr(cls, name, None)
        if method is not None and not hasattr(method, _WRAPPED):
            setattr(cls, name, _outside_body(method))


def _unwrap_subtests() -> None:
    for module_name, cls_name, name in _SUBTEST_METHODS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        method = cls.__dict__.get(name) if cls is not None else None
        if method is not None and hasattr(method, _WRAPPED):
            setattr(cls, name, getattr(method, _WRAPPED))


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_WRAPPED_KEY, False):
        _unwrap_subtests()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    # the outermost wrapper: the leak check comes after every fixture's teardown and
    # after pytest's own plugins dropped what they kept of the test
    try:
        result = yield
        body = item.stash.get(_BODY, None)
        if body is not None and _FAILED_BUDGET not in item.stash:
            body.check_leaks()
            if body.leaked is not None:
                item.stash[_LEAKED] = body.leaked[0]
            reason = _leak_reason(body)
            if reason is not None:
                assert body.leaked is not None
                sites = _format_sites(body.leaked[1], str(item.config.rootpath))
                pytest.fail(f"{reason}\nwhere the leaked memory was allocated:\n{sites}",
                            pytrace=False)
        return result
    finally:
        # after fixture teardown, which may still read gotcha_context
        _forget_run(item)


# -- the report ---------------------------------------------------------------------------


class _Report:
    """The per-test allocation table of ``--gotcha-report`` / ``--gotcha-top``: a plugin
    of its own, on pytest-xdist's controller only.

    Registered only when the report is on, so that a session without it pays nothing;
    a plugin object also knows its config, which ``pytest_runtest_logreport`` is not
    given (and pytester runs sessions inside sessions).
    """

    def __init__(self, config: pytest.Config, top: int | None) -> None:
        self.root = str(config.rootpath)
        self.top = top
        # nodeid -> (bytes, objects, calls, sites); a rerun replaces the run before
        self.results: dict[str, tuple[int, int, int, list[dict[str, Any]]]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        usage = getattr(report, REPORT_ATTR, None)
        if report.when == "call" and usage is not None:
            self.results[report.nodeid] = (
                usage["bytes"], usage["objects"], usage["calls"], usage.get("sites") or []
            )

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        if self.top is None:
            tr.write_sep("=", "gotcha: allocations per test body, biggest first")
        else:
            tr.write_sep("=", f"gotcha: the {self.top} biggest test bodies "
                              f"of {len(self.results)} measured")
        if not self.results:
            tr.write_line("no test body was measured")
            return
        # bytes first, then objects and calls; the node id makes ties deterministic
        rows = sorted(self.results.items(),
                      key=lambda r: (-r[1][0], -r[1][1], -r[1][2], r[0]))
        if self.top is not None:
            rows = rows[: self.top]
        cells = [(f"{b:,}", f"{o:,}", f"{c:,}", nodeid) for nodeid, (b, o, c, _) in rows]
        header = ("bytes", "objects", "calls", "test")
        widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(3)]
        for row in [header, *cells]:
            numbers = "  ".join(row[i].rjust(widths[i]) for i in range(3))
            tr.write_line(f"{numbers}  {row[3]}")
        shown = rows[: self.top if self.top is not None else REPORT_SITES_TESTS]
        if not any(sites for _, (*_, sites) in shown):
            return
        tr.write_sep("-", "where the memory each held as it returned was allocated (sampled)")
        for nodeid, (*_, sites) in shown:
            if sites:
                tr.write_line(nodeid)
                tr.write_line(_format_sites(sites, self.root))


class _JsonReport:
    """The ``--gotcha-json`` file: every measured test body, for CI dashboards.

    ``{"version": 1, "tests": [...]}``, one entry per test whose body ran, in the
    order they finished: ``nodeid``, ``outcome`` (``passed``, ``failed``, ``skipped``
    for an xfail), ``bytes``, ``objects``, ``calls``, ``memory_peak`` (bytes, or null
    when memory was not tracked), ``budget`` (the limits that applied, or null),
    ``over_budget`` (the one-line reason, or null), ``leaked`` (bytes still held once
    the body returned, when leaks were checked, else null) and ``sites`` (where the
    memory held as the body returned was allocated: ``file``, ``line``, ``bytes``,
    ``blocks``, biggest first).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.tests: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        usage = getattr(report, REPORT_ATTR, None)
        if report.when == "call" and usage is not None:
            self.tests.append({"nodeid": report.nodeid, "outcome": report.outcome, **usage})
        leaked = getattr(report, LEAKED_ATTR, None)
        if report.when == "teardown" and leaked is not None:
            # the teardown comes after its call (with xdist too: one worker runs both)
            for entry in reversed(self.tests):
                if entry["nodeid"] == report.nodeid:
                    entry["leaked"] = leaked
                    if report.failed:
                        entry["outcome"] = "failed"
                    break

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "tests": self.tests}, f, indent=1)
            f.write("\n")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_line(
            f"gotcha: usage of {len(self.tests)} test bodies written to {self.path}"
        )
