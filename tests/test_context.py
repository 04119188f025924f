"""The scope API: counting, limits, nesting, every way out of a scope."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import pickle
import threading
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gotcha_async as gotcha

pytestmark = pytest.mark.anyio

MB = 10**6
SLACK = 64 * 1024  # what the interpreter may allocate around a known allocation


def big(n: int) -> bytearray:
    return bytearray(n)


# -- the Go library's tracker semantics (pure accounting, no event loop) --------------


def test_limited_tracker() -> None:
    ctx = gotcha.Context(bytes=100, objects=10, calls=5)
    assert ctx.used() == (0, 0, 0)
    assert ctx.limits() == (100, 10, 5)
    assert ctx.remains() == (100, 10, 5)
    ctx.add(bytes=60, objects=4, calls=1)
    assert ctx.used() == gotcha.Usage(bytes=60, objects=4, calls=1)
    assert ctx.remains() == (40, 6, 4)
    assert not ctx.exceeded()
    ctx.add(bytes=40)
    assert not ctx.exceeded()  # used == limit is not over it
    ctx.add(bytes=1)
    assert ctx.exceeded()
    # per resource, as Go's Remains: the other resources keep their remainders
    assert ctx.remains() == (0, 6, 4)
    ctx.reset()
    assert ctx.used() == (0, 0, 0)
    assert not ctx.exceeded()
    assert ctx.remains() == (100, 10, 5)


def test_remains_per_resource_as_in_the_go_tracker_test() -> None:
    ctx = gotcha.Context(bytes=10, objects=5, calls=3)
    ctx.reset()
    ctx.add(calls=10)
    assert ctx.exceeded()
    assert ctx.remains() == (10, 5, 0)
    parent = gotcha.Context(bytes=10, objects=5, calls=3)
    child = gotcha.Context(parent=parent)
    child.add(bytes=15, objects=3, calls=3)
    assert child.remains() == (0, 2, 0)


def test_remains_of_a_long_parent_chain_does_not_recurse() -> None:
    root = gotcha.Context(bytes=100)
    ctx = root
    for _ in range(10_000):  # far past the recursion limit
        ctx = gotcha.Context(parent=ctx)
    ctx.add(bytes=40)
    assert ctx.remains() == (60, None, None)


def test_unlimited_tracker() -> None:
    ctx = gotcha.Context()
    assert ctx.limits() == (None, None, None)
    assert ctx.remains() == (None, None, None)
    ctx.add(bytes=10**15, objects=10**12, calls=10**12)
    assert ctx.used() == (10**15, 10**12, 10**12)
    assert not ctx.exceeded()


def test_unlimited_child_of_limited_parent() -> None:
    parent = gotcha.Context(bytes=1000, calls=10)
    child = gotcha.Context(parent=parent)
    assert child.parent is parent
    assert child.limits() == (None, None, None)
    child.add(bytes=300, objects=2, calls=1)
    assert parent.used() == (300, 2, 1)
    assert child.remains() == parent.remains() == (700, None, 9)
    child.add(bytes=701)
    assert parent.exceeded()
    assert child.exceeded()  # an ancestor's limit counts
    assert child.remains() == (0, None, 9)
    child.reset()  # own counters only
    assert child.used() == (0, 0, 0)
    assert parent.used() == (1001, 2, 1)
    assert child.exceeded()


def test_limited_child_is_bounded_by_its_parent() -> None:
    parent = gotcha.Context(bytes=100)
    child = gotcha.Context(bytes=1000, parent=parent)
    child.add(bytes=30)
    assert child.remains().bytes == 70
    sibling = gotcha.Context(bytes=10, parent=parent)
    assert sibling.remains().bytes == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"bytes": -1}, ValueError, "bytes must be >= 0, got -1"),
        ({"objects": 1.5}, TypeError, "objects must be an int, not 1.5"),
        ({"calls": True}, TypeError, "calls must be an int, not True"),
    ],
)
def test_add_rejects_bad_values(kwargs: dict[str, Any], error: type[Exception], text: str) -> None:
    ctx = gotcha.Context()
    with pytest.raises(error, match=text):
        ctx.add(**kwargs)
    assert ctx.used() == (0, 0, 0)


def test_parent_cycle_is_refused() -> None:
    a = gotcha.Context()
    b = gotcha.Context(parent=a)
    with pytest.raises(ValueError, match="ancestor"):
        a._set_parent(b)


def test_bad_parent_and_flags() -> None:
    with pytest.raises(TypeError, match="parent must be a Context"):
        gotcha.Context(parent=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hard must be True or False, not 1"):
        gotcha.limit(hard=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shield must be True or False"):
        gotcha.limit(shield="yes")  # type: ignore[arg-type]
    ctx = gotcha.Context()
    with pytest.raises(TypeError, match="shield must be True or False, not 'yes'"):
        ctx.shield = "yes"  # type: ignore[assignment]
    assert ctx.shield is False  # nothing changed


def _made(factory: Any, **kwargs: Any) -> tuple[Any, ...]:
    """What a scope made with kwargs is, or the error its making raised."""
    try:
        ctx = factory(**kwargs)
    except Exception as exc:
        return (type(exc), str(exc))
    return (ctx.limits(), ctx._limits, ctx._hard, ctx.memory())


LIMIT_VALUES = st.one_of(
    st.none(), st.integers(min_value=-3, max_value=2**64), st.booleans(),
    st.floats(allow_nan=False), st.sampled_from(["64 MiB", "1k", "x", ""]),
)


@settings(max_examples=300, deadline=None)
@given(bytes=LIMIT_VALUES, memory=LIMIT_VALUES)
@example(bytes=True, memory=None)
@example(bytes=None, memory=1.0)
@example(bytes=0.0, memory=1)
def test_limit_and_move_on_limit_make_what_context_makes_every_time(
    bytes: Any, memory: Any
) -> None:
    # limit() keeps the recipes of the scopes made most often: a kept one must be
    # what a fresh check makes, and a bad value must be refused every time (also one
    # equal to a kept int: True, 1.0)
    for b, m in ((0, None), (1, None), (None, 0), (None, 1), (0, 1), (1, 1)):
        gotcha.limit(bytes=b, memory=m)
    fresh = _made(gotcha.Context, bytes=bytes, memory=memory)
    for factory in (gotcha.limit, gotcha.move_on_limit, gotcha.limit):
        assert _made(factory, bytes=bytes, memory=memory) == fresh


def test_the_kept_recipes_are_bounded() -> None:
    from gotcha_async import _context

    for n in range(3 * _context._SIMPLE_MAX):
        assert gotcha.limit(bytes=n).limits().bytes == n
        assert gotcha.limit(bytes=n, memory=n + 1)._limits == (n, None, None, n + 1)
    assert len(_context._SIMPLE) <= _context._SIMPLE_MAX
    assert gotcha.limit().limits() == (None, None, None)


def test_str_and_repr() -> None:
    ctx = gotcha.Context(bytes=10)
    ctx.add(bytes=41840, objects=5116, calls=15)
    assert str(ctx) == "5116 objects allocated, 41840 bytes, 15 calls (exceeded)"
    assert repr(ctx) == (
        "<gotcha_async.Context bytes=41840/10 objects=5116 calls=15 new>"
    )


def test_limit_exceeded_pickles_without_its_context() -> None:
    ctx = gotcha.Context(bytes=1)
    err = gotcha.LimitExceeded(ctx, "bytes", 10, 1)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.resource, copy.used, copy.limit, copy.context) == ("bytes", 10, 1, None)
    assert str(copy) == str(err) == "bytes limit exceeded: 10 bytes allocated, limit 1"


# -- exact counts ------------------------------------------------------------------


async def test_empty_scope_is_charged_nothing() -> None:
    async with gotcha.limit() as ctx:
        pass
    assert ctx.used() == (0, 0, 0)
    async with gotcha.move_on_limit(bytes=0) as ctx:
        pass
    assert ctx.used() == (0, 0, 0)
    assert not ctx.exceeded()
    with gotcha.limit() as ctx:
        pass
    assert ctx.used() == (0, 0, 0)


def test_empty_scope_is_charged_nothing_in_sync_code() -> None:
    with gotcha.limit() as ctx:
        pass
    assert ctx.used() == (0, 0, 0)


async def test_known_allocation_is_counted_exactly() -> None:
    async with gotcha.limit() as ctx:
        data = big(MB)
    b, o, c = ctx.used()
    assert MB <= b <= MB + SLACK
    assert 1 <= o and 1 <= c <= 10
    assert len(data) == MB


def _pymem() -> tuple[Any, Any]:
    realloc = ctypes.pythonapi.PyMem_Realloc
    realloc.restype = ctypes.c_void_p
    realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    free = ctypes.pythonapi.PyMem_Free
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    return realloc, free


REALLOC_SIZES = [1000 + 100 * i for i in range(200)]  # 2,190,000 bytes in 200 calls, each small


@pytest.mark.parametrize("memory", [None, 64 * MB], ids=["plain", "sampling"])
def test_small_reallocs_are_charged_their_new_sizes(memory: int | None) -> None:
    # a small realloc whose old block is not held (any, while nothing is held; most,
    # while a scope samples) is charged from the scope's batch before it is made, else
    # after: one call and its new size each, either way
    realloc, free = _pymem()
    with gotcha.limit(memory=memory) as ctx:
        p = None
        for size in REALLOC_SIZES:
            p = realloc(p, size)
        free(p)
    used = ctx.used()
    assert sum(REALLOC_SIZES) <= used.bytes < sum(REALLOC_SIZES) + SLACK
    assert len(REALLOC_SIZES) <= used.calls


def test_small_reallocs_trip_the_limit_they_cross() -> None:
    realloc, free = _pymem()
    p = None
    with pytest.raises(gotcha.LimitExceeded) as info:
        with gotcha.limit(bytes=sum(REALLOC_SIZES) // 2):
            for size in REALLOC_SIZES:
                p = realloc(p, size)
    free(p)
    assert info.value.resource == "bytes"


async def test_reading_the_counters_does_not_move_them() -> None:
    async with gotcha.limit() as ctx:
        first = ctx.used()
        second = ctx.used()
    assert first == second == ctx.used()


def test_sync_scope_counts_without_an_event_loop() -> None:
    with gotcha.limit() as ctx:
        data = big(3 * MB)
    assert 3 * MB <= ctx.used().bytes <= 3 * MB + SLACK
    del data
    with pytest.raises(gotcha.LimitExceeded) as info:
        with gotcha.limit(bytes=MB):
            big(2 * MB)
    assert info.value.resource == "bytes"
    assert gotcha.current() is None


# -- charges follow the work ----------------------------------------------------------


async def test_concurrent_tasks_are_isolated() -> None:
    held = anyio.Event()
    release = anyio.Event()
    result: dict[str, gotcha.Context] = {}

    async def hog() -> None:
        async with gotcha.limit() as ctx:
            data = big(10 * MB)
            held.set()
            await release.wait()  # holds the 10 MB across awaits
            del data
        result["hog"] = ctx

    async def light() -> None:
        await held.wait()
        async with gotcha.limit() as ctx:
            for _ in range(10):
                [str(i) for i in range(10)]
                await anyio.sleep(0)
        release.set()
        result["light"] = ctx

    async with anyio.create_task_group() as tg:
        tg.start_soon(hog)
        tg.start_soon(light)
    assert 10 * MB <= result["hog"].used().bytes < 10 * MB + SLACK
    assert result["light"].used().bytes < SLACK


async def test_child_tasks_are_charged_to_the_scope() -> None:
    async def child() -> None:
        big(2 * MB)

    async with gotcha.limit() as ctx:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            tg.start_soon(child)
    assert 4 * MB <= ctx.used().bytes < 4 * MB + SLACK


async def test_worker_threads_are_charged_to_the_scope() -> None:
    async with gotcha.limit() as ctx:
        await anyio.to_thread.run_sync(big, 3 * MB)
    assert 3 * MB <= ctx.used().bytes < 3 * MB + SLACK


async def test_tasks_outside_the_scope_are_never_charged() -> None:
    inside = anyio.Event()
    outside_done = anyio.Event()

    async def outsider() -> None:
        await inside.wait()
        big(5 * MB)
        await anyio.to_thread.run_sync(big, 5 * MB)
        outside_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(outsider)
        async with gotcha.limit() as ctx:
            inside.set()
            await outside_done.wait()
    assert ctx.used().bytes < SLACK


def test_plain_threads_inherit_nothing() -> None:
    def work() -> None:
        big(4 * MB)

    with gotcha.limit() as ctx:
        t = threading.Thread(target=work)  # a new thread starts with an empty context
        t.start()
        t.join()
    assert ctx.used().bytes < SLACK


# -- every way out of a scope -----------------------------------------------------------


async def test_exceeded_with_a_checkpoint_is_cancelled_there() -> None:
    reached = False
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MB) as ctx:
            big(2 * MB)
            await anyio.sleep(0)
            reached = True
    assert not reached
    err = info.value
    assert err.context is ctx
    assert err.resource == "bytes"
    assert err.limit == MB
    assert err.used > MB
    assert f"{MB:,}" in str(err)
    assert ctx.cancel_called and ctx.exceeded()
    assert err.__cause__ is None and err.__suppress_context__
    assert gotcha.current() is None


async def test_exceeded_without_a_checkpoint_still_raises() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(objects=10):
            [object() for _ in range(100)]
    assert info.value.resource == "objects"
    assert info.value.used > 10
    assert gotcha.current() is None


async def test_calls_limit() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(calls=50):
            for _ in range(100):
                big(100)
    assert info.value.resource == "calls"


async def test_move_on_limit_swallows_and_reports() -> None:
    reached = False
    async with gotcha.move_on_limit(bytes=MB) as ctx:
        big(2 * MB)
        await anyio.sleep(0)
        reached = True
    assert not reached
    assert ctx.exceeded()
    assert ctx.cancelled_caught
    assert gotcha.current() is None


async def test_user_cancel_is_not_a_limit() -> None:
    async with gotcha.limit(bytes=MB) as ctx:
        ctx.cancel()
        await anyio.sleep(0)
        pytest.fail("not cancelled")
    assert ctx.cancelled_caught
    assert not ctx.exceeded()
    assert gotcha.current() is None


async def test_cancel_before_entering() -> None:
    ctx = gotcha.limit()
    ctx.cancel()
    assert ctx.cancel_called
    async with ctx:
        await anyio.sleep(0)
        pytest.fail("not cancelled")
    assert ctx.cancelled_caught


async def test_deadline_is_forwarded() -> None:
    async with gotcha.limit() as ctx:
        ctx.deadline = anyio.current_time() - 1
        assert ctx.deadline < anyio.current_time()
        await anyio.sleep(0)
        pytest.fail("not cancelled")
    assert ctx.cancelled_caught and not ctx.exceeded()


async def test_outer_cancellation_passes_through_untouched() -> None:
    with anyio.CancelScope() as outer:
        async with gotcha.limit(bytes=MB) as ctx:
            outer.cancel()
            await anyio.sleep(0)
            pytest.fail("not cancelled")
    assert outer.cancelled_caught
    assert not ctx.cancelled_caught
    assert gotcha.current() is None


async def test_outer_cancellation_wins_over_an_exceeded_limit() -> None:
    with anyio.CancelScope() as outer:
        async with gotcha.limit(bytes=MB) as ctx:
            outer.cancel()
            big(2 * MB)
            await anyio.sleep(0)
            pytest.fail("not cancelled")
    assert outer.cancelled_caught  # not turned into LimitExceeded
    assert ctx.exceeded()


async def test_shielded_scope_keeps_outer_cancellation_out_not_its_limit() -> None:
    with anyio.CancelScope() as outer:
        async with gotcha.move_on_limit(bytes=MB, shield=True) as ctx:
            outer.cancel()
            await anyio.sleep(0)  # shielded: goes on
            big(2 * MB)
            await anyio.sleep(0)
            pytest.fail("own limit must still cancel")
        assert ctx.exceeded() and ctx.shield
    assert outer.cancel_called


async def test_exception_in_body_propagates_unchanged() -> None:
    with pytest.raises(KeyError):
        async with gotcha.limit(bytes=MB):
            raise KeyError("x")
    assert gotcha.current() is None


async def test_exception_in_exceeded_scope_becomes_the_cause() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MB):
            big(2 * MB)
            raise KeyError("x")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(KeyError):
        async with gotcha.move_on_limit(bytes=MB):
            big(2 * MB)
            raise KeyError("x")


class Buffer(bytearray):
    """A buffer a weak reference can follow to its end."""


@pytest.mark.parametrize("how", ["cancelled", "raised", "swallowed", "refused", "moved on"])
async def test_a_stopped_scopes_memory_is_freed_as_it_exits_not_by_the_collector(
    how: str,
) -> None:
    # LimitExceeded's traceback holds the frames it passed through; a frame of ours that
    # kept it in a local made a cycle, so the stopped code's frames, and what they held,
    # lived on until the cyclic collector ran: a server's stopped requests (8 MiB each,
    # held by their tracebacks) piled up by the hundred between collections
    refs: list[weakref.ref[Buffer]] = []

    async def body() -> None:
        data = Buffer(MB // 2 if how == "refused" else 2 * MB)
        refs.append(weakref.ref(data))
        if how == "raised":
            raise KeyError("the body's own error")
        if how == "refused":
            big(2 * MB)
        if how == "swallowed":
            with contextlib.suppress(anyio.get_cancelled_exc_class()):
                await anyio.sleep(0)
        await anyio.sleep(0)
        pytest.fail("not stopped")

    scope = (gotcha.move_on_limit(bytes=MB) if how == "moved on" else
             gotcha.limit(bytes=MB, hard=how == "refused"))
    gc.collect()
    gc.disable()
    try:
        try:
            async with scope:
                await body()
        except gotcha.LimitExceeded:
            assert how != "moved on"
        else:
            assert how == "moved on" and scope.exceeded()
        # the loop's step that threw the cancellation in holds it until the task's
        # next wait
        await anyio.lowlevel.checkpoint()
        assert refs and refs[0]() is None, "the stopped body's buffer outlived the scope"
    finally:
        gc.enable()


async def test_parent_exceeded_cancels_child_and_parent_raises() -> None:
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=MB) as parent:
            async with gotcha.limit(bytes=100 * MB) as child:
                assert gotcha.current() is child and child.parent is parent
                big(2 * MB)
                await anyio.sleep(0)
                pytest.fail("not cancelled")
            pytest.fail("the child must let the cancellation through")
    assert info.value.context is parent
    assert child.exceeded() and not child.cancelled_caught
    assert gotcha.current() is None


async def test_the_scope_whose_limit_broke_raises() -> None:
    async with gotcha.limit(bytes=100 * MB) as parent:
        with pytest.raises(gotcha.LimitExceeded) as info:
            async with gotcha.limit(bytes=MB) as child:
                big(2 * MB)
                await anyio.sleep(0)
        assert info.value.context is child
        assert gotcha.current() is parent
        assert not parent.exceeded()
        assert parent.used().bytes >= child.used().bytes > MB
    assert gotcha.current() is None


async def test_exceeded_child_without_checkpoint_leaves_parent_running() -> None:
    async with gotcha.move_on_limit(bytes=100 * MB) as parent:
        async with gotcha.move_on_limit(bytes=MB) as child:
            big(2 * MB)
        await anyio.sleep(0)  # the child's late cancellation must not land here
        assert gotcha.current() is parent
    assert child.exceeded() and not parent.cancel_called


async def test_exceeded_in_a_child_task_cancels_the_scope() -> None:
    async def hog() -> None:
        big(2 * MB)
        await anyio.sleep_forever()

    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=MB):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hog)
    assert gotcha.current() is None


async def test_exceeded_in_a_worker_thread_cancels_the_scope() -> None:
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=MB):
            await anyio.to_thread.run_sync(big, 2 * MB)
            await anyio.sleep_forever()


async def test_a_context_is_used_once() -> None:
    ctx = gotcha.limit()
    async with ctx:
        with pytest.raises(RuntimeError, match="already been entered"):
            async with ctx:
                pass
    with pytest.raises(RuntimeError, match="only once"):
        with ctx:
            pass


async def test_current_is_the_innermost_scope() -> None:
    assert gotcha.current() is None
    async with gotcha.limit() as a:
        assert gotcha.current() is a
        with gotcha.move_on_limit() as b:
            assert gotcha.current() is b
            assert b.parent is a
        assert gotcha.current() is a
    assert gotcha.current() is None


# -- run() and waiting for a scope -------------------------------------------------------


async def test_run_returns_the_result() -> None:
    async def work(n: int) -> int:
        await anyio.sleep(0)
        return len(big(n))

    assert await gotcha.run(work, 1000, bytes=MB) == 1000


async def test_run_raises_when_exceeded() -> None:
    async def work() -> None:
        big(2 * MB)
        await anyio.sleep_forever()

    with pytest.raises(gotcha.LimitExceeded) as info:
        await gotcha.run(work, bytes="1 MB")
    assert info.value.limit == MB


async def test_awaiting_a_context_returns_when_it_is_exceeded() -> None:
    started = anyio.Event()
    go = anyio.Event()
    ctx = gotcha.move_on_limit(bytes=MB)

    async def worker() -> None:
        async with ctx:
            started.set()
            await go.wait()
            big(2 * MB)
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await started.wait()
        assert not ctx.exceeded()
        go.set()
        await ctx  # returns once the limit broke
        assert ctx.exceeded()
    await ctx  # done already: returns at once


async def test_awaiting_a_context_returns_when_it_exits() -> None:
    ctx = gotcha.limit()
    entered = anyio.Event()
    leave = anyio.Event()
    waited = anyio.Event()

    async def worker() -> None:
        async with ctx:
            entered.set()
            await leave.wait()

    async def watcher() -> None:
        await ctx
        waited.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await entered.wait()
        tg.start_soon(watcher)
        await anyio.sleep(0)
        assert not waited.is_set()
        leave.set()
    assert waited.is_set()


# -- the tree property ------------------------------------------------------------------


def _nodes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    # a def, not a lambda holding another: hypothesis reads the source of extend= to
    # check that it uses its argument, and misreads a lambda inside a lambda
    return st.builds(
        lambda sizes, kids, concurrent: ("node", sizes, kids, concurrent),
        st.lists(st.integers(min_value=0, max_value=200_000), max_size=2),
        st.lists(children, min_size=1, max_size=3),
        st.booleans(),
    )


trees = st.recursive(
    st.lists(st.integers(min_value=0, max_value=200_000), min_size=0, max_size=3).map(
        lambda sizes: ("leaf", sizes)
    ),
    _nodes,
    max_leaves=8,
)


Seen = list[tuple[gotcha.Context, list[gotcha.Context]]]


async def _walk(tree: tuple[Any, ...], seen: Seen) -> gotcha.Context:
    """Enter a scope, allocate, recurse into the children (in sequence or concurrently)."""
    kids: list[gotcha.Context] = []

    async def into(sub: tuple[Any, ...]) -> None:
        kids.append(await _walk(sub, seen))

    async with gotcha.limit() as ctx:
        if tree[0] == "leaf":
            for n in tree[1]:
                big(n)
        else:
            _, sizes, children, concurrent = tree
            for n in sizes:
                big(n)
            if concurrent:
                async with anyio.create_task_group() as tg:
                    for sub in children:
                        tg.start_soon(into, sub)
            else:
                for sub in children:
                    await into(sub)
        await anyio.sleep(0)
    seen.append((ctx, kids))
    return ctx


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees)
def test_parents_are_charged_at_least_their_children(tree: tuple[Any, ...]) -> None:
    for backend in ("asyncio", "trio"):
        seen: list[tuple[gotcha.Context, list[gotcha.Context]]] = []
        anyio.run(_walk, tree, seen, backend=backend)
        for ctx, kids in seen:
            for field in range(3):
                assert ctx.used()[field] >= sum(k.used()[field] for k in kids)
            for kid in kids:
                assert kid.parent is ctx
        root = seen[-1][0]
        assert root.parent is None
        assert gotcha.current() is None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_loop_in_a_worker_thread_is_cancelled_while_the_main_thread_blocks(
    backend: str,
) -> None:
    # the main thread sits in join(), in C: it runs no pending call, the delivery
    # thread must hand the cancellation to the loop
    results: list[tuple[bool, bool]] = []

    async def main() -> None:
        with anyio.fail_after(30):  # a guard only: the limit must cancel long before
            async with gotcha.move_on_limit(bytes=MB) as ctx:
                big(2 * MB)
                await anyio.sleep_forever()
        results.append((ctx.exceeded(), ctx.cancelled_caught))

    thread = threading.Thread(target=anyio.run, args=(main,), kwargs={"backend": backend})
    thread.start()
    thread.join()
    assert results == [(True, True)]


@pytest.mark.anyio
async def test_scope_entered_in_a_worker_thread_is_a_child_of_the_tasks() -> None:
    def work() -> gotcha.Context:
        with gotcha.limit() as inner:  # no event loop in this thread: counts only
            big(MB)
        return inner

    async with gotcha.limit() as outer:
        inner = await anyio.to_thread.run_sync(work)
    assert inner.parent is outer
    assert MB <= inner.used().bytes <= outer.used().bytes < MB + SLACK

    def greedy() -> None:
        with gotcha.limit(bytes=1000):
            big(MB)

    with pytest.raises(gotcha.LimitExceeded):
        await anyio.to_thread.run_sync(greedy)
