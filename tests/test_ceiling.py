"""Ceilings: soft limits that still stop code which never reaches a checkpoint."""

from __future__ import annotations

import threading

import anyio
import pytest

import gotcha_async as gotcha
from gotcha_async import _meter

# hard limits and ceilings stop code through the frames it reads
pytestmark = pytest.mark.needs_frames

KiB, MiB = gotcha.KiB, gotcha.MiB
# what runs between the allocation that crosses a ceiling and the next bytecode
# boundary, and the interpreter's own unwinding afterwards
SLIP = 64 * KiB


def grow_without_checkpoint(keep: list[bytearray], step: int = KiB) -> None:
    while True:
        keep.append(bytearray(step))


@pytest.mark.anyio
async def test_a_ceiling_stops_a_loop_that_never_awaits_between_limit_and_ceiling() -> None:
    keep: list[bytearray] = []
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=2 * MiB, ceiling=3) as ctx:
            grow_without_checkpoint(keep)
    assert info.value.resource == "bytes" and info.value.limit == 2 * MiB
    assert isinstance(info.value.__cause__, gotcha.HardLimitError)
    assert isinstance(info.value.__cause__, MemoryError)
    assert 6 * MiB < ctx.used().bytes <= 6 * MiB + SLIP
    assert gotcha.current() is None and _meter._debug.active() == 0


@pytest.mark.anyio
async def test_under_a_ceiling_the_limit_stays_soft() -> None:
    reached = False
    async with gotcha.move_on_limit(bytes=MiB, ceiling=4) as ctx:
        data = bytearray(2 * MiB)  # past the limit, under the ceiling: not refused
        await anyio.sleep(0)  # the checkpoint where the soft limit cancels
        reached = True
    assert len(data) == 2 * MiB
    assert not reached and ctx.exceeded() and ctx.cancelled_caught


@pytest.mark.anyio
async def test_work_within_its_budget_never_sees_the_ceiling() -> None:
    async with gotcha.limit(bytes=4 * MiB, ceiling=2) as ctx:
        for _ in range(10):
            chunk = bytearray(256 * KiB)
            del chunk
            await anyio.sleep(0)
    assert not ctx.exceeded()
    assert 2 * MiB < ctx.used().bytes < 4 * MiB


@pytest.mark.anyio
async def test_a_huge_allocation_past_the_ceiling_is_refused_at_that_line() -> None:
    seen: list[BaseException] = []
    async with gotcha.move_on_limit(bytes=MiB, ceiling=2) as ctx:
        try:
            bytearray(1024 * MiB)
        except MemoryError as exc:
            seen.append(exc)
    assert len(seen) == 1 and type(seen[0]) is MemoryError  # CPython's own
    assert ctx.exceeded() and ctx.used().bytes < gotcha.REFUSE_MIN
    broken = ctx._broken()  # what the refused allocation would have reached
    assert broken is not None and broken[0] == 0 and broken[1] >= 1024 * MiB


@pytest.mark.anyio
async def test_a_hard_scope_in_a_worker_thread_is_stopped_there() -> None:
    keep: list[bytearray] = []
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MiB, hard=True) as ctx:
            await anyio.to_thread.run_sync(grow_without_checkpoint, keep)
    # interrupted (HardLimitError), or the list's growth refused first (MemoryError)
    assert isinstance(info.value.__cause__, MemoryError)
    # the delivery thread needs the GIL to interrupt the worker: up to one switch
    # interval (5 ms) of allocation goes through first
    assert MiB < ctx.used().bytes < 64 * MiB
    assert gotcha.current() is None


def test_a_hard_scope_in_a_plain_thread_leaves_the_others_alone() -> None:
    stop = threading.Event()
    bystander_rounds = 0
    errors: list[BaseException] = []

    def bystander() -> None:
        nonlocal bystander_rounds
        try:
            while not stop.is_set():
                bytearray(KiB)
                bystander_rounds += 1
        except BaseException as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    def governed() -> None:
        for _ in range(20):
            keep: list[bytearray] = []
            with gotcha.move_on_limit(bytes=MiB, hard=True) as ctx:
                grow_without_checkpoint(keep)
            assert ctx.exceeded()

    other = threading.Thread(target=bystander)
    other.start()
    try:
        worker = threading.Thread(target=governed)
        worker.start()
        worker.join()
    finally:
        stop.set()
        other.join()
    assert errors == [] and bystander_rounds > 0
    assert _meter._debug.active() == 0


