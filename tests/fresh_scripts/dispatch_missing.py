"""Allocation sites where asyncio's dispatch function is not found (tests/test_foreign.py).

In a process of its own: the dispatch functions are handed to the C half once, when the
first scope installs the hook. The name is pointed at one that does not exist, as a
Python without ``Handle._run`` would look: one warning says what is lost, and sites are
still recorded, at the line that allocated.
"""

from __future__ import annotations

import asyncio
import warnings

import gotcha_async as gotcha
from gotcha_async import _foreign

_foreign.DISPATCH = (("asyncio.events", "Handle._no_such_function"), *_foreign.DISPATCH[1:])


async def main() -> list[bytearray]:
    async with gotcha.limit(exact_memory=True, track_memory=True) as ctx:
        held = [bytearray(4096) for _ in range(64)]  # the site
        await asyncio.sleep(0)
        [site] = ctx.allocation_sites(1)
        assert site.traceback[0].filename == __file__, site
        assert site.size >= 64 * 4096, site
    return held


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    asyncio.run(main())
    asyncio.run(main())
messages = [str(w.message) for w in caught if "was not found" in str(w.message)]
assert len(messages) == 1 and "Handle._no_such_function" in messages[0], messages
assert all(file != asyncio.events.__file__ for file, _ in _foreign.dispatch_frames())
print("ok")
