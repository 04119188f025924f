"""Item 10, deterministically: a KeyboardInterrupt at every bytecode of the package's
own code while a scope is entered and exited.

    interrupt_points.py sync|asyncio|trio [hard]

An opcode tracer counts the instructions executed in gotcha_async's files during one
``with``/``async with`` of a scope, and in run k raises KeyboardInterrupt at the k-th
(k = 0, 1, 2, ... until a run completes without one). After each run, once every
scope is left: ``gotcha.current()`` must be None, no scope may be left active, and
ordinary code outside any scope must allocate freely.
"""

from __future__ import annotations

import contextvars
import os
import sys
from types import FrameType
from typing import Any

from _common import report

import gotcha_async as gotcha
from gotcha_async import _meter

mode = sys.argv[1]
hard = len(sys.argv) > 2 and sys.argv[2] == "hard"
PACKAGE = os.path.dirname(gotcha.__file__) + os.sep
LIMIT = 64 * gotcha.KiB
# CPython 3.15's debug build fails an assertion (STACK_LEVEL() >= level, in
# generated_cases.c.h) on an exception raised by an opcode tracer inside a generator
# expression, with no gotcha loaded: tests/crash_scripts/genexpr_trace.py. There the
# injector leaves generator expressions alone.
GENEXPR_ASSERTS = sys.version_info >= (3, 15) and hasattr(sys, "gettotalrefcount")


class Injector:
    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.fired = False

    def tracer(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        if GENEXPR_ASSERTS and frame.f_code.co_name == "<genexpr>":
            return None
        frame.f_trace_opcodes = True
        # line events as well: 3.12.1 delivers no opcode events to a frame whose
        # f_trace_opcodes was set in its call event
        if event in ("opcode", "line"):
            self.seen += 1
            if self.seen - 1 == self.at and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
        return self.tracer


def body_sync() -> None:
    with gotcha.move_on_limit(bytes=LIMIT, hard=hard) as ctx:
        del ctx


async def body_async() -> None:
    async with gotcha.move_on_limit(bytes=LIMIT, hard=hard) as ctx:
        del ctx


def once(inj: Injector) -> tuple[bool, bool]:
    """Run the body once under the injector: (interrupted, current() was None after)."""
    seen_none = [True]
    interrupted = [False]

    async def task() -> None:
        sys.settrace(inj.tracer)
        try:
            await body_async()
        except KeyboardInterrupt:
            interrupted[0] = True
        finally:
            sys.settrace(None)
        seen_none[0] = gotcha.current() is None

    def sync() -> None:
        sys.settrace(inj.tracer)
        try:
            body_sync()
        except KeyboardInterrupt:
            interrupted[0] = True
        finally:
            sys.settrace(None)
        seen_none[0] = gotcha.current() is None

    if mode == "sync":
        # in a context of its own, like a task: a scope left entered by mistake stays
        # there, and this script can go on and report it
        contextvars.Context().run(sync)
    elif mode == "asyncio":
        import asyncio

        asyncio.run(task())
    else:
        import trio

        trio.run(task)
    return interrupted[0], seen_none[0]


# first use installs the hook (a separate window: see interrupt_storm.py's warm-up);
# raising from an opcode event inside its generator expression also trips a debug
# build's stack assertion (3.15d), which is CPython's, not the scope's
with gotcha.Context():
    pass
bad: list[str] = []
points = 0
k = 0
while True:
    inj = Injector(k)
    interrupted, none_after = once(inj)
    if not inj.fired:
        break
    points += 1
    if not interrupted:
        bad.append(f"{k}: the KeyboardInterrupt was lost")
    if not none_after:
        bad.append(f"{k}: current() is a dead scope")
    if _meter._debug.active() != 0:
        bad.append(f"{k}: {_meter._debug.active()} scope(s) left active")
    try:
        bytearray(LIMIT * 4)
    except MemoryError:
        bad.append(f"{k}: code outside any scope was refused")
    k += 1
    if k > 5000:
        bad.append("more than 5000 instructions in one enter/exit")
        break
report(points=points, bad=bad[:20], nbad=len(bad), current_none=gotcha.current() is None,
       active=_meter._debug.active())
