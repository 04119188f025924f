"""The web middlewares' contract, written once and run on every framework.

The ASGI middleware (Starlette, under uvicorn) and the aiohttp middleware (under
aiohttp's own server) promise the same behaviour: the same answers to a request over its
limit, the same log line, metrics and summary, the same options. Each test here serves
one framework-free application through an adapter (web_adapters.py), talks to it over
real HTTP with httpx (on asyncio and on trio) or with the ``websockets`` client, and
checks what the client and the logs saw. What only one framework has (ASGI's send and
receive guards, Mount, lifespan, plain ASGI apps; aiohttp's setup() and hand-added
middleware) stays in test_asgi.py, test_routes.py and test_aiohttp.py.

Unless a test says otherwise the limits are purely soft (``ceiling=None``): a hog
allocates in one go, and the default ceiling would refuse that allocation before the
soft path could be watched (the ceiling has tests of its own: test_asgi_ceiling.py, and
test_hogs_are_refused_at_the_default_ceiling here).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from asgi_server import START_TIMEOUT
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from web_adapters import ADAPTERS, Adapter, Endpoints, Params, Served, Socket, Stream, Text

import gotcha_async as gotcha
from gotcha_async._report import human_size
from gotcha_async.asgi import Exceeded

LIMIT = gotcha.MiB
HOG = 8 * gotcha.MiB  # what a hog allocates: eight times the limit
STREAM_CHUNK = 256 * gotcha.KiB
STREAM_CHUNKS = 16  # 4 MiB in all: a stream that breaks its limit only once it has started
SOFT: dict[str, Any] = {"ceiling": None}
BODY_503 = "Service Unavailable: the request exceeded its bytes limit\n"


@pytest.fixture(params=ADAPTERS, ids=lambda adapter: adapter.name)
def web(request: pytest.FixtureRequest) -> Adapter:
    adapter = request.param
    assert isinstance(adapter, Adapter)
    return adapter


# -- the application under test ---------------------------------------------------------


class Barrier:
    """Holds requests until ``n`` of them are in the server at once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.event: asyncio.Event | None = None

    async def wait(self) -> None:
        if self.event is None:
            self.event = asyncio.Event()
        self.count += 1
        if self.count >= self.n:
            self.event.set()
        async with asyncio.timeout(START_TIMEOUT):
            await self.event.wait()


@dataclass
class State:
    barrier: Barrier | None = None
    #: the paths whose handler went on to its end
    finished: list[str] = field(default_factory=list)


def endpoints(state: State | None = None) -> Endpoints:
    """Normal and hog routes: the application every test serves, or a part of it."""
    state = state or State()

    async def ok(params: Params) -> str:
        if state.barrier is not None:
            await state.barrier.wait()
        ctx = gotcha.current()
        if ctx is None:
            return json.dumps({"bytes": None, "root": None})
        return json.dumps({"bytes": ctx.used().bytes, "root": ctx.parent is None})

    def hog(path: str) -> Text:
        async def run(params: Params) -> str:
            data = bytearray(HOG)
            if state.barrier is not None:
                await state.barrier.wait()
            await anyio.sleep(0)
            state.finished.append(path)
            return f"allocated {len(data)}"

        return Text(run)

    async def hog_no_checkpoint(params: Params) -> str:
        data = bytearray(HOG)
        state.finished.append("/hog-no-checkpoint")
        return f"allocated {len(data)}"

    async def hog_in_thread(params: Params) -> str:
        # work handed to a worker thread is the request's too
        size = await anyio.to_thread.run_sync(lambda: len(bytearray(HOG)))
        state.finished.append("/hog-in-thread")
        return f"allocated {size}"

    async def stream() -> AsyncIterator[bytes]:
        for i in range(STREAM_CHUNKS):
            # a fresh chunk each time, as a handler rendering rows would
            yield bytes([65 + i % 26]) * STREAM_CHUNK
        state.finished.append("/stream")

    async def stream_small() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1024

    async def own_limit(params: Params) -> str:
        # the application's own limit, which it does not catch: not the middleware's
        async with gotcha.limit(bytes=1000):
            data = bytearray(10_000)
            await anyio.sleep(0)
        return str(len(data))

    async def item(params: Params) -> str:
        return params["n"]

    async def echo(text: str) -> str:
        if text == "hog":
            return f"allocated {len(bytearray(HOG))}"
        return "echo " + text

    async def hog_before_accept() -> None:
        bytearray(HOG)

    return {
        "/ok": Text(ok),
        "/hog": hog("/hog"),
        "/hog-no-checkpoint": Text(hog_no_checkpoint),
        "/hog-in-thread": Text(hog_in_thread),
        "/stream": Stream(stream),
        "/stream-small": Stream(stream_small),
        "/own-limit": Text(own_limit),
        "/big/hog": hog("/big/hog"),
        "/free/hog": hog("/free/hog"),
        "/items/{n:int}": Text(item, methods=("GET", "POST")),
        "/ws": Socket(echo),
        "/ws-hog-before-accept": Socket(echo, before_accept=hog_before_accept),
    }


