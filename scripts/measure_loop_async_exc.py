"""CPython alone: does an asynchronous exception raised in a loop reach the loop's handler?

    python scripts/measure_loop_async_exc.py [ROUNDS]

A worker thread loops inside ``try: ... except BaseException``; the main thread raises an
exception in it with ``PyThreadState_SetAsyncExc`` (what Ctrl-C is to the main thread).
Each loop's body ends in an ``if``. Where the exception lands on an instruction that
CPython's exception table leaves uncovered (a loop's closing jump, on some versions), it
skips the handler and kills the thread. Prints, per loop, how many of ROUNDS escaped.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

caught: list[int] = []


class Interrupt(Exception):
    pass


def while_true(started: threading.Event) -> None:
    keep = []
    try:
        started.set()
        while True:
            keep.append(bytearray(100))
            if len(keep) > 1000:
                keep.clear()
    except BaseException:
        caught.append(1)


def while_cond(started: threading.Event) -> None:
    keep: list[object] = []
    try:
        started.set()
        while len(keep) < 10**9:
            keep.append(bytearray(100))
            if len(keep) > 1000:
                keep.clear()
    except BaseException:
        caught.append(1)


def for_loop(started: threading.Event) -> None:
    keep = []
    try:
        started.set()
        for _ in range(10**9):
            keep.append(bytearray(100))
            if len(keep) > 1000:
                keep.clear()
    except BaseException:
        caught.append(1)


def run_one(loop) -> None:  # type: ignore[no-untyped-def]
    started = threading.Event()
    thread = threading.Thread(target=loop, args=(started,))
    thread.start()
    started.wait()
    time.sleep(0.002)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident or 0),
                                               ctypes.py_object(Interrupt))
    thread.join(10)


threading.excepthook = lambda args: None  # the escaped ones: counted, not printed
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
for loop in (while_true, while_cond, for_loop):
    caught.clear()
    for _ in range(rounds):
        run_one(loop)
    print(f"{sys.version.split()[0]} {loop.__name__}: escaped {rounds - len(caught)} of {rounds}")
