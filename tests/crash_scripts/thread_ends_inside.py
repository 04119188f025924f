"""Item 14: a thread that ends inside a scope (entered, never exited).

Once that thread and its scope are gone, no scope is active in the process and the
hook leaves the allocator chain, as it does after any last exit.
"""

from __future__ import annotations

import gc
import threading

from _common import report

import gotcha_async as gotcha
from gotcha_async import _meter


def leave_it_entered() -> None:
    ctx = gotcha.Context(bytes=gotcha.MiB, hard=True)
    ctx.__enter__()
    bytearray(1000)


before = (_meter._debug.active(), _meter._debug.hooked())
t = threading.Thread(target=leave_it_entered)
t.start()
t.join()
del t
gc.collect()
with gotcha.Context() as ctx:
    bytearray(1000)
after = (_meter._debug.active(), _meter._debug.hooked())
report(before=before, after=after, counted=ctx.used().bytes,
       big=len(bytearray(10 * gotcha.MiB)))
