"""A Starlette app in which every request has its own allocation budget.

    python examples/asgi_app.py          # serves on http://127.0.0.1:8000

    curl -i http://127.0.0.1:8000/       # 200: a small JSON answer
    curl -i http://127.0.0.1:8000/hog    # 503: allocates 16 MiB against a 4 MiB budget
    curl -i http://127.0.0.1:8000/big    # 200: the same, on a route allowed 64 MiB

``app`` has LimitMiddleware, ``bare_app`` is the same app without it (for
bench/bench_asgi.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import gotcha_async as gotcha
from gotcha_async.asgi import LimitMiddleware

BODY = json.dumps([{"id": i, "name": f"item-{i}", "price": i * 1.5} for i in range(50)])


async def index(request: Request) -> Response:
    # a JSON handler workload: parse, compute, one checkpoint
    items = json.loads(BODY)
    total = sum(item["price"] for item in items)
    names = [item["name"].upper() for item in items]
    await anyio.sleep(0)
    return JSONResponse({"total": total, "names": names[:5]})


async def hog(request: Request) -> Response:
    # a handler that builds far more than a request should
    rows = bytearray(16 * gotcha.MiB)
    await anyio.sleep(0)
    return PlainTextResponse(f"built {len(rows):,} bytes\n")


def on_exceeded(scope: MutableMapping[str, Any], ctx: gotcha.Context) -> None:
    # a hook for metrics; the middleware has logged the breach already
    print(f"over budget: {scope['path']} ({ctx})")


def build(limited: bool, memory: int | None = None) -> Starlette:
    app = Starlette(routes=[Route("/", index), Route("/hog", hog), Route("/big", hog)])
    if limited:
        app.add_middleware(
            LimitMiddleware,
            bytes=4 * gotcha.MiB,
            memory=memory,  # a cap on what a request holds at once, if given
            routes={"/big": {"bytes": "64 MiB"}},
            on_exceeded=on_exceeded,
        )
    return app


app = build(limited=True)
bare_app = build(limited=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(app, host="127.0.0.1", port=8000)
