"""Items 1 and 5: limits breaking outside the main thread, optionally while the main
thread starts and stops tracemalloc.

    threads_trip.py THREADS ITERATIONS [tracemalloc]
"""

from __future__ import annotations

import sys
import threading
import tracemalloc

from _common import report

import gotcha_async as gotcha

threads, iterations = int(sys.argv[1]), int(sys.argv[2])
toggle = len(sys.argv) > 3 and sys.argv[3] == "tracemalloc"
start = threading.Barrier(threads + 1)
done = threading.Event()
exceeded = [0] * threads
finished = [0] * threads


def work(i: int) -> None:
    start.wait()
    for _ in range(iterations):
        with gotcha.move_on_limit(bytes=1000) as ctx:
            bytearray(10_000)
        exceeded[i] += ctx.exceeded()
        finished[i] += 1


workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
for t in workers:
    t.start()
start.wait()
cycles = 0
if toggle:
    # start/stop tracemalloc for as long as the threads trip limits: each stop races
    # the delivery thread's wake-ups
    while any(t.is_alive() for t in workers):
        tracemalloc.start()
        tracemalloc.stop()
        cycles += 1
for t in workers:
    t.join()
report(exceeded=exceeded, finished=finished, cycles=cycles,
       current=gotcha.current() is None, active=gotcha._meter._debug.active())
