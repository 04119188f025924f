"""Item 31/11: user code that a loop calls outside any task's coroutine, past a hard
scope's ceiling.

    loop_callouts.py future|pytask|uvloop|callback|trio_token [SCOPES]

An exception raised in such code does not go to the scope's code but to the loop:
``future``: a task awaits a Future subclass whose Python ``add_done_callback``
allocates; the task's step calls it after the coroutine yielded, and an exception there
is handed to the loop's exception handler while the task is left waiting forever
(found by scripts/fault_inject.py, test_asyncio.test_tasks seed 3 on 3.14 and 3.15: a
hang); ``pytask``: the same with asyncio's pure-Python Task; ``uvloop``: the same on
uvloop, whose loop runs callbacks from C (asyncio's runner is the dispatch); ``callback``: a
``call_soon`` callback (its exception is only logged); ``trio_token``: a callback of
trio's ``run_sync_soon`` (its exception crashes trio's run). None of them may get the
stop: the scope's own code, which allocates as much, is stopped instead. A round whose
task is still waiting after a generous time counts as hung (the guard of a failure, never
a synchronisation: a sound round ends in milliseconds).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from _common import report

import gotcha_async as gotcha

mode = sys.argv[1]
scopes = int(sys.argv[2]) if len(sys.argv) > 2 else 30
LOST: list[str] = []
DONE = [0]  # callouts that ran to their end
HANG_GUARD = 20.0


def work() -> None:
    # enough small allocations to pass a 64 KiB fence on its own
    junk = [str(i) * 3 for i in range(2_000)]
    del junk
    DONE[0] += 1


def run_asyncio() -> tuple[int, int]:
    import asyncio

    class Fut(asyncio.Future):  # type: ignore[type-arg]
        def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
            work()
            super().add_done_callback(fn, context=context)

    def handler(loop: Any, context: dict[str, Any]) -> None:
        LOST.append(f"{context.get('message')}: {context.get('exception')!r}"[:160])

    def callback(done: asyncio.Future[None]) -> None:
        work()
        if not done.done():  # the scope may have been cancelled, and done with it
            done.set_result(None)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(100_000):
            if mode == "callback":
                done = loop.create_future()
                loop.call_soon(callback, done)
                await done
            else:
                f = Fut()
                loop.call_soon(f.set_result, None)
                await f
            # the scope's own code allocates too: it is what must be stopped
            junk = [object() for _ in range(50)]
            del junk

    async def one() -> bool:
        with gotcha.move_on_limit(bytes=256 * gotcha.KiB, hard=True) as ctx:
            try:
                await body()
            except MemoryError:
                pass
        return ctx.exceeded()

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(handler)
        if mode == "pytask":
            py_task: Any = getattr(asyncio.tasks, "_PyTask")  # noqa: B009
            loop.set_task_factory(lambda loop, coro, **kw: py_task(coro, loop=loop, **kw))
        stopped = hung = 0
        for _ in range(scopes):
            task = asyncio.ensure_future(one())
            done, _pending = await asyncio.wait({task}, timeout=HANG_GUARD)
            if not done:
                # a task nothing will wake cannot be cancelled either (asyncio.run would
                # wait for it at its end forever): report and leave
                finish(stopped, 1)
            stopped += task.result()
        return stopped, hung

    if mode == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def run_trio() -> tuple[int, int]:
    import trio

    def callback(ready: trio.Event) -> None:
        work()
        ready.set()

    async def one() -> bool:
        token = trio.lowlevel.current_trio_token()
        with gotcha.move_on_limit(bytes=256 * gotcha.KiB, hard=True) as ctx:
            try:
                for _ in range(100_000):
                    ready = trio.Event()
                    token.run_sync_soon(callback, ready)
                    await ready.wait()
                    junk = [object() for _ in range(50)]
                    del junk
            except MemoryError:
                pass
        return ctx.exceeded()

    async def main() -> tuple[int, int]:
        stopped = hung = 0
        for _ in range(scopes):
            with trio.move_on_after(HANG_GUARD) as guard:
                stopped += await one()
            if guard.cancelled_caught:
                hung += 1
                break
        return stopped, hung

    try:
        return trio.run(main)
    except BaseException as e:  # TrioInternalError: what was lost is what killed trio
        LOST.append(f"{type(e).__name__}: {e.__cause__!r}"[:160])
        return 0, 0


def finish(stopped: int, hung: int) -> None:
    report(lost=len(LOST), sample=LOST[:3], stopped=stopped, hung=hung, done=DONE[0],
           current_none=gotcha.current() is None)
    sys.stdout.flush()
    os._exit(0)


finish(*(run_trio() if mode == "trio_token" else run_asyncio()))
