"""Item 31/5: tracers, profilers and sys.monitoring callbacks are machinery.

    tracers.py settrace|setprofile|monitoring|coverage [SCOPES]

Hard scopes whose body grows past the ceiling in small steps while a tool watches
every line or call with a callback of its own that allocates too. The tool's callback
is never interrupted nor refused: CPython unsets a trace or profile function that
raises (coverage's Python tracer then warns "Trace function changed" and loses what
follows), and passes a sys.monitoring callback's exception to the instruction that
fired it (it escaped the scope from inside coverage/sysmon.py). ``coverage``: run under
``coverage run`` by the test, whatever its core; the lines of ``after()`` must be
measured. The tool's own work is not charged to the scope either: a scope's figures do
not depend on whether a tool watches it.
"""

from __future__ import annotations

import sys
from typing import Any

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]
scopes = int(sys.argv[2]) if len(sys.argv) > 2 else 20
EVENTS: list[Any] = []
ERRORS: list[str] = []


# each callback allocates in its own frame, where an interrupt would be aimed


def tracer(frame: Any, event: str, arg: Any) -> Any:
    EVENTS.append((event, [0] * 64, "x" * 200))
    del EVENTS[:-1000]
    return tracer


def profiler(frame: Any, event: str, arg: Any) -> None:
    EVENTS.append((event, [0] * 64, "x" * 200))
    del EVENTS[:-1000]


TOOL = 3  # sys.monitoring's "optimizer" tool id, free in a plain program


def on_line(code: Any, line: int) -> None:
    EVENTS.append((line, [0] * 64, "x" * 200))
    del EVENTS[:-1000]


def grow() -> int:
    kept: list[object] = []
    for i in range(200_000):
        kept.append(str(i))
        kept.append(i * 3)
        if i % 50 == 0:
            # code the tool has never seen (a new code object, new lines): coverage's
            # callbacks allocate for these only
            ns: dict[str, Any] = {}
            exec(compile(NEW_CODE.format(i=i), __file__, "exec"), ns)
            kept.append(ns["f"]())
    return len(kept)


NEW_CODE = """
def f():
    a = {i}
    b = a + 1
    if b:
        return [a, b]
    return None
"""


def measure_quiet() -> int:
    # the same small body measured with the tool on: nothing of the tool's is charged
    with gotcha.limit() as ctx:
        _ = [0] * 100
    return ctx.used().bytes


def start() -> None:
    if mode == "settrace":
        sys.settrace(tracer)
    elif mode == "setprofile":
        sys.setprofile(profiler)
    elif mode == "monitoring":
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        mon.use_tool_id(TOOL, "gotcha-test")
        mon.register_callback(TOOL, mon.events.LINE, on_line)
        mon.set_events(TOOL, mon.events.LINE)


def installed() -> bool:
    if mode == "settrace":
        return sys.gettrace() is tracer
    if mode == "setprofile":
        return sys.getprofile() is profiler
    if mode == "monitoring":
        return bool(sys.monitoring.get_tool(TOOL) == "gotcha-test")  # type: ignore[attr-defined,unused-ignore]
    # coverage: its tracer, or its sys.monitoring tool (coverage's own id)
    mon = getattr(sys, "monitoring", None)
    if mon is not None and mon.get_tool(mon.COVERAGE_ID) is not None:
        return True
    return sys.gettrace() is not None


def after() -> str:
    x = 1
    y = x + 1
    return f"after {y}"


quiet_without = measure_quiet()


def innermost(exc: BaseException) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return
    code = tb.tb_frame.f_code
    if code.co_name in ("tracer", "profiler", "on_line") or "coverage" in code.co_filename:
        ERRORS.append(f"{code.co_filename}:{code.co_name}")  # raised inside the tool


start()
stopped = escaped = 0
for _ in range(scopes):
    try:
        with gotcha.move_on_limit(bytes=256 * gotcha.KiB, hard=True) as ctx:
            try:
                grow()
            except MemoryError as exc:
                stopped += 1
                innermost(exc)
    except MemoryError as exc:
        escaped += 1
        innermost(exc)
    assert ctx.exceeded()
still = installed()
quiet = measure_quiet()
print(after())
report(stopped=stopped, escaped=escaped, installed=still, quiet=quiet,
       quiet_without=quiet_without, in_tool=ERRORS[:5], n_in_tool=len(ERRORS),
       current_none=gotcha.current() is None)
