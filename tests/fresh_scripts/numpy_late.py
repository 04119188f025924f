"""numpy imported after the hook was installed is still counted (tests/test_numpy.py)."""

from __future__ import annotations

import asyncio
import sys

import gotcha_async as gotcha
from gotcha_async import _meter

assert "numpy" not in sys.modules


async def main() -> None:
    async with gotcha.limit():  # installs the hook; no numpy yet
        pass
    assert _meter._debug.numpy_state() == 0
    import numpy as np

    async with gotcha.limit() as ctx:
        np.empty(10**6)
    assert _meter._debug.numpy_state() == 1, _meter._debug.numpy_state()
    assert 8 * 10**6 <= ctx.used().bytes <= 8 * 10**6 + 4096, ctx.used()
    print("ok")


asyncio.run(main())
