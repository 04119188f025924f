"""Routes as FastAPI and Starlette name them, and the summary reachable from the app,
behind a real uvicorn on 127.0.0.1: FastAPI's shapes (a route per method on one path),
Mount, globs with a method, the summary pasted back into routes=, Starlette's router.

The middleware is added as FastAPI and Starlette users add it,
``app.add_middleware(LimitMiddleware, ...)``: the test never holds the instance. What
the ASGI middleware promises as the aiohttp one does (route keys, a key naming no
route, response=) is tested once for both in test_web_contract.py.
"""

from __future__ import annotations

import ast
import logging
from typing import Any

import anyio
import httpx
import pytest
from asgi_server import serving
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

import gotcha_async as gotcha
from gotcha_async.asgi import LimitMiddleware, middleware_of, summary

HOG = 4 * gotcha.MiB


def fastapi_app(**middleware: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        data = bytearray(HOG)
        await anyio.sleep(0)
        return {"item_id": item_id, "size": len(data)}

    @app.post("/items/{item_id}")
    async def post_item(item_id: int) -> dict[str, int]:
        data = bytearray(HOG)
        await anyio.sleep(0)
        return {"item_id": item_id, "size": len(data)}

    app.add_middleware(LimitMiddleware, **middleware)
    return app


def gotcha_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "gotcha_async" and r.levelno == logging.WARNING]


async def statuses(url: str, requests: list[tuple[str, str]]) -> list[int]:
    # one client, one kept-alive connection, as a browser or a service would
    async with httpx.AsyncClient(base_url=url) as client:
        return [(await client.request(method, path)).status_code for method, path in requests]


# -- routes= keys are the framework's templates -------------------------------------------


@pytest.mark.anyio
async def test_fastapi_route_template_key_applies_and_methods_are_told_apart() -> None:
    app = fastapi_app(routes={"GET /items/{item_id}": {"bytes": "1 MiB"}}, ceiling=None)
    with serving(app) as server:
        codes = await statuses(server.url, [("GET", "/items/1"), ("POST", "/items/1"),
                                            ("GET", "/items/2"), ("GET", "/ok")])
    # GET is over its 1 MiB; POST has no key, so no limit (the middleware sets none)
    assert codes == [503, 200, 503, 200]


@pytest.mark.anyio
async def test_key_without_method_applies_to_every_method_and_a_methods_key_wins() -> None:
    routes = {"/items/{item_id}": {"bytes": "1 MiB"}, "POST /items/{item_id}": {"bytes": None}}
    with serving(fastapi_app(routes=routes, ceiling=None)) as server:
        codes = await statuses(server.url, [("GET", "/items/1"), ("POST", "/items/1")])
    assert codes == [503, 200]


@pytest.mark.anyio
async def test_route_key_inside_a_mount() -> None:
    async def hog(request: Any) -> Response:
        data = bytearray(HOG)
        await anyio.sleep(0)
        return PlainTextResponse(str(len(data)))

    async def ok(request: Any) -> Response:
        return PlainTextResponse("ok")

    api = Starlette(routes=[Route("/users/{user_id:int}", hog)])
    app = Starlette(routes=[Route("/ok", ok), Mount("/api", app=api)])
    app.add_middleware(LimitMiddleware, routes={"/api/users/{user_id:int}": {"bytes": "1 MiB"}},
                       ceiling=None)
    with serving(app) as server:
        assert await statuses(server.url, [("GET", "/api/users/7")]) == [503]
    assert [r.route for r in summary(app) if r.count and r.exceeded] == [
        "/api/users/{user_id:int}"]


