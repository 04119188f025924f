"""The aiohttp middleware against a real aiohttp server on 127.0.0.1, hit with a real
client (aiohttp's own, which tells a truncated body from a complete one)."""

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
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

import gotcha_async as gotcha
from gotcha_async.aiohttp import Exceeded, LimitMiddleware, middleware_of, setup, summary

LIMIT = gotcha.MiB
HOG = 8 * gotcha.MiB
CHUNK = 256 * gotcha.KiB
CHUNKS = 80  # 20 MiB streamed


MIDDLEWARE = web.AppKey("middleware", LimitMiddleware)


@dataclass
class State:
    finished: list[str] = field(default_factory=list)
    exceeded: list[Exceeded] = field(default_factory=list)


def make_app(state: State, *, by_hand: bool = False, **options: Any) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def hog(request: web.Request) -> web.Response:
        data = bytearray(HOG)
        await asyncio.sleep(0)
        state.finished.append(request.path)
        return web.Response(text=str(len(data)))

    async def hog_no_checkpoint(request: web.Request) -> web.Response:
        data = bytearray(HOG)
        state.finished.append(request.path)
        return web.Response(text=str(len(data)))

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(CHUNKS):
            # a fresh chunk each time, as a handler rendering rows would
            await response.write(bytes([65 + i % 26]) * CHUNK)
        await response.write_eof()
        state.finished.append(request.path)
        return response

    async def item(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["n"])

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.data == "hog":
                data = bytearray(HOG)
                await ws.send_str(f"allocated {len(data)}")
            else:
                await ws.send_str("echo " + message.data)
        return ws

    async def ws_hog_before_prepare(request: web.Request) -> web.WebSocketResponse:
        data = bytearray(HOG)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(str(len(data)))
        return ws

    def hook(request: web.Request, ctx: gotcha.Context, exceeded: Exceeded) -> None:
        state.exceeded.append(exceeded)

    options.setdefault("on_exceeded", hook)
    middleware = LimitMiddleware(**options)
    app = web.Application(middlewares=[middleware] if by_hand else [])
    if not by_hand:
        middleware.install(app)
    app[MIDDLEWARE] = middleware
    app.router.add_get("/ok", ok)
    app.router.add_get("/hog", hog)
    app.router.add_get("/hog-no-checkpoint", hog_no_checkpoint)
    app.router.add_get("/stream", stream)
    app.router.add_get("/items/{n}", item)
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/ws-hog-before-prepare", ws_hog_before_prepare)
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


@pytest.mark.needs_frames
@pytest.mark.asyncio
async def test_requests_under_the_limit_pass_and_hogs_get_503() -> None:
    state = State()
    async with serving(make_app(state, bytes=LIMIT)) as url:
        ok = await get(url + "/ok")
        hog = await get(url + "/hog")
        no_checkpoint = await get(url + "/hog-no-checkpoint")
    assert ok == (200, b"ok")
    body = b"Service Unavailable: the request exceeded its bytes limit\n"
    assert hog == (503, body)
    assert no_checkpoint == (503, body)
    # the first was stopped at its checkpoint, the second by the default ceiling (its
    # buffer, far past twice the budget, was refused): no 200 either way
    assert state.finished == []


@pytest.mark.asyncio
async def test_stream_whose_writes_never_wait_is_aborted_not_sent_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    state = State()
    received = 0
    async with serving(make_app(state, bytes=4 * gotcha.MiB)) as url:
        async with aiohttp.ClientSession() as session, session.get(url + "/stream") as response:
            assert response.status == 200  # sent before the limit broke
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in response.content.iter_any():
                    received += len(chunk)
    assert received < 4 * gotcha.MiB + 2 * CHUNK
    assert state.finished == []
    [record] = gotcha_records(caplog)
    assert (record.outcome, record.status, record.route) == (  # type: ignore[attr-defined]
        "aborted", 200, "/stream"
    )
    # one line says it all: aiohttp logged no "Error handling request" traceback
    assert [r for r in caplog.records if r.exc_info] == []


