"""How far a worker thread that never awaits gets past its hard ceiling before it stops.

    python scripts/worker_overshoot.py [--trials 20] [--busy-main]

A worker thread allocates 1 KiB pieces inside ``move_on_limit(bytes=10 MiB, hard=True)``,
keeping the last thousand, until it is stopped. Its interrupt needs the GIL: a switch
interval (5 ms) or more of allocation goes through first. With ``--busy-main`` the main
thread competes for the GIL (a pure-Python loop, as a busy client or server thread
would), and the interrupt is delivered by whichever of the main thread's pending call
and the delivery thread gets the GIL first. Prints the overshoot past the ceiling of
each trial, in MiB, sorted, and in switch intervals of this worker's own allocation
rate measured before the scope.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import gotcha_async as gotcha

MiB = gotcha.MiB
LIMIT = 10 * MiB
PIECE = 1024


def rate() -> float:
    """Bytes a second this thread allocates in the hog's loop, outside any scope."""
    keep = []
    start = time.perf_counter()
    for _ in range(20_000):
        keep.append(bytes(PIECE))
    return 20_000 * (PIECE + 8) / (time.perf_counter() - start)


def trial(busy_main: bool) -> tuple[float, float]:
    out: dict[str, float] = {}
    done = threading.Event()

    def hog() -> None:
        out["rate"] = rate()
        keep = []
        with gotcha.move_on_limit(bytes=LIMIT, hard=True) as ctx:
            while True:
                keep.append(bytes(PIECE))
                if len(keep) == 1000:
                    # bytes= counts what was allocated, not what is kept: a short list is
                    # never grown by an allocation large enough to be refused, so only the
                    # interrupt can stop this loop
                    keep.clear()
        out["past"] = ctx.used().bytes - LIMIT
        done.set()

    t = threading.Thread(target=hog)
    t.start()
    if busy_main:
        n = 0
        while not done.is_set() and t.is_alive():
            n += 1
    t.join()
    return out["past"], out["past"] / (out["rate"] * sys.getswitchinterval())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--busy-main", action="store_true")
    args = parser.parse_args()
    results = sorted(trial(args.busy_main) for _ in range(args.trials))
    past = [p / MiB for p, _ in results]
    intervals = [i for _, i in results]
    print(f"{sys.version.split()[0]}, busy main thread: {args.busy_main}, {args.trials} trials")
    print("MiB past the ceiling:", " ".join(f"{p:.1f}" for p in past))
    print(f"median {statistics.median(past):.1f} MiB, max {past[-1]:.1f} MiB; in switch "
          f"intervals of allocation: median {statistics.median(intervals):.2f}, "
          f"max {max(intervals):.2f}")


if __name__ == "__main__":
    main()