def gotcha_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gotcha_async"]


async def statuses(served: Served, requests: list[tuple[str, str]]) -> list[int]:
    # one client, one kept-alive connection, as a browser or a service would
    async with served.client() as client:
        return [(await client.request(method, path)).status_code for method, path in requests]


# -- HTTP -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("server_loop", ["asyncio", "uvloop"])
async def test_concurrent_requests_under_the_limit_pass_and_hogs_get_503(
    web: Adapter, server_loop: str
) -> None:
    n = 50
    paths = ["/hog" if i % 5 == 0 else "/ok" for i in range(n)]  # 10 hogs among 40
    # every request waits in the server until all 50 are in: they really overlap
    state = State(barrier=Barrier(n))
    results: dict[int, httpx.Response] = {}
    with web.serve(endpoints(state), loop=server_loop, bytes=LIMIT, **SOFT) as served:
        async with served.client(timeout=30) as client:

            async def get(i: int) -> None:
                results[i] = await client.get(paths[i])

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(get, i)
        assert state.barrier is not None and state.barrier.count == n
    for i, path in enumerate(paths):
        response = results[i]
        if path == "/hog":
            assert response.status_code == 503, (i, response.text)
            assert response.headers["content-type"] == "text/plain; charset=utf-8"
            assert response.text == BODY_503
        else:
            assert response.status_code == 200, (i, response.text)
            body = response.json()
            # each request in a root scope of its own, charged none of the hogs' 80 MiB
            assert body["root"] is True
            assert 0 < body["bytes"] < 256 * gotcha.KiB


@pytest.mark.anyio
@pytest.mark.parametrize("server_loop", ["asyncio", "uvloop"])
async def test_hog_without_a_checkpoint_runs_to_its_end_and_still_gets_503(
    web: Adapter, server_loop: str
) -> None:
    state = State()
    with web.serve(endpoints(state), loop=server_loop, bytes=LIMIT, **SOFT) as served:
        async with served.client() as client:
            response = await client.get("/hog-no-checkpoint")
    assert (response.status_code, response.text) == (503, BODY_503)
    # the handler ran to its end and returned its response: still no 200
    assert state.finished == ["/hog-no-checkpoint"]


@pytest.mark.needs_frames
@pytest.mark.anyio
async def test_hogs_are_refused_at_the_default_ceiling(web: Adapter) -> None:
    state = State()
    with web.serve(endpoints(state), bytes=LIMIT) as served:
        async with served.client() as client:
            ok = await client.get("/ok")
            hog = await client.get("/hog")
            no_checkpoint = await client.get("/hog-no-checkpoint")
    assert ok.status_code == 200
    assert (hog.status_code, hog.text) == (503, BODY_503)
    assert (no_checkpoint.status_code, no_checkpoint.text) == (503, BODY_503)
    # each buffer, far past twice the budget, was refused: neither handler went on
    assert state.finished == []


class Buffer(bytearray):
    """A buffer a weak reference can follow to its end."""


