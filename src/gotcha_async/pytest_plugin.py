"""pytest plugin: allocation budgets for tests (``@pytest.mark.gotcha``).

Registered through the ``pytest11`` entry point ``gotcha``, so it is active wherever
gotcha-async is installed. It offers:

- the marker ``@pytest.mark.gotcha(bytes=..., objects=..., calls=..., memory=...,
  hard=False)``: the test fails if its body goes over the budget;
- a session-wide default budget, ``--gotcha-bytes``, ``--gotcha-objects``,
  ``--gotcha-calls``, ``--gotcha-memory``, ``--gotcha-hard`` (ini ``gotcha_bytes`` and
  so on), which a test's marker overrides key by key;
- the flag ``--gotcha-report`` (ini ``gotcha_report = true``): a table of what every
  test's body allocated, biggest first, at the end of the session;
- ``--gotcha-json=PATH`` (ini ``gotcha_json``): the same figures, with each test's
  budget and outcome, as a JSON file for CI dashboards;
- the fixture ``gotcha_context``: the :class:`~gotcha_async.Context` measuring the
  running test's body.

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

import functools
import inspect
import json
import os
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gotcha_async import Context

__all__ = ["gotcha_context"]

MARKER = "gotcha"
_LIMIT_ARGS = ("bytes", "objects", "calls", "memory")
_MARKER_ARGS = (*_LIMIT_ARGS, "hard")
_SECTION = "gotcha"

# the validated marker arguments of an item (limits as ints), set at collection
_BUDGET = pytest.StashKey[dict[str, Any]]()
# the Context measuring the item's body, from setup to the end of teardown
_CONTEXT = pytest.StashKey["Context"]()
# set when the body ran inside its Context (a unittest async test never does)
_ENTERED = pytest.StashKey[bool]()
# the budget failure this plugin raised for the item's call phase, if any
_FAILED_BUDGET = pytest.StashKey[str]()
# the --gotcha-report table, when the report is on
_REPORT = pytest.StashKey["_Report"]()
# the --gotcha-json file, when asked for
_JSON = pytest.StashKey["_JsonReport"]()
# the session-wide default budget (limits as ints, hard), when one is given
_DEFAULTS = pytest.StashKey[dict[str, Any]]()

# the attribute carrying a call report's usage; a plain dict, so that pytest-xdist
# serialises it from the workers to the controller like any other report field
REPORT_ATTR = "gotcha_usage"


# -- options and marker ------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gotcha", "allocation budgets (gotcha-async)")
    for name, what in (
        ("bytes", "bytes allocated"),
        ("objects", "object allocations"),
        ("calls", "allocator calls"),
        ("memory", "peak memory held"),
    ):
        group.addoption(
            f"--gotcha-{name}",
            dest=f"gotcha_{name}",
            metavar="LIMIT",
            default=None,
            help=f"default limit on the {what} of every test's body, e.g. '64 MiB' or "
            f"'10k'; @pytest.mark.gotcha overrides it per test (ini: gotcha_{name})",
        )
        parser.addini(
            f"gotcha_{name}",
            default="",
            help=f"as --gotcha-{name}: default limit on each test body's {what}",
        )
    group.addoption(
        "--gotcha-hard",
        action="store_true",
        default=None,
        help="make the default limits hard (ini: gotcha_hard)",
    )
    parser.addini("gotcha_hard", type="bool", default=False,
                  help="as --gotcha-hard: the default limits are hard")
    group.addoption(
        "--gotcha-report",
        action="store_true",
        default=None,
        help="measure every test's body and print a table of the bytes, objects and "
        "allocator calls each one used, biggest first (ini: gotcha_report)",
    )
    parser.addini(
        "gotcha_report",
        type="bool",
        default=False,
        help="as --gotcha-report: per-test allocation table at the end of the session",
    )
    group.addoption(
        "--gotcha-json",
        dest="gotcha_json",
        metavar="PATH",
        default=None,
        help="measure every test's body and write what each used, its budget and "
        "outcome to PATH as JSON (ini: gotcha_json)",
    )
    parser.addini("gotcha_json", default="",
                  help="as --gotcha-json: the path of the JSON usage report")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gotcha(bytes=None, objects=None, calls=None, memory=None, hard=False): "
        "fail the test if its body allocates more than this (the arguments of "
        "gotcha_async.limit); fixtures are not charged",
    )
    defaults = _session_defaults(config)
    if defaults is not None:
        config.stash[_DEFAULTS] = defaults
    if _report_enabled(config):
        report = _Report()
        config.stash[_REPORT] = report
        config.pluginmanager.register(report, "gotcha-report")
    path = _json_path(config)
    if path is not None and not hasattr(config, "workerinput"):
        # pytest-xdist workers send their reports to the controller, which writes
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
    for name in _LIMIT_ARGS:
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
    return _REPORT in config.stash or _JSON in config.stash


def _budget_from_marker(mark: pytest.Mark) -> dict[str, Any]:
    """Validate the arguments of a ``gotcha`` marker; return them normalised.

    :raises ValueError: naming the bad argument (the caller turns it into a usage error)
    """
    if mark.args:
        raise ValueError(
            "takes keyword arguments only (bytes=, objects=, calls=, memory=, hard=), "
            f"got positional {', '.join(repr(a) for a in mark.args)}"
        )
    unknown = [name for name in mark.kwargs if name not in _MARKER_ARGS]
    if unknown:
        raise ValueError(
            f"unknown argument {unknown[0]!r} (expected bytes, objects, calls, memory, hard)"
        )
    from gotcha_async import Context

    budget = dict(mark.kwargs)
    try:
        # The Context validates exactly what limit() would, with its own messages,
        # which name the parameter; a throwaway one costs nothing until entered.
        Context(**budget)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ValueError(str(exc)) from None
    from gotcha_async._units import check_limit

    # only what the marker gives: the rest comes from the session's defaults
    for name in _LIMIT_ARGS:
        if name in budget:
            budget[name] = check_limit(name, budget[name])
    if "hard" in budget:
        budget["hard"] = bool(budget["hard"])
    return budget


def _effective_budget(
    defaults: dict[str, Any] | None, marked: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The session's defaults overridden key by key by the marker; None if no limit."""
    budget: dict[str, Any] = dict.fromkeys(_LIMIT_ARGS)
    budget["hard"] = False
    if defaults is not None:
        budget.update(defaults)
    if marked is not None:
        budget.update(marked)
    if all(budget[name] is None for name in _LIMIT_ARGS):
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


