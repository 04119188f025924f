"""Memory held: memory= limits, credits for frees made elsewhere, allocation sites."""

from __future__ import annotations

import ctypes
import gc
import random
import sys
import threading
import tracemalloc
from collections.abc import Iterator

import anyio
import pytest
from fresh_scripts import run as run_fresh

import gotcha_async as gotcha
from gotcha_async import _meter

pytestmark = pytest.mark.anyio

KiB, MiB, GiB = gotcha.KiB, gotcha.MiB, gotcha.GiB
SLACK = 64 * KiB


def big(n: int) -> bytearray:
    return bytearray(n)


@pytest.fixture
def tracing() -> Iterator[None]:
    tracemalloc.start(5)
    try:
        yield
    finally:
        tracemalloc.stop()


async def test_churn_passes_a_small_memory_limit() -> None:
    async with gotcha.limit(memory=MiB) as ctx:
        for _ in range(1600):  # 100 MiB through a 64 KiB buffer
            chunk = big(64 * KiB)
            del chunk
    current, peak = ctx.memory()  # type: ignore[misc]
    assert 64 * KiB <= peak < 64 * KiB + SLACK
    assert current < SLACK
    assert ctx.used().bytes >= 100 * MiB  # the allocation budget still sees it all


async def test_holding_more_than_the_limit_fails() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(memory=MiB) as ctx:
            keep = [big(256 * KiB) for _ in range(10)]  # 2.5 MiB
            await anyio.sleep(0)
            pytest.fail("not cancelled")
    err = info.value
    assert err.resource == "memory" and err.limit == MiB
    assert 2.5 * MiB <= err.used < 2.5 * MiB + SLACK
    assert "bytes held at peak" in str(err)
    assert ctx.memory().peak == err.used  # type: ignore[union-attr]
    del keep


async def test_producer_scope_is_credited_for_what_a_consumer_frees() -> None:
    send, receive = anyio.create_memory_object_stream[bytearray](0)  # unbuffered
    dropped = 0

    async def consumer() -> None:
        nonlocal dropped
        async with receive:
            async for item in receive:
                del item
                dropped += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        async with gotcha.limit(memory=2 * MiB) as ctx:
            async with send:
                for _ in range(100):
                    await send.send(big(256 * KiB))
    assert dropped == 100
    current, peak = ctx.memory()  # type: ignore[misc]
    assert ctx.used().bytes >= 25 * MiB
    assert peak <= 2 * 256 * KiB + SLACK
    assert current < SLACK


async def test_a_block_freed_by_another_thread_is_credited() -> None:
    # exact: the worker thread the first call starts holds about 10 KiB of small blocks,
    # which a sampled scope counts as one sample of 64 KiB or none, one run in seven
    async with gotcha.Context(track_memory=True, exact_memory=True) as ctx:
        box = [big(MiB)]
        assert ctx.memory().current >= MiB  # type: ignore[union-attr]
        await anyio.to_thread.run_sync(box.clear)
        assert ctx.memory().current < SLACK  # type: ignore[union-attr]
        assert ctx.memory().peak >= MiB  # type: ignore[union-attr]


def test_memory_outlives_its_scope_and_is_credited_later() -> None:
    with gotcha.Context(track_memory=True) as ctx:
        kept = big(MiB)
    assert ctx.memory().current >= MiB  # type: ignore[union-attr]
    assert _meter._debug.hooked()  # a held block keeps the hook in place for its free
    t = threading.Thread(target=kept.clear)  # freed outside any scope, in a thread
    t.start()
    t.join()
    del kept
    assert ctx.memory().current < SLACK  # type: ignore[union-attr]