@pytest.mark.anyio
async def test_a_growing_buffer_is_weighed_by_its_growth_under_a_memory_ceiling() -> None:
    buf = bytearray()
    async with gotcha.move_on_limit(memory=8 * MiB, hard=True) as ctx:
        while True:
            buf += b"x" * (64 * KiB)
    held = ctx.memory()
    assert held is not None
    # a realloc is not checked as if the old block were still held: the buffer gets
    # to the limit, not to half of it
    assert 7 * MiB < len(buf) <= 8 * MiB
    assert held.peak <= 8 * MiB + SLIP


def test_ceilings_are_validated_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"ceiling must be >= 1.*0\.5"):
        gotcha.limit(bytes=1, ceiling=0.5)
    with pytest.raises(TypeError, match=r"ceiling must be a number >= 1 or None, not '2'"):
        gotcha.limit(bytes=1, ceiling="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ceiling"):
        gotcha.limit(bytes=1, ceiling=True)
    with pytest.raises(ValueError, match="finite"):
        gotcha.limit(bytes=1, ceiling=float("nan"))
    with pytest.raises(ValueError, match="hard=True or a ceiling, not both"):
        gotcha.limit(bytes=1, hard=True, ceiling=2)


def test_a_ceiling_scales_every_limit_rounding_up() -> None:
    ctx = gotcha.Context(bytes=3, objects=10, ceiling=1.5)
    ctx.add(bytes=5)  # past the limit (3), at the ceiling (ceil(4.5) = 5)
    assert ctx.exceeded()
    assert ctx.limits() == (3, 10, None)


def test_track_memory_and_add_are_validated() -> None:
    with pytest.raises(TypeError, match="track_memory must be True or False, not 'yes'"):
        gotcha.Context(track_memory="yes")  # type: ignore[arg-type]
    ctx = gotcha.Context(bytes=10)
    with pytest.raises(ValueError, match=r"bytes is too large: 18446744073709551621"):
        ctx.add(bytes=2**64 + 5)
    assert ctx.used() == (0, 0, 0)  # nothing was charged


def test_counters_saturate_instead_of_wrapping() -> None:
    ctx = gotcha.Context(bytes=10)
    ctx.add(bytes=2**64 - 2)
    ctx.add(bytes=2**64 - 2)
    assert ctx.used().bytes >= 2**64 - 2
    assert ctx.exceeded()


def test_allocations_after_add_saturated_the_counters_do_not_wrap_them() -> None:
    # the hook's own charge of each block saturates too, in the scope and its ancestors
    top = 2**64 - 2
    ctx = gotcha.Context(bytes=100)
    with ctx:
        ctx.add(bytes=top, objects=top, calls=top)
        kept = [[i] * 10 for i in range(10)]
    assert all(value >= top for value in ctx.used()), ctx.used()
    outer = gotcha.Context()
    with outer:
        outer.add(bytes=top)
        with gotcha.Context():
            kept = [[i] for i in range(100)]
    assert outer.used().bytes >= top
    del kept


@pytest.mark.anyio
async def test_an_ancestors_ceiling_stops_a_loop_in_a_scope_without_limits() -> None:
    # the inner scope's blocks are batched against what its whole chain has left:
    # the outer ceiling is crossed, and acted on, at the block that crosses it
    keep: list[bytearray] = []
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=2 * MiB, ceiling=3) as outer:
            async with gotcha.limit() as inner:
                grow_without_checkpoint(keep)
    assert info.value.context is outer
    assert 6 * MiB < outer.used().bytes <= 6 * MiB + SLIP
    assert inner.used().bytes <= outer.used().bytes