def _new_context(budget: dict[str, Any] | None) -> Context:
    from gotcha_async import Context

    return Context(**budget) if budget is not None else Context()


def _forget_run(item: pytest.Item) -> None:
    """Drop what one run of the test left in its stash."""
    for key in (_CONTEXT, _ENTERED, _FAILED_BUDGET):
        if key in item.stash:  # type: ignore[misc]  # keys of different value types
            del item.stash[key]  # type: ignore[misc]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture is set up, so that gotcha_context finds the Context. A fresh
    # one per run: a Context can be entered once, and rerun plugins run setup again.
    _forget_run(item)
    if not isinstance(item, pytest.Function):
        return  # a doctest, a YAML item...: no test function to measure
    budget = item.stash.get(_BUDGET, None)
    if budget is not None or _measures_everything(item.config):
        item.stash[_CONTEXT] = _new_context(budget)


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
    ctx: Context | None = item.stash.get(_CONTEXT, None)
    if ctx is None:
        ctx = item.stash[_CONTEXT] = _new_context(None)
    return ctx


def _measured(
    fn: Callable[..., Any], ctx: Context, entering: Callable[[], None]
) -> Callable[..., Any]:
    """fn, running inside ctx; ``entering()`` is called first, outside ctx.

    ``functools.wraps`` keeps the name, the signature and the attributes that other
    plugins look at (pytest-asyncio and anyio check for a coroutine function, so the
    wrapper of a coroutine function is one too).
    """
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def measured_async(*args: Any, **kwargs: Any) -> Any:
            entering()
            # entered in the task that runs the test: that task's contextvars are
            # where the allocator hook looks for the scope
            with ctx:
                return await fn(*args, **kwargs)

        return measured_async

    @functools.wraps(fn)
    def measured(*args: Any, **kwargs: Any) -> Any:
        entering()
        with ctx:
            return fn(*args, **kwargs)

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    ctx = item.stash.get(_CONTEXT, None)
    if ctx is None or not isinstance(item, pytest.Function):
        return (yield)
    # Swapped here rather than in pytest_pyfunc_call: pytest-asyncio wraps item.obj
    # in its event-loop runner in runtest(), before pytest_pyfunc_call runs.
    original = item.obj

    def entering() -> None:
        item.stash[_ENTERED] = True

    item.obj = _measured(original, ctx, entering)
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
    if _ENTERED not in item.stash:
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
    unit = {"bytes": "bytes", "objects": "objects", "calls": "allocator calls",
            "memory": "bytes of memory held"}[resource]
    limited = f"Test was limited to {limit:,} {unit}" + (" (hard)" if budget["hard"] else "")
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


