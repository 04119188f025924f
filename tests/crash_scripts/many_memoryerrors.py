"""Item 2: more than 16 MemoryErrors alive inside one hard scope.

    many_memoryerrors.py sync|asyncio limit|move_on_limit

Untrusted code that keeps what it catches: 40 rounds of small-step growth, each stopped
by a MemoryError that is kept alive (a list in sync code; asyncio.gather(...,
return_exceptions=True) over 40 tasks under asyncio.run in a sync hard scope). 3.11
keeps 16 preallocated MemoryErrors: 40 more are held before the scope is entered, so
that every MemoryError raised in it has to be allocated.

A scope may stop the rounds early (after a few stops the grace is gone and the next
stop lands wherever the code is); what is asserted is that the process survives,
that what was caught is MemoryErrors, and that the scope ended as it should.
"""

from __future__ import annotations

import asyncio
import sys

from _common import report

import gotcha_async as gotcha

ROUNDS = 40
LIMIT = gotcha.MiB


def grow() -> None:
    keep = []
    while True:
        keep.append(bytearray(4096))


async def grow_task() -> None:
    grow()


async def gather_all() -> list[BaseException]:
    results = await asyncio.gather(*(grow_task() for _ in range(ROUNDS)),
                                   return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]


HOARD = [MemoryError() for _ in range(40)]  # 3.11's freelist, drained
errors: list[BaseException] = []
raised = None
scope = gotcha.limit if sys.argv[2] == "limit" else gotcha.move_on_limit
try:
    with scope(bytes=LIMIT, hard=True) as ctx:
        if sys.argv[1] == "sync":
            errors = [None] * ROUNDS  # type: ignore[list-item]
            for i in range(ROUNDS):
                try:
                    grow()
                except MemoryError as exc:
                    errors[i] = exc
        else:
            errors = asyncio.run(gather_all())
except gotcha.LimitExceeded as exc:
    raised = exc.resource
caught = [e for e in errors if e is not None]
all_memory_errors = all(isinstance(e, MemoryError) for e in caught)
memory_errors = len(caught)
del errors, caught
report(raised=raised, memory_errors=memory_errors, all_memory_errors=all_memory_errors,
       used=ctx.used().bytes, limit=LIMIT, exceeded=ctx.exceeded(),
       current_none=gotcha.current() is None, active=gotcha._meter._debug.active(),
       after=len(bytearray(10 * gotcha.MiB)))
