"""Hard limits: the allocation that would break the limit is refused where it is made."""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable

import anyio
import pytest

import gotcha_async as gotcha

pytestmark = [pytest.mark.anyio, pytest.mark.needs_frames]

KiB, MiB, GiB = gotcha.KiB, gotcha.MiB, gotcha.GiB
# allocations the loop and the interpreter's unwinding make after a refusal: counted,
# never refused
MACHINERY = 16 * KiB


def big(n: int) -> bytearray:
    return bytearray(n)


def fill() -> None:
    """Allocates in 1 KiB steps until it is stopped."""
    keep = []
    while True:
        keep.append(big(KiB))


def peak_rss() -> int:
    import resource  # Unix only: the one test that uses it is skipped elsewhere

    rss: int = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * KiB


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux only)")
async def test_huge_allocation_is_refused_before_it_is_made() -> None:
    before = peak_rss()
    seen: list[BaseException] = []
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=64 * MiB, hard=True) as ctx:
            try:
                big(2 * GiB)
            except MemoryError as exc:
                seen.append(exc)
                raise
    assert len(seen) == 1 and isinstance(seen[0], MemoryError)
    err = info.value
    assert err.context is ctx and err.resource == "bytes"
    assert err.used >= 2 * GiB  # what the refused allocation would have reached
    assert isinstance(err.__cause__, MemoryError)
    assert ctx.used().bytes < 64 * KiB  # the refused allocation was never charged
    assert ctx.exceeded() and ctx.cancel_called
    assert peak_rss() - before < 256 * MiB
    assert gotcha.current() is None


async def test_append_loop_holds_at_most_the_limit() -> None:
    buf: list[bytearray] = []
    async with gotcha.move_on_limit(bytes=4 * MiB, hard=True) as ctx:
        while True:
            buf.append(big(KiB))
    assert ctx.exceeded()
    assert len(buf) * KiB <= 4 * MiB
    assert len(buf) * KiB > 3 * MiB
    assert ctx.used().bytes <= 4 * MiB + MACHINERY  # the unwinding after the refusal


async def test_code_that_swallows_the_error_gets_a_grace_four_times_then_none() -> None:
    buf: list[bytearray] = []
    stops = 0
    async with gotcha.move_on_limit(bytes=4 * MiB, hard=True) as ctx:
        for _ in range(100_000):
            try:
                buf.append(big(KiB))
            except MemoryError:
                stops += 1
    # the error lands at the next bytecode boundary: inside the try, or at the loop's
    # own jump, where it escapes the loop
    assert stops >= 1 or len(buf) < 100_000
    graces = 4 * gotcha.GRACE["bytes"]
    assert ctx.used().bytes <= 4 * MiB + graces + MACHINERY
    assert len(buf) * KiB <= 4 * MiB + graces


async def test_spinning_loop_stops_on_a_calls_limit() -> None:
    spins = 0
    async with gotcha.move_on_limit(calls=10_000, hard=True) as ctx:
        while True:
            _ = [spins]
            spins += 1
    assert ctx.exceeded()
    # stopped at the bytecode boundary after the 10,001st call
    assert 1000 < spins <= 10_000 + 16
    assert ctx.used().calls <= 10_000 + MACHINERY


async def test_objects_limit_is_refused_too() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(objects=1000, hard=True):
            [object() for _ in range(10_000)]
    assert info.value.resource == "objects"
    # stopped at the next bytecode boundary after the 1,001st object
    assert 1000 < info.value.used <= 1000 + 32


async def test_refusal_lands_only_in_its_own_task_and_thread() -> None:
    stop = threading.Event()
    thread_started = threading.Event()
    started = anyio.Event()
    errors: list[BaseException] = []
    rounds = {"task": 0, "thread": 0}

    def thread_bystander() -> None:
        while not stop.is_set():
            try:
                [big(KiB) for _ in range(64)]
                rounds["thread"] += 1
                thread_started.set()
            except BaseException as exc:  # any error at all is a failure here
                errors.append(exc)
                return

    async def task_bystander() -> None:
        started.set()
        while not stop.is_set():
            try:
                [big(KiB) for _ in range(64)]
                rounds["task"] += 1
            except BaseException as exc:  # any error at all is a failure here
                errors.append(exc)
                return
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(task_bystander)
        tg.start_soon(anyio.to_thread.run_sync, thread_bystander)
        await started.wait()
        await anyio.to_thread.run_sync(thread_started.wait)
        for _ in range(20):
            async with gotcha.move_on_limit(bytes=MiB, hard=True) as ctx:
                keep = []
                while True:
                    keep.append(big(KiB))
            assert ctx.exceeded()
            await anyio.sleep(0)
        stop.set()
    assert errors == []
    assert rounds["task"] > 0 and rounds["thread"] > 0


