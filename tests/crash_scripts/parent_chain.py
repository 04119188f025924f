"""Item 9: a long ``parent=`` chain of Contexts, built and dropped.

    parent_chain.py DEPTH STACK_KIB

Builds the chain in a thread whose stack is STACK_KIB, charges the innermost scope
once, and drops the last reference there: the whole chain must be freed without
overflowing the stack, and building it must not be quadratic.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref

from _common import report

import gotcha_async as gotcha

depth, stack_kib = int(sys.argv[1]), int(sys.argv[2])
out: dict[str, object] = {}


def work() -> None:
    t0 = time.perf_counter()
    root = gotcha.Context()
    alive = weakref.ref(root)
    ctx = root
    for _ in range(depth):
        ctx = gotcha.Context(parent=ctx)
    out["build_s"] = round(time.perf_counter() - t0, 3)
    ctx.add(bytes=7)
    out["root_used"] = root.used().bytes
    out["exceeded"] = ctx.exceeded()
    del root
    t1 = time.perf_counter()
    del ctx  # the last reference to the innermost: the whole chain goes
    out["drop_s"] = round(time.perf_counter() - t1, 3)
    out["freed"] = alive() is None


threading.stack_size(stack_kib * 1024)
t = threading.Thread(target=work)
t.start()
t.join()
report(**out)
