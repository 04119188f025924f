"""Observe mode, with per-request metrics exported to Prometheus through OpenTelemetry.

    pip install "gotcha-async[otel]" opentelemetry-sdk opentelemetry-exporter-prometheus
    python examples/observe_prometheus.py          # a short demonstration, then exits
    python examples/observe_prometheus.py --serve  # app on :8000, metrics on :9464

The demonstration starts the app under uvicorn and the Prometheus endpoint on free
ports of 127.0.0.1, sends a few requests, scrapes ``/metrics`` as Prometheus would and
prints the gotcha series, then shuts the app down, which logs the per-route summary
with a suggested budget per route. Nothing is refused: ``enforce=False`` only observes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import anyio
import httpx
import uvicorn
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import gotcha_async as gotcha
from gotcha_async.asgi import LimitMiddleware


async def item(request: Request) -> Response:
    n = request.path_params["n"]
    text = ",".join(str(i) for i in range(n * 100))
    await anyio.sleep(0)
    return PlainTextResponse(f"{len(text)}\n")


async def report(request: Request) -> Response:
    rows = [bytes(1024) for _ in range(6 * 1024)]  # 6 MiB: over the 4 MiB budget
    await anyio.sleep(0)
    return PlainTextResponse(f"{len(rows)} rows\n")


def build(provider: MeterProvider) -> Starlette:
    app = Starlette(routes=[Route("/items/{n:int}", item), Route("/report", report)])
    app.add_middleware(
        LimitMiddleware, bytes=4 * gotcha.MiB, enforce=False, track_memory=True,
        meter_provider=provider,
    )
    return app


def metrics_provider() -> MeterProvider:
    # the reader registers itself with prometheus_client's default registry
    return MeterProvider(metric_readers=[PrometheusMetricReader()])


def serve() -> None:
    logging.basicConfig(level=logging.INFO)
    start_http_server(9464, addr="127.0.0.1")
    uvicorn.run(build(metrics_provider()), host="127.0.0.1", port=8000)


def demonstrate() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    metrics_server, _ = start_http_server(0, addr="127.0.0.1")
    metrics_url = f"http://127.0.0.1:{metrics_server.server_port}/metrics"
    config = uvicorn.Config(build(metrics_provider()), host="127.0.0.1", port=0,
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    ready = threading.Event()

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        ready.set()
        await task

    thread = threading.Thread(target=asyncio.run, args=(run(),))
    thread.start()
    ready.wait(10)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for n in range(1, 21):
            client.get(f"/items/{n}").raise_for_status()
        for _ in range(3):
            status = client.get("/report").status_code
            # one write: the server thread logs to the same stream meanwhile
            print(f"GET /report: {status}")
    scraped = httpx.get(metrics_url).text
    print("scraped from", "/metrics:")
    for line in scraped.splitlines():
        if line.startswith("gotcha_") and ("_count" in line or "_total" in line):
            print("  " + line)
    server.should_exit = True
    thread.join(10)
    metrics_server.shutdown()


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
    else:
        demonstrate()
