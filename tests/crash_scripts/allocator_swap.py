"""Item 31/8: an allocator swapper that puts back, inside an open scope, the
allocator it saved before the scope's hook joined.

    allocator_swap.py memray|ctypes

``memray``: a ``memray.Tracker(trace_python_allocators=True)`` started before the scope
and stopped inside it; ``ctypes``: the same pattern through the C API (PyMem_GetAllocator
at start, PyMem_SetAllocator of what it got at stop, both domains), as any profiler
may. Then the scope's body allocates 1 MiB at a time without end, under a 50 MiB hard
limit. Before, the hook was out of the chain from the swap on: nothing was charged and
the loop ran until its safety deadline (5 s). Every block allocated between the swap
and the hook's return is uncounted: the figure printed is how many.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import time

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]


class Allocator(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("ctx", "malloc", "calloc", "realloc", "free")]


DOMAINS = (1, 2)  # PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ


class Swapper:
    """What memray's Tracker and tracemalloc do with the chain: save, later put back."""

    def __enter__(self) -> None:
        self.saved = []
        for domain in DOMAINS:
            a = Allocator()
            ctypes.pythonapi.PyMem_GetAllocator(ctypes.c_int(domain), ctypes.byref(a))
            self.saved.append(a)

    def __exit__(self, *exc: object) -> None:
        for domain, a in zip(DOMAINS, self.saved, strict=True):
            ctypes.pythonapi.PyMem_SetAllocator(ctypes.c_int(domain), ctypes.byref(a))


def swapper() -> object:
    if mode == "ctypes":
        return Swapper()
    import memray

    path = os.path.join(tempfile.mkdtemp(), "trace.bin")
    return memray.Tracker(path, trace_python_allocators=True)


tool = swapper()
tool.__enter__()  # type: ignore[attr-defined]
n = 0
with gotcha.move_on_limit(bytes=50 * gotcha.MiB, hard=True) as ctx:
    first = bytearray(1000)
    tool.__exit__(None, None, None)  # type: ignore[attr-defined]
    start = time.monotonic()
    deadline = start + 5
    while time.monotonic() < deadline:
        block = bytearray(1 << 20)
        n += 1
seconds = time.monotonic() - start
with gotcha.limit() as later:
    data = bytearray(100_000)
report(blocks=n, seconds=seconds, used=ctx.used().bytes, exceeded=ctx.exceeded(),
       later=later.used().bytes, current_none=gotcha.current() is None)
