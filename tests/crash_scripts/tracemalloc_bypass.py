"""Item 12: tracemalloc stopped behind the wrapper's back while the hook is on top.

    tracemalloc_bypass.py early|c

early: ``from tracemalloc import stop`` bound before gotcha_async is imported; c:
``_tracemalloc.stop()``, the C function itself. Either way, called inside a scope
entered after tracemalloc.start() (the hook then sits on top of tracemalloc and
goes with it), it must not drop the hook for good: the next 1 MiB hard scope still
refuses a 50 MB bytearray, and later scopes still count.
"""

from __future__ import annotations

import _tracemalloc
import sys
import tracemalloc
from tracemalloc import stop as early_stop

from _common import report

import gotcha_async as gotcha

stop = early_stop if sys.argv[1] == "early" else _tracemalloc.stop
results: list[str] = []
inside: list[int] = []
for _ in range(3):
    tracemalloc.start()
    with gotcha.Context() as first:  # the hook joins the chain on top of tracemalloc
        stop()  # and is dropped here, behind the wrapper's back
        bytearray(100_000)
    inside.append(first.used().bytes)  # informational: what the scope saw after stop()
    try:
        with gotcha.limit(bytes=gotcha.MiB, hard=True):
            data = bytearray(50 * gotcha.MiB)
            del data
        results.append("passed")
    except gotcha.LimitExceeded as exc:
        results.append(f"LimitExceeded {exc.resource}")
    with gotcha.Context() as later:
        kept = bytearray(100_000)
    results.append(f"later {later.used().bytes}")
    del kept
report(results=results, inside=inside, current_none=gotcha.current() is None)
