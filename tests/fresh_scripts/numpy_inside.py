"""numpy first imported inside a scope, as a lazy handler does, is counted from its
first array, keeps its own loader, and the import watch is gone (tests/test_numpy.py)."""

from __future__ import annotations

import asyncio
import sys

import gotcha_async as gotcha
from gotcha_async import _meter


async def main() -> None:
    async with gotcha.limit() as ctx:
        import numpy as np

        before = ctx.used().bytes
        np.empty(10**6)
        grown = ctx.used().bytes - before
    assert _meter._debug.numpy_state() == 1, _meter._debug.numpy_state()
    assert 8 * 10**6 <= grown <= 8 * 10**6 + 4096, grown
    # numpy keeps its own loader, and the watch is gone
    assert np.__spec__ is not None and np.__spec__.loader is np.__loader__
    assert type(np.__loader__).__name__ == "SourceFileLoader", np.__loader__
    assert not any(type(f).__name__ == "_NumpyWatch" for f in sys.meta_path)
    print("ok")


asyncio.run(main())