def test_a_scope_starts_from_nothing_where_spent_scopes_counters_are_reused() -> None:
    # A scope's held counters outlive it until its last block is freed; then they are
    # kept for the next scopes, which must start from zero, not from the old peaks.
    for _ in range(8):
        with gotcha.Context(memory=GiB) as outer, gotcha.Context(parent=outer):
            kept = big(MiB)
        del kept, outer
    gc.collect()
    with gotcha.Context(track_memory=True, exact_memory=True) as fresh:
        start = fresh.memory()
        block = big(10_000)
        current, peak = fresh.memory()  # type: ignore[misc]
    assert start is not None and start.peak < KiB, start
    assert 10_000 <= current == peak < 10_000 + KiB, (current, peak)
    del block


def test_blocks_of_4_mib_and_more_are_held_exactly_as_they_come_grow_and_go() -> None:
    # A table entry packs a weight below 4 MiB - 1 into 22 bits; the larger ones live in
    # a second table. Sizes on both sides of the boundary, a block grown across it by
    # realloc, and frees in another order than the allocations.
    sizes = [4 * MiB - 2, 4 * MiB - 1, 4 * MiB, 9 * MiB + 7, 64 * MiB]
    with gotcha.Context(track_memory=True, exact_memory=True) as ctx:
        base = ctx.memory().current  # type: ignore[union-attr]
        blocks = [bytearray(n) for n in sizes]
        held = ctx.memory().current - base  # type: ignore[union-attr]
        assert sum(sizes) <= held < sum(sizes) + len(sizes) * KiB, held
        grown = bytearray(4 * MiB - 100)
        grown.extend(bytes(200))  # realloc past the boundary, with bytearray's eighth more
        after = ctx.memory().current - base  # type: ignore[union-attr]
        # the old block's weight credited: without, after would be held + 8.5 MiB
        assert held + 4 * MiB + 100 <= after < held + 4 * MiB * 9 // 8 + 2 * KiB, (held, after)
        for i in (3, 0, 4, 1, 2):
            before = ctx.memory().current  # type: ignore[union-attr]
            blocks[i] = bytearray()
            freed = before - ctx.memory().current  # type: ignore[union-attr]
            assert sizes[i] <= freed < sizes[i] + KiB, (i, freed)
        del grown
        assert ctx.memory().current - base < SLACK  # type: ignore[union-attr]


def test_many_scopes_whose_blocks_outlive_them_are_each_credited_at_the_free() -> None:
    # An entry names its scope's counters by an index, reused once they are spent: 500
    # scopes (more than the 64 kept spare) each leave a block behind inside one parent,
    # which must be credited each one's size when it goes, in any order.
    with gotcha.Context(track_memory=True, exact_memory=True) as outer:
        base = outer.memory().current  # type: ignore[union-attr]
        kept = []
        for i in range(500):
            with gotcha.Context(parent=outer):
                kept.append(bytearray(1000 + i))
        held = outer.memory().current - base  # type: ignore[union-attr]
        want = sum(1000 + i for i in range(500))
        assert want <= held < want + 500 * 200, (held, want)
        random.Random(3).shuffle(kept)
        while kept:
            kept.pop()
        assert outer.memory().current - base < SLACK  # type: ignore[union-attr]
    for _ in range(3):  # the indices given back serve the next scopes
        with gotcha.Context(track_memory=True, exact_memory=True) as fresh:
            block = bytearray(10_000)
            current = fresh.memory().current  # type: ignore[union-attr]
        assert 10_000 <= current < 10_000 + KiB, current
        del block


def test_held_memory_stays_exact_while_blocks_sharing_filter_slots_come_and_go() -> None:
    # A free first asks a filter of 65,536 slots whether its block may be recorded:
    # 300,000 blocks put several in most slots, and a slot must answer yes until the last
    # of its blocks is gone, or the frees after that are missed and held memory stays up.
    # Freed in an order that has nothing to do with their slots.
    with gotcha.Context(track_memory=True, exact_memory=True) as ctx:
        blocks = [bytearray(100) for _ in range(300_000)]
        full = ctx.memory().current  # type: ignore[union-attr]
        assert full > 300_000 * 100
        random.Random(12).shuffle(blocks)
        del blocks[150_000:]
        half = ctx.memory().current  # type: ignore[union-attr]
        assert abs(half - full / 2) < full / 100, (half, full)
        while blocks:
            blocks.pop()
        assert ctx.memory().current < SLACK  # type: ignore[union-attr]