@pytest.mark.parametrize(
    ("work", "refused"),
    [
        # _json is a module of its own (lib-dynload) on most builds: not refused
        pytest.param(lambda: json.loads(json.dumps([list(range(50))] * 2000)), False,
                     id="json"),
        pytest.param(lambda: re.findall(r"\w+", "word " * 200_000), True, id="re"),
        pytest.param(lambda: {i: str(i) for i in range(100_000)}, True, id="comprehension"),
    ],
)
async def test_refusal_inside_library_code(work: Callable[[], object], refused: bool) -> None:
    with gotcha.Context() as free:
        work()
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MiB, hard=True) as ctx:
            work()
    assert isinstance(info.value.__cause__, MemoryError)
    # a C call that allocates in small steps runs until its first allocation of
    # REFUSE_MIN or more past the ceiling that CPython's own C asked for (here the
    # result list's growth), or returns and is stopped at the next bytecode boundary
    if refused:
        assert ctx.used().bytes <= 16 * MiB < free.used().bytes
    else:
        assert ctx.used().bytes <= free.used().bytes + MiB
    assert gotcha.current() is None
    # the process goes on allocating normally
    assert len(big(8 * MiB)) == 8 * MiB


async def test_refusal_inside_a_finally_block() -> None:
    cleaned = []
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=MiB, hard=True):
            try:
                pass
            finally:
                cleaned.append(big(4 * MiB))
    assert cleaned == []


async def test_a_stopped_scopes_cleanup_runs_to_its_end() -> None:
    # the stop's except/finally blocks (a session's rollback and close) allocate more than
    # the grace: they were stopped again halfway, and what they hand back was lost
    cleaned: list[int] = []
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=MiB, hard=True) as ctx:
            try:
                fill()
            finally:
                undo = [bytes(100) for _ in range(4_000)]  # 0.5 MB in small steps
                cleaned.append(len(undo))
    assert cleaned == [4_000]
    assert ctx.exceeded()
    # up to twice the ceiling while unwinding, not further
    assert ctx.used().bytes <= 2 * MiB + 64 * KiB


@pytest.mark.parametrize("kind", ["hard", "ceiling"])
async def test_move_on_limit_swallows_what_a_library_made_of_its_stop(kind: str) -> None:
    # pandas' C parser turns a refused read() into ParserError and drops the MemoryError:
    # that escaped move_on_limit (limit() raised LimitExceeded from it already)
    class LibraryError(Exception):
        pass

    def library_call() -> None:
        try:
            bytearray(256 * MiB)  # refused: larger than the ceiling on its own
        except MemoryError:
            raise LibraryError("read failed") from None

    limits: dict[str, object] = {"hard": True} if kind == "hard" else {"ceiling": 2}
    async with gotcha.move_on_limit(bytes=16 * MiB, **limits) as ctx:  # type: ignore[arg-type]
        library_call()
    assert ctx.exceeded()
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=16 * MiB, **limits):  # type: ignore[arg-type]
            library_call()
    assert isinstance(info.value.__cause__, LibraryError)
    # a scope that only tripped its soft limit still lets the library's error through
    with pytest.raises(LibraryError):
        async with gotcha.move_on_limit(bytes=1 * MiB):
            bytearray(2 * MiB)
            raise LibraryError("a real one")


