"""A hang in CPython's test_asyncio.test_tasks with no gotcha loaded: one task fails.

    python scripts/repro_test_tasks_interleaving_hang.py     # hangs (3.13.0): Ctrl-C

Found by scripts/fault_inject.py (3.13.0, test.test_asyncio.test_tasks seed 1): a hard
scope's stop landed in coro1 of test_current_task_with_interleaving_tasks before it sets
fut2, and coro2 waits for fut2 for good. The same MemoryError raised at that line with
no gotcha (the fourth call of asyncio.current_task, patched to raise) hangs the same way:
the harness runs that test outside any scope (DEADLOCK_WHEN_A_TASK_FAILS).
"""

import asyncio
import unittest

from test.test_asyncio import test_tasks  # type: ignore[import-not-found]  # noqa: F401

real = asyncio.current_task
n = [0]


def flaky(*a, **k):  # type: ignore[no-untyped-def]
    n[0] += 1
    if n[0] == 4:  # coro1, after await fut1, before fut2.set_result(True)
        raise MemoryError
    return real(*a, **k)


asyncio.current_task = flaky
suite = unittest.defaultTestLoader.loadTestsFromName(
    "test.test_asyncio.test_tasks.CTask_CFuture_Tests.test_current_task_with_interleaving_tasks")
unittest.TextTestRunner(verbosity=2).run(suite)
