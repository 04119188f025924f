"""Item 12: tracemalloc stopped behind the wrapper's back while the hook is on top.

    tracemalloc_bypass.py early|c

early: ``from tracemalloc import stop`` bound before gotcha_async is imported; c:
``_tracemalloc.stop()``, the C function itself. Either way, inside a 1 MiB hard
scope entered after the hook was dropped that way, a 50 MB bytearray must still be
refused, and later scopes must still count. (A stop inside a scope drops the hook
for the rest of that scope: nothing reaches the core to tell it.)
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
for _ in range(3):
    tracemalloc.start()
    with gotcha.Context():
        pass  # the hook joins the chain on top of tracemalloc
    # drops whatever was installed after start(): the hook. The core cannot see this
    # happen; the next scope entered probes the chain and joins it again.
    stop()
    try:
        with gotcha.limit(bytes=gotcha.MiB, hard=True) as ctx:
            data = bytearray(50 * gotcha.MiB)
            del data
        results.append("passed")
    except gotcha.LimitExceeded as exc:
        results.append(f"LimitExceeded {exc.resource}")
    with gotcha.Context() as later:
        kept = bytearray(100_000)
    results.append(f"later {later.used().bytes}")
    del kept
report(results=results, current_none=gotcha.current() is None)
