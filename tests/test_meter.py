"""The C core: the hook's place in the allocator chain, tracemalloc, leaks."""

from __future__ import annotations

import contextvars
import gc
import platform
import sys
import threading
import tracemalloc
import weakref

import anyio
import pytest
from fresh_scripts import run as run_fresh

import gotcha_async as gotcha
from gotcha_async import _meter

MB = 10**6
SLACK = 64 * 1024


def big(n: int) -> bytearray:
    return bytearray(n)


def test_hook_is_in_the_chain_only_while_it_has_work() -> None:
    # work: an active scope, or a held block (tracked by a memory scope) to credit
    assert _meter._debug.active() == 0
    assert _meter._debug.hooked() == (_meter._debug.held_blocks() > 0)
    with gotcha.limit():
        assert _meter._debug.hooked()
        assert _meter._debug.active() == 1
        with gotcha.limit():
            assert _meter._debug.active() == 2
    assert _meter._debug.active() == 0
    assert _meter._debug.hooked() == (_meter._debug.held_blocks() > 0)


def test_the_hook_reads_the_thread_state_where_the_interpreter_keeps_it() -> None:
    # 3.11 keeps it in _PyRuntime, at the place the build's headers give; 3.12 and later
    # in a thread-local variable, found at install where the interpreter's thread-local
    # block is static (runtime.c). A release or a build where the check fails silently
    # costs a call on every allocation: this says where it must not.
    with gotcha.limit():
        direct = _meter._debug.reads_thread_state()
    linux_tls = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
    assert direct == (sys.version_info[:2] == (3, 11) or linux_tls)
    assert _meter._debug.thread_state_agrees() is (True if direct else None)


def test_the_direct_read_is_each_threads_own_state() -> None:
    # every thread alive at once (so that no two share a thread-local block), each with
    # its own scope: the read gives that thread's state, and each scope gets exactly
    # its own thread's allocations, not its neighbours'
    with gotcha.limit():
        expected = _meter._debug.thread_state_agrees()
    n = 8
    sizes = [(i + 1) * MB for i in range(n)]
    barrier = threading.Barrier(n)
    agrees: list[bool | None] = [None] * n
    used = [0] * n

    def work(i: int) -> None:
        barrier.wait()
        agrees[i] = _meter._debug.thread_state_agrees()
        with gotcha.limit() as ctx:
            barrier.wait()
            big(sizes[i])
            barrier.wait()
        used[i] = ctx.used().bytes

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert agrees == [expected] * n
    for i in range(n):
        assert sizes[i] <= used[i] < sizes[i] + SLACK, (i, used)


def in_a_fresh_process(case: str) -> None:
    """Run a case of tests/fresh_scripts/hook_forms.py where no memory scope exists.

    A free reaches the hook only while some memory scope exists anywhere in the
    process, and a test suite keeps scopes alive in the tracebacks it stores.
    """
    run_fresh("hook_forms.py", case)


def test_frees_reach_the_hook_only_while_a_scope_can_hold_memory() -> None:
    # a free has nothing to do for a plain scope: it goes to the allocator below (on a
    # build with profile-guided optimization, pymalloc's free inlined), and comes back
    # before a memory scope can hold a block
    in_a_fresh_process("frees_only_while_a_scope_can_hold")


def test_a_memory_scope_under_tracemalloc_started_over_a_light_hook() -> None:
    # tracemalloc saved the hook while it left frees to pymalloc: they never come back
    # to it through tracemalloc, so a link of its own goes on top and sees them
    in_a_fresh_process("tracemalloc_started_over_a_light_hook")


def test_a_stop_that_bypasses_the_wrapper_drops_the_link_until_the_next_scope() -> None:
    in_a_fresh_process("stop_bypassing_the_wrapper")


def test_held_memory_stays_exact_through_every_form_while_threads_allocate() -> None:
    # the hook changes form (out, light, full, light with the link) with every memory
    # scope made and dropped and every tracemalloc start and stop, the bypassing one
    # too, while three threads allocate in plain scopes: a held block's free must
    # reach the hook in every form it takes
    in_a_fresh_process("every_form_while_threads_allocate")


