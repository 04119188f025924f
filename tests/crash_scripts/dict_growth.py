"""Item 17: a refusal that lands on a dict's growth.

    dict_growth.py setdefault|setattr

3.13.0's dict.setdefault() and PyDict_SetDefault[Ref]() (every string interned goes
through it: setattr() and getattr() of a new name) do not report a failed resize: they
return success with the MemoryError still set and count the entry they did not insert,
and the dict's next resize reads one entry past the end (a SIGSEGV). With the hook's
refusal that was ``SystemError: ... returned a result with an exception set`` then a
crash (fault_inject.py, test_traceback seed 3, in the interned-strings dict).

setdefault: a dict whose next key makes it grow by far more than a hard scope's
ceiling. setattr: new attribute names, made outside the scope, until the interned-strings
dict's growth is larger on its own than the ceiling (before the fix: the SystemError
from _deliver and the SIGSEGV of the fault-injection run).
"""

from __future__ import annotations

import sys

from _common import report

import gotcha_async as gotcha
from gotcha_async import _meter

mode = sys.argv[1]
caught: list[str] = []

if mode == "setdefault":
    d = {i: None for i in range(5461)}  # a full table of 8192 slots: the next key grows it
    with gotcha.move_on_limit(bytes=100_000, hard=True) as ctx:
        try:
            d.setdefault(-1, None)  # the new table is some 400 kB
        except MemoryError as e:
            caught.append(type(e).__name__)
    count = len(d)
    actual = sum(1 for _ in d)
    for i in range(10**6, 10**6 + 50_000):  # more resizes: the miscount would crash here
        d.setdefault(i, None)
else:
    class Plain:
        pass

    o = Plain()
    names = [f"attribute_number_{i}" for i in range(300_000)]  # made outside, not interned
    with gotcha.move_on_limit(bytes=100_000, hard=True) as ctx:
        try:
            for name in names:  # each is interned: the interned-strings dict grows
                setattr(o, name, None)
                delattr(o, name)
        except MemoryError as e:
            caught.append(type(e).__name__)
    more = [f"more_{i}" for i in range(300_000)]
    for name in more:  # more resizes of the interned-strings dict
        setattr(o, name, None)
        delattr(o, name)
    count = actual = 0

report(caught=caught, count=count, actual=actual, exceeded=ctx.exceeded(),
       dict_fragile=_meter._debug.dict_fragile(), version=list(sys.version_info[:3]))
