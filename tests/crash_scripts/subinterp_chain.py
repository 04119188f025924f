"""Item 31/10: own-GIL subinterpreters allocate while the main interpreter's
scopes change the allocator chain.

    subinterp_chain.py SECONDS

The main thread enters and leaves scopes without a pause, for SECONDS and until each
subinterpreter has run its work twice (a slow debug build on a loaded machine can take
longer than SECONDS for one round), at most ``LONGEST`` seconds: the first entered puts the
hook in the chain, the last left takes it out, a ``memory=`` scope turns its frees on
and off. Two isolated subinterpreters, each in its own thread and under its own GIL,
allocate and free all the while. They read the allocator table without the main GIL,
so every table the main interpreter writes must be one they can call, whichever
mix of old and new they read (a jump to a garbage address from ``_Py_Dealloc`` on
3.14 before).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from _common import report
from _subinterp import create_isolated, destroy, run

import gotcha_async as gotcha

WORK = (
    "keep = []\n"
    "for i in range(100_000):\n"
    "    keep.append(bytearray(i % 300))\n"
    "    if len(keep) > 2000:\n"
    "        del keep[:1000]\n"
)
LONGEST = 150.0
stop = threading.Event()
failures: list[str] = []
rounds = [0, 0]
# set when a subinterpreter has done two rounds, or can do no more
done = [threading.Event(), threading.Event()]


def work(i: int) -> None:
    try:
        interp = create_isolated()
    except Exception as exc:  # said in the result, not only on stderr
        failures.append(f"creation: {type(exc).__name__}: {exc}")
        done[i].set()
        return
    try:
        while not stop.is_set():
            failure = run(interp, WORK)
            if failure is not None:
                failures.append(failure)
                return
            rounds[i] += 1
            if rounds[i] >= 2:
                done[i].set()
    finally:
        done[i].set()
        destroy(interp)


async def churn(seconds: float) -> int:
    start = time.monotonic()
    n = 0
    while not all(d.is_set() for d in done) or time.monotonic() < start + seconds:
        if time.monotonic() > start + LONGEST:
            failures.append(f"rounds after {LONGEST:.0f} s: {rounds}")
            break
        async with gotcha.limit(memory=64 * gotcha.MiB):
            keep = [bytearray(100) for _ in range(50)]
        async with gotcha.limit():
            keep = [bytearray(100) for _ in range(50)]
        del keep
        n += 1
        await asyncio.sleep(0)
    return n


threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
try:
    scopes = asyncio.run(churn(float(sys.argv[1])))
finally:
    stop.set()
    for t in threads:
        t.join()
report(failures=failures, rounds=rounds, scopes=scopes)