def test_a_free_of_null_credits_nothing_where_held_blocks_fill_the_filter() -> None:
    # free(NULL) is legal, and its filter slot is set like any other once enough blocks
    # are held: 600,000 blocks (each bytearray and its buffer) leave no slot empty. The
    # table has no entry for NULL, and looking one up would find an empty slot instead.
    free = ctypes.pythonapi.PyObject_Free
    free.argtypes, free.restype = [ctypes.c_void_p], None
    mem_free = ctypes.pythonapi.PyMem_Free
    mem_free.argtypes, mem_free.restype = [ctypes.c_void_p], None
    for _ in range(10):  # outside the scope: what the first calls leave in ctypes' caches
        free(None)
        mem_free(None)
    with gotcha.Context(track_memory=True, exact_memory=True) as ctx:
        blocks = [bytearray(100) for _ in range(300_000)]
        held, current = _meter._debug.held_blocks(), ctx.memory().current  # type: ignore[union-attr]
        for _ in range(100):
            free(None)
            mem_free(None)
        # the ints these reads return are held too: a block or two, a few bytes more
        assert held <= _meter._debug.held_blocks() <= held + 2
        assert 0 <= ctx.memory().current - current < 1024  # type: ignore[union-attr]
        del blocks
        assert ctx.memory().current < SLACK  # type: ignore[union-attr]


def test_blocks_left_behind_stop_costing_once_no_tracking_context_is_left() -> None:
    # Blocks that outlive every tracking scope (caches, interned strings) would keep a
    # lookup in every free of the process. Their credits matter only while a Context
    # that could be asked for them exists: once the last one is collected, the table is
    # dropped and the hook leaves the allocator chain. In a fresh interpreter: in this
    # one, any earlier test's Context still referenced (a traceback pytest keeps) holds
    # the table.
    run_fresh("last_context.py", timeout=60)


async def test_nested_scopes_track_inside_a_memory_scope() -> None:
    async with gotcha.limit(memory=10 * MiB) as outer:
        async with gotcha.limit() as inner:
            data = big(MiB)
        assert inner.memory().current >= MiB  # type: ignore[union-attr]
        assert outer.memory().current >= MiB  # type: ignore[union-attr]
        del data
        assert inner.memory().current < SLACK  # type: ignore[union-attr]
    assert gotcha.Context().memory() is None  # no limit, no tracking


@pytest.mark.needs_frames
async def test_hard_memory_limit_refuses_but_lets_churn_through() -> None:
    async with gotcha.limit(memory=MiB, hard=True) as ctx:
        for _ in range(200):
            chunk = big(64 * KiB)
            del chunk
    assert not ctx.exceeded()
    keep: list[bytearray] = []
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(memory=MiB, hard=True):
            while True:
                keep.append(big(64 * KiB))
    assert isinstance(info.value.__cause__, MemoryError)
    assert len(keep) * 64 * KiB <= MiB


@pytest.mark.needs_frames
async def test_allocation_sites_need_no_tracemalloc() -> None:
    assert not tracemalloc.is_tracing()
    async with gotcha.Context(track_memory=True, exact_memory=True) as ctx:
        blocks = [big(100 * KiB) for _ in range(5)]  # the biggest site
        small = [big(KiB) for _ in range(3)]
        sites = ctx.allocation_sites(2)
    assert len(sites) == 2
    assert sites[0].traceback[0].filename == __file__
    assert sites[0].size >= 500 * KiB and sites[0].count >= 5
    assert sites[1].size < sites[0].size
    assert all("gotcha_async" not in s.traceback[0].filename for s in sites)
    # read first: after the exit what the scope holds can only shrink (a block made
    # inside it, such as `sites`, freed between the two reads)
    held = ctx.memory().current  # type: ignore[union-attr]
    everything = ctx.allocation_sites(None, filters=[tracemalloc.DomainFilter(True, 0)])
    assert sum(s.size for s in everything) <= held
    other_domain = ctx.allocation_sites(None, filters=[tracemalloc.DomainFilter(False, 0)])
    assert other_domain == []
    del blocks, small


