"""Issue 31, item 10: the first scope installs the hook while own-GIL subinterpreters
allocate.

    subinterp_install.py

Installing asks the running CPython how a dict's growth fails, by wrapping both
allocator domains for one call and failing its one allocation. Two isolated
subinterpreters, each in its own thread and under its own GIL, allocate all the while:
they read the allocator table without the main GIL, so the wrapper must work with
whichever ctx they read beside it, and the allocation failed must be the probing
thread's, never theirs (3.15 before: their interpreter's creation failed with a
MemoryError, or a SIGSEGV in the wrapper reading a NULL ctx).
"""

from __future__ import annotations

import asyncio
import threading

from _common import report
from _subinterp import create_isolated, destroy, run

WORK = "keep = [bytearray(i % 300) for i in range(2000)]"
started = threading.Semaphore(0)
stop = threading.Event()
failures: list[str] = []
rounds = [0, 0]


def work(i: int) -> None:
    # creating an interpreter allocates most: the script reproduced the failure only
    # while the probe met a creation
    while not stop.is_set():
        try:
            interp = create_isolated()
        except Exception as exc:  # the failure this script is for: say it, and go on
            failures.append(f"creation: {type(exc).__name__}: {exc}")
        else:
            try:
                failure = run(interp, WORK)
                if failure is not None:
                    failures.append(failure)
            finally:
                destroy(interp)
        rounds[i] += 1
        if rounds[i] == 1:
            started.release()


threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
for _ in threads:
    started.acquire()

import gotcha_async as gotcha  # noqa: E402  (after they run: the import must not wait)


async def first_scope() -> bool:
    async with gotcha.limit(bytes=64 * gotcha.MiB) as ctx:
        keep = [bytearray(100) for _ in range(50)]
        del keep
    return ctx.used().bytes > 0


charged = asyncio.run(first_scope())
stop.set()
for t in threads:
    t.join()
report(failures=failures, rounds=rounds, charged=charged)
