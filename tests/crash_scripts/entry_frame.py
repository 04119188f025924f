"""Item 3: refusal checks while the current frame is CPython's C entry frame (3.13+).

    entry_frame.py finalizer|signal|nested|gc|asyncio

Each mode exhausts a hard scope (``ctx.add`` past its limit and any grace) and then
makes the interpreter run code from C inside it: a function called from C whose
locals die at its return (a ``__del__`` and an unclosed file's ResourceWarning), a
signal handler, a nested scope, a gc pass over cycles with finalizers, coroutines
finishing inside asyncio's C task step. The provocation runs in the body and again in
its ``except MemoryError`` handler (the grace), so that it runs whichever mechanism
stops the body. The finalizers and the handler must run and see no refusal.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import warnings
from typing import Any

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]
FIRED = [0, 0]  # finalizers / handlers run, MemoryErrors that reached the body


class Finalized:
    other: Any = None

    def __del__(self) -> None:
        FIRED[0] += 1


def handler(signum: int, frame: object) -> None:
    FIRED[0] += 1


signal.signal(signal.SIGUSR1, handler)
warnings.simplefilter("ignore", ResourceWarning)

# everything the provocations need is made before the scope is exhausted
OBJS: list[Any] = []
for _ in range(4):
    OBJS.extend([Finalized(), open(__file__, "rb")])


def drop_one(_: int) -> int:
    # called from C (map): the frame is the outermost of that call, and its local
    # dies while the frame is cleared, with the C entry frame current
    dropped = OBJS.pop()  # noqa: F841
    return 0


CALLS = map(drop_one, range(len(OBJS)))
BIG = 10 * gotcha.MiB
NESTED = [gotcha.Context(), gotcha.Context()]


def make_cycles() -> None:
    for _ in range(50):
        a, b = Finalized(), Finalized()
        a.other, b.other = b, a


async def finishing() -> int:
    return 1


async def amain() -> None:
    # each task's coroutine returns inside the C task step
    for _ in range(3):
        await asyncio.ensure_future(finishing())


def provoke() -> None:
    if mode == "finalizer":
        for _ in CALLS:
            pass
    elif mode == "signal":
        signal.raise_signal(signal.SIGUSR1)
    elif mode == "nested":
        with NESTED.pop():
            pass
    elif mode == "gc":
        gc.collect()
    elif mode == "asyncio":
        asyncio.run(amain())


if mode == "gc":
    gc.disable()
    make_cycles()
with gotcha.move_on_limit(bytes=100_000, hard=True) as ctx:
    try:
        ctx.add(bytes=BIG)
        provoke()
    except MemoryError:
        FIRED[1] += 1
        provoke()
gc.enable()
report(fired=FIRED[0], memory_errors=FIRED[1], exceeded=ctx.exceeded(),
       current_none=gotcha.current() is None, active=gotcha._meter._debug.active())