def _sites(ctx: Context) -> str:
    """The top allocation sites of ctx, as text ('' when the core cannot tell yet)."""
    from gotcha_async._memory import sites_report

    return sites_report(ctx).strip("\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when != "call":
        return report
    ctx = item.stash.get(_CONTEXT, None)
    if ctx is None or _ENTERED not in item.stash:
        return report
    b, o, c = ctx.used()
    held = ctx.memory()
    budget = item.stash.get(_BUDGET, None)
    setattr(report, REPORT_ATTR, {
        "bytes": b, "objects": o, "calls": c,
        "memory_peak": held.peak if held is not None else None,
        "budget": budget,
        "over_budget": _over_budget(ctx, budget) if budget is not None else None,
    })
    if budget is None:
        return report
    if _FAILED_BUDGET not in item.stash:
        # the body failed (or was skipped) on its own: say that it was over budget too
        reason = _over_budget(ctx, budget)
        if reason is not None:
            report.sections.append((_SECTION, reason))
        else:
            return report
    sites = _sites(ctx)
    if sites:
        report.sections.append((f"{_SECTION}: top allocation sites", sites))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        # after fixture teardown, which may still read gotcha_context
        _forget_run(item)


# -- the report ---------------------------------------------------------------------------


class _Report:
    """The per-test allocation table of ``--gotcha-report``: a plugin of its own.

    Registered only when the report is on, so that a session without it pays nothing;
    a plugin object also knows its config, which ``pytest_runtest_logreport`` is not
    given (and pytester runs sessions inside sessions).
    """

    def __init__(self) -> None:
        self.results: list[tuple[str, int, int, int]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        usage = getattr(report, REPORT_ATTR, None)
        if report.when == "call" and usage is not None:
            self.results.append(
                (report.nodeid, usage["bytes"], usage["objects"], usage["calls"])
            )

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        tr.write_sep("=", "gotcha: allocations per test body, biggest first")
        if not self.results:
            tr.write_line("no test body was measured")
            return
        # bytes first, then objects and calls; the node id makes ties deterministic
        rows = sorted(self.results, key=lambda r: (-r[1], -r[2], -r[3], r[0]))
        cells = [(f"{b:,}", f"{o:,}", f"{c:,}", nodeid) for nodeid, b, o, c in rows]
        header = ("bytes", "objects", "calls", "test")
        widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(3)]
        for row in [header, *cells]:
            numbers = "  ".join(row[i].rjust(widths[i]) for i in range(3))
            tr.write_line(f"{numbers}  {row[3]}")


class _JsonReport:
    """The ``--gotcha-json`` file: every measured test body, for CI dashboards.

    ``{"version": 1, "tests": [...]}``, one entry per test whose body ran, in the
    order they finished: ``nodeid``, ``outcome`` (``passed``, ``failed``, ``skipped``
    for an xfail), ``bytes``, ``objects``, ``calls``, ``memory_peak`` (bytes, or null
    when memory was not tracked), ``budget`` (the limits that applied, or null) and
    ``over_budget`` (the one-line reason, or null).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.tests: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        usage = getattr(report, REPORT_ATTR, None)
        if report.when == "call" and usage is not None:
            self.tests.append({"nodeid": report.nodeid, "outcome": report.outcome, **usage})

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
