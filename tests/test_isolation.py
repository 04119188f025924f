"""Every request on its own, on every server, for real.

A server may hand the application a context that an earlier request left behind:
uvicorn on asyncio's own loop runs the connection's reader -- and starts the next
keep-alive request's task -- in the context of the request task that called
``transport.resume_reading()``; with pipelining (uvloop too) it starts the next
request's task from inside the previous request's ``send``, while that request still
runs. A request's scope must never be the child of another request's scope, and
nothing the server does after a request ended may be charged to it.

Each server runs in a thread of this process, on 127.0.0.1; the clients are httpx (one
connection, kept alive) and a raw socket (pipelining). The assertions are read once
the server has shut down, when every request's scope has exited and is frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from asgi_server import START_TIMEOUT, _Server, in_thread, serving
from web_adapters import aiohttp_serving

import gotcha_async as gotcha
from gotcha_async.asgi import LimitMiddleware

MiB = gotcha.MiB
POST = 5 * 10**6  # the 5 MB POST
BUDGET = "64 MiB"  # under which every second one of them got a 500
WORK = 3 * MiB  # what /work allocates and holds across a checkpoint
WORK_BUDGET = 8 * MiB  # room for one request's work, not for three
CHUNK = 256 * gotcha.KiB
KEEP_ALIVE = 10
PIPELINED = 8

UVICORN = [
    pytest.param(loop, http, id=f"uvicorn-{loop}-{http}")
    for loop in ("asyncio", "uvloop")
    for http in ("h11", "httptools")
]
SERVERS = [
    *(pytest.param(f"uvicorn-{p.values[0]}-{p.values[1]}", id=p.id) for p in UVICORN),
    pytest.param("hypercorn-asyncio", id="hypercorn-asyncio"),
    pytest.param("hypercorn-trio", id="hypercorn-trio"),
    pytest.param("aiohttp", id="aiohttp"),
]


@dataclass
class Seen:
    """What the application saw: each request's path and scope, in order."""

    requests: list[tuple[str, gotcha.Context]] = field(default_factory=list)

    def note(self, path: str) -> None:
        ctx = gotcha.current()
        assert ctx is not None, "the request runs outside its own scope"
        self.requests.append((path, ctx))

    def scopes(self) -> list[gotcha.Context]:
        """The scopes of the test's requests (not the harness's /ok)."""
        return [ctx for path, ctx in self.requests if path != "/ok"]


# -- the application, as ASGI and as aiohttp -------------------------------------------


def asgi_app(seen: Seen) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        seen.note(path)
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
        elif path == "/ok":  # the harness's own check that the server is still up
            await respond(send, b"ok")
        elif path == "/echo":
            # streamed both ways: the body read as it comes, answered chunk by chunk
            chunks = []
            more = True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            headers = [(b"content-type", b"application/octet-stream")]
            if scope["query_string"] == b"length":  # else chunked
                headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await respond(send, str(len(await work())).encode())

    return app


async def work() -> bytearray:
    data = bytearray(WORK)
    await anyio.sleep(0)  # held across a checkpoint, where other requests run
    return data


