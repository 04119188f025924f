"""A CPython 3.14 bug shown without gotcha: PyThreadState_SetAsyncExc past try/except.

    python scripts/repro_cpython_314_async_exc.py    # 3.14.10: most escape; 3.11-3.13, 3.15: none

A worker thread allocates in a loop inside ``try: ... except BaseException``; the main
thread raises an exception in it with ``PyThreadState_SetAsyncExc``, the call a hard
scope's interrupt of a worker thread uses. On 3.14.10 the exception often skips the
handlers of the frame it is raised in and surfaces in its caller; on the other versions
checked it is always caught where it was raised.
"""

from __future__ import annotations

import ctypes
import threading
import time

caught: list[str] = []


class Interrupt(Exception):
    pass


def grow(started: threading.Event) -> None:
    keep = []
    try:
        started.set()
        while True:
            keep.append(bytearray(100))
            if len(keep) > 1000:
                keep.clear()
    except BaseException as exc:
        caught.append(type(exc).__name__)


def run_one() -> None:
    started = threading.Event()
    thread = threading.Thread(target=grow, args=(started,))
    thread.start()
    started.wait()
    time.sleep(0.01)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident or 0),
                                               ctypes.py_object(Interrupt))
    thread.join(10)


threading.excepthook = lambda args: None  # the escaped ones: counted below, not printed
ROUNDS = 20
for _ in range(ROUNDS):
    run_one()
print(f"caught where raised: {len(caught)} of {ROUNDS}")
raise SystemExit(0 if len(caught) == ROUNDS else 1)
