"""Item 6: subinterpreters with their own GIL allocate in other threads while scopes
are entered in the main interpreter.

    subinterp_gil.py memory|hard

The main thread sits in a scope (``memory=`` tracking, or a small hard ``bytes``
limit) waiting on an event while two isolated subinterpreters, each in its own
thread, allocate about 50 MB. Their allocations must be neither charged to the main
scope nor refused, and the heap must survive.
"""

from __future__ import annotations

import sys
import threading

from _common import report
from _subinterp import create_isolated, destroy, run

import gotcha_async as gotcha

WORK = (
    "keep = []\n"
    "for i in range(25_000):\n"
    "    keep.append(bytearray(1000))\n"
    "    if len(keep) > 2000:\n"
    "        del keep[:1000]\n"
    "total = sum(map(len, keep))\n"
)
failures: list[str | None] = [None, None]
done = [threading.Event(), threading.Event()]
interps = [create_isolated(), create_isolated()]


def work(i: int) -> None:
    try:
        failures[i] = run(interps[i], WORK)
    finally:
        done[i].set()


if sys.argv[1] == "memory":
    scope = gotcha.move_on_limit(memory=100 * gotcha.MiB)
else:
    scope = gotcha.move_on_limit(bytes=gotcha.MiB, hard=True)
threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
with scope as ctx:
    for t in threads:
        t.start()
    for d in done:
        d.wait(120)
for t in threads:
    t.join()
for interp in interps:
    destroy(interp)
report(failures=failures, used=ctx.used().bytes, exceeded=ctx.exceeded(),
       current_none=gotcha.current() is None)