def test_tracemalloc_started_first_and_stopped_inside_a_scope() -> None:
    tracemalloc.start()
    try:
        with gotcha.limit() as ctx:
            big(MB)
            assert tracemalloc.get_traced_memory()[1] >= MB  # tracemalloc still sees it
            tracemalloc.stop()  # drops the allocator tracemalloc saved, our hook with it
            assert _meter._debug.hooked()
            big(2 * MB)
    finally:
        tracemalloc.stop()
    assert 3 * MB <= ctx.used().bytes < 3 * MB + SLACK


def test_tracemalloc_started_and_stopped_inside_a_scope() -> None:
    with gotcha.limit() as ctx:
        tracemalloc.start()
        try:
            big(MB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        big(MB)
    assert peak >= MB
    assert 2 * MB <= ctx.used().bytes < 2 * MB + SLACK


def test_tracemalloc_spanning_scopes() -> None:
    with gotcha.limit() as first:
        tracemalloc.start()
    try:
        with gotcha.limit() as second:
            big(MB)
    finally:
        tracemalloc.stop()
    with gotcha.limit() as third:
        big(MB)
    assert first.used().bytes < SLACK
    assert MB <= second.used().bytes < MB + SLACK
    assert MB <= third.used().bytes < MB + SLACK
    assert tracemalloc.stop.__gotcha_wrapped__  # type: ignore[attr-defined]


def test_ready_is_an_allocation_free_awaitable() -> None:
    marker = object()

    async def main() -> object:
        return await _meter.Ready(marker)

    assert anyio.run(main) is marker
    it = _meter.Ready(5).__await__()
    with pytest.raises(StopIteration) as info:
        next(it)
    assert info.value.value == 5


def test_contexts_are_collected() -> None:
    async def main() -> list[weakref.ref[gotcha.Context]]:
        refs = []
        for _ in range(100):
            async with gotcha.limit() as ctx, gotcha.move_on_limit(bytes=10) as inner:
                big(100)
            refs.append(weakref.ref(ctx))
            refs.append(weakref.ref(inner))
        return refs

    refs = anyio.run(main)
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_scope_entered_where_none_was_found_is_seen_after_another_thread_looked() -> None:
    # The hook remembers the last (thread, context version) in which it found no scope.
    # Entering a scope changes that answer without a context switch; another thread's
    # lookup then takes CPython's own cache of the variable away, so only forgetting
    # the remembered "no scope" at enter() keeps this thread's allocations charged.
    b_entered, b_go, b_done = threading.Event(), threading.Event(), threading.Event()
    a_done = threading.Event()

    def other_thread() -> None:
        with gotcha.Context():  # keeps the hook active while the main thread looks
            b_entered.set()
            b_go.wait()
            big(1000)  # looks the variable up in this thread
            b_done.set()
            a_done.wait()  # and stays in its scope: its exit would forget as well

    thread = threading.Thread(target=other_thread)
    thread.start()
    b_entered.wait()

    def main_side() -> gotcha.Usage:
        big(1000)  # a fresh context: no scope found, and remembered
        with gotcha.Context() as mine:
            b_go.set()
            b_done.wait()
            big(MB)
        return mine.used()

    try:
        used = contextvars.Context().run(main_side)
    finally:
        b_go.set()
        a_done.set()
        thread.join()
    assert MB <= used.bytes < MB + SLACK


def test_a_thread_that_ended_inside_its_scope_is_not_mistaken_for_the_next() -> None:
    # The hook remembers the scope it last found for a (thread state, context version).
    # A thread that ends with a scope still entered leaves its state's memory to the
    # next thread, whose version starts where the first one's did: the next thread's
    # allocations must not be charged to the old scope.
    keeper = threading.Event()
    keeper_in = threading.Event()

    def keep_active() -> None:  # an entered scope elsewhere keeps the hook metering
        with gotcha.Context():
            keeper_in.set()
            keeper.wait()

    other = threading.Thread(target=keep_active)
    other.start()
    keeper_in.wait()
    left: list[gotcha.Context] = []

    def enter() -> None:
        ctx = gotcha.Context()
        ctx.__enter__()  # never exited
        big(1000)
        left.append(ctx)

    def enter_and_end() -> None:
        # in a context of its own, which the test can collect: a thread's own context
        # is let go only after join() has returned, on some versions
        contextvars.Context().run(enter)

    try:
        for _ in range(20):  # thread states come back at the same address, mostly
            first = threading.Thread(target=enter_and_end)
            first.start()
            first.join()
            before = left[-1].used()
            second = threading.Thread(target=lambda: big(MB))
            second.start()
            second.join()
            assert left[-1].used() == before
    finally:
        keeper.set()
        other.join()
        # each abandoned scope and its context hold each other: the collector ends
        # them, and then nothing is left active for the tests that follow
        del left[:]
        gc.collect()
    assert _meter._debug.active() == 0


def test_an_ancestor_counts_an_open_descendants_small_blocks() -> None:
    # Small blocks are charged in batches, one scope's chain at a time; reading any
    # scope's counters settles the batch first, so an ancestor read while its
    # descendant is still running counts every block made so far.
    with gotcha.Context() as outer:
        with gotcha.Context() as inner:
            kept = [bytearray(1000) for _ in range(100)]
            outer_bytes = outer._bytes  # each reader settles on its own
            outer_now = outer.used()
            inner_now = inner.used()
    assert outer_bytes >= 100 * 1000
    assert outer_now.bytes >= inner_now.bytes >= 100 * 1000
    assert outer_now.calls >= inner_now.calls >= 100
    del kept


def test_the_librarys_own_work_is_not_charged() -> None:
    # used() builds its tuple with the hook paused. Pausing also forgets the scope the
    # hook last found, as the hook's common path does not ask whether its thread is
    # paused: were the scope still remembered, each tuple and its ints (the counts
    # are all above the small-int cache) would be charged to it.
    reads = 1000
    slots = list(range(1, reads + 1))  # the loop's ints, made before the scope
    kept: list[gotcha.Usage | None] = [None] * (reads + 2)
    with gotcha.Context() as ctx:
        kept[0] = ctx.used()
        for i in slots:
            kept[i] = ctx.used()
        kept[-1] = ctx.used()
    before, after = kept[0], kept[-1]
    assert isinstance(before, gotcha.Usage) and isinstance(after, gotcha.Usage)
    assert after.objects - before.objects < reads // 10  # against 4,000 unpaused
    assert after.calls - before.calls < reads // 10


def test_scopes_of_threads_taking_turns_are_each_charged_their_own_blocks() -> None:
    # The batch belongs to the scope last charged; a thread switch moves it to the
    # other thread's scope. Each thread's work, run beside the other's with thread
    # switches as often as the interpreter makes them, is charged what it is alone.
    n = 20_000
    used: dict[int, gotcha.Usage] = {}

    def work(size: int, start: threading.Barrier | None = None) -> None:
        kept: list[list[None]] = []
        if start is not None:
            start.wait()
        with gotcha.Context() as ctx:
            for _ in range(n):
                # a list and its items, two mallocs (a bytearray's buffer is a realloc,
                # which would move the batch to this scope itself)
                kept.append([None] * size)
        used[size] = ctx.used()

    sizes = (10, 100)
    for size in sizes:
        work(size)
    alone = dict(used)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        start = threading.Barrier(len(sizes))
        threads = [threading.Thread(target=work, args=(size, start)) for size in sizes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    # the interpreter's free lists, shared by the threads, save a few hundred blocks
    # either way; a block charged to the other scope moves thousands
    for size in sizes:
        assert used[size].bytes >= n * size * 8
        assert abs(used[size].bytes - alone[size].bytes) <= SLACK, (size, used, alone)
        assert abs(used[size].calls - alone[size].calls) <= n // 20, (size, used, alone)