async def test_code_that_swallows_its_stop_is_stopped_again_past_the_grace() -> None:
    stops = 0
    async with gotcha.move_on_limit(bytes=MiB, hard=True) as ctx:
        while stops < 3:
            try:
                keep = [big(KiB) for _ in range(10_000)]
                del keep
            except MemoryError:
                stops += 1  # and back to the loop, out of the handler
    assert stops == 3 and ctx.exceeded()
    assert ctx.used().bytes <= 2 * MiB  # each time stopped within the grace


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("budget", [MiB, 64 * KiB])
async def test_a_close_the_stopped_code_starts_in_a_task_of_its_own_runs_to_its_end(
    budget: int,
) -> None:
    # SQLAlchemy's AsyncSession closes behind asyncio.shield, in a new task with no
    # exception in flight: stopped again in its first 64 KiB, it left the session's
    # connection checked out ("Task exception was never retrieved")
    import asyncio

    closed: list[int] = []

    async def close() -> None:
        undo = [bytes(100) for _ in range(4_000)]  # 0.5 MB in small steps
        await asyncio.sleep(0)
        closed.append(len(undo))

    tasks = []
    async with gotcha.move_on_limit(bytes=budget, hard=True) as ctx:
        try:
            fill()
        finally:
            tasks.append(asyncio.ensure_future(close()))
            await asyncio.shield(tasks[0])  # the scope's cancellation may end the wait
    await tasks[0]  # its exception, if it was stopped
    assert closed == [4_000]
    assert ctx.exceeded()
    # a ceiling's worth past the ceiling, and at least 4 MiB (a small budget's close
    # was stopped at twice the ceiling), not further
    assert ctx.used().bytes <= budget + max(budget, 4 * MiB) + 64 * KiB


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_loops_cancellation_work_is_not_charged_to_a_scope_past_its_limit() -> None:
    # cancelling a scope, anyio re-cancels its task at every turn of the loop, and a
    # TaskGroup waiting for a child's cleanup wakes and waits again each time: that was
    # charged to the scope (about 180 MB a second), and with a ceiling it stopped the
    # cleanup it was waiting for
    import asyncio

    turns = 3_000
    released = asyncio.Event()
    cleaning = asyncio.Event()

    async def child() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaning.set()
            await asyncio.shield(released.wait())

    async def release_after_turns() -> None:
        await cleaning.wait()
        for _ in range(turns):
            await asyncio.sleep(0)
        released.set()

    outside = asyncio.ensure_future(release_after_turns())  # made outside the scope
    async with gotcha.move_on_limit(bytes=MiB) as ctx:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(child())
            await asyncio.sleep(0)
            before = ctx.used().bytes
            keep = big(2 * MiB)  # past the limit: the scope is cancelled
            await asyncio.sleep(3600)
    await outside
    assert released.is_set() and ctx.exceeded()
    del keep
    # the body's 2 MiB, and no more than 16 bytes a turn of the loop
    assert ctx.used().bytes - before <= 2 * MiB + KiB + 16 * turns


async def test_refusal_inside_a_shielded_section() -> None:
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=MiB, hard=True):
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0)
                big(4 * MiB)
    assert gotcha.current() is None


async def test_refusal_in_a_worker_thread() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MiB, hard=True):
            await anyio.to_thread.run_sync(big, 4 * MiB)
    assert isinstance(info.value.__cause__, MemoryError)


async def test_soft_limits_let_the_allocation_through() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MiB) as ctx:
            data = big(4 * MiB)
            assert len(data) == 4 * MiB  # went through
            assert ctx.used().bytes > 4 * MiB
    assert info.value.__cause__ is None


async def test_nested_soft_and_hard_scopes_each_apply_their_own_rule() -> None:
    # a soft parent and a generous hard child: the allocation goes through
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MiB) as outer:
            async with gotcha.limit(bytes=100 * MiB, hard=True):
                data = big(4 * MiB)
                await anyio.sleep(0)
    assert info.value.context is outer and len(data) == 4 * MiB
    # a hard child inside a generous soft parent: refused
    async with gotcha.limit(bytes=100 * MiB) as outer:
        with pytest.raises(gotcha.LimitExceeded) as info:
            async with gotcha.limit(bytes=MiB, hard=True) as inner:
                big(4 * MiB)
        assert info.value.context is inner
    assert not outer.exceeded()
    # a hard parent refuses for its unlimited children
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MiB, hard=True) as outer:
            async with gotcha.limit():
                big(4 * MiB)
    assert info.value.context is outer


def test_hard_limits_work_in_synchronous_code() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        with gotcha.limit(bytes=MiB, hard=True):
            big(4 * MiB)
    assert info.value.used >= 4 * MiB
    with gotcha.move_on_limit(bytes=MiB, hard=True) as ctx:
        big(4 * MiB)
    assert ctx.exceeded()


async def test_reset_clears_the_refusal() -> None:
    async with gotcha.move_on_limit(bytes=MiB, hard=True) as ctx:
        try:
            big(4 * MiB)
        except MemoryError:
            pass
        assert ctx.exceeded()
        ctx.reset()
        assert not ctx.exceeded()
    assert ctx.cancel_called  # the cancellation already requested stays
