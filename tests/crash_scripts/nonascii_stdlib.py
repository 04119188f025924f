"""Item 15: the event loop's frames stay exempt when the standard library lives under a
non-ASCII path.

Run with PYTHONPATH pointing at a folder that holds a copy of the ``asyncio`` package
(the test makes one under an ASCII and under a non-ASCII name): asyncio runs inside
an exhausted sync hard scope, its tasks doing nothing but ``sleep(0)``. Wherever a
MemoryError lands, it must not be in asyncio's own code, and the outcome must be
the same under both paths.
"""

from __future__ import annotations

import asyncio
import traceback

from _common import report

import gotcha_async as gotcha

ASYNCIO_DIR = asyncio.__file__.rsplit("/", 1)[0]
ROUNDS = 200


# a mark per round and task, in place: counting with ints would allocate
MARKS = [bytearray(ROUNDS) for _ in range(3)]


async def spin(marks: bytearray) -> None:
    for i in range(ROUNDS):
        await asyncio.sleep(0)
        marks[i] = 1


async def main() -> None:
    await asyncio.gather(*map(spin, MARKS))


def grow() -> None:
    keep = []
    while True:
        keep.append(bytearray(1000))


where = "none"
with gotcha.move_on_limit(bytes=200_000, hard=True) as ctx:
    try:
        grow()
    except MemoryError:
        pass
    try:
        asyncio.run(main())
    except MemoryError as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        where = "asyncio" if frames and frames[-1].filename.startswith(ASYNCIO_DIR) else "user"
report(where=where, done=sum(map(sum, MARKS)), used=ctx.used().bytes,
       asyncio_dir_ascii=ASYNCIO_DIR.isascii(), exceeded=ctx.exceeded(),
       current_none=gotcha.current() is None)
