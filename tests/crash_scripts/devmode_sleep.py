"""Item 16: what ten ``await asyncio.sleep(0)`` cost a scope (run with and without -X dev).

Under ``-X dev`` asyncio's debug bookkeeping (a stack captured per call_soon) is the
loop's work, not the task's.
"""

from __future__ import annotations

import asyncio
import sys

from _common import report

import gotcha_async as gotcha


async def main() -> list[int]:
    out = []
    for _ in range(5):
        async with gotcha.limit() as ctx:
            for _ in range(10):
                await asyncio.sleep(0)
        out.append(ctx.used().bytes)
    return out


used = asyncio.run(main())
report(used=used, dev=sys.flags.dev_mode, current_none=gotcha.current() is None)