async def respond(send: Any, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def aiohttp_app(seen: Seen, **limits: Any) -> Any:
    from aiohttp import web

    from gotcha_async.aiohttp import setup

    async def ok(request: web.Request) -> web.Response:
        seen.note(request.path)
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.StreamResponse:
        seen.note(request.path)
        chunks = [chunk async for chunk in request.content.iter_chunked(CHUNK)]
        # a copy of the body made by the request itself: aiohttp may hand over the
        # chunks its parser made, outside the request (3.15's aiohttp: nothing else is
        # the request's), and each request is checked for charges near its own work
        copy = b"".join(chunks)
        del copy
        response = web.StreamResponse()
        if request.query_string == "length":  # else chunked
            response.content_length = sum(map(len, chunks))
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def work_route(request: web.Request) -> web.Response:
        seen.note(request.path)
        return web.Response(text=str(len(await work())))

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        seen.note(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_get("/ws", websocket)
    setup(app, **limits)
    app.router.add_get("/ok", ok)
    app.router.add_post("/echo", echo)
    app.router.add_get("/work", work_route)
    return app


# -- the servers -----------------------------------------------------------------------


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def hypercorn_serving(app: Any, backend: str) -> Iterator[int]:
    from hypercorn.config import Config

    sock = listening_socket()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns it from here
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0

    def run(ready: threading.Event, stoppers: list[Callable[[], object]]) -> None:
        if backend == "trio":
            import trio
            from hypercorn.trio import serve as trio_serve

            async def main_trio() -> None:
                stop = trio.Event()
                token = trio.lowlevel.current_trio_token()
                stoppers.append(lambda: token.run_sync_soon(stop.set))
                ready.set()  # the socket listens already: connections wait for it
                await trio_serve(app, config, shutdown_trigger=stop.wait)

            trio.run(main_trio)
        else:
            from hypercorn.asyncio import serve as asyncio_serve

            async def main_asyncio() -> None:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                stoppers.append(lambda: loop.call_soon_threadsafe(stop.set))
                ready.set()
                await asyncio_serve(app, config, shutdown_trigger=stop.wait)

            asyncio.run(main_asyncio())

    with in_thread(run):
        yield port


@contextlib.contextmanager
def server(kind: str, seen: Seen, **limits: Any) -> Iterator[int]:
    """Serve the application under LimitMiddleware(**limits) on ``kind``; its port."""
    if kind == "aiohttp":
        with aiohttp_serving(aiohttp_app(seen, **limits), "asyncio") as port:
            yield port
        return
    app = LimitMiddleware(asgi_app(seen), **limits)
    if kind.startswith("hypercorn-"):
        with hypercorn_serving(app, kind.removeprefix("hypercorn-")) as port:
            yield port
        return
    _, loop, http = kind.split("-")
    with serving(app, loop=loop, http=http) as running:
        yield int(running.url.rsplit(":", 1)[1])


# -- what must hold --------------------------------------------------------------------


def assert_isolated(seen: Seen, n: int, parent: gotcha.Context | None = None) -> list[int]:
    """Every request had a scope of its own, under no other request's; their bytes."""
    scopes = seen.scopes()
    assert len(scopes) == n
    every_request = {id(ctx) for _, ctx in seen.requests}
    assert len({id(ctx) for ctx in scopes}) == n
    for ctx in scopes:
        ancestor = ctx.parent
        while ancestor is not None:
            assert id(ancestor) not in every_request, "a request inside another request"
            ancestor = ancestor.parent
        assert ctx.parent is parent
        assert not ctx.exceeded()
    return [ctx.used().bytes for ctx in scopes]


def assert_near_own_work(charged: list[int], least: int, most: int) -> None:
    # each request's charge is its own work: never less than what it allocated itself,
    # and no other request's on top (before the fix, a request was charged every later
    # request that ran inside it, and the server's parsing of their bodies)
    assert all(least <= b <= most for b in charged), [f"{b / MiB:.1f} MiB" for b in charged]
    assert max(charged) < 2 * min(charged), [f"{b / MiB:.1f} MiB" for b in charged]


def pipelined(port: int, paths: list[str]) -> list[tuple[int, bytes]]:
    """Write every request at once on one connection; read every response."""
    requests = b"".join(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for path in paths
    )
    responses: list[tuple[int, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT) as conn:
        conn.sendall(requests)
        buffer = b""
        while len(responses) < len(paths):
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buffer[:head_end].decode("latin-1").split("\r\n")
                headers = dict(line.split(":", 1) for line in head[1:])
                headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
                status = int(head[0].split()[1])
                if "content-length" not in headers:  # a server's own error page
                    responses.append((status, b"(no content-length)"))
                    break
                end = head_end + 4 + int(headers["content-length"])
                if len(buffer) >= end:
                    responses.append((status, buffer[head_end + 4:end]))
                    buffer = buffer[end:]
                    continue
            data = conn.recv(1 << 16)
            if not data:
                break  # the server closed the connection: the rest is unanswered
            buffer += data
    return responses


def streamed_body(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield bytes([sent // CHUNK % 251]) * n
        sent += n


# -- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_keep_alive_5_mb_posts_each_on_its_own(kind: str) -> None:
    # the case: a 500 on every second 5 MB POST under bytes="64 MiB" (uvicorn on
    # asyncio's own loop), each request the child of the one before
    seen = Seen()
    body = bytes(range(256)) * (POST // 256)
    statuses = []
    with server(kind, seen, bytes=BUDGET) as port, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=START_TIMEOUT,
        limits=httpx.Limits(max_connections=1),
    ) as client:
        for _ in range(KEEP_ALIVE):
            response = client.post("/echo", content=body)
            statuses.append(response.status_code)
            assert response.content == body or response.status_code != 200
    assert statuses == [200] * KEEP_ALIVE
    charged = assert_isolated(seen, KEEP_ALIVE)
    assert_near_own_work(charged, len(body), 48 * MiB)


@pytest.mark.parametrize("kind", SERVERS)
def test_keep_alive_streamed_both_ways(kind: str) -> None:
    seen = Seen()
    total = 4 * MiB
    expected = b"".join(streamed_body(total))
    with server(kind, seen, bytes=BUDGET) as port, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=START_TIMEOUT,
        limits=httpx.Limits(max_connections=1),
    ) as client:
        for _ in range(6):
            # no length: sent chunked, read back as it comes
            with client.stream("POST", "/echo", content=streamed_body(total)) as response:
                assert response.status_code == 200
                assert b"".join(response.iter_bytes()) == expected
    charged = assert_isolated(seen, 6)
    assert_near_own_work(charged, total, 48 * MiB)


@pytest.mark.parametrize("kind", SERVERS)
def test_pipelined_requests_each_on_its_own(kind: str) -> None:
    # uvicorn starts the next pipelined request from inside the previous one's send: the
    # third got a 500 and the rest of the connection was never answered
    seen = Seen()
    with server(kind, seen, bytes=WORK_BUDGET) as port:
        responses = pipelined(port, ["/work"] * PIPELINED)
    assert responses == [(200, str(WORK).encode())] * PIPELINED
    charged = assert_isolated(seen, PIPELINED)
    assert_near_own_work(charged, WORK, WORK + 2 * MiB)


@pytest.mark.parametrize(("loop", "http"), UVICORN)
def test_an_outer_scope_around_the_server_stays_every_request_parent(
    loop: str, http: str
) -> None:
    # a user's own scope around the whole server is a valid parent: it is charged every
    # request, and no request is another's
    seen = Seen()
    app = LimitMiddleware(asgi_app(seen), bytes=WORK_BUDGET)
    outer = gotcha.Context()
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on",
                            log_level="warning", loop=loop, http=http)
    uv = _Server(config)

    def run() -> None:
        with outer:  # the loop's tasks and callbacks all start from this context
            uv.run()

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    try:
        assert uv.startup_done.wait(START_TIMEOUT) and uv.started
        port = uv.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=START_TIMEOUT,
                          limits=httpx.Limits(max_connections=1)) as client:
            statuses = [client.get("/work").status_code for _ in range(5)]
        responses = pipelined(port, ["/work"] * 4)
    finally:
        uv.should_exit = True
        thread.join(START_TIMEOUT)
    assert not thread.is_alive()
    assert statuses == [200] * 5
    assert [status for status, _ in responses] == [200] * 4
    charged = assert_isolated(seen, 9, parent=outer)
    assert_near_own_work(charged, WORK, WORK + 2 * MiB)
    assert outer.used().bytes >= sum(charged)


def test_two_middlewares_on_one_request_still_nest() -> None:
    # the inner middleware's scope is entered in the request's own task: the same
    # request, so the outer request scope stays its parent (and pays for it)
    seen = Seen()
    outer_scopes: list[gotcha.Context] = []

    def noting(app: Any) -> Any:
        async def wrapper(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                current = gotcha.current()
                assert current is not None
                outer_scopes.append(current)
            await app(scope, receive, send)

        return wrapper

    app = LimitMiddleware(noting(LimitMiddleware(asgi_app(seen), bytes=WORK_BUDGET)),
                          bytes=4 * WORK_BUDGET)
    with serving(app, loop="asyncio", http="h11") as running, httpx.Client(
        base_url=running.url, timeout=START_TIMEOUT, limits=httpx.Limits(max_connections=1)
    ) as client:
        statuses = [client.get("/work").status_code for _ in range(3)]
    assert statuses == [200] * 3
    inner = seen.scopes()
    assert len(inner) == 3
    for ctx, outer in zip(inner, outer_scopes, strict=False):
        assert ctx.parent is outer and outer.parent is None
        assert outer.used().bytes >= ctx.used().bytes >= WORK


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
ECHOED = 2 * MiB  # more than a server buffers before it pauses reading


@pytest.mark.parametrize("kind", SERVERS)
def test_a_websocket_after_keep_alive_requests_is_on_its_own(kind: str) -> None:
    # the upgrade arrives on a connection whose earlier requests are over: on uvicorn's
    # asyncio loop its task starts in the context of the last one that resumed reading
    # (a body larger than the server buffers)
    seen = Seen()
    body = bytes(range(256)) * (ECHOED // 256)
    with server(kind, seen, bytes=BUDGET) as port, socket.create_connection(
        ("127.0.0.1", port), timeout=START_TIMEOUT
    ) as conn:
        for _ in range(2):
            conn.sendall(b"POST /echo?length HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            head, rest = read_head(conn, b"")
            assert head[0].split()[1] == "200", head
            while len(rest) < len(body):
                data = conn.recv(1 << 16)
                assert data, "the server closed the connection"
                rest += data
            assert rest == body
        conn.sendall(UPGRADE)
        head, _ = read_head(conn, b"")
        assert head[0].split()[1] == "101", head  # accepted: the handler has run
    assert [path for path, _ in seen.requests][:3] == ["/echo", "/echo", "/ws"]
    assert_isolated(seen, 3)


def read_head(conn: socket.socket, buffer: bytes) -> tuple[list[str], bytes]:
    """A response's status line and headers, and what came after them."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(1 << 16)
        assert data, "the server closed the connection"
        buffer += data
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return head.decode("latin-1").split("\r\n"), rest
