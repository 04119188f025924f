"""Blocks left behind stop costing once no tracking Context is left: the table is
dropped and the hook leaves the allocator chain (tests/test_memory.py)."""

from __future__ import annotations

import gc

import gotcha_async as gotcha
from gotcha_async import _meter

gc.collect()
ctx = gotcha.Context(track_memory=True, exact_memory=True)
with ctx:
    kept = [bytearray(1024) for _ in range(100)]
assert _meter._debug.held_blocks() >= 100
assert _meter._debug.hooked()
del ctx  # the last Context that could report these blocks
assert _meter._debug.held_blocks() == 0, _meter._debug.held_blocks()
assert not _meter._debug.hooked()
del kept  # their frees find nothing to credit, and nothing breaks
with gotcha.Context(track_memory=True) as again:  # tracking starts afresh
    data = bytearray(1 << 20)
    memory = again.memory()
    assert memory is not None and memory.current >= 1 << 20, memory
    del data
    memory = again.memory()
    assert memory is not None and memory.current < 64 * 1024, memory
print("ok")
