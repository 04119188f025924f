"""Item 31/9: the first scope of a process entered while it shuts down.

    shutdown.py atexit|finalizer|thread

``atexit``: an atexit handler enters the process's first scopes (two soft ones and a
hard one that goes past its ceiling); ``finalizer``: the same from a ``__del__`` that
runs when the interpreter clears the main module (a finalizer is never interrupted: its
hard scope is only marked exceeded); ``thread``: from an atexit handler, in a worker
thread that it joins. Before, the first scope started the delivery thread, which at
shutdown raises ``RuntimeError: can't create new thread at interpreter shutdown``
(``PythonFinalizationError`` from 3.13), and so did every later scope; on 3.11 the
scope's first look for a running loop imported a module, which fails there
(``ImportError: sys.meta_path is None``). The results are printed from the handler.
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import Any

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]


def scopes(gotcha: Any = gotcha) -> dict[str, object]:
    # the module's globals may be None by the time a finalizer runs at teardown
    seen: dict[str, object] = {}
    for name in ("first", "second"):
        try:
            with gotcha.limit(bytes=gotcha.MiB) as ctx:
                data = bytearray(100_000)
            seen[name] = ctx.used().bytes >= 100_000 and len(data) == 100_000
        except BaseException as exc:  # what the scope raised is the result
            seen[name] = f"{type(exc).__name__}: {exc}"
    kept: list[str] = []
    hard = None
    try:
        with gotcha.move_on_limit(bytes=256 * gotcha.KiB, hard=True) as hard:
            for i in range(1_000_000):
                kept.append(str(i))
    except BaseException as exc:
        seen["hard_raised"] = f"{type(exc).__name__}: {exc}"
    # move_on_limit swallows the HardLimitError that stopped the loop
    seen["hard_stopped"] = len(kept) < 1_000_000
    seen["hard_exceeded"] = hard is not None and hard.exceeded()
    seen["current_none"] = gotcha.current() is None
    return seen


def in_thread() -> dict[str, object]:
    out: dict[str, object] = {}

    def work() -> None:
        out.update(scopes())

    t = threading.Thread(target=work)
    try:
        t.start()
    except RuntimeError as exc:
        return {"thread": f"not started: {exc}"}
    t.join()
    return out


def at_exit() -> None:
    report(**(in_thread() if mode == "thread" else scopes()))


class AtTeardown:
    def __del__(self, report: Any = report, scopes: Any = scopes) -> None:
        report(**scopes())


if mode == "finalizer":
    keeper = AtTeardown()  # a module global: finalized when the main module is cleared
else:
    atexit.register(at_exit)
