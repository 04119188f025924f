"""A worker thread's stop also lands in the task's thread, inside a Python tracer.

    COVERAGE_CORE=pytrace python scripts/repro_coverage_thread_stop.py
    COVERAGE_CORE=sysmon python scripts/repro_coverage_thread_stop.py   # 3.12+
    COVERAGE_CORE=ctrace python scripts/repro_coverage_thread_stop.py   # clean

Found by scripts/ecosystem_inject.py (docs/reliability.md, row 31/5). The work runs in a
worker thread (``anyio.to_thread.run_sync``) inside a hard scope and is stopped there; the awaiting
task's thread is interrupted as well, at its next bytecode: coverage's Python tracer
(called for anyio's ``CancelScope.__exit__``) or its ``sys.monitoring`` callbacks. CPython
unsets the tracer ("Trace function changed") and anyio's machinery is aborted halfway: a
``RuntimeError`` escapes ``move_on_limit`` (a cancel scope exited out of order, or the
thread limiter's token never released), and the next scope of the task fails too.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

import anyio.to_thread
import coverage

import gotcha_async as gotcha

TARGET = '''\
def work(n):
    out = []
    for i in range(n):
        out.append({"id": i, "name": "row %d" % i})
    return len(out)
'''


async def main() -> None:
    from target import work  # type: ignore[import-not-found]

    for budget in (100_000, 1_000_000):
        try:
            async with gotcha.move_on_limit(bytes=budget, hard=True) as ctx:
                await anyio.to_thread.run_sync(work, 200_000)
            print(f"bytes={budget}: stopped={ctx.exceeded()}")
        except BaseException as exc:
            print(f"bytes={budget}: escaped move_on_limit: {exc!r}")


if __name__ == "__main__":
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "target.py"), "w") as f:
        f.write(TARGET)
    sys.path.insert(0, folder)
    cov = coverage.Coverage(data_file=None, include=[os.path.join(folder, "*")])
    cov.start()
    tracer = sys.gettrace()
    asyncio.run(main())
    print("tracer still installed:", sys.gettrace() is tracer)
    cov.stop()
