"""pytest-asyncio tests: the stock asyncio loop and uvloop (see conftest)."""

from __future__ import annotations

import asyncio

import pytest

import gotcha_async as gotcha

MB = 10**6
SLACK = 64 * 1024


def big(n: int) -> bytearray:
    return bytearray(n)


@pytest.mark.asyncio
async def test_asyncio_to_thread_and_create_task_are_charged() -> None:
    async with gotcha.limit() as ctx:
        await asyncio.to_thread(big, 2 * MB)
        await asyncio.create_task(asyncio.to_thread(big, 2 * MB))
    assert 4 * MB <= ctx.used().bytes < 4 * MB + SLACK


@pytest.mark.asyncio
async def test_empty_scope_on_asyncio_and_uvloop() -> None:
    async with gotcha.limit() as ctx:
        pass
    assert ctx.used() == (0, 0, 0)
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(bytes=MB):
            big(2 * MB)
            await asyncio.sleep(0)
            pytest.fail("not cancelled at the checkpoint")


@pytest.mark.asyncio
async def test_tasks_outside_the_scope_are_never_charged() -> None:
    inside = asyncio.Event()
    done = asyncio.Event()

    async def outsider() -> None:
        await inside.wait()
        big(5 * MB)
        done.set()

    task = asyncio.create_task(outsider())
    async with gotcha.limit() as ctx:
        inside.set()
        await done.wait()
    await task
    assert ctx.used().bytes < SLACK


@pytest.mark.asyncio
async def test_outer_timeout_passes_through() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            async with gotcha.limit(bytes=MB) as ctx:
                big(2 * MB)
                await asyncio.sleep(0)
    assert ctx.exceeded()
    assert gotcha.current() is None