@pytest.mark.anyio
@pytest.mark.parametrize("limits", [{"hard": True}, {}], ids=["hard", "default-ceiling"])
async def test_a_request_stopped_before_the_router_ran_is_named_by_its_route(
    limits: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    # stopped in a middleware between this one and the router: Starlette never put the
    # route in the scope (3.13 with the default ceiling logged the raw path's glob)
    class Greedy:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                keep: list[bytes] = []
                while len(keep) < HOG // 1000:  # past any ceiling here
                    keep.append(bytes(1000))
                del keep
            await self.app(scope, receive, send)

    async def item(request: Any) -> Response:
        return PlainTextResponse("item")

    app = Starlette(routes=[Route("/ok", item), Route("/items/{n:int}", item)])
    app.add_middleware(Greedy)
    app.add_middleware(LimitMiddleware, routes={"/items/*": {"bytes": "64 KiB"}}, **limits)
    with serving(app) as server:
        assert await statuses(server.url, [("GET", "/items/1")]) == [503]
    assert [getattr(r, "route", None) for r in caplog.records if r.name == "gotcha_async"
            and r.levelno == logging.WARNING] == ["/items/{n:int}"]
    assert [r.route for r in summary(app) if r.count and r.exceeded] == ["/items/{n:int}"]


@pytest.mark.anyio
async def test_glob_keys_still_match_raw_paths() -> None:
    app = fastapi_app(routes={"GET /items/*": {"bytes": "1 MiB"}}, ceiling=None)
    with serving(app) as server:
        assert await statuses(server.url, [("GET", "/items/1"), ("POST", "/items/1")]) == [
            503, 200]


# -- the summary, from the app ----------------------------------------------------------


@pytest.mark.anyio
async def test_summary_from_the_app_uses_the_keys_and_pastes_back_into_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = fastapi_app(enforce=False)
    with pytest.raises(LookupError, match="has not built its middleware yet"):
        summary(app)
    with serving(app) as server:
        requests = [("GET", f"/items/{n}") for n in range(3)]
        requests += [("POST", "/items/9"), ("GET", "/nowhere/1"), ("GET", "/nowhere/2")]
        assert await statuses(server.url, requests) == [200] * 4 + [404] * 2
    rows = {(r.method, r.route): r.count for r in summary(app)}
    assert rows == {("GET", "/items/{item_id}"): 3, ("POST", "/items/{item_id}"): 1,
                    ("GET", "/ok"): 1, ("GET", "(no route)"): 2}
    assert middleware_of(app).summary() == summary(app)

    # the routed lines, pasted into routes= as they are, name routes of the app
    text = middleware_of(app).summary_text().splitlines()[1:]
    pasted = ast.literal_eval("{\n" + "\n".join(text) + "\n}")
    assert set(pasted) == {"GET /items/{item_id}", "POST /items/{item_id}", "GET /ok"}
    caplog.clear()
    again = fastapi_app(routes=pasted)
    with serving(again) as server:
        assert await statuses(server.url, [("GET", "/items/1")]) == [200]
    assert gotcha_warnings(caplog) == []


# -- bad configuration ----------------------------------------------------------------------


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"response": lambda a, b: None}, TypeError,
         "response must be an ASGI application such as starlette's JSONResponse(...), or a "
         "callable taking the LimitExceeded and returning one; <function"),
        ({"routes": {"GET  /x y": {}}}, ValueError, "routes key 'GET  /x y' must be"),
    ],
)
def test_bad_configuration_names_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        LimitMiddleware(_app, **kwargs)
    assert str(info.value).startswith(message)


# -- the router's matching, as Starlette's router does it ---------------------------------


def test_starlette_router_resolves_as_the_router_routes() -> None:
    from starlette.routing import WebSocketRoute

    from gotcha_async._routes import StarletteRouter

    async def endpoint(request: Any) -> Response:
        return PlainTextResponse("")

    async def ws(websocket: Any) -> None:
        pass

    inner = Starlette(routes=[Route("/users/{id:int}", endpoint, methods=["POST"])])
    app = Starlette(routes=[
        Route("/items/me", endpoint),
        Route("/items/{item_id}", endpoint),
        WebSocketRoute("/items/{item_id}", ws),
        Mount("/api", app=inner),
    ])
    router = StarletteRouter(app.router)

    def resolve(path: str, method: str = "GET", kind: str = "http", root: str = "") -> Any:
        return router.resolve({"type": kind, "path": root + path, "root_path": root,
                               "method": method})

    assert resolve("/items/me") == "/items/me"  # the first match, as the router's
    assert resolve("/items/7") == "/items/{item_id}"
    assert resolve("/items/7", "HEAD") == "/items/{item_id}"  # HEAD goes with GET
    assert resolve("/items/7", kind="websocket") == "/items/{item_id}"
    assert resolve("/api/users/3", "POST") == "/api/users/{id:int}"
    assert resolve("/api/users/3") == "/api/users/{id:int}"  # a 405: the route's all the same
    assert resolve("/api/users/x", "POST") is None  # the convertor's regex: no route
    assert resolve("/nowhere") is None
    assert resolve("/items/7", root="/prefix") == "/items/{item_id}"  # behind a proxy prefix
    assert sorted(router.templates()) == [
        "/api/users/{id:int}", "/items/me", "/items/{item_id}", "/items/{item_id}"]
