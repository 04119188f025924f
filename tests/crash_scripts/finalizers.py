"""Item 31/6: finalizers that allocate inside a hard scope past its ceiling.

    finalizers.py del|weakref|gc|gccallback|asyncio|map [SCOPES]

The body of each hard scope makes and drops objects whose finalizer allocates: a
``__del__`` run when the last reference goes (``del``), a weakref callback run the same
way, or both run by the cyclic gc; ``gccallback``: a ``gc.callbacks`` callback,
which the collector calls as it starts and stops (a bound method, as CPython's
``test_gc`` registers them); ``asyncio``: a loop's exception handler, which asyncio's C
futures call from their finalizer ("Future exception was never retrieved"). The
finalizers' allocations take the scope past its ceiling as often as the body's do. A
finalizer is never interrupted nor refused: an exception raised there is printed as
"Exception ignored" and lost (before: 180 in 30 scopes), and the finalizer's work is left
half done. The body itself must still be
stopped. ``map``: the same work in a function that C calls (``map``) but that is no
finalizer: it must still be interrupted (the body allocates nothing else there).
"""

from __future__ import annotations

import gc
import sys
import weakref
from typing import Any

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]
scopes = int(sys.argv[2]) if len(sys.argv) > 2 else 30
LOST: list[str] = []
DONE = [0]  # finalizers that ran to their end


def unraisable(u: Any) -> None:
    LOST.append(f"{type(u.exc_value).__name__} in {u.object!r}"[:120])


sys.unraisablehook = unraisable


def work() -> None:
    # enough small allocations to pass a 64 KiB fence on its own
    junk = [str(i) * 3 for i in range(2_000)]
    del junk
    DONE[0] += 1


class Finalized:
    other: Any = None

    def __del__(self) -> None:
        work()


class Target:
    pass


def callback(ref: object) -> None:
    work()


KEEP: list[Any] = []


class Watcher:
    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        work()


if mode == "gccallback":
    gc.callbacks.append(Watcher().on_gc)

LOOP: Any = None
if mode == "asyncio":
    import asyncio

    LOOP = asyncio.new_event_loop()
    LOOP.set_exception_handler(lambda loop, context: work())


def one_round() -> None:
    if mode == "map":
        for _ in map(lambda _: work(), range(1)):
            pass
    elif mode == "del":
        obj = Finalized()
        del obj
    elif mode == "gccallback":
        gc.collect(0)
    elif mode == "asyncio":
        fut = LOOP.create_future()
        fut.set_exception(ValueError("never retrieved"))
        del fut
    elif mode == "weakref":
        t = Target()
        KEEP.append(weakref.ref(t, callback))
        del t
        KEEP.pop()
    else:
        a, b = Finalized(), Target()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        KEEP.append(weakref.ref(b, callback))
        del a, b
        gc.collect()
        KEEP.pop()


stopped = 0
for _ in range(scopes):
    with gotcha.move_on_limit(bytes=256 * gotcha.KiB, hard=True) as ctx:
        try:
            for _ in range(100_000):
                one_round()
                if mode != "map":
                    body = [object() for _ in range(50)]
                    del body
        except MemoryError:
            stopped += 1
    assert ctx.exceeded()
gc.callbacks.clear()
gc.collect()
report(lost=len(LOST), sample=LOST[:3], stopped=stopped, done=DONE[0],
       current_none=gotcha.current() is None)
