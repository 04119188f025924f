"""One small interface over the web frameworks the middlewares serve, for the contract
suite (test_web_contract.py): the same endpoints, served for real on 127.0.0.1 by each
framework's own server, with the middleware added the way its users add it.

An application is described without a framework: a mapping from route templates to
endpoints (:class:`Text`, :class:`Stream`, :class:`Socket`), whose functions hold the
behaviour under test. They run in the request's own task, so what they allocate is the
request's. Templates are written as Starlette writes them, ``/items/{n:int}`` for an
integer parameter; :meth:`Adapter.route` says how the middleware names such a route in
that framework (its ``routes=`` keys, log lines, metrics and summary).

Each server runs its own event loop in a thread of the test process (as
asgi_server.py does for uvicorn): the test's client may run on asyncio, on trio or be a
blocking one (the ``websockets`` client), and the server's memory is ours to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
from asgi_server import START_TIMEOUT, TLS, in_thread, serving

import gotcha_async.aiohttp
import gotcha_async.asgi
from gotcha_async.asgi import RouteSummary

Params = Mapping[str, str]


@dataclass(frozen=True)
class Text:
    """HTTP: answers 200, ``text/plain``, with what ``run(path_params)`` returns."""

    run: Callable[[Params], Awaitable[str]]
    methods: tuple[str, ...] = ("GET",)  # GET answers HEAD too, in both frameworks


@dataclass(frozen=True)
class Stream:
    """HTTP: answers 200 without a length, then writes each chunk ``chunks()`` yields
    as it comes (nothing in between ever waits for the client)."""

    chunks: Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Socket:
    """A websocket: ``before_accept()`` runs before the handshake is answered; then each
    text message is answered with ``reply(text)`` until the client leaves."""

    reply: Callable[[str], Awaitable[str]]
    before_accept: Callable[[], Awaitable[object]] | None = None


Endpoint = Text | Stream | Socket
Endpoints = Mapping[str, Endpoint]


async def _ok(params: Params) -> str:
    return "ok"


#: every application answers /ok: the harness asks it once more before the server's
#: shutdown, to check that the server is still up whatever the test did
ALIVE: Endpoints = {"/ok": Text(_ok)}


@dataclass
class Served:
    """A running server: where to reach it, and the framework's application."""

    url: str
    ws_url: str
    app: Any
    #: what the server logged with a traceback while it ran (a test reads it after the
    #: block; uvicorn's loggers do not propagate to caplog)
    tracebacks: list[logging.LogRecord] = field(default_factory=list)

    def client(self, timeout: float = START_TIMEOUT) -> httpx.AsyncClient:
        """An httpx client of this server (on the test's own backend)."""
        return httpx.AsyncClient(base_url=self.url, timeout=timeout, verify=TLS)


