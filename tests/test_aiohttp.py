"""What only the aiohttp middleware has: setup() and install(), the middleware put in
``web.Application(middlewares=[...])`` by hand, and an aiohttp ``response=`` that cannot
be sent afresh.

What it promises as the ASGI middleware does (answers, log lines, metrics, summary,
routes=, response=, websockets, options) is tested once for both in
test_web_contract.py, with the server in a thread. Here the server runs in the test's
own loop, in the main thread as in production, on asyncio's loop and on uvloop
(pytest-asyncio, conftest.py), and the client is aiohttp's own (test_foreign.py uses
this harness too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import gotcha_async as gotcha
from gotcha_async.aiohttp import Exceeded, LimitMiddleware, setup

LIMIT = gotcha.MiB
HOG = 8 * gotcha.MiB


@dataclass
class State:
    finished: list[str] = field(default_factory=list)
    exceeded: list[Exceeded] = field(default_factory=list)


def make_app(state: State, *, by_hand: bool = False, **options: Any) -> web.Application:
    """/ok and /hog under LimitMiddleware(**options), installed or, ``by_hand``, only
    put in the application's middlewares; every Exceeded goes to ``state``."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def hog(request: web.Request) -> web.Response:
        data = bytearray(HOG)
        await asyncio.sleep(0)
        state.finished.append(request.path)
        return web.Response(text=str(len(data)))

    def hook(request: web.Request, ctx: gotcha.Context, exceeded: Exceeded) -> None:
        state.exceeded.append(exceeded)

    options.setdefault("on_exceeded", hook)
    middleware = LimitMiddleware(**options)
    app = web.Application(middlewares=[middleware] if by_hand else [])
    if not by_hand:
        middleware.install(app)
    app.router.add_get("/ok", ok)
    app.router.add_get("/hog", hog)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def gotcha_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gotcha_async"]


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


@pytest.mark.asyncio
async def test_middleware_added_by_hand_works_for_http() -> None:
    # not installed: no signals, no startup, no key on the app; the default ceiling
    state = State()
    async with serving(make_app(state, by_hand=True, bytes=LIMIT)) as url:
        assert await get(url + "/ok") == (200, b"ok")
        assert await get(url + "/hog") == (
            503, b"Service Unavailable: the request exceeded its bytes limit\n")
    assert state.finished == []
    assert [(e.path, e.outcome, e.status) for e in state.exceeded] == [("/hog", "refused", 503)]


def test_setup_builds_and_installs_once() -> None:
    app = web.Application()
    middleware = setup(app, bytes="8 MiB", enforce=False)
    assert middleware.limits["bytes"] == 8 * gotcha.MiB
    assert list(app.middlewares) == [middleware]
    with pytest.raises(RuntimeError, match="installed in an application already"):
        middleware.install(web.Application())


def test_stream_response_is_refused_as_response_at_construction() -> None:
    # a StreamResponse is written by its handler: it cannot be sent afresh to each request
    with pytest.raises(TypeError) as info:
        LimitMiddleware(response=web.StreamResponse())
    assert str(info.value).startswith("response must be an aiohttp web.Response")
