"""Item 4: refusals while CPython unwinds (traceback entries and frame objects are made
with the exception fetched).

    unwinding.py recursion|agen

recursion: a deep recursion that allocates at every level, so that its
RecursionError (or its refusal) unwinds across the limit; swept over a range of hard
limits around the usage at the deepest point. agen: async generators whose
``finally`` blocks allocate, closed by asyncio.run inside a sync hard scope, swept the
same way. Every outcome must be an ordinary exception of the body (RecursionError,
MemoryError) turned into LimitExceeded on exit, or no exception: never a SystemError,
an exception lost on the way, or a dead process.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator, Callable

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]
sys.setrecursionlimit(600)


def recurse(n: int) -> int:
    keep = bytearray(512)
    return recurse(n + 1) + len(keep)


def run_recursion() -> None:
    recurse(0)


async def agen() -> AsyncGenerator[bytes, None]:
    try:
        while True:
            yield b"x"
    finally:
        junk = [bytearray(256) for _ in range(64)]
        del junk


async def agen_main() -> None:
    gens = [agen() for _ in range(30)]
    for g in gens:
        await g.__anext__()
    keep = []
    for _ in range(300):  # grow; a low limit stops it, then the generators are closed
        keep.append(bytearray(1024))


def run_agen() -> None:
    asyncio.run(agen_main())


body: Callable[[], None] = run_recursion if mode == "recursion" else run_agen
# the usage at the deepest point, without a limit
with gotcha.Context() as probe:
    try:
        body()
    except (RecursionError, MemoryError):
        pass
top = probe.used().bytes
outcomes: dict[str, int] = {}
step = max(top // 60, 256)
for lim in range(step, top + 8 * step, step):
    try:
        with gotcha.limit(bytes=lim, hard=True):
            body()
        what = "none"
    except gotcha.LimitExceeded as exc:
        cause = exc.__cause__
        # a MemoryError subclass (a hard scope's interrupt) counts as a MemoryError
        kind = MemoryError if isinstance(cause, MemoryError) else type(cause)
        what = f"LimitExceeded from {kind.__name__}"
    except BaseException as exc:
        what = "MemoryError" if isinstance(exc, MemoryError) else type(exc).__name__
    outcomes[what] = outcomes.get(what, 0) + 1
    assert gotcha.current() is None
report(outcomes=outcomes, top=top, current_none=gotcha.current() is None,
       active=gotcha._meter._debug.active())
