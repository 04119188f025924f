"""The middleware's default ceiling: a handler that never awaits is stopped near its budget.

Behind a real uvicorn on 127.0.0.1, with nothing but a budget given.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import httpx
import pytest
from asgi_server import serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import gotcha_async as gotcha
from gotcha_async.asgi import LimitMiddleware

pytestmark = [pytest.mark.anyio, pytest.mark.needs_frames]

MiB, KiB = gotcha.MiB, gotcha.KiB
BUDGET = 10 * MiB
# the default ceiling (2), plus what the handler allocates before it is interrupted: the
# test server's loop runs in a worker thread, where the interrupt waits for the GIL
# (one to three 5 ms switch intervals of allocation, up to four on the 3.15 debug build
# with the client's thread competing for it; in a main-thread server it is at once)
STOPPED_BY = 2 * BUDGET + 16 * MiB


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    # Linux: writing 5 resets the process's peak resident set size to its current one
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def app(used: dict[str, int], errors: list[BaseException]) -> Starlette:
    async def hog(request: Request) -> Response:
        # 330 MB in 1 KiB pieces, never awaiting: a soft limit alone cannot stop it
        pieces = [bytearray(KiB) for _ in range(330_000)]
        return PlainTextResponse(f"built {len(pieces)}")

    async def ok(request: Request) -> Response:
        try:
            rows = [{"i": i, "name": f"row-{i}"} for i in range(2000)]
        except MemoryError as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)
            raise
        await anyio.sleep(0)
        return JSONResponse({"rows": len(rows)})

    async def record(scope: Any, ctx: gotcha.Context) -> None:
        used[scope["path"] + str(len(used))] = ctx.used().bytes

    inner = Starlette(routes=[Route("/hog", hog), Route("/ok", ok)])
    return LimitMiddleware(inner, bytes=BUDGET, on_exceeded=record)  # type: ignore[return-value]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux only)")
async def test_a_hog_that_never_awaits_gets_503_with_rss_near_its_budget() -> None:
    used: dict[str, int] = {}
    with serving(app(used, [])) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/ok")).status_code == 200  # warm up
            reset_peak_rss()
            before = peak_rss()
            response = await client.get("/hog")
            growth = peak_rss() - before
    assert response.status_code == 503
    assert response.text == "Service Unavailable: the request exceeded its bytes limit\n"
    [charged] = used.values()
    assert 2 * BUDGET < charged <= STOPPED_BY
    # the 330 MB never existed: the server grew by about what the hog was allowed
    assert growth < 4 * BUDGET, f"peak RSS grew by {growth / MiB:.1f} MiB"


async def test_hogs_among_normal_requests_are_stopped_and_the_others_never_notice() -> None:
    used: dict[str, int] = {}
    errors: list[BaseException] = []
    paths = ["/hog" if i % 4 == 0 else "/ok" for i in range(40)]  # 10 hogs among 40
    codes: dict[int, int] = {}
    with serving(app(used, errors)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def get(i: int) -> None:
                codes[i] = (await client.get(paths[i])).status_code

            async with anyio.create_task_group() as tg:
                for i in range(len(paths)):
                    tg.start_soon(get, i)
    for i, path in enumerate(paths):
        assert codes[i] == (503 if path == "/hog" else 200), (i, path)
    assert errors == []  # no normal request ever saw a MemoryError
    assert len(used) == 10
    assert all(2 * BUDGET < u <= STOPPED_BY for u in used.values()), used


async def test_ceiling_none_is_the_go_semantics_purely_soft() -> None:
    async def hog(request: Request) -> Response:
        return PlainTextResponse(str(len(bytearray(4 * BUDGET))))

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/hog", hog), Route("/ok", ok)])
    middleware = LimitMiddleware(inner, bytes=BUDGET, ceiling=None)
    assert middleware._options.ceiling is None
    with serving(middleware) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.get("/hog")
    # the allocation went through (no ceiling), and the exit still answered 503
    assert response.status_code == 503


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def test_bad_ceilings_are_refused_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="ceiling must be >= 1"):
        LimitMiddleware(_app, bytes=1, ceiling=0.5)
    with pytest.raises(TypeError, match="ceiling must be a number"):
        LimitMiddleware(_app, bytes=1, ceiling="2")  # type: ignore[arg-type]