class _Tracebacks(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@contextlib.contextmanager
def _tracebacks_of(logger_name: str, records: list[logging.LogRecord]) -> Iterator[None]:
    handler = _Tracebacks(records)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


_INT_PARAM = re.compile(r"\{(\w+):int\}")


class Adapter:
    """What a contract test needs of a framework."""

    name: ClassVar[str]
    #: how a ``response=`` that is neither a response nor a callable is refused
    bad_response_message: ClassVar[str]
    #: how middleware_of() says an application has no middleware
    no_middleware_message: ClassVar[str]

    def __repr__(self) -> str:
        return self.name

    def serve(self, endpoints: Endpoints, /, *, loop: str = "asyncio",
              **options: Any) -> contextlib.AbstractContextManager[Served]:
        """Serve ``endpoints`` (and :data:`ALIVE`) with the middleware built with
        ``options``, exactly those (no default of the tests' own), on a free port of
        127.0.0.1, the server's loop being ``loop`` ("asyncio" or "uvloop"), for the
        block. Its exit asks /ok once more, then shuts the server down (the lifespan
        shutdown or the app's on_shutdown: the summary of observe mode is logged by
        then)."""
        raise NotImplementedError

    def route(self, template: str) -> str:
        """The middleware's name for the route declared with ``template``."""
        raise NotImplementedError

    def json_response(self, data: object, status: int,
                      headers: Mapping[str, str] | None = None) -> Any:
        """The framework's ready-made JSON response, for ``response=``."""
        raise NotImplementedError

    def path_of(self, target: Any) -> str:
        """The path of what a routes callable or on_exceeded is handed (the ASGI scope,
        the aiohttp request)."""
        raise NotImplementedError

    def middleware(self, **options: Any) -> Any:
        """The middleware built with ``options`` on its own, outside any server."""
        raise NotImplementedError

    def middleware_of(self, app: Any) -> Any:
        raise NotImplementedError

    def summary(self, app: Any) -> list[RouteSummary]:
        raise NotImplementedError

    def app_without_middleware(self) -> Any:
        raise NotImplementedError


# -- Starlette, under uvicorn ----------------------------------------------------------


class StarletteAdapter(Adapter):
    """A Starlette application, ``app.add_middleware(LimitMiddleware, ...)`` as a
    Starlette or FastAPI user writes it, under uvicorn (asgi_server.serving)."""

    name = "starlette"
    bad_response_message = "response must be an ASGI application"
    no_middleware_message = "no LimitMiddleware in"

    def app(self, endpoints: Endpoints, /, **options: Any) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, Response, StreamingResponse
        from starlette.routing import BaseRoute, Route, WebSocketRoute
        from starlette.websockets import WebSocket, WebSocketDisconnect

        def text(endpoint: Text) -> Callable[[Request], Awaitable[Response]]:
            async def handler(request: Request) -> Response:
                params = {k: str(v) for k, v in request.path_params.items()}
                return PlainTextResponse(await endpoint.run(params))

            return handler

        def stream(endpoint: Stream) -> Callable[[Request], Awaitable[Response]]:
            async def handler(request: Request) -> Response:
                return StreamingResponse(endpoint.chunks(), media_type="text/plain")

            return handler

        def socket(endpoint: Socket) -> Callable[[WebSocket], Awaitable[None]]:
            async def handler(websocket: WebSocket) -> None:
                if endpoint.before_accept is not None:
                    await endpoint.before_accept()
                await websocket.accept()
                while True:
                    try:
                        message = await websocket.receive_text()
                    except WebSocketDisconnect:
                        return
                    await websocket.send_text(await endpoint.reply(message))

            return handler

        declared: list[BaseRoute] = []
        for template, endpoint in {**ALIVE, **endpoints}.items():
            if isinstance(endpoint, Text):
                declared.append(Route(template, text(endpoint), methods=list(endpoint.methods)))
            elif isinstance(endpoint, Stream):
                declared.append(Route(template, stream(endpoint)))
            else:
                declared.append(WebSocketRoute(template, socket(endpoint)))
        app = Starlette(routes=declared)
        app.add_middleware(gotcha_async.asgi.LimitMiddleware, **options)
        return app

    @contextlib.contextmanager
    def serve(self, endpoints: Endpoints, /, *, loop: str = "asyncio",
              **options: Any) -> Iterator[Served]:
        app = self.app(endpoints, **options)
        with serving(app, loop=loop) as running:
            served = Served(running.url, running.ws_url, app)
            # after the start: uvicorn's logging configuration replaces its handlers
            with _tracebacks_of("uvicorn.error", served.tracebacks):
                yield served

    def route(self, template: str) -> str:
        return template

    def json_response(self, data: object, status: int,
                      headers: Mapping[str, str] | None = None) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(data, status_code=status, headers=headers)

    def path_of(self, target: Any) -> str:
        return str(target["path"])

    def middleware(self, **options: Any) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            pass

        return gotcha_async.asgi.LimitMiddleware(app, **options)

    def middleware_of(self, app: Any) -> Any:
        return gotcha_async.asgi.middleware_of(app)

    def summary(self, app: Any) -> list[RouteSummary]:
        return gotcha_async.asgi.summary(app)

    def app_without_middleware(self) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("an ASGI application")


# -- aiohttp, under its own server -----------------------------------------------------


class AiohttpAdapter(Adapter):
    """An aiohttp application, ``gotcha_async.aiohttp.setup(app, ...)`` before its routes
    are added (they are known at its startup), under aiohttp's own server (AppRunner,
    TCPSite) in a thread."""

    name = "aiohttp"
    bad_response_message = "response must be an aiohttp web.Response"
    no_middleware_message = "no gotcha_async LimitMiddleware installed"

    def app(self, endpoints: Endpoints, /, **options: Any) -> Any:
        from aiohttp import WSMsgType, web

        def text(endpoint: Text) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
            async def handler(request: web.Request) -> web.StreamResponse:
                return web.Response(text=await endpoint.run(dict(request.match_info)))

            return handler

        def stream(endpoint: Stream) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
            async def handler(request: web.Request) -> web.StreamResponse:
                response = web.StreamResponse()
                response.content_type = "text/plain"
                await response.prepare(request)
                async for chunk in endpoint.chunks():
                    await response.write(chunk)
                await response.write_eof()
                return response

            return handler

        def socket(endpoint: Socket) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
            async def handler(request: web.Request) -> web.StreamResponse:
                if endpoint.before_accept is not None:
                    await endpoint.before_accept()
                ws = web.WebSocketResponse()
                await ws.prepare(request)
                async for message in ws:
                    if message.type == WSMsgType.TEXT:
                        await ws.send_str(await endpoint.reply(message.data))
                return ws

            return handler

        app = web.Application()
        gotcha_async.aiohttp.setup(app, **options)
        for template, endpoint in {**ALIVE, **endpoints}.items():
            path = _INT_PARAM.sub(r"{\1:\\d+}", template)
            if isinstance(endpoint, Text):
                for method in endpoint.methods:
                    if method == "GET":
                        app.router.add_get(path, text(endpoint))  # and HEAD
                    else:
                        app.router.add_route(method, path, text(endpoint))
            elif isinstance(endpoint, Stream):
                app.router.add_get(path, stream(endpoint))
            else:
                app.router.add_get(path, socket(endpoint))
        return app

    @contextlib.contextmanager
    def serve(self, endpoints: Endpoints, /, *, loop: str = "asyncio",
              **options: Any) -> Iterator[Served]:
        app = self.app(endpoints, **options)
        tracebacks: list[logging.LogRecord] = []
        with _tracebacks_of("aiohttp", tracebacks), aiohttp_serving(app, loop) as port:
            url = f"http://127.0.0.1:{port}"
            yield Served(url, f"ws://127.0.0.1:{port}", app, tracebacks)
            # whatever the test did, the server is still there
            assert httpx.get(url + "/ok", verify=TLS).status_code == 200

    def route(self, template: str) -> str:
        # declared as {n:\d+}: aiohttp names the resource by its canonical path
        return _INT_PARAM.sub(r"{\1}", template)

    def json_response(self, data: object, status: int,
                      headers: Mapping[str, str] | None = None) -> Any:
        from aiohttp import web

        return web.json_response(data, status=status, headers=headers)

    def path_of(self, target: Any) -> str:
        return str(target.path)

    def middleware(self, **options: Any) -> Any:
        return gotcha_async.aiohttp.LimitMiddleware(**options)

    def middleware_of(self, app: Any) -> Any:
        return gotcha_async.aiohttp.middleware_of(app)

    def summary(self, app: Any) -> list[RouteSummary]:
        return gotcha_async.aiohttp.summary(app)

    def app_without_middleware(self) -> Any:
        from aiohttp import web

        return web.Application()


def _new_loop(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    assert loop == "asyncio", loop
    return asyncio.new_event_loop


@contextlib.contextmanager
def aiohttp_serving(app: Any, loop: str) -> Iterator[int]:
    """aiohttp's own server for ``app`` on a free port of 127.0.0.1, in a thread; its
    port. At the exit, the application's cleanup (on_shutdown included) has run."""
    from aiohttp import web

    ports: list[int] = []

    def run(ready: threading.Event, stoppers: list[Callable[[], object]]) -> None:
        async def main() -> None:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=START_TIMEOUT)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                ports.append(runner.addresses[0][1])
                stop = asyncio.Event()
                running = asyncio.get_running_loop()
                stoppers.append(lambda: running.call_soon_threadsafe(stop.set))
                ready.set()
                await stop.wait()
            finally:
                await runner.cleanup()

        with asyncio.Runner(loop_factory=_new_loop(loop)) as runner:
            runner.run(main())

    with in_thread(run):
        assert ports, "aiohttp did not say its port"
        yield ports[0]


ADAPTERS: list[Adapter] = [StarletteAdapter(), AiohttpAdapter()]
