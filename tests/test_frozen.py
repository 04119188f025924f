"""An exited scope is frozen: never charged, never refuses, interrupts or cancels anything.

A task started inside a scope keeps the scope in its context after the scope exits.
From then on the scope is never charged (that work charges its nearest live ancestor,
or nothing), never refuses, trips or cancels anything, and is never a parent; what it
reports stays what it was at exit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

import gotcha_async as gotcha

pytestmark = pytest.mark.anyio

MB = 10**6
SLACK = 64 * 1024  # what the interpreter may allocate around a known allocation


async def outliving(
    tg: anyio.abc.TaskGroup, body: Callable[[], Awaitable[None]]
) -> tuple[anyio.Event, anyio.Event]:
    """Start a task from the calling scope that runs body once told to: (go, done)."""
    go, done = anyio.Event(), anyio.Event()

    async def task() -> None:
        await go.wait()
        try:
            await body()
        finally:
            done.set()

    tg.start_soon(task)
    await anyio.sleep(0)  # started: its context holds the scope from here on
    return go, done


async def test_a_task_left_in_an_exited_hard_scope_is_never_refused() -> None:
    # the regression: a bare MemoryError for 10 MB after the hard scope had exited,
    # whenever any other scope was open (the hook only looks while one is)
    got: list[object] = []

    async def allocate() -> None:
        try:
            got.append(len(bytearray(10 * MB)))
        except MemoryError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        async with gotcha.move_on_limit(bytes=MB, hard=True) as hard:
            go, done = await outliving(tg, allocate)
        at_exit = hard.used()
        async with gotcha.limit() as other:
            go.set()
            await done.wait()
    assert got == [10 * MB]
    assert hard.used() == at_exit
    assert not hard.exceeded() and not hard.cancel_called
    assert other.used().bytes < SLACK  # another task's work is never another scope's


async def test_work_left_in_an_exited_scope_charges_its_nearest_live_ancestor() -> None:
    async def allocate() -> None:
        data = bytearray(4 * MB)
        del data

    async with anyio.create_task_group() as tg:
        async with gotcha.limit(bytes=100 * MB) as outer:
            async with gotcha.move_on_limit(bytes=MB) as inner:
                go, done = await outliving(tg, allocate)
            at_exit, outer_before = inner.used(), outer.used().bytes
            go.set()
            await done.wait()
            assert 4 * MB <= outer.used().bytes - outer_before < 4 * MB + SLACK
    # 4 MB over its limit after it exited: not charged, not tripped, not cancelled
    assert inner.used() == at_exit
    assert not inner.exceeded() and not inner.cancel_called
    assert not outer.exceeded()


async def test_an_exited_scope_is_never_a_parent() -> None:
    seen: dict[str, object] = {}

    async def enter_new_scope() -> None:
        seen["current"] = gotcha.current()
        async with gotcha.limit() as fresh:
            seen["parent"] = fresh.parent
            seen["exceeded"] = fresh.exceeded()
            data = bytearray(2 * MB)
            del data
        seen["fresh"] = fresh

    async with anyio.create_task_group() as tg:
        async with gotcha.limit() as outer:
            # exceeded on its own (a soft limit that its body swallows), then exited
            async with gotcha.move_on_limit(bytes=MB) as broken:
                go, done = await outliving(tg, enter_new_scope)
                big = bytearray(2 * MB)
                del big
                await anyio.sleep(0)
            assert broken.exceeded()
            go.set()
            await done.wait()
    assert seen["current"] is outer
    assert seen["parent"] is outer
    assert seen["exceeded"] is False  # an exited ancestor's breach is not its own
    fresh = seen["fresh"]
    assert isinstance(fresh, gotcha.Context)
    assert not fresh.exceeded()
    assert fresh.used().bytes >= 2 * MB


async def test_with_no_live_ancestor_nothing_is_charged() -> None:
    async def allocate() -> None:
        assert gotcha.current() is None
        data = bytearray(4 * MB)
        del data

    async with anyio.create_task_group() as tg:
        async with gotcha.move_on_limit(bytes=MB) as gone:
            go, done = await outliving(tg, allocate)
        at_exit = gone.used()
        async with gotcha.limit() as elsewhere:  # keeps the hook looking
            go.set()
            await done.wait()
    assert gone.used() == at_exit and not gone.exceeded()
    assert elsewhere.used().bytes < SLACK


async def test_held_memory_of_an_exited_scope_is_frozen_but_still_credited() -> None:
    kept: list[bytearray] = []

    async def allocate() -> None:
        kept.append(bytearray(3 * MB))

    async with anyio.create_task_group() as tg:
        async with gotcha.limit(memory=100 * MB, exact_memory=True) as outer:
            async with gotcha.Context(track_memory=True, exact_memory=True) as inner:
                mine = bytearray(MB)
                go, done = await outliving(tg, allocate)
            current, peak = inner.memory()  # type: ignore[misc]
            assert current >= MB
            outer_before = outer.memory().current  # type: ignore[union-attr]
            go.set()
            await done.wait()
            # the block allocated after the exit is the live ancestor's alone (frees
            # of small blocks it held at exit may still credit it)
            assert inner.memory().current <= current  # type: ignore[union-attr]
            assert inner.memory().peak == peak  # type: ignore[union-attr]
            assert outer.memory().current - outer_before > 3 * MB - SLACK  # type: ignore[union-attr]
            del mine  # a block it held at exit: still credited to it
            assert inner.memory().current < current - MB + SLACK  # type: ignore[union-attr]
            assert inner.memory().peak == peak  # type: ignore[union-attr]
            kept.clear()


async def test_a_parent_that_exits_before_its_child_is_entered_is_skipped() -> None:
    async with gotcha.limit() as outer:
        async with gotcha.limit() as middle:
            child = gotcha.Context(parent=middle)
        assert child.parent is middle  # set up while it was live
        async with child:
            assert child.parent is outer
            data = bytearray(2 * MB)
            del data
        assert middle.used().bytes < SLACK
        assert outer.used().bytes >= 2 * MB
        late = gotcha.Context(parent=middle)  # given an exited parent
        assert late.parent is outer


async def test_used_and_exceeded_read_after_exit_stay_as_they_were() -> None:
    async with gotcha.limit() as parent:
        with pytest.raises(gotcha.LimitExceeded):
            async with gotcha.limit(bytes=1000) as child:
                data = bytearray(100_000)
                del data
                await anyio.sleep(0)
        used = child.used()
        assert child.exceeded()
        child.add(bytes=5 * MB)  # charges its live ancestors, not itself
        assert child.used() == used and child.exceeded()
        assert parent.used().bytes >= 5 * MB
        assert str(child).startswith(f"{used.objects} objects allocated, {used.bytes} bytes")
