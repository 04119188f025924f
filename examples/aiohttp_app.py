"""An aiohttp.web app in which every request has its own allocation budget.

    python examples/aiohttp_app.py           # a short demonstration, then exits
    python examples/aiohttp_app.py --serve   # serves on http://127.0.0.1:8080

The demonstration serves the app on a free port of 127.0.0.1 and asks it for ``/``
(200), ``/hog`` (503: 16 MiB against a 4 MiB budget) and ``/stream`` (20 MiB streamed
with writes that never wait: the response is cut off after about 4 MiB, never sent whole
as a 200).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import aiohttp
from aiohttp import web

import gotcha_async as gotcha
from gotcha_async.aiohttp import setup


async def index(request: web.Request) -> web.Response:
    return web.json_response({"total": sum(range(1000))})


async def hog(request: web.Request) -> web.Response:
    rows = bytearray(16 * gotcha.MiB)
    await asyncio.sleep(0)
    return web.Response(text=f"built {len(rows):,} bytes\n")


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(80):
        await response.write(bytes(256 * gotcha.KiB))  # 20 MiB in all
    await response.write_eof()
    return response


def build() -> web.Application:
    app = web.Application()
    setup(app, bytes=4 * gotcha.MiB)
    app.router.add_get("/", index)
    app.router.add_get("/hog", hog)
    app.router.add_get("/stream", stream)
    return app


async def demonstrate() -> None:
    runner = web.AppRunner(build())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/hog"):
                async with session.get(url + path) as response:
                    print(f"GET {path}: {response.status} {(await response.text()).strip()}")
            received = 0
            async with session.get(url + "/stream") as response:
                try:
                    async for chunk in response.content.iter_any():
                        received += len(chunk)
                    print(f"GET /stream: {response.status}, complete")
                except aiohttp.ClientPayloadError:
                    print(f"GET /stream: {response.status}, cut off after "
                          f"{received / gotcha.MiB:.1f} MiB")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    if "--serve" in sys.argv:
        web.run_app(build(), host="127.0.0.1", port=8080)
    else:
        asyncio.run(demonstrate())
