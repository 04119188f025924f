"""Per-request metrics through the real OpenTelemetry SDK, behind a real uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from asgi_server import serving
from fresh_scripts import run as run_fresh
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import gotcha_async as gotcha
from gotcha_async._otel import BYTE_BUCKETS
from gotcha_async.asgi import LimitMiddleware

LIMIT = gotcha.MiB
HOG = 8 * gotcha.MiB


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def hog(request: Request) -> Response:
    data = bytearray(HOG)
    await anyio.sleep(0)
    return PlainTextResponse(str(len(data)))


async def item(request: Request) -> Response:
    return PlainTextResponse(str(request.path_params["n"]))


def app() -> Starlette:
    return Starlette(routes=[Route("/ok", ok), Route("/hog", hog), Route("/items/{n:int}", item)])


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    yield reader
    reader.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, tuple[str, list[Any]]]:
    """metric name -> (unit, data points), for the gotcha_async meter."""
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, tuple[str, list[Any]]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != "gotcha_async":
                continue
            for metric in scope_metrics.metrics:
                out[metric.name] = (metric.unit or "", list(metric.data.data_points))
    return out


def by_route(data_points: list[Any]) -> dict[tuple[Any, ...], Any]:
    return {
        (p.attributes.get("http.route"), p.attributes["http.response.status_code"]): p
        for p in data_points
    }


async def hit(url: str, paths: list[str]) -> list[int]:
    async with httpx.AsyncClient(base_url=url) as client:
        return [(await client.get(p)).status_code for p in paths]


@pytest.mark.anyio
async def test_histograms_per_request_with_route_template_and_status(
    reader: InMemoryMetricReader,
) -> None:
    provider = MeterProvider(metric_readers=[reader])
    middleware = LimitMiddleware(app(), bytes=LIMIT, ceiling=None, meter_provider=provider)
    with serving(middleware) as server:
        codes = await hit(server.url, ["/ok", "/ok", "/hog", "/items/1", "/items/2"])
    assert codes == [200, 200, 503, 200, 200]
    metrics = points(reader)
    assert {name: unit for name, (unit, _) in metrics.items()} == {
        "gotcha.request.allocated": "By",
        "gotcha.request.objects": "{object}",
        "gotcha.request.allocator_calls": "{call}",
        "gotcha.request.exceeded": "{request}",
    }  # no peak memory: nothing tracked it
    allocated = by_route(metrics["gotcha.request.allocated"][1])
    # serving() asks /ok once more before shutting down
    assert {key: p.count for key, p in allocated.items()} == {
        ("/ok", 200): 3, ("/hog", 503): 1, ("/items/{n:int}", 200): 2,
    }
    hog_point = allocated[("/hog", 503)]
    assert HOG < hog_point.sum < HOG + 256 * gotcha.KiB
    assert list(hog_point.explicit_bounds) == list(BYTE_BUCKETS)
    assert all(p.attributes["http.request.method"] == "GET" for p in allocated.values())
    for name in ("gotcha.request.objects", "gotcha.request.allocator_calls"):
        assert sum(p.count for p in metrics[name][1]) == 6
    [exceeded] = metrics["gotcha.request.exceeded"][1]
    assert exceeded.value == 1
    assert dict(exceeded.attributes) == {
        "http.request.method": "GET", "http.route": "/hog", "http.response.status_code": 503,
        "url.scheme": "http", "error.type": "bytes",
        "gotcha.resource": "bytes", "gotcha.enforced": True,
    }
    # the stable HTTP conventions' attributes, as on http.server.request.duration: a
    # request stopped for its limit carries error.type, the others do not
    assert dict(hog_point.attributes) == {
        "http.request.method": "GET", "http.route": "/hog", "http.response.status_code": 503,
        "url.scheme": "http", "error.type": "bytes",
    }
    assert dict(allocated[("/ok", 200)].attributes) == {
        "http.request.method": "GET", "http.route": "/ok", "http.response.status_code": 200,
        "url.scheme": "http",
    }


@pytest.mark.anyio
async def test_observe_mode_counts_requests_over_as_not_enforced(
    reader: InMemoryMetricReader,
) -> None:
    provider = MeterProvider(metric_readers=[reader])
    middleware = LimitMiddleware(app(), memory=LIMIT, enforce=False, meter_provider=provider)
    with serving(middleware) as server:
        assert await hit(server.url, ["/hog", "/hog", "/ok"]) == [200, 200, 200]
    metrics = points(reader)
    [exceeded] = metrics["gotcha.request.exceeded"][1]
    assert exceeded.value == 2
    assert exceeded.attributes["gotcha.enforced"] is False
    assert exceeded.attributes["gotcha.resource"] == "memory"
    assert "error.type" not in exceeded.attributes  # observed: the request did not fail
    unit, peaks = metrics["gotcha.request.memory.peak"]
    assert unit == "By"
    peak = by_route(peaks)[("/hog", 200)]
    assert peak.count == 2 and peak.max >= HOG


@pytest.mark.anyio
async def test_raw_path_never_becomes_an_attribute(reader: InMemoryMetricReader) -> None:
    async def plain(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    provider = MeterProvider(metric_readers=[reader])
    with serving(LimitMiddleware(plain, meter_provider=provider)) as server:
        await hit(server.url, ["/users/1", "/users/2"])
    _, data_points = points(reader)["gotcha.request.allocated"]
    assert [dict(p.attributes) for p in data_points] == [
        {"http.request.method": "GET", "http.response.status_code": 200, "url.scheme": "http"}
    ]
    assert data_points[0].count == 3


def test_noop_provider_creates_no_instruments() -> None:
    middleware = LimitMiddleware(app(), meter_provider=NoOpMeterProvider())
    assert middleware._options.instruments is None


def test_importing_the_middleware_does_not_import_opentelemetry() -> None:
    run_fresh("otel_not_imported.py", timeout=60)


@pytest.mark.parametrize("placeholder_tells", [True, False], ids=["attribute", "getter"])
def test_default_is_the_global_provider(placeholder_tells: bool) -> None:
    # in a process of its own: the global provider can be set once per process
    run_fresh("otel_global_provider.py", str(placeholder_tells), timeout=60)
