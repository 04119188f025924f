"""Third-party C extensions inside hard and ceiling scopes (item 31/1).

orjson does not check a failed ``_PyBytes_Resize`` (a refusal there was a SIGSEGV) and
pyo3 turns a NULL from the allocator into ``PanicException``, a BaseException that
escaped ``move_on_limit``. Their allocations must go through; the work is stopped at
the next bytecode boundary instead.

    python extensions.py orjson|pydantic|server
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import anyio
import anyio.to_thread
from _common import report

import gotcha_async as gotcha

ROWS = [{"id": i, "name": f"row {i}", "tags": ["a", "b", "c"], "score": i / 7}
        for i in range(20_000)]
SCOPES: list[dict[str, Any]] = [{"hard": True}, {"ceiling": 2}]


def orjson_work() -> None:
    import orjson

    orjson.loads(orjson.dumps(ROWS))


def pydantic_work() -> None:
    import pydantic

    class Row(pydantic.BaseModel):
        id: int
        name: str
        tags: list[str]
        score: float

    pydantic.TypeAdapter(list[Row]).validate_python(ROWS)


async def scopes(work: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for kw in SCOPES:
        name = "hard" if kw.get("hard") else "ceiling"
        # in the task itself, and in a worker thread the task hands it to
        async with gotcha.move_on_limit(bytes=gotcha.MiB, **kw) as ctx:
            work()
        seen[f"{name}_task_exceeded"] = ctx.exceeded()
        async with gotcha.move_on_limit(bytes=gotcha.MiB, **kw) as ctx:
            await anyio.to_thread.run_sync(work)
        seen[f"{name}_thread_exceeded"] = ctx.exceeded()
    # with room enough, the same work runs to its end
    async with gotcha.limit(bytes=gotcha.GiB, hard=True):
        work()
    seen["roomy_ok"] = True
    return seen


def server() -> dict[str, Any]:
    import httpx
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import ORJSONResponse

    from gotcha_async.asgi import LimitMiddleware

    app = FastAPI()

    @app.get("/rows", response_class=ORJSONResponse)
    async def rows() -> ORJSONResponse:
        return ORJSONResponse(ROWS)

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    # the middleware's defaults: a soft budget with a hard ceiling at twice it
    wrapped = LimitMiddleware(app, bytes="1 MiB")
    config = uvicorn.Config(wrapped, host="127.0.0.1", port=0, log_level="critical",
                            lifespan="off")
    srv = uvicorn.Server(config)
    started = threading.Event()
    original = srv.startup

    async def startup(sockets: Any = None) -> None:
        try:
            await original(sockets=sockets)
        finally:
            started.set()

    srv.startup = startup  # type: ignore[method-assign]
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert started.wait(10) and srv.started
    port = srv.servers[0].sockets[0].getsockname()[1]
    statuses = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for _ in range(5):
            statuses.append(client.get("/rows").status_code)
        after = client.get("/ok").status_code
    srv.should_exit = True
    thread.join(10)
    return {"statuses": statuses, "after": after}


def main() -> None:
    mode = sys.argv[1]
    if mode == "server":
        report(**server())
        return
    work = {"orjson": orjson_work, "pydantic": pydantic_work}[mode]
    report(**asyncio.run(scopes(work)))


if __name__ == "__main__":
    main()
