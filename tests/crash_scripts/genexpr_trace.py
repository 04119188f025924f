"""CPython's own: an exception raised by an opcode tracer inside a generator expression.

    python genexpr_trace.py

No gotcha here. Raises KeyboardInterrupt from a ``sys.settrace`` function at each
instruction in turn of a function with a generator expression; on CPython 3.15.2's
debug build the interpreter aborts (``Assertion `STACK_LEVEL() >= level' failed``, in
generated_cases.c.h), which is why interrupt_points.py spares generator expressions
there. Prints the number of instructions once a run completes without an interrupt.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any


def target(names: tuple[str, ...] = ("a", "b", "c")) -> bool:
    params = {"a": 1, "b": 2, "c": 3}
    return all(n in params for n in names)


class Injector:
    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.fired = False

    def tracer(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != __file__ or frame.f_code.co_name == "tracer":
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            if self.seen == self.at and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
            self.seen += 1
        return self.tracer


for k in range(1000):
    injector = Injector(k)
    sys.settrace(injector.tracer)
    try:
        target()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    if not injector.fired:
        print("instructions:", k)
        break
