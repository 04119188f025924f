"""A forked child's own delivery thread interrupts its threads (tests/test_reliability.py).

The parent installs the hook and starts the delivery thread before it forks; in the child
a thread allocates in a hard scope, in a loop that only an interrupt can stop. The loop's
body ends in an `if`: 3.14's second closing jump of a `while` is outside the exception
table, and an interrupt there went past the `with` (scripts/measure_loop_async_exc.py).
"""

from __future__ import annotations

import os
import threading

import gotcha_async as gotcha

with gotcha.limit():
    pass  # installed, delivery thread started, before the fork
pid = os.fork()
if pid == 0:
    stopped: list[bool] = []

    def grow() -> None:
        keep: list[bytearray] = []
        with gotcha.move_on_limit(bytes=gotcha.MiB, hard=True) as ctx:
            while True:  # only the child's delivery thread can interrupt this thread
                keep.append(bytearray(100))
                if len(keep) > 1000:
                    keep.clear()  # no allocation large enough to be refused
        stopped.append(ctx.exceeded())

    t = threading.Thread(target=grow)
    t.start()
    t.join(60)
    os._exit(0 if stopped == [True] else 3)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
assert code == 0, f"the child exited with {code} (3: its thread was not stopped)"
print("ok")