@pytest.mark.anyio
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
async def test_a_stopped_requests_memory_goes_with_it_not_with_the_collector(
    web: Adapter, hard: bool
) -> None:
    # The stop's traceback holds the frames it went through, among them the
    # middleware's, which kept the stop in a local: a cycle, so each stopped request's
    # frames and buffers (8 MiB for a hog) waited for the cyclic collector. With the
    # collector off, every buffer must be gone once the server has shut down.
    refs: list[weakref.ref[Buffer]] = []

    def kept(size: int) -> Buffer:
        data = Buffer(size)
        refs.append(weakref.ref(data))
        return data

    # what each handler keeps is under the limit: the hard scope lets it through
    async def cancelled(params: Params) -> str:
        data = kept(LIMIT // 2)
        more = bytearray(2 * LIMIT)
        await anyio.sleep(0)
        return f"allocated {len(data) + len(more)}"

    async def no_checkpoint(params: Params) -> str:
        data = kept(LIMIT // 2)
        return f"allocated {len(data) + len(bytearray(2 * LIMIT))}"

    async def refused(params: Params) -> str:
        data = kept(LIMIT // 2)
        return f"allocated {len(data) + len(bytearray(HOG))}"

    async def aborted() -> AsyncIterator[bytes]:
        data = kept(LIMIT // 4)
        for _ in range(STREAM_CHUNKS):
            yield bytes(data[:STREAM_CHUNK])

    paths = ["/cancelled", "/no-checkpoint", "/refused", "/aborted"]
    routes: Endpoints = {
        "/cancelled": Text(cancelled), "/no-checkpoint": Text(no_checkpoint),
        "/refused": Text(refused), "/aborted": Stream(aborted),
    }
    gc.collect()
    gc.disable()
    try:
        with web.serve(routes, bytes=LIMIT, **({"hard": True} if hard else SOFT)) as served:
            async with served.client() as client:
                for path in paths * 3:
                    with contextlib.suppress(httpx.RemoteProtocolError):  # /aborted
                        response = await client.get(path)
                        assert response.status_code == 503, (path, response.text)
        assert len(refs) == len(paths) * 3
        alive = [paths[i % len(paths)] for i, ref in enumerate(refs) if ref() is not None]
        if hard and web.name == "starlette":
            # Starlette's own cycle: a StreamingResponse whose body raised (here, the
            # refusal) in its task group is unwrapped by create_collapsing_task_group
            # with the group still in a local of the frame the error goes through
            alive = [path for path in alive if path != "/aborted"]
        assert alive == []
    finally:
        gc.enable()


@pytest.mark.anyio
async def test_hog_in_a_worker_thread_gets_503(web: Adapter) -> None:
    with web.serve(endpoints(), bytes=LIMIT, **SOFT) as served:
        assert await statuses(served, [("GET", "/hog-in-thread")]) == [503]


@pytest.mark.anyio
async def test_status_code_is_configurable(web: Adapter) -> None:
    with web.serve(endpoints(), bytes=LIMIT, status_code=429, **SOFT) as served:
        async with served.client() as client:
            response = await client.get("/hog")
    assert response.status_code == 429
    assert response.text == "Too Many Requests: the request exceeded its bytes limit\n"


@pytest.mark.needs_frames
@pytest.mark.anyio
async def test_hard_limit_refuses_the_allocation_and_answers_503(web: Adapter) -> None:
    state = State()
    with web.serve(endpoints(state), bytes=LIMIT, hard=True) as served:
        assert await statuses(served, [("GET", "/hog-no-checkpoint")]) == [503]
    assert state.finished == []  # refused at the allocation: the handler never went on


@pytest.mark.anyio
async def test_stream_exceeding_after_it_started_is_aborted_not_truncated(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    state = State()
    received = 0
    with web.serve(endpoints(state), bytes=LIMIT, **SOFT) as served:
        async with served.client() as client:
            async with client.stream("GET", "/stream") as response:
                assert response.status_code == 200  # already sent when the limit broke
                with pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in response.aiter_bytes():
                        received += len(chunk)
    assert received < LIMIT + STREAM_CHUNK
    assert state.finished == []
    [record] = gotcha_records(caplog)
    assert (record.path, record.route, record.status, record.outcome) == (  # type: ignore[attr-defined]
        "/stream", "/stream", 200, "aborted"
    )
    assert "; response aborted, status 200 already sent; enforced; " in record.getMessage()
    # one line says it all: the server logged no traceback of its own for it
    assert served.tracebacks == []
    assert [r for r in caplog.records if r.exc_info] == []


@pytest.mark.anyio
async def test_stream_under_the_limit_completes(web: Adapter) -> None:
    with web.serve(endpoints(), bytes=LIMIT, **SOFT) as served:
        async with served.client() as client:
            response = await client.get("/stream-small")
    assert (response.status_code, response.content) == (200, b"x" * 4096)


@pytest.mark.anyio
async def test_application_own_limit_is_not_the_middlewares(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    with web.serve(endpoints(), bytes=LIMIT, **SOFT) as served:
        # the application's own error, as the framework answers it
        assert await statuses(served, [("GET", "/own-limit")]) == [500]
    assert gotcha_records(caplog) == []


@pytest.mark.anyio
async def test_no_limit_measures_requests_and_never_stops_them(web: Adapter) -> None:
    with web.serve(endpoints()) as served:
        async with served.client() as client:
            hog = await client.get("/hog")
            ok = await client.get("/ok")
    assert hog.status_code == 200
    body = ok.json()
    assert body["root"] is True and 0 < body["bytes"] < 256 * gotcha.KiB


# -- per-route limits -------------------------------------------------------------------


@pytest.mark.anyio
async def test_route_mapping_globs_and_regexes_override_defaults(web: Adapter) -> None:
    routes = {
        "/big/*": {"bytes": 16 * gotcha.MiB},
        "/free/*": {"bytes": None},
        re.compile(r"/items/[0-8]"): {"bytes": 1000},
        "/items/9": {"bytes": None, "objects": 1},
    }
    with web.serve(endpoints(), bytes=LIMIT, routes=routes, **SOFT) as served:
        async with served.client() as client:
            big = await client.get("/big/hog")
            free = await client.get("/free/hog")
            default = await client.get("/hog")
            small = await client.get("/items/7")
            ok = await client.get("/items/9")
    assert big.status_code == 200  # 8 MiB within its 16 MiB
    assert free.status_code == 200  # no limit at all on that route
    assert default.status_code == 503  # no pattern matches: 1 MiB
    assert small.status_code == 503  # a plain request allocates more than 1000 bytes
    assert ok.status_code == 503  # and more than one object
    assert ok.text == "Service Unavailable: the request exceeded its objects limit\n"


@pytest.mark.anyio
async def test_route_keys_are_templates_with_an_optional_method(web: Adapter) -> None:
    item = web.route("/items/{n:int}")
    routes = {f"GET {item}": {"bytes": 100}, "/hog": {"bytes": None}}
    with web.serve(endpoints(), bytes=LIMIT, routes=routes, **SOFT) as served:
        codes = await statuses(served, [
            ("GET", "/items/1"),  # a plain request allocates more than 100 bytes
            ("HEAD", "/items/1"),  # no key for HEAD: the default 1 MiB
            ("POST", "/items/1"),  # nor for POST
            ("GET", "/hog"),  # its key lifts the default
        ])
    assert codes == [503, 200, 200, 200]


@pytest.mark.anyio
async def test_route_key_without_a_method_applies_to_every_method_and_a_methods_key_wins(
    web: Adapter,
) -> None:
    item = web.route("/items/{n:int}")
    routes = {item: {"bytes": 100}, f"POST {item}": {"bytes": None}}
    with web.serve(endpoints(), routes=routes, **SOFT) as served:
        codes = await statuses(served, [("GET", "/items/1"), ("POST", "/items/1")])
    assert codes == [503, 200]


@pytest.mark.anyio
async def test_route_callable_chooses_limits_per_request(web: Adapter) -> None:
    seen: list[str] = []

    def routes(target: Any) -> dict[str, Any] | None:
        path = web.path_of(target)
        seen.append(path)
        return {"bytes": "16 MiB"} if path.startswith("/big/") else None

    with web.serve(endpoints(), bytes=LIMIT, routes=routes, **SOFT) as served:
        codes = await statuses(served, [("GET", "/big/hog"), ("GET", "/free/hog")])
    assert codes == [200, 503]
    assert seen[:2] == ["/big/hog", "/free/hog"]


@pytest.mark.anyio
async def test_route_callable_bad_answer_fails_that_request_only(web: Adapter) -> None:
    def routes(target: Any) -> dict[str, Any] | None:
        return {"bytes": -1} if web.path_of(target) == "/hog" else None

    with web.serve(endpoints(), bytes=LIMIT, routes=routes, **SOFT) as served:
        assert await statuses(served, [("GET", "/hog")]) == [500]
        # the next request is answered (a new connection: after an error of the
        # application uvicorn closes its connection, racing a client that reuses it)
        assert await statuses(served, [("GET", "/ok")]) == [200]


@pytest.mark.anyio
async def test_key_naming_no_route_is_reported_once_at_startup(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    with web.serve(endpoints(), routes={"/items/{id}": {"bytes": 100}}) as served:
        # reported by the startup, before any request
        [warning] = [r.getMessage() for r in gotcha_records(caplog)]
        assert await statuses(served, [("GET", "/items/1")] * 3) == [200] * 3
    assert len(gotcha_records(caplog)) == 1
    assert warning.startswith("routes key '/items/{id}' names no route of the application")
    assert repr(web.route("/items/{n:int}")) in warning  # what the user meant, listed


# -- reporting --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_log_record_per_exceeded_request_is_one_readable_line(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    with web.serve(endpoints(), bytes=LIMIT, **SOFT) as served:
        async with served.client() as client:
            assert (await client.get("/ok")).status_code == 200
            assert (await client.get("/hog?x=1")).status_code == 503
    [record] = gotcha_records(caplog)
    assert record.levelno == logging.WARNING
    fields = {k: getattr(record, k) for k in
              ("method", "path", "route", "resource", "limit", "status", "enforced", "outcome")}
    assert fields == {"method": "GET", "path": "/hog", "route": "/hog", "resource": "bytes",
                      "limit": LIMIT, "status": 503, "enforced": True, "outcome": "refused"}
    used = record.used  # type: ignore[attr-defined]
    assert HOG < used < HOG + 256 * gotcha.KiB
    client = record.client  # type: ignore[attr-defined]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", client)
    assert record.getMessage() == (
        f"GET /hog exceeded its bytes limit: {human_size(used)} of 1 MiB; "
        f"answered 503; enforced; client {client}"
    )


@pytest.mark.anyio
async def test_route_template_not_the_raw_path_in_the_log_line_the_metrics_and_the_summary(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    reader = InMemoryMetricReader()
    item = web.route("/items/{n:int}")
    # Soft: with a budget this small the default ceiling can stop a Starlette request
    # before its router has run, and then no template is known (Python 3.13)
    with web.serve(endpoints(), routes={"/items/*": {"bytes": 1000}},
                   meter_provider=MeterProvider(metric_readers=[reader]), **SOFT) as served:
        assert await statuses(served, [("GET", "/items/1"), ("GET", "/items/2"),
                                       ("GET", "/ok")]) == [503, 503, 200]
    # the harness asked /ok once more before the shutdown
    records = gotcha_records(caplog)
    assert [(r.path, r.route) for r in records] == [  # type: ignore[attr-defined]
        ("/items/1", item), ("/items/2", item)
    ]
    assert records[0].getMessage().startswith(f"GET {item} exceeded its bytes limit: ")
    data = reader.get_metrics_data()
    assert data is not None
    [metric] = [m for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == "gotcha.request.allocated"]
    counts: dict[tuple[Any, Any], int] = {}
    for p in metric.data.data_points:
        assert isinstance(p, HistogramDataPoint) and p.attributes is not None
        key = (p.attributes.get("http.route"), p.attributes["http.response.status_code"])
        counts[key] = p.count
    assert counts == {(item, 503): 2, ("/ok", 200): 2}
    rows = {r.route: r for r in web.summary(served.app)}
    assert set(rows) == {item, "/ok"}
    assert (rows[item].count, rows[item].exceeded) == (2, 2)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_on_exceeded_called_once_per_exceeded_request(web: Adapter, kind: str) -> None:
    calls: list[tuple[str, bool, int]] = []

    def sync_hook(target: Any, ctx: gotcha.Context) -> None:
        calls.append((web.path_of(target), ctx.exceeded(), ctx.used().bytes))

    async def async_hook(target: Any, ctx: gotcha.Context) -> None:
        await asyncio.sleep(0)
        sync_hook(target, ctx)

    hook = sync_hook if kind == "sync" else async_hook
    with web.serve(endpoints(), bytes=LIMIT, on_exceeded=hook, **SOFT) as served:
        codes = await statuses(served, [("GET", p) for p in
                                        ("/ok", "/hog", "/ok", "/hog-no-checkpoint")])
    assert codes == [200, 503, 200, 503]
    assert [(path, exceeded) for path, exceeded, _ in calls] == [
        ("/hog", True), ("/hog-no-checkpoint", True)
    ]
    assert all(used > HOG for _, _, used in calls)


@pytest.mark.anyio
async def test_on_exceeded_exception_is_logged_and_still_answers(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")

    def hook(target: Any, ctx: gotcha.Context) -> None:
        raise RuntimeError("metrics backend down")

    with web.serve(endpoints(), bytes=LIMIT, on_exceeded=hook, **SOFT) as served:
        codes = await statuses(served, [("GET", "/hog"), ("GET", "/hog"), ("GET", "/ok")])
    assert codes == [503, 503, 200]
    errors = [r for r in gotcha_records(caplog) if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "metrics backend down"
    assert "on_exceeded hook" in errors[0].getMessage()


# -- tasks a handler spawns -------------------------------------------------------------


@pytest.mark.anyio
async def test_child_tasks_of_a_handler_are_charged_to_the_request_and_stopped_with_it(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    done: list[str] = []

    async def fan_out(params: Params) -> str:
        async def part(n: int) -> None:
            data = bytearray(HOG // 4)
            await anyio.sleep(0)
            await anyio.Event().wait()  # never set: only the limit ends it
            done.append(f"part {n} {len(data)}")

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(part, n)
        return "all parts done"

    with web.serve({"/fan-out": Text(fan_out)}, bytes=LIMIT, **SOFT) as served:
        assert await statuses(served, [("GET", "/fan-out")]) == [503]
    assert done == []
    [record] = gotcha_records(caplog)
    assert record.used > HOG // 4  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_task_outliving_its_request_is_in_no_scope_once_the_request_ended(
    web: Adapter,
) -> None:
    # Documented: a task spawned with create_task and not awaited keeps the request's
    # scope in its context (contextvars are copied), but once the request is over that
    # scope is exited and frozen: gotcha.current() is its nearest live ancestor (none
    # here), nothing is charged to it, nothing stops the task or reports it. Such work
    # needs a scope of its own.
    seen: dict[str, Any] = {}
    release = asyncio.Event()
    finished = threading.Event()

    async def spawn(params: Params) -> str:
        seen["request"] = gotcha.current()

        async def later() -> None:
            await release.wait()
            ctx = gotcha.current()
            before = ctx.used().bytes if ctx is not None else 0
            data = bytearray(HOG)
            seen["later"] = ctx
            seen["charged"] = (ctx.used().bytes - before) if ctx is not None else 0
            seen["len"] = len(data)
            finished.set()

        seen["task"] = asyncio.get_running_loop().create_task(later())
        return "spawned"

    async def go(params: Params) -> str:
        release.set()
        return "released"

    with web.serve({"/spawn": Text(spawn), "/go": Text(go)}, bytes=LIMIT, **SOFT) as served:
        assert await statuses(served, [("GET", "/spawn"), ("GET", "/go")]) == [200, 200]
        assert await anyio.to_thread.run_sync(finished.wait, START_TIMEOUT)
    request_ctx = seen["request"]
    assert request_ctx is not None and seen["later"] is None
    assert seen["charged"] == 0 and seen["len"] == HOG  # not charged, never stopped
    assert request_ctx.used().bytes < LIMIT
    assert not request_ctx.exceeded()


# -- observe mode -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_observe_mode_never_stops_a_request_and_reports_each_one_over(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    state = State()
    seen: list[Exceeded] = []

    def hook(target: Any, ctx: gotcha.Context, exceeded: Exceeded) -> None:
        seen.append(exceeded)

    with web.serve(endpoints(state), bytes=LIMIT, enforce=False, on_exceeded=hook) as served:
        async with served.client() as client:
            codes = [(await client.get(p)).status_code
                     for p in ("/ok", "/hog", "/hog-no-checkpoint", "/ok")]
            streamed = await client.get("/stream")
    assert codes == [200, 200, 200, 200]
    assert streamed.status_code == 200
    assert len(streamed.content) == STREAM_CHUNK * STREAM_CHUNKS  # not aborted
    # not even at the default ceiling, which observe mode has too
    assert state.finished == ["/hog", "/hog-no-checkpoint", "/stream"]
    records = gotcha_records(caplog)
    assert [(r.path, r.status, r.enforced, r.outcome) for r in records] == [  # type: ignore[attr-defined]
        ("/hog", 200, False, "observed"),
        ("/hog-no-checkpoint", 200, False, "observed"),
        ("/stream", 200, False, "observed"),
    ]
    assert "; observed only, not enforced: status 200 sent; would have been stopped; " in (
        records[0].getMessage()
    )
    assert [(e.path, e.observed, e.enforced, e.outcome, e.status, e.resource)
            for e in seen] == [
        (path, True, False, "observed", 200, "bytes")
        for path in ("/hog", "/hog-no-checkpoint", "/stream")
    ]
    assert all(e.used > e.limit == LIMIT for e in seen)


@pytest.mark.anyio
async def test_observe_mode_reports_a_memory_limit_from_the_peak(web: Adapter) -> None:
    seen: list[Exceeded] = []

    def hook(target: Any, ctx: gotcha.Context, exceeded: Exceeded) -> None:
        seen.append(exceeded)

    with web.serve(endpoints(), memory=LIMIT, enforce=False, on_exceeded=hook) as served:
        codes = await statuses(served, [("GET", "/hog"), ("GET", "/stream-small")])
    assert codes == [200, 200]
    [exceeded] = seen
    assert (exceeded.path, exceeded.resource) == ("/hog", "memory")
    assert HOG <= exceeded.used < HOG + 256 * gotcha.KiB


@pytest.mark.anyio
async def test_observe_mode_logs_the_summary_once_at_shutdown(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gotcha_async")
    item = web.route("/items/{n:int}")
    with web.serve(endpoints(), bytes=LIMIT, enforce=False, track_memory=True) as served:
        codes = await statuses(served, [("GET", "/hog")] * 3 + [
            ("GET", f"/items/{n}") for n in range(5)])
        assert codes == [200] * 8
        assert [r for r in gotcha_records(caplog) if r.levelno == logging.INFO] == []
    # the harness asked /ok once more before the shutdown
    lines = [r.getMessage() for r in gotcha_records(caplog) if r.levelno == logging.INFO]
    assert lines[0].startswith("per-route allocation summary (suggested budget")
    assert len(lines) == 4
    items, hog, ok = lines[1:]
    assert items.startswith(f'"GET {item}": {{"bytes": "')
    assert "# 5 requests, 0 over the limit; bytes median " in items
    assert hog.startswith('"GET /hog": {"bytes": "') and '"memory": "' in hog
    assert "# 3 requests, 3 over the limit; bytes median 8" in hog
    assert "; peak memory median " in hog
    assert ok.startswith('"GET /ok": {"bytes": "') and "# 1 request, 0 over" in ok


def test_enforce_mode_logs_no_summary(web: Adapter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gotcha_async")
    with web.serve(endpoints(), bytes=LIMIT):
        pass
    assert gotcha_records(caplog) == []


# -- the summary ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_summary_is_readable_from_the_middleware(web: Adapter) -> None:
    with web.serve(endpoints(), bytes=LIMIT, track_memory=True, **SOFT) as served:
        codes = await statuses(served, [("GET", "/hog")] * 4 + [("GET", "/stream-small")])
        assert codes == [503] * 4 + [200]
    rows = {(r.method, r.route): r for r in web.middleware_of(served.app).summary()}
    hog = rows[("GET", "/hog")]
    assert (hog.count, hog.exceeded) == (4, 4)
    assert HOG < hog.bytes.max < HOG + 256 * gotcha.KiB
    # within the buckets' 9%
    assert hog.bytes.max / 1.09 <= hog.bytes.median <= hog.bytes.max
    assert hog.memory is not None and HOG <= hog.memory.max
    assert hog.suggested_bytes >= 1.25 * hog.bytes.max
    assert rows[("GET", "/stream-small")].exceeded == 0
    assert web.middleware_of(served.app).summary_text().count("\n") == len(rows)


@pytest.mark.anyio
async def test_summary_from_the_app_groups_unrouted_requests(web: Adapter) -> None:
    with web.serve(endpoints(), enforce=False) as served:
        paths = ["/items/1", "/items/2", "/nowhere/1", "/nowhere/2", "/nowhere/3"]
        assert await statuses(served, [("GET", p) for p in paths]) == [200] * 2 + [404] * 3
    # the harness asked /ok once more before the shutdown
    assert {(r.method, r.route): r.count for r in web.summary(served.app)} == {
        ("GET", "(no route)"): 3, ("GET", web.route("/items/{n:int}")): 2, ("GET", "/ok"): 1}
    middleware = web.middleware_of(served.app)
    assert isinstance(middleware, type(web.middleware()))  # the framework's own
    assert middleware.summary() == web.summary(served.app)


def test_middleware_of_an_app_without_one_says_so(web: Adapter) -> None:
    with pytest.raises(LookupError, match=web.no_middleware_message):
        web.middleware_of(web.app_without_middleware())


# -- response= --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_response_is_a_ready_response_sent_afresh_to_each_request(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    busy = web.json_response({"error": "over budget"}, 429, {"Retry-After": "5"})
    with web.serve(endpoints(), bytes=LIMIT, response=busy, **SOFT) as served:
        async with served.client() as client:
            # twice on one connection: the same response object answers each time
            first = await client.get("/hog")
            second = await client.get("/hog")
            ok = await client.get("/ok")
    for r in (first, second):
        assert r.status_code == 429
        assert r.json() == {"error": "over budget"}
        assert r.headers["retry-after"] == "5"
    assert ok.status_code == 200
    lines = [r.getMessage() for r in gotcha_records(caplog)]
    assert len(lines) == 2 and all("answered 429" in line for line in lines)


@pytest.mark.anyio
async def test_response_callable_gets_the_limit_exceeded(web: Adapter) -> None:
    seen: list[Exceeded] = []

    def answer(exc: gotcha.LimitExceeded) -> Any:
        return web.json_response({"resource": exc.resource, "limit": exc.limit}, 503)

    def hook(target: Any, ctx: gotcha.Context, exceeded: Exceeded) -> None:
        seen.append(exceeded)

    with web.serve(endpoints(), bytes=LIMIT, response=answer, on_exceeded=hook,
                   **SOFT) as served:
        async with served.client() as client:
            r = await client.get("/hog")
    assert (r.status_code, r.json()) == (503, {"resource": "bytes", "limit": LIMIT})
    assert [e.status for e in seen] == [503]


@pytest.mark.anyio
async def test_response_callable_that_fails_leaves_the_default_answer(
    web: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(exc: gotcha.LimitExceeded) -> Any:
        raise RuntimeError("template missing")

    with web.serve(endpoints(), bytes=LIMIT, response=broken, **SOFT) as served:
        async with served.client() as client:
            r = await client.get("/hog")
    assert (r.status_code, r.text) == (503, BODY_503)
    [failed] = [rec for rec in gotcha_records(caplog) if rec.levelno == logging.ERROR]
    assert failed.getMessage().startswith("response=<function")
    assert failed.exc_info is not None and isinstance(failed.exc_info[1], RuntimeError)


# -- websockets -------------------------------------------------------------------------

try:
    import websockets.sync.client as websockets_sync
    from websockets.exceptions import ConnectionClosedError, InvalidStatus
except ImportError:  # pragma: no cover - the test extra installs it
    websockets_sync = None  # type: ignore[assignment]

needs_websockets = pytest.mark.skipif(
    websockets_sync is None,
    reason="no websocket client: install the 'websockets' package (uvicorn serves "
    "websockets only with it or wsproto)",
)


@needs_websockets
@pytest.mark.parametrize("ceiling", [None, "default"])
def test_websocket_under_its_limit_works_then_is_closed_with_1008_when_it_breaks_it(
    web: Adapter, ceiling: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    # soft: stopped at its next send; at the default ceiling: its buffer refused
    caplog.set_level(logging.WARNING, logger="gotcha_async")
    options: dict[str, Any] = {} if ceiling == "default" else {"ceiling": None}
    seen: list[Exceeded] = []

    def hook(target: Any, ctx: gotcha.Context, exceeded: Exceeded) -> None:
        seen.append(exceeded)

    with web.serve(endpoints(), bytes=LIMIT, on_exceeded=hook, **options) as served:
        with websockets_sync.connect(served.ws_url + "/ws", open_timeout=10) as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "echo hello"
            ws.send("hog")
            with pytest.raises(ConnectionClosedError) as info:
                ws.recv(timeout=10)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "bytes limit exceeded")
    [exceeded] = seen
    assert (exceeded.method, exceeded.path, exceeded.outcome) == ("WEBSOCKET", "/ws", "closed")


@needs_websockets
@pytest.mark.parametrize("ceiling", [None, "default"])
def test_websocket_over_its_limit_before_the_handshake_is_refused_with_the_status(
    web: Adapter, ceiling: str | None
) -> None:
    options: dict[str, Any] = {} if ceiling == "default" else {"ceiling": None}
    with web.serve(endpoints(), bytes=LIMIT, **options) as served:
        with pytest.raises(InvalidStatus) as info:
            websockets_sync.connect(served.ws_url + "/ws-hog-before-accept", open_timeout=10)
    assert info.value.response.status_code == 503


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bytes": -1}, ValueError, "bytes must be >= 0, got -1"),
        ({"bytes": "lots"}, ValueError, "bytes: not a size: 'lots'"),
        ({"objects": "lots"}, ValueError, "objects: not a size: 'lots'"),
        ({"calls": 1.5}, ValueError, "calls must be a whole number, got 1.5"),
        ({"memory": True}, TypeError, "memory must be an int, a size string or None, not True"),
        ({"hard": "yes"}, TypeError, "hard must be True or False, not 'yes'"),
        ({"status_code": 200}, ValueError, "status_code must be an HTTP error status"),
        ({"status_code": 302}, ValueError, "status_code must be an HTTP error status"),
        ({"status_code": "503"}, TypeError, "status_code must be an int, not '503'"),
        ({"routes": 42}, TypeError, "routes must be a mapping"),
        ({"routes": {"/x": {"bites": 1}}}, ValueError, "routes['/x'] has an unknown key 'bites'"),
        ({"routes": {"/x": {"bytes": -1}}}, ValueError, "routes['/x']['bytes'] must be >= 0"),
        ({"routes": {"/x": {"hard": 1}}}, TypeError, "routes['/x']['hard'] must be True or False"),
        ({"routes": {"/x": 5}}, TypeError, "routes['/x'] must be a mapping of limit arguments"),
        ({"routes": {42: {}}}, TypeError, "routes: a pattern must be a glob string"),
        ({"routes": {re.compile(b"/x"): {}}}, TypeError, "routes: a regex pattern must be a str"),
        ({"routes": {"get /x": {}}}, ValueError,
         "routes key 'get /x' must be a route or path pattern, optionally after a method"),
        ({"on_exceeded": 42}, TypeError, "on_exceeded must be callable or None, not 42"),
        ({"enforce": "no"}, TypeError, "enforce must be True or False, not 'no'"),
        ({"enforce": 0}, TypeError, "enforce must be True or False, not 0"),
        ({"track_memory": 1}, TypeError, "track_memory must be True or False, not 1"),
        ({"meter_provider": 42}, TypeError, "meter_provider must be an OpenTelemetry "
                                            "MeterProvider or None, not 42"),
        ({"summary_routes": 0}, ValueError, "summary_routes must be an int >= 1, got 0"),
        ({"bytez": 1}, TypeError, "LimitMiddleware() got an unexpected keyword argument 'bytez'"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_option(
    web: Adapter, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        web.middleware(**kwargs)
    assert str(info.value).startswith(message)


def test_response_that_is_neither_a_response_nor_a_callable_fails_at_construction(
    web: Adapter,
) -> None:
    with pytest.raises(TypeError) as info:
        web.middleware(response=429)
    assert str(info.value).startswith(web.bad_response_message)


def test_size_strings_are_accepted(web: Adapter) -> None:
    middleware = web.middleware(bytes="1.5 MiB", objects="10k", memory="64 MB",
                                routes={"/x": {"calls": "1M"}})
    assert middleware.limits["bytes"] == 1536 * gotcha.KiB
    assert middleware.limits["objects"] == 10_000
    assert middleware.limits["memory"] == 64_000_000