@pytest.mark.needs_frames
async def test_limit_exceeded_names_the_top_sites() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(memory=MiB):
            keep = [big(256 * KiB) for _ in range(10)]
    message = str(info.value)
    assert "top allocation sites still held by the scope:" in message
    assert f"{__file__}:" in message
    assert "2.5 MiB in " in message
    del keep


async def test_sites_need_tracking() -> None:
    with pytest.raises(RuntimeError, match="does not track held memory"):
        gotcha.Context().allocation_sites()
    async with gotcha.Context(track_memory=True) as ctx:
        pass
    with pytest.raises(ValueError, match="limit must be"):
        ctx.allocation_sites(-1)


@pytest.mark.needs_frames
async def test_sites_are_the_innermost_user_frames() -> None:
    def inner() -> bytearray:
        return big(200 * KiB)

    async with gotcha.Context(track_memory=True) as ctx:
        kept = inner()
    (site,) = ctx.allocation_sites(1, key_type="traceback")
    frames = [(f.filename, f.lineno) for f in site.traceback]
    # oldest first: this test, inner(), big(); nothing of the package or the loop,
    # nothing older than the loop's dispatch of the task (pytest's frames, which run
    # the loop, had filled the fourth place), and not 3.12's "<shim>" entry frame
    assert [f for f, _ in frames] == [__file__] * 3
    assert frames[-1][1] == big.__code__.co_firstlineno + 1
    assert site.size >= 200 * KiB
    del kept


@pytest.mark.needs_frames
async def test_consecutive_blocks_get_the_site_of_their_own_line_and_caller() -> None:
    # The hook remembers the frames of the last site it read, for the next block made
    # at the same place (a C call makes many). A block one line further on, or made
    # by the same helper called from elsewhere, must get a site of its own.
    def helper() -> bytearray:
        return big(100 * KiB)

    def caller_a() -> bytearray:
        return helper()

    def caller_b() -> bytearray:
        return helper()

    async with gotcha.Context(track_memory=True, exact_memory=True) as ctx:
        line = sys._getframe().f_lineno
        first = big(65536)  # literal sizes: no block of another site in between
        second = big(65536)
        via_a = caller_a()
        via_b = caller_b()
        sites = ctx.allocation_sites(None, key_type="traceback")
    by_frames = {
        tuple((f.filename, f.lineno) for f in site.traceback): site.count for site in sites
    }
    here = [frames for frames in by_frames if (__file__, line + 1) in frames]
    after = [frames for frames in by_frames if (__file__, line + 2) in frames]
    assert here and after
    callers = {
        code.co_firstlineno: [frames for frames in by_frames
                              if any(n == code.co_firstlineno + 1 for _, n in frames)]
        for code in (caller_a.__code__, caller_b.__code__)
    }
    assert all(callers.values()), callers
    del first, second, via_a, via_b


async def test_tracemalloc_stopped_inside_a_memory_scope_keeps_crediting() -> None:
    tracemalloc.start()
    try:
        async with gotcha.limit(memory=10 * MiB) as ctx:
            data = big(MiB)
            tracemalloc.stop()
            del data
            more = big(MiB)
            assert MiB <= ctx.memory().current < MiB + SLACK  # type: ignore[union-attr]
            del more
    finally:
        tracemalloc.stop()
    assert ctx.memory().current < SLACK  # type: ignore[union-attr]
