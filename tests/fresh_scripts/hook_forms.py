"""The hook's forms (out, light, full, light with a tracemalloc link) as memory scopes
come and go and tracemalloc starts and stops (tests/test_meter.py).

Argument: the case to run. In a fresh process: a free reaches the hook only while some
memory scope exists anywhere in the process, and a test suite keeps scopes alive in the
tracebacks it stores.
"""

from __future__ import annotations

import _tracemalloc
import gc
import sys
import threading
import tracemalloc

import gotcha_async as gotcha
from gotcha_async import _meter

MB, SLACK = 10**6, 64 * 1024


def current(ctx: gotcha.Context) -> int:
    memory = ctx.memory()
    assert memory is not None, "not a memory scope"
    return memory.current


def hold_and_free(ctx: gotcha.Context) -> None:
    """A block of known size is held by ctx, and no longer once freed."""
    data = bytearray(MB)
    assert MB <= current(ctx) < MB + SLACK, ctx.memory()
    del data
    assert current(ctx) < SLACK, ctx.memory()


def frees_only_while_a_scope_can_hold() -> None:
    with gotcha.limit():
        assert _meter._debug.hook_form() == "light"
        holder = gotcha.limit(memory=10 * MB)
        assert _meter._debug.hook_form() == "full"
        with holder:
            hold_and_free(holder)
        del holder
        assert _meter._debug.hook_form() == "light"
    assert _meter._debug.hook_form() == "out"


def tracemalloc_started_over_a_light_hook() -> None:
    with gotcha.limit():
        tracemalloc.start()
        with gotcha.limit(memory=10 * MB) as ctx:
            hold_and_free(ctx)
            assert _meter._debug.hook_form() == "light, watched"
            tracemalloc.stop()  # the light hook back on top, the link gone with it
            assert _meter._debug.hook_form() == "full"
            hold_and_free(ctx)
        del ctx
        assert _meter._debug.hook_form() == "light"


def stop_bypassing_the_wrapper() -> None:
    with gotcha.limit():
        tracemalloc.start()
        holder = gotcha.limit(memory=10 * MB)
        assert _meter._debug.hook_form() == "light, watched"
        _tracemalloc.stop()  # behind our back: the link is gone, unnoticed
        with holder:  # entering probes the chain, and frees reach the hook again
            assert _meter._debug.hook_form() == "full"
            hold_and_free(holder)
        del holder
        assert _meter._debug.hook_form() == "light"


def every_form_while_threads_allocate() -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while not stop.is_set():
                with gotcha.limit():
                    x = [bytearray(100) for _ in range(200)]
                    y = bytearray(70_000)
                    y += b"x" * 1000
                    del x, y
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    forms = set()
    try:
        for i in range(120):
            if i % 4 == 1:
                tracemalloc.start()  # over a light hook: the link goes on top
            with gotcha.limit(memory=10 * MB, exact_memory=True) as ctx:
                forms.add(_meter._debug.hook_form())
                data = [bytearray(5000) for _ in range(50)]
                assert 250_000 <= current(ctx) < 250_000 + SLACK
                if i % 4 == 1:
                    tracemalloc.stop()
                elif i % 4 == 2:
                    tracemalloc.start()  # over the full hook
                del data
                assert current(ctx) < SLACK, ctx.memory()
            if i % 4 == 2:
                (_tracemalloc.stop if i % 8 == 2 else tracemalloc.stop)()
            del ctx
            gc.collect()
            forms.add(_meter._debug.hook_form())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert {"full", "light", "light, watched"} <= forms, forms


CASES = {f.__name__: f for f in [
    frees_only_while_a_scope_can_hold,
    tracemalloc_started_over_a_light_hook,
    stop_bypassing_the_wrapper,
    every_form_while_threads_allocate,
]}

CASES[sys.argv[1]]()
print("ok")
