"""Lazy scopes: a plain scope on asyncio makes no cancel scope until one is needed.

Every case here checks what a scope does when it is cancelled (by a broken limit, by
``cancel()``, from outside) with other cancel scopes around it and inside it: anyio's,
``asyncio.timeout``'s, task groups'. Those marked ``anyio`` run on asyncio and trio (on
trio nothing is lazy: they pin the behaviour both backends share); those marked
``asyncio`` run on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio
import anyio._backends._asyncio
import pytest

import gotcha_async as gotcha
from gotcha_async import _foreign

LIMIT = 1000
OVER = 64 * 1024  # one allocation well past LIMIT


async def checkpoints(n: int = 50) -> None:
    """Give a soft limit's delivery (a pending call, then a loop callback) time to land."""
    for _ in range(n):
        await anyio.sleep(0)


async def warm() -> None:
    """The first scopes of a process learn anyio's scope class; later ones are lazy."""
    for _ in range(2):
        async with gotcha.limit():
            pass


def cancelling() -> int:
    """The asyncio task's cancelling() count (0 on trio)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return 0  # trio
    return task.cancelling() if task is not None else 0


# -- it is lazy -------------------------------------------------------------------------

# where anyio lacks the internals a lazy scope uses, every scope takes the full path (and
# the rest of this file holds all the same)
lazy = pytest.mark.skipif(
    not _foreign.lazy_possible(anyio._backends._asyncio.CancelScope),
    reason="this anyio has not what a lazy scope needs: every scope is made at entry",
)


@lazy
@pytest.mark.asyncio
async def test_a_plain_scope_makes_no_cancel_scope() -> None:
    await warm()
    async with gotcha.limit(bytes=gotcha.MiB) as ctx:
        assert ctx._scope is None
        assert ctx._host is asyncio.current_task()
        await asyncio.sleep(0)
    assert ctx._scope is None and ctx._host is None
    assert not ctx.cancel_called and not ctx.cancelled_caught


@pytest.mark.asyncio
async def test_deadline_shield_and_early_cancel_take_the_full_path() -> None:
    await warm()
    with gotcha.Context(shield=True) as a:
        assert a._scope is not None
    b = gotcha.Context()
    b.deadline = anyio.current_time() + 60
    with b:
        assert b._scope is not None
    c = gotcha.Context()
    c.cancel()
    with c:
        assert c._scope is not None
        await asyncio.sleep(0)
    assert c.cancelled_caught


# -- a broken limit and cancel() ---------------------------------------------------------


@pytest.mark.anyio
async def test_broken_limit_cancels_and_leaves_cancelling_balanced() -> None:
    await warm()
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=LIMIT) as ctx:
            bytearray(OVER)
            await checkpoints()
            pytest.fail("not cancelled")
    assert ctx.cancel_called and ctx.cancelled_caught
    assert cancelling() == 0
    await anyio.sleep(0)  # not cancelled again out here


@pytest.mark.anyio
async def test_cancel_inside_the_body_cancels_at_the_next_checkpoint() -> None:
    await warm()
    with gotcha.Context() as ctx:
        ctx.cancel("enough")
        assert ctx.cancel_called
        await anyio.sleep(0)
        pytest.fail("not cancelled")
    assert ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_cancellation_is_level_triggered() -> None:
    await warm()
    caught = 0
    async with gotcha.move_on_limit(bytes=LIMIT) as ctx:
        bytearray(OVER)
        for _ in range(3):
            try:
                await checkpoints()
            except anyio.get_cancelled_exc_class():
                caught += 1  # swallowed: the next checkpoint is cancelled again
        await anyio.sleep(0)
        pytest.fail("not cancelled again")
    assert caught == 3
    assert ctx.exceeded() and ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_cancel_from_another_task() -> None:
    await warm()
    entered = anyio.Event()
    box: dict[str, gotcha.Context] = {}

    async def victim() -> None:
        with gotcha.Context() as ctx:
            box["ctx"] = ctx
            entered.set()
            await anyio.sleep(10)
        assert ctx.cancelled_caught

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(victim)
            await entered.wait()
            box["ctx"].cancel()


@pytest.mark.anyio
async def test_deadline_set_inside_the_body() -> None:
    await warm()
    with gotcha.Context() as ctx:
        ctx.deadline = anyio.current_time() + 0.01
        await anyio.sleep(5)
    assert ctx.cancelled_caught


@pytest.mark.anyio
async def test_shield_set_inside_the_body_keeps_an_outer_cancel_out() -> None:
    await warm()
    with anyio.CancelScope() as outer:
        with gotcha.Context() as ctx:
            ctx.shield = True
            outer.cancel()
            await checkpoints(5)  # shielded: not cancelled
        await anyio.sleep(0)
        pytest.fail("not cancelled after the shield")
    assert outer.cancelled_caught and not ctx.cancelled_caught


# -- nesting with anyio's scopes ---------------------------------------------------------


@pytest.mark.anyio
async def test_outer_cancellation_passes_through_untouched() -> None:
    await warm()
    with anyio.CancelScope() as outer:
        async with gotcha.limit() as ctx:
            outer.cancel()
            await anyio.sleep(0)
            pytest.fail("not cancelled")
    assert outer.cancelled_caught
    assert not ctx.cancel_called and not ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_inner_anyio_scope_does_not_take_our_cancellation() -> None:
    await warm()
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=LIMIT) as ctx:
            with anyio.CancelScope() as inner:
                bytearray(OVER)
                await checkpoints()
                pytest.fail("not cancelled")
            pytest.fail("the inner scope swallowed the cancellation")
    assert not inner.cancel_called and not inner.cancelled_caught
    assert ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_inner_shield_holds_off_our_cancellation_until_it_exits() -> None:
    await warm()
    reached_end_of_shield = False
    async with gotcha.move_on_limit(bytes=LIMIT) as ctx:
        with anyio.CancelScope(shield=True):
            bytearray(OVER)
            await checkpoints()
            reached_end_of_shield = True
        await anyio.sleep(0)
        pytest.fail("not cancelled after the shield")
    assert reached_end_of_shield and ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_inner_scope_cancelled_on_its_own_catches_its_own() -> None:
    await warm()
    async with gotcha.limit() as ctx:
        with anyio.CancelScope() as inner:
            inner.cancel()
            await anyio.sleep(0)
        await anyio.sleep(0)  # ours is not cancelled
    assert inner.cancelled_caught and not ctx.cancelled_caught


@pytest.mark.anyio
async def test_outer_anyio_scope_cancelled_after_ours_broke() -> None:
    await warm()
    with anyio.CancelScope() as outer:
        with pytest.raises(gotcha.LimitExceeded):
            async with gotcha.limit(bytes=LIMIT):
                bytearray(OVER)
                await checkpoints()
        outer.cancel()
        await anyio.sleep(0)
        pytest.fail("outer not cancelled")
    assert outer.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_nested_limits_the_outer_one_breaks() -> None:
    await warm()
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=LIMIT) as outer:
            async with gotcha.limit() as inner:
                with anyio.CancelScope() as plain:
                    bytearray(OVER)
                    await checkpoints()
                    pytest.fail("not cancelled")
    assert info.value.context is outer
    assert not inner.cancelled_caught and not plain.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_nested_limits_the_inner_one_breaks_then_the_outer_is_cancelled() -> None:
    await warm()
    async with gotcha.move_on_limit() as outer:
        with anyio.CancelScope() as plain:
            with pytest.raises(gotcha.LimitExceeded):
                async with gotcha.limit(bytes=LIMIT) as inner:
                    bytearray(OVER)
                    await checkpoints()
            outer.cancel()
            await anyio.sleep(0)
            pytest.fail("outer not cancelled")
    assert inner.cancelled_caught and outer.cancelled_caught
    assert not plain.cancelled_caught
    assert cancelling() == 0


@pytest.mark.anyio
async def test_inner_limit_made_real_after_its_parent_was() -> None:
    await warm()
    async with gotcha.move_on_limit() as outer:
        async with gotcha.move_on_limit() as inner:
            with anyio.CancelScope() as plain:
                outer.cancel()  # outer made real first, around inner's anyio scope
                inner.cancel()  # inner's goes between outer's and plain
                await anyio.sleep(0)
                pytest.fail("not cancelled")
            pytest.fail("the outer cancellation was taken by the inner scope")
    # the outermost cancelled scope catches, as on trio
    assert inner.cancel_called and not inner.cancelled_caught
    assert outer.cancelled_caught and not plain.cancelled_caught
    assert cancelling() == 0


# -- task groups -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_anyio_task_group_children_are_cancelled() -> None:
    await warm()
    cancelled = []

    async def sleeper() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.append(1)
            raise

    async def hog() -> None:
        bytearray(OVER)
        await anyio.sleep(10)

    with anyio.fail_after(5), pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=LIMIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sleeper)
                tg.start_soon(sleeper)
                tg.start_soon(hog)
    assert cancelled == [1, 1]
    assert cancelling() == 0


@pytest.mark.anyio
async def test_task_group_child_cancelled_while_the_host_is_shielded() -> None:
    await warm()
    cancelled = anyio.Event()

    async def hog() -> None:
        bytearray(OVER)
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    with anyio.fail_after(5):
        async with gotcha.move_on_limit(bytes=LIMIT) as ctx:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hog)
                with anyio.CancelScope(shield=True):
                    await cancelled.wait()  # the child is cancelled, the host is not
            await anyio.sleep(0)
            pytest.fail("the host not cancelled after its shield")
    assert ctx.exceeded() and ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_asyncio_task_group_children_are_cancelled() -> None:
    await warm()
    cancelled = []

    async def sleeper() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(1)
            raise

    async def hog() -> None:
        bytearray(OVER)
        await asyncio.sleep(10)

    async with asyncio.timeout(5):
        with pytest.raises(gotcha.LimitExceeded):
            async with gotcha.limit(bytes=LIMIT):
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(sleeper())
                    tg.create_task(sleeper())
                    tg.create_task(hog())
    assert cancelled == [1, 1]
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_scope_inside_an_anyio_task_group_child() -> None:
    await warm()
    result: dict[str, Any] = {}

    async def child() -> None:
        try:
            async with gotcha.limit(bytes=LIMIT) as ctx:
                bytearray(OVER)
                await checkpoints()
        except gotcha.LimitExceeded:
            result["raised"] = True
        result["caught"] = ctx.cancelled_caught
        result["cancelling"] = cancelling()

    async with anyio.create_task_group() as tg:
        tg.start_soon(child)
    assert result == {"raised": True, "caught": True, "cancelling": 0}


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
@pytest.mark.asyncio
async def test_scope_in_an_eager_task() -> None:
    await warm()
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        pytest.skip("uvloop's create_task does not take eager task factories")
    result: dict[str, Any] = {}

    async def child() -> None:
        # entered before the task's first suspension: it runs inside create_task()
        try:
            async with gotcha.limit(bytes=LIMIT) as ctx:
                result["lazy"] = ctx._scope is None
                bytearray(OVER)
                await checkpoints()
        except gotcha.LimitExceeded:
            result["raised"] = True
        result["cancelling"] = cancelling()

    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    try:
        async with gotcha.limit() as outer:
            task = loop.create_task(child())
            await task
    finally:
        loop.set_task_factory(None)
    assert result == {"lazy": True, "raised": True, "cancelling": 0}
    assert not outer.cancel_called


# -- nesting with asyncio.timeout ----------------------------------------------------------


@lazy
@pytest.mark.asyncio
async def test_timeout_inside_expires_through_nothing_of_ours() -> None:
    await warm()
    async with gotcha.limit() as ctx:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
    assert ctx._scope is None and not ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_timeout_outside_expires_through_our_scope() -> None:
    await warm()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            async with gotcha.limit() as ctx:
                await asyncio.sleep(5)
    assert not ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_broken_limit_inside_a_timeout_is_not_a_timeout() -> None:
    await warm()
    async with asyncio.timeout(5):
        with pytest.raises(gotcha.LimitExceeded):
            async with gotcha.limit(bytes=LIMIT):
                bytearray(OVER)
                await checkpoints()
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_timeout_inside_a_broken_scope_does_not_take_our_cancellation() -> None:
    await warm()
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=LIMIT) as ctx:
            async with asyncio.timeout(5) as timeout:
                bytearray(OVER)
                await checkpoints()
                pytest.fail("not cancelled")
    assert not timeout.expired()
    assert ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_timeout_none_inside_and_outside() -> None:
    await warm()
    async with asyncio.timeout(None):
        async with gotcha.move_on_limit(bytes=LIMIT) as ctx:
            async with asyncio.timeout(None):
                bytearray(OVER)
                await checkpoints()
                pytest.fail("not cancelled")
    assert ctx.cancelled_caught
    assert cancelling() == 0


@pytest.mark.asyncio
async def test_native_cancel_of_the_task_is_not_swallowed() -> None:
    await warm()
    entered = asyncio.Event()

    async def victim() -> None:
        async with gotcha.move_on_limit():
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(victim())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- more arrangements -------------------------------------------------------------------


@pytest.mark.anyio
async def test_parent_made_real_from_a_child_task_of_its_task_group() -> None:
    await warm()
    child_scope: dict[str, gotcha.Context] = {}

    async def child() -> None:
        async with gotcha.move_on_limit() as ctx:
            child_scope["ctx"] = ctx
            bytearray(OVER)  # breaks the parent's limit, from the child's task
            await anyio.sleep(10)

    with anyio.fail_after(5), pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=LIMIT) as parent:
            async with anyio.create_task_group() as tg:
                tg.start_soon(child)
    assert info.value.context is parent
    assert child_scope["ctx"].parent is parent
    assert not child_scope["ctx"].cancelled_caught  # the parent's cancellation passed through
    assert cancelling() == 0


@pytest.mark.anyio
async def test_move_on_after_outside_and_a_broken_limit_inside() -> None:
    await warm()
    with anyio.move_on_after(5) as outer:
        async with gotcha.move_on_limit(bytes=LIMIT) as ctx:
            bytearray(OVER)
            await checkpoints()
            pytest.fail("not cancelled")
        await anyio.sleep(0)  # the outer scope is not cancelled
    assert ctx.cancelled_caught and not outer.cancel_called
    assert cancelling() == 0


@pytest.mark.anyio
async def test_run_raises_for_a_broken_limit() -> None:
    await warm()

    async def work() -> None:
        bytearray(OVER)
        await checkpoints()

    with pytest.raises(gotcha.LimitExceeded):
        await gotcha.run(work, bytes=LIMIT)
    assert cancelling() == 0


@lazy
@pytest.mark.asyncio
async def test_a_lazy_scope_after_another_task_made_one_real() -> None:
    # anyio's task states are not empty any more: entry looks the task up
    await warm()
    async with anyio.create_task_group() as tg:
        tg.start_soon(asyncio.sleep, 0)
        async with gotcha.limit() as ctx:
            assert ctx._scope is None and ctx._anyio_outer is not None
        with pytest.raises(gotcha.LimitExceeded):
            async with gotcha.limit(bytes=LIMIT):
                bytearray(OVER)
                await checkpoints()
    assert cancelling() == 0
