"""A real uvicorn on 127.0.0.1, in a thread of the test process (its memory is ours to
read, its logs go through our logging), for the ASGI tests."""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import uvicorn

START_TIMEOUT = 10.0

#: httpx builds a TLS context for every client it creates (certifi's bundle: 40 to 50 ms
#: each, more than most requests of a test take) unless it is handed one. The tests
#: speak plain HTTP to 127.0.0.1: this one context serves every client (``verify=TLS``).
TLS = ssl.create_default_context()


class _Server(uvicorn.Server):
    """uvicorn.Server that says when its startup is over, whatever its outcome."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = threading.Event()

    async def startup(self, sockets: list[Any] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.startup_done.set()


@dataclass
class Running:
    url: str
    ws_url: str
    thread: threading.Thread


@contextlib.contextmanager
def serving(
    app: Any, loop: str = "asyncio", http: str = "auto",
    lifespan: Literal["auto", "on", "off"] = "on",
) -> Iterator[Running]:
    """Run ``app`` under uvicorn on a free port of 127.0.0.1 in a thread, for the block.

    ``lifespan="auto"`` for an application without the lifespan protocol (Django).
    """
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan=lifespan, log_level="warning", loop=loop,
        http=http,
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        if not server.startup_done.wait(START_TIMEOUT):
            raise RuntimeError("uvicorn did not finish its startup")
        if not server.started:
            raise RuntimeError("uvicorn failed to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Running(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", thread)
        # whatever the test did, the server is still there
        assert thread.is_alive()
        assert httpx.get(f"http://127.0.0.1:{port}/ok", verify=TLS).status_code == 200
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT)
    assert not thread.is_alive(), "uvicorn did not shut down"


@contextlib.contextmanager
def in_thread(run: Callable[[threading.Event, list[Callable[[], object]]], None]) -> Iterator[None]:
    """Run a server's loop in a thread: run(ready, stoppers) sets ready once it serves
    and puts in stoppers a thread-safe way to make it return."""
    ready = threading.Event()
    stoppers: list[Callable[[], object]] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            run(ready, stoppers)
        except BaseException as exc:  # shown by the test, not lost in the thread
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=target, name="server", daemon=True)
    thread.start()
    try:
        assert ready.wait(START_TIMEOUT), "the server did not start"
        assert not failed, failed
        yield
    finally:
        for stop in stoppers:
            stop()
        thread.join(START_TIMEOUT)
    assert not thread.is_alive(), "the server did not shut down"
    assert not failed, failed
