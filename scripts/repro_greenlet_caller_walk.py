"""A hard scope's refusal inside a resumed greenlet: SIGSEGV in the engine's caller walk.

    python scripts/repro_greenlet_caller_walk.py          # hard scopes: dies (SIGSEGV)
    python scripts/repro_greenlet_caller_walk.py --soft   # the same as soft scopes: clean

Found by scripts/ecosystem_inject.py (SQLAlchemy's asyncio layer, whose greenlet_spawn
and await_ switch a greenlet out and back in across task steps). caller_is_cpython()
(caller.c) calls glibc's backtrace(pcs, 48), which unwinds every frame before the walk
looks at the first: past greenlet's g_initialstub and g_switch, into C stack the parent
has reused since the greenlet started, where libgcc's unwinder faults. Died 4 of 4 on
3.11.7, 3.13.0 and 3.15.2 (0 of 4 on 3.12.1 and 3.14.10, whose stacks happen to hold
readable garbage there).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import greenlet

import gotcha_async as gotcha


class Obj:
    pass


OBJS = [Obj() for _ in range(20_000)]
BIG = {o: 1 for o in OBJS}
refused = 0


def child() -> None:
    global refused
    greenlet.getcurrent().parent.switch()  # out, as SQLAlchemy's await_() does
    try:
        set(OBJS[:10]).union(BIG)  # CPython's set growth, over budget: refused
    except MemoryError:
        refused += 1


def scribble(depth: int) -> None:
    """C frames (sorted's key calls, a PyErr_Format) where the greenlet's parent was."""
    if depth == 0:
        try:
            int("x" * 50)
        except ValueError:
            pass
        return
    sorted([1, 2], key=lambda v: deeper(depth - 1, v))


def deeper(depth: int, value: int) -> int:
    scribble(depth)
    return value


async def main(scope: dict[str, Any]) -> None:
    for i in range(300):
        async with gotcha.move_on_limit(bytes=64 * 1024, **scope):
            g = greenlet.greenlet(child)
            g.gr_context = greenlet.getcurrent().gr_context  # as SQLAlchemy does
            sorted([1], key=lambda _: g.switch())  # started under a C frame
            await asyncio.sleep(0)  # the task step ends, the loop runs
            scribble(i % 6)
            g.switch()  # resumed from elsewhere: the refusal walks the C stack
    print(f"survived, {refused} refused")


if __name__ == "__main__":
    asyncio.run(main({} if "--soft" in sys.argv else {"hard": True}))