@pytest.mark.asyncio
async def test_observe_mode_sends_everything_and_reports(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gotcha_async")
    state = State()
    app = make_app(state, bytes=4 * gotcha.MiB, enforce=False)
    async with serving(app) as url:
        status, body = await get(url + "/stream")
        assert (await get(url + "/hog-no-checkpoint"))[0] == 200
        assert [r for r in gotcha_records(caplog) if r.levelno == logging.INFO] == []
    assert status == 200 and len(body) == CHUNK * CHUNKS
    assert state.finished == ["/stream", "/hog-no-checkpoint"]
    assert [(e.path, e.outcome, e.enforced, e.status) for e in state.exceeded] == [
        ("/stream", "observed", False, 200), ("/hog-no-checkpoint", "observed", False, 200)
    ]
    # logged once, at the application's shutdown
    summary = [r.getMessage() for r in gotcha_records(caplog) if r.levelno == logging.INFO]
    assert summary[0].startswith("per-route allocation summary")
    assert any(line.startswith('"GET /stream": {"bytes": "')
               and "# 1 request, 1 over the limit" in line for line in summary)


@pytest.mark.asyncio
async def test_route_template_in_log_metrics_and_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    reader = InMemoryMetricReader()
    state = State()
    app = make_app(state, routes={"/items/*": {"bytes": 100}},
                   meter_provider=MeterProvider(metric_readers=[reader]))
    async with serving(app) as url:
        assert (await get(url + "/items/1"))[0] == 503
        assert (await get(url + "/items/2"))[0] == 503
        assert (await get(url + "/ok"))[0] == 200
    assert [(r.path, r.route) for r in gotcha_records(caplog)] == [  # type: ignore[attr-defined]
        ("/items/1", "/items/{n}"), ("/items/2", "/items/{n}")
    ]
    assert gotcha_records(caplog)[0].getMessage().startswith(
        "GET /items/{n} exceeded its bytes limit: "
    )
    data = reader.get_metrics_data()
    assert data is not None
    [metric] = [m for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == "gotcha.request.allocated"]
    counts: dict[tuple[Any, Any], int] = {}
    for p in metric.data.data_points:
        assert isinstance(p, HistogramDataPoint) and p.attributes is not None
        key = (p.attributes.get("http.route"), p.attributes["http.response.status_code"])
        counts[key] = p.count
    assert counts == {("/items/{n}", 503): 2, ("/ok", 200): 1}
    middleware = app[MIDDLEWARE]
    rows = {r.route: r for r in middleware.summary()}
    assert (rows["/items/{n}"].count, rows["/items/{n}"].exceeded) == (2, 2)


@pytest.mark.asyncio
async def test_route_keys_are_resource_templates_with_an_optional_method() -> None:
    routes = {"GET /items/{n}": {"bytes": 100}, "/hog": {"bytes": None}}
    app = make_app(State(), bytes=LIMIT, routes=routes)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        async with session.get(url + "/items/1") as r:
            assert r.status == 503  # a plain request allocates more than 100 bytes
        async with session.head(url + "/items/1") as r:
            assert r.status == 200  # HEAD: no key for it, the default 1 MiB
        async with session.get(url + "/hog") as r:
            assert r.status == 200  # its key lifts the default


@pytest.mark.asyncio
async def test_key_naming_no_resource_is_reported_once_at_startup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    # the routes are added after the middleware is installed: known at the startup
    app = make_app(State(), routes={"/items/{id}": {"bytes": 100}})
    async with serving(app) as url:
        [warning] = [r.getMessage() for r in gotcha_records(caplog)]
        for _ in range(3):
            assert (await get(url + "/items/1"))[0] == 200
    assert len(gotcha_records(caplog)) == 1
    assert warning.startswith("routes key '/items/{id}' names no route of the application")
    assert "'/items/{n}'" in warning


@pytest.mark.asyncio
async def test_summary_from_the_app_groups_unrouted_requests() -> None:
    app = make_app(State(), enforce=False)
    async with serving(app) as url:
        for path in ("/items/1", "/items/2", "/nowhere/1", "/nowhere/2", "/nowhere/3"):
            await get(url + path)
    assert {(r.method, r.route): r.count for r in summary(app)} == {
        ("GET", "(no route)"): 3, ("GET", "/items/{n}"): 2}
    assert middleware_of(app) is app[MIDDLEWARE]
    with pytest.raises(LookupError, match="no gotcha_async LimitMiddleware installed"):
        middleware_of(web.Application())


@pytest.mark.asyncio
async def test_response_is_a_web_response_sent_afresh_to_each_request() -> None:
    busy = web.json_response({"error": "over budget"}, status=429,
                             headers={"Retry-After": "5"})
    app = make_app(State(), bytes=LIMIT, response=busy)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(url + "/hog") as r:
                assert (r.status, await r.json()) == (429, {"error": "over budget"})
                assert r.headers["Retry-After"] == "5"
        async with session.get(url + "/ok") as r:
            assert r.status == 200


@pytest.mark.asyncio
async def test_response_callable_gets_the_limit_exceeded() -> None:
    def answer(exc: gotcha.LimitExceeded) -> web.Response:
        return web.json_response({"resource": exc.resource}, status=503)

    state = State()
    async with serving(make_app(state, bytes=LIMIT, response=answer)) as url:
        async with aiohttp.ClientSession() as session, session.get(url + "/hog") as r:
            assert (r.status, await r.json()) == (503, {"resource": "bytes"})
    assert [e.status for e in state.exceeded] == [503]


@pytest.mark.asyncio
async def test_websocket_over_its_limit_is_closed_with_1008() -> None:
    state = State()
    async with serving(make_app(state, bytes=LIMIT)) as url:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive_str()) == "echo hello"
            await ws.send_str("hog")
            message = await ws.receive()
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert (message.data, message.extra) == (1008, "bytes limit exceeded")
    [exceeded] = state.exceeded
    assert (exceeded.method, exceeded.outcome) == ("WEBSOCKET", "closed")


