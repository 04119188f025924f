"""Items 31/3, 31/4, 31/7 and 31/11: an interrupt lands only in the frame that asked.

    interrupt_aim.py threads N ROUNDS KIND        N threads, each in ROUNDS hard scopes
    interrupt_aim.py trio ROUNDS                  trio.run inside a hard scope
    interrupt_aim.py gc_del ROUNDS                cyclic garbage with allocating __del__
    interrupt_aim.py loops                        loops whose checks are few, in the main
                                                  thread and in another

threads: each body grows a list in a ``while cond:`` loop (KIND ``while``; ``while_if``:
one whose body ends in an ``if``; ``for``) inside ``try/except MemoryError``.
``escaped``: a HardLimitError that left ``move_on_limit``
(raised in the package's own ``__exit__``: 3.13's eval breaker raises an async exception
at the thread's next check, wherever that is). ``skipped``: bodies that neither caught
nor finished, so the error skipped their ``except`` (the loop's closing jump is outside
the exception table on 3.12 and 3.13). ``killed``: threads that died.
"""

from __future__ import annotations

import gc
import sys
import threading

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]


def threads(n: int, rounds: int, kind: str) -> None:
    lock = threading.Lock()
    counts = {"escaped": 0, "killed": 0, "caught": 0, "finished": 0}

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def body() -> None:
        keep: list[bytearray] = []
        try:
            if kind == "while":
                while len(keep) < 10**7:
                    keep.append(bytearray(100))
            elif kind == "while_if":
                # 3.13 and 3.14 close a loop whose body ends in an `if` with a second
                # jump back, outside the exception table
                while len(keep) < 10**7:
                    keep.append(bytearray(100))
                    if len(keep) > 1000:
                        keep.clear()
            else:
                for _ in range(10**7):
                    keep.append(bytearray(100))
        except MemoryError:
            count("caught")
            return
        count("finished")

    def work(start: threading.Barrier) -> None:
        start.wait()
        for _ in range(rounds):
            try:
                with gotcha.move_on_limit(bytes=2_000_000, hard=True):
                    body()
            except BaseException:
                count("escaped")

    threading.excepthook = lambda args: count("killed")
    start = threading.Barrier(n)
    workers = [threading.Thread(target=work, args=(start,)) for _ in range(n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    skipped = n * rounds - counts["caught"] - counts["finished"] - counts["escaped"]
    report(**counts, skipped=skipped, active=gotcha._meter._debug.active())


def trio_run(rounds: int) -> None:
    import trio

    outcomes: dict[str, int] = {}

    async def main() -> str:
        keep = []
        try:
            for _ in range(10**6):
                keep.append(bytearray(100))
                if len(keep) % 64 == 0:
                    await trio.lowlevel.checkpoint()
        except MemoryError:
            return "caught"
        return "finished"

    for _ in range(rounds):
        try:
            with gotcha.move_on_limit(bytes=2_000_000, hard=True):
                r = trio.run(main)
        except BaseException as exc:  # TrioInternalError, a HardLimitError that escaped
            r = type(exc).__name__
        outcomes[r] = outcomes.get(r, 0) + 1
    report(outcomes=outcomes, active=gotcha._meter._debug.active())


class Node:
    def __init__(self) -> None:
        self.me = self
        self.pad = [0] * 10

    def __del__(self) -> None:
        self.garbage = [bytearray(64) for _ in range(20)]


def gc_del(rounds: int) -> None:
    # 3.12: an interrupt raised at the jump from `except MemoryError: pass` back to the
    # end of the try was caught by that try again (3.12 unwinds a backward jump from
    # the instruction before its target), and making the exception past the last grace
    # asked for the next interrupt: the module spun there for ever
    caught = 0
    for _ in range(rounds):
        with gotcha.move_on_limit(bytes=200_000, hard=True):
            try:
                keep = [Node() for _ in range(5000)]
                del keep
                gc.collect()
            except MemoryError:
                caught += 1
    report(rounds=rounds, caught=caught, active=gotcha._meter._debug.active())


def leaf(i: int) -> list[int]:
    return [i] * 20


def loops() -> None:
    # Two loops inside a try, each with a single eval-breaker check of its own, on 3.13:
    # "call" allocates in leaf(), which returns before any check, and its closing jump is
    # outside the exception table (3.12, 3.13), so the interrupt is raised at leaf()'s
    # entry (as if at the call); "callfree" has no check but that jump: on 3.13 it is
    # not interrupted (an interrupt there skipped the try and the scope's `with` in the
    # same frame, and the program died), on the others it is.
    outcomes: dict[str, list[str]] = {"call": [], "callfree": []}

    def run(kind: str) -> None:
        out = outcomes[kind]
        try:
            with gotcha.move_on_limit(bytes=2_000_000, hard=True) as ctx:
                d = {}
                i = 0
                try:
                    if kind == "call":
                        while i < 200_000:
                            d[i] = leaf(i)
                            i += 1
                    else:
                        while i < 200_000:
                            d[i] = [i] * 20
                            i += 1
                except MemoryError:
                    out.append("caught")
                else:
                    out.append("finished")
            if not out:
                out.append("stopped after the loop" if ctx.exceeded() else "lost")
        except BaseException as exc:
            out.append(f"escaped {type(exc).__name__}")

    for kind in outcomes:
        run(kind)
        t = threading.Thread(target=run, args=(kind,))
        t.start()
        t.join()
    report(outcomes=outcomes, active=gotcha._meter._debug.active())


if mode == "threads":
    threads(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
elif mode == "loops":
    loops()
elif mode == "trio":
    trio_run(int(sys.argv[2]))
else:
    gc_del(int(sys.argv[2]))
