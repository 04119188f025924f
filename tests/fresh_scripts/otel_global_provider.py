"""A middleware built before the SDK is configured reports to the global provider set
afterwards (tests/test_otel.py). In a process of its own: the global provider can be set
once per process.

Argument: ``True`` or ``False``, whether the API's placeholder provider says when the SDK
is set; with an API whose placeholder did not, the middleware asks get_meter_provider()
instead: both must work.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gotcha_async import _foreign
from gotcha_async.asgi import LimitMiddleware

placeholder_tells = {"True": True, "False": False}[sys.argv[1]]
assert hasattr(metrics.get_meter_provider(), _foreign.OTEL_REAL_PROVIDER)
if not placeholder_tells:
    _foreign.OTEL_REAL_PROVIDER = "_no_such_attribute"  # as an API without it


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


middleware = LimitMiddleware(app)  # built before the SDK is configured, as apps are
instruments = middleware._options.instruments
assert instruments is not None and instruments.placeholder is not None
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


async def main() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    await middleware({"type": "http", "method": "GET", "path": "/"}, receive, send)


asyncio.run(main())
data = reader.get_metrics_data()
assert data is not None
names = sorted(m.name for rm in data.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics)
expected = ["gotcha.request.allocated", "gotcha.request.allocator_calls",
            "gotcha.request.objects"]
assert names == expected, names
print("ok")