@pytest.mark.asyncio
async def test_websocket_over_its_limit_before_the_handshake_gets_the_status() -> None:
    async with serving(make_app(State(), bytes=LIMIT)) as url:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url + "/ws-hog-before-prepare")
    assert info.value.status == 503


@pytest.mark.asyncio
async def test_middleware_added_by_hand_works_for_http() -> None:
    state = State()
    async with serving(make_app(state, by_hand=True, bytes=LIMIT)) as url:
        assert (await get(url + "/ok"))[0] == 200
        assert (await get(url + "/hog"))[0] == 503
    assert [e.path for e in state.exceeded] == ["/hog"]


def test_setup_builds_and_installs_once() -> None:
    app = web.Application()
    middleware = setup(app, bytes="8 MiB", enforce=False)
    assert middleware.limits["bytes"] == 8 * gotcha.MiB
    assert list(app.middlewares) == [middleware]
    with pytest.raises(RuntimeError, match="installed in an application already"):
        middleware.install(web.Application())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bytes": "lots"}, ValueError, "bytes: not a size: 'lots'"),
        ({"enforce": 0}, TypeError, "enforce must be True or False, not 0"),
        ({"bytez": 1}, TypeError, "LimitMiddleware() got an unexpected keyword argument 'bytez'"),
        ({"status_code": 302}, ValueError, "status_code must be an HTTP error status"),
        ({"routes": {"/x": {"bites": 1}}}, ValueError, "routes['/x'] has an unknown key 'bites'"),
        ({"response": 429}, TypeError, "response must be an aiohttp web.Response"),
        ({"response": web.StreamResponse()}, TypeError, "response must be an aiohttp web"),
    ],
)
def test_bad_options_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        LimitMiddleware(**kwargs)
    assert str(info.value).startswith(message)
