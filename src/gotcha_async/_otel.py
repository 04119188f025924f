"""OpenTelemetry instruments of the web integrations (the ``otel`` extra).

Only ``opentelemetry-api`` is used, and only once a middleware asks for it: importing
this module imports nothing from OpenTelemetry.

========================================  ==========  ==================================
name                                      unit        what, per request
========================================  ==========  ==================================
``gotcha.request.allocated``              ``By``      bytes allocated (histogram)
``gotcha.request.objects``                ``{object}``  object allocations (histogram)
``gotcha.request.allocator_calls``        ``{call}``  allocator calls (histogram)
``gotcha.request.memory.peak``            ``By``      peak memory held, when tracked
``gotcha.request.exceeded``               ``{request}``  requests over a limit (counter)
========================================  ==========  ==================================

Attributes: ``http.request.method``, ``http.route`` (only when the framework gives a
route template), ``http.response.status_code`` (when a status was sent), ``url.scheme``
and, for a request stopped for its limit, ``error.type`` (the resource: ``bytes``,
``objects``, ``calls`` or ``memory``); the counter adds ``gotcha.resource`` and
``gotcha.enforced``. These are the stable HTTP conventions' names, so the histograms
join ``http.server.request.duration`` on method, route, status and scheme.
"""

from __future__ import annotations

from typing import Any

from . import _foreign, _report

# Powers of four from 1 KiB to 4 GiB: request allocations span six orders of
# magnitude, and OpenTelemetry's default buckets (0 to 10,000) would put nearly every
# request in the last one.
BYTE_BUCKETS = tuple(float(4**n * 1024) for n in range(12))
COUNT_BUCKETS = tuple(float(4**n * 10) for n in range(12))

METRICS = {
    "bytes": ("gotcha.request.allocated", "By",
              "Bytes requested from Python's allocator by the request's work"),
    "objects": ("gotcha.request.objects", "{object}",
                "Object allocations made by the request's work"),
    "calls": ("gotcha.request.allocator_calls", "{call}",
              "Allocator calls (malloc, calloc, realloc) made by the request's work"),
    "memory": ("gotcha.request.memory.peak", "By",
               "Peak of the memory the request held (allocated and not yet freed)"),
}
EXCEEDED = ("gotcha.request.exceeded", "{request}",
            "Requests that went over a limit, enforced or only observed")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gotcha-async")
    except Exception:  # not installed as a distribution (a source checkout)
        return "0"


def _histogram(meter: Any, name: str, unit: str, description: str, buckets: Any) -> Any:
    try:
        return meter.create_histogram(
            name, unit=unit, description=description,
            explicit_bucket_boundaries_advisory=buckets,
        )
    except TypeError:  # an API older than 1.23 has no advisory buckets
        return meter.create_histogram(name, unit=unit, description=description)


class Instruments:
    """The instruments of one middleware, created on one MeterProvider."""

    def __init__(self, meter_provider: Any, placeholder: Any = None) -> None:
        # placeholder: the API's global provider while no SDK has been set. Its
        # instruments drop what they are given until one is, and then forward to it:
        # until then, recording is skipped (a tenth of a small request's cost)
        self.placeholder = placeholder
        if placeholder is not None:
            #: whether the SDK has been set since (the placeholder says: _foreign)
            self.sdk_is_set = _foreign.otel_sdk_is_set(placeholder)
        meter = meter_provider.get_meter("gotcha_async", _version())
        self.histograms = []
        for resource, (name, unit, description) in METRICS.items():
            buckets = BYTE_BUCKETS if unit == "By" else COUNT_BUCKETS
            self.histograms.append(
                (resource, _histogram(meter, name, unit, description, buckets))
            )
        name, unit, description = EXCEEDED
        self.exceeded = meter.create_counter(name, unit=unit, description=description)

    def ready(self) -> bool:
        """Whether what is recorded can reach an SDK (false while only the API's
        placeholder provider is set: its instruments drop everything)."""
        placeholder = self.placeholder
        if placeholder is None:
            return True
        if not self.sdk_is_set():
            return False  # nobody could read it yet
        self.placeholder = None  # set at last: these instruments now forward to it
        return True

    def record(
        self,
        method: str,
        route: str | None,
        status: int | None,
        scheme: str | None,
        used: tuple[int, int, int],
        peak: int | None,
        breach: _report.Exceeded | None,
    ) -> None:
        if not self.ready():
            return
        attributes: dict[str, str | int | bool] = {"http.request.method": method}
        if route is not None:
            attributes["http.route"] = route
        if status is not None:
            attributes["http.response.status_code"] = status
        if scheme is not None:
            attributes["url.scheme"] = scheme
        if breach is not None and breach.enforced:
            # the semantic conventions' "component-specific low-cardinality error
            # identifier" for a request that failed: what it was stopped for
            attributes["error.type"] = breach.resource
        values = (*used, peak)
        for (_, histogram), value in zip(self.histograms, values, strict=True):
            if value is not None:
                histogram.record(value, attributes)
        if breach is not None:
            self.exceeded.add(1, {**attributes, "gotcha.resource": breach.resource,
                                  "gotcha.enforced": breach.enforced})


def instruments_for(meter_provider: Any) -> Instruments | None:
    """The instruments on ``meter_provider``; None for none.

    ``None`` means OpenTelemetry's global provider when ``opentelemetry-api`` is
    installed, and no metrics otherwise.
    """
    placeholder = None
    if meter_provider is None:
        try:
            from opentelemetry import metrics
        except ImportError:
            return None
        meter_provider = metrics.get_meter_provider()
        if type(meter_provider).__name__ == "_ProxyMeterProvider":
            placeholder = meter_provider
    if not callable(getattr(meter_provider, "get_meter", None)):
        raise TypeError(
            f"meter_provider must be an OpenTelemetry MeterProvider or None, not "
            f"{meter_provider!r}"
        )
    if type(meter_provider).__name__ == "NoOpMeterProvider":
        return None  # asked for no metrics: measure nothing for them
    return Instruments(meter_provider, placeholder)
