"""Items 10 and 11 with real signals: KeyboardInterrupts from a timer while scopes keep
tripping in synchronous code.

    interrupt_storm.py COUNT soft|hard python|c

SIGALRM's handler raises KeyboardInterrupt, as Ctrl-C does: a Python function (as
asyncio.run and trio install for SIGINT) or ``signal.default_int_handler`` (C). It is
armed COUNT times at a random delay under 2 ms, while the main thread
enters, trips and leaves scopes in a loop: the interrupts land everywhere, in the
scope's enter and exit and in the delivery of the broken limit. Every interrupt must
reach the program (none printed as "Exception ignored" and dropped), and after each
one no scope may be left entered.
"""

from __future__ import annotations

import contextvars
import gc
import random
import signal
import sys
import threading

from _common import report

import gotcha_async as gotcha
from gotcha_async import _meter

count, hard = int(sys.argv[1]), sys.argv[2] == "hard"
python_handler = len(sys.argv) <= 3 or sys.argv[3] == "python"
fired = [0]


def on_alarm(signum: int, frame: object) -> None:
    fired[0] += 1
    raise KeyboardInterrupt


signal.signal(signal.SIGALRM, on_alarm if python_handler else signal.default_int_handler)
rng = random.Random(11)
caught = lost = dead = refused_outside = escaped = stuck = 0
SPINS = 200_000  # a round is ~1,000 scopes at most: this many means the signal is stuck
LIMIT = 2000


def trip_until_interrupted() -> str:
    """Trip scopes until an interrupt arrives: "caught", "lost" (its handler ran and
    nothing was raised here) or "stuck" (its handler never ran)."""
    expected = fired[0] + 1
    try:
        # armed inside the try: a timer of 10 us can fire on the way in
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.000_01, 0.002))
        for _ in range(SPINS):
            if fired[0] >= expected:
                return "lost"
            with gotcha.move_on_limit(bytes=LIMIT, hard=hard):
                try:
                    bytearray(LIMIT * 2)
                except MemoryError:
                    pass
        return "stuck"
    except KeyboardInterrupt:
        if not python_handler:
            fired[0] += 1
        return "caught"


def cpython_with_leaks(rounds: int) -> int:
    """The same storm over ``with threading.Lock()``: how often CPython itself lets an
    interrupt in between a C ``__enter__`` and the with block (3.14.10 does)."""
    leaks = 0
    for _ in range(rounds):
        lock = threading.Lock()
        try:
            # armed and disarmed inside the try: a 10 us timer can fire on either side
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.000_01, 0.002))
            for _ in range(SPINS):
                with lock:
                    pass
            signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            signal.setitimer(signal.ITIMER_REAL, 0)
        leaks += lock.locked()
    return leaks


with gotcha.Context():  # first use installs the hook: not what is measured here
    pass
signal.signal(signal.SIGALRM, signal.default_int_handler)
control = cpython_with_leaks(100)
signal.signal(signal.SIGALRM, on_alarm if python_handler else signal.default_int_handler)
for _ in range(count):
    state: list[object] = ["", True]

    def one(state: list[object] = state) -> None:
        state[0] = trip_until_interrupted()
        state[1] = gotcha.current() is None

    before = _meter._debug.active()
    try:
        # a context of its own per round: a scope left entered stays there
        contextvars.Context().run(one)
        # disarmed inside the try: a timer firing just after the round is not an
        # uncaught KeyboardInterrupt of this script's own
        signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        escaped += 1  # it arrived, but not where it was raised
        signal.setitimer(signal.ITIMER_REAL, 0)
    if state[0] == "caught":
        caught += 1
    elif state[0] == "lost":
        lost += 1
    elif state[0] == "stuck":
        stuck += 1
        fired[0] += 1  # disarmed above: the next round waits for its own
    if not state[1] or _meter._debug.active() > before:
        dead += 1
    try:
        bytearray(LIMIT * 4)
    except MemoryError:
        refused_outside += 1
# a scope left entered in an abandoned context is released with that context, which its
# token keeps in a cycle with the scope: collected by the gc, whenever it runs
gc.collect()
report(cpython_with_leaks=control, fired=fired[0], caught=caught, lost=lost, stuck=stuck,
       escaped=escaped, dead=dead,
       refused_outside=refused_outside, active=_meter._debug.active())
