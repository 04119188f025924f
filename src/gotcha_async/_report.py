"""What the web integrations tell an operator: the log line of an exceeded request,
and the per-route summary (fixed memory) with a suggested budget per route.

Shared by :mod:`gotcha_async.asgi` and :mod:`gotcha_async.aiohttp`; no engine import,
no work at import.
"""

from __future__ import annotations

import inspect
import logging
import math
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ._units import RESOURCES, UNITS

logger = logging.getLogger("gotcha_async")


# -- human units -------------------------------------------------------------------------

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _scaled(n: int, decimals: int) -> str:
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log2(n)) // 10, len(_BINARY) - 1)
    text = f"{n / 1024**exponent:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {_BINARY[exponent]}"


def human_size(n: int) -> str:
    """``8808038`` -> ``"8.4 MiB"``: binary units, one decimal at most."""
    return _scaled(n, 1)


def budget_size(n: int) -> str:
    """A size string that ``parse_size`` reads back as exactly n (for a suggested budget)."""
    for decimals in (0, 1, 2, 3):
        text = _scaled(n, decimals)
        number, unit = text.split()
        scale = 1024 ** _BINARY.index(unit)
        if Fraction(number) * scale == n:
            return text
    return str(n)


def used_of_limit(resource: str, used: int, limit: int) -> str:
    """``"8.4 MiB of 8 MiB"``, ``"1,750 objects of 1,000"``.

    Never two equal-looking figures for different values: where one decimal would make
    the use look like the limit, more are shown, and then the exact bytes.
    """
    if resource in ("bytes", "memory"):
        for decimals in (1, 2, 3):
            u, lim = _scaled(used, decimals), _scaled(limit, decimals)
            if u != lim or used == limit:
                return f"{u} of {lim}"
        return f"{used:,} B of {limit:,} B"
    return f"{used:,} {UNITS[resource]} of {limit:,}"


# -- one exceeded request -------------------------------------------------------------------

#: What happened to a request over its limit (``Exceeded.outcome``).
OUTCOMES = {
    "refused": "answered {status}",
    "aborted": "response aborted, status {status} already sent",
    "completed": "stopped after its response (status {status}) completed: background work",
    "closed": "websocket closed with 1008",
    "denied": "websocket handshake refused",
    "observed": "observed only, not enforced: status {status} sent",
}


@dataclass(frozen=True)
class Exceeded:
    """One request that went over (or, observing, would have gone over) its limit.

    Passed as the third argument of an ``on_exceeded(scope_or_request, ctx, exceeded)``
    hook that takes three, and found in the ``extra`` of the log record.

    :ivar resource: ``"bytes"``, ``"objects"``, ``"calls"`` or ``"memory"``
    :ivar used: what the request used of it (peak held, for ``memory``)
    :ivar limit: the limit it broke
    :ivar enforced: False in observe mode (``enforce=False``): nothing was stopped
    :ivar outcome: ``"refused"`` (answered the error status), ``"aborted"`` (the response
        had started: dropped), ``"completed"`` (it broke in work after the response had
        been sent, e.g. a background task, which was stopped), ``"closed"`` (a websocket
        closed with 1008), ``"denied"`` (a websocket handshake refused), ``"observed"``
    :ivar status: the HTTP status the client got (or had got when it was aborted);
        None when none was sent
    :ivar method: the request method (``"WEBSOCKET"`` for a websocket)
    :ivar path: the raw path
    :ivar route: the route template when the framework gave one, else None
    :ivar client: ``"host:port"`` of the client, when known
    """

    resource: str
    used: int
    limit: int
    enforced: bool
    outcome: str
    status: int | None
    method: str
    path: str
    route: str | None
    client: str | None

    @property
    def observed(self) -> bool:
        """True when the limit was only observed (observe mode), not enforced."""
        return not self.enforced

    def message(self) -> str:
        """The one log line: sizes in human units, what was done, who asked."""
        where = self.route if self.route is not None else self.path
        status = "-" if self.status is None else str(self.status)
        outcome = OUTCOMES[self.outcome].format(status=status)
        enforced = "enforced" if self.enforced else "not enforced"
        if self.outcome == "observed":
            enforced = "would have been stopped"
        return (
            f"{self.method} {where} exceeded its {self.resource} limit: "
            f"{used_of_limit(self.resource, self.used, self.limit)}; {outcome}; "
            f"{enforced}; client {self.client or '-'}"
        )

    def log(self) -> None:
        logger.warning(
            "%s", self.message(),
            extra={
                "method": self.method, "path": self.path, "route": self.route,
                "resource": self.resource, "used": self.used, "limit": self.limit,
                "status": self.status, "client": self.client, "enforced": self.enforced,
                "outcome": self.outcome,
            },
        )


def first_breach(
    limits: tuple[int | None, ...], used: tuple[int, ...], peak: int | None
) -> tuple[str, int, int] | None:
    """(resource, used, limit) of the first limit that ``used`` goes strictly past."""
    values = (*used, peak)
    for name, lim, value in zip(RESOURCES, limits, values, strict=True):
        if lim is not None and value is not None and value > lim:
            return name, value, lim
    return None


def client_of(client: Any) -> str | None:
    if isinstance(client, (tuple, list)) and len(client) == 2:
        return f"{client[0]}:{client[1]}"
    return None if client is None else str(client)


# -- the exceeded hook -------------------------------------------------------------------


def hook_arity(hook: Callable[..., Any]) -> int:
    """2 or 3: how many positional arguments ``on_exceeded`` takes."""
    try:
        sig = inspect.signature(hook)
    except (TypeError, ValueError):
        return 2
    positional = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return 3
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return 3 if positional >= 3 else 2


async def call_hook(
    hook: Callable[..., Any], arity: int, first: Any, ctx: Any, exceeded: Exceeded
) -> None:
    """Call the hook; log (never raise) what it raises."""
    try:
        result = hook(first, ctx, exceeded) if arity == 3 else hook(first, ctx)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception(
            "on_exceeded hook %r failed for %s %s", hook, exceeded.method, exceeded.path
        )


# -- the per-route summary ---------------------------------------------------------------

# Log-spaced buckets, 8 per power of two: a quantile read from them is within 9% of
# the true value, for any value up to 2**64, in a fixed 4 KiB per figure per route.
_STEPS = 8
_BUCKETS = 64 * _STEPS + 2


# Bucket k + 1 holds the values from 2 ** (k / _STEPS) up, bucket 0 the zeros: a
# bisection finds it, without a logarithm per request.
_LOWS = [math.ceil(2 ** (k / _STEPS)) for k in range(_BUCKETS - 1)]


def _bucket(value: int) -> int:
    return bisect_right(_LOWS, value) if value > 0 else 0


def _bucket_top(index: int) -> int:
    if index == 0:
        return 0
    return math.ceil(2 ** (index / _STEPS))


class _Histogram:
    # low <= value < high: the values of the bucket last found (index last), which
    # most of a route's requests fall in again: found without a bisection
    __slots__ = ("count", "counts", "high", "last", "low", "max")

    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * _BUCKETS))
        self.count = 0
        self.max = 0
        self.low = self.high = self.last = 0

    def find(self, value: int) -> int:
        """The bucket of ``value``, remembered with its bounds."""
        if value <= 0:
            return 0
        index = bisect_right(_LOWS, value)
        self.low = _LOWS[index - 1]
        self.high = _LOWS[index] if index < len(_LOWS) else math.inf  # type: ignore[assignment]
        self.last = index
        return index

    def add(self, value: int) -> None:
        self.counts[self.last if self.low <= value < self.high else self.find(value)] += 1
        self.count += 1
        if value > self.max:
            self.max = value

    def quantile(self, q: float) -> int:
        """The value at quantile q, rounded up to its bucket's top (never above max)."""
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(_bucket_top(index), self.max)
        return self.max  # pragma: no cover - the counts add up to count


@dataclass(frozen=True)
class Figure:
    """Median, 99th percentile and maximum of one figure over a route's requests.

    Median and p99 are read from log-spaced buckets: within 9% of the exact value.
    """

    median: int
    p99: int
    max: int


@dataclass(frozen=True)
class RouteSummary:
    """What the requests of one route used, since the middleware started.

    :ivar method: the request method
    :ivar route: the route template (or the raw path, or ``"(other)"``)
    :ivar count: how many requests
    :ivar exceeded: how many of them went over their limit (observed or enforced)
    :ivar bytes: bytes allocated per request
    :ivar memory: peak memory held per request, when it was tracked, else None
    :ivar suggested_bytes: a ``bytes=`` budget for the route (see :func:`suggest`)
    :ivar suggested_memory: a ``memory=`` budget for it, when memory was tracked
    """

    method: str
    route: str
    count: int
    exceeded: int
    bytes: Figure
    memory: Figure | None
    suggested_bytes: int
    suggested_memory: int | None


#: How a suggested budget is derived, as the summary log says it.
SUGGESTION_RULE = (
    "suggested budget = the larger of 2 x p99 and 1.25 x max, rounded up to "
    "1, 1.25, 1.5 or 1.75 times a power of two"
)


def suggest(figure: Figure) -> int:
    """A budget for a route with these figures: see :data:`SUGGESTION_RULE`.

    Twice the p99 leaves room for the requests the sample did not see; 1.25 x the max
    keeps every request seen under it, with some margin.
    """
    want = max(2 * figure.p99, math.ceil(1.25 * figure.max), 1)
    power = 2 ** (want.bit_length() - 1)
    for step in (1, 1.25, 1.5, 1.75, 2):
        if power * step >= want:
            return int(power * step)
    raise AssertionError("unreachable")  # pragma: no cover


OTHER = "(other)"
#: the row of the requests that matched no route (404s, mostly)
NO_ROUTE = "(no route)"


class _RouteStats:
    __slots__ = ("bytes", "exceeded", "memory")

    def __init__(self) -> None:
        self.bytes = _Histogram()
        self.memory: _Histogram | None = None
        self.exceeded = 0


class Summary:
    """Per-route figures in fixed memory: at most ``max_routes`` routes, 4 KiB a figure.

    Requests of routes beyond the first ``max_routes`` seen share the ``"(other)"`` row.
    """

    def __init__(self, max_routes: int = 200) -> None:
        if type(max_routes) is not int or max_routes < 1:
            raise ValueError(f"summary_routes must be an int >= 1, got {max_routes!r}")
        self.max_routes = max_routes
        self._routes: dict[tuple[str, str], _RouteStats] = {}

    def add(
        self, method: str, route: str, used_bytes: int, peak: int | None, exceeded: bool
    ) -> None:
        stats = self._routes.get((method, route))
        if stats is None:
            stats = self._new_route(method, route)
        # _Histogram.add, inline: this runs for every request
        figure = stats.bytes
        figure.counts[
            figure.last if figure.low <= used_bytes < figure.high else figure.find(used_bytes)
        ] += 1
        figure.count += 1
        if used_bytes > figure.max:
            figure.max = used_bytes
        if peak is not None:
            if stats.memory is None:
                stats.memory = _Histogram()
            stats.memory.add(peak)
        if exceeded:
            stats.exceeded += 1

    def _new_route(self, method: str, route: str) -> _RouteStats:
        key = (method, route)
        if len(self._routes) >= self.max_routes:
            key = (method, OTHER)
            stats = self._routes.get(key)
            if stats is not None:
                return stats
        stats = self._routes[key] = _RouteStats()
        return stats

    def rows(self) -> list[RouteSummary]:
        """One row per route, the most requested first."""
        out = []
        for (method, route), stats in self._routes.items():
            b = _figure(stats.bytes)
            m = _figure(stats.memory) if stats.memory is not None else None
            out.append(RouteSummary(
                method=method, route=route, count=stats.bytes.count,
                exceeded=stats.exceeded, bytes=b, memory=m,
                suggested_bytes=suggest(b),
                suggested_memory=suggest(m) if m is not None else None,
            ))
        out.sort(key=lambda r: (-r.count, r.route, r.method))
        return out

    def text(self) -> str:
        """The summary as the shutdown log prints it: one line per route.

        A route's line is a ``routes=`` entry followed by its figures as a comment, so
        the lines paste into ``routes={...}`` as they are; requests that match no route
        (and the ``"(other)"`` routes past ``summary_routes``) are a comment only.
        """
        rows = self.rows()
        if not rows:
            return "per-route allocation summary: no request was measured"
        lines = [f"per-route allocation summary ({SUGGESTION_RULE}; "
                 "median and p99 within 9%); each line pastes into routes={...}:"]
        for r in rows:
            budget = f'"bytes": "{budget_size(r.suggested_bytes)}"'
            if r.suggested_memory is not None:
                budget += f', "memory": "{budget_size(r.suggested_memory)}"'
            figures = (
                f"{plural(r.count, 'request')}, {r.exceeded:,} over the limit; "
                f"bytes median {human_size(r.bytes.median)}, p99 {human_size(r.bytes.p99)}, "
                f"max {human_size(r.bytes.max)}"
            )
            if r.memory is not None:
                figures += (
                    f"; peak memory median {human_size(r.memory.median)}, "
                    f"p99 {human_size(r.memory.p99)}, max {human_size(r.memory.max)}"
                )
            if r.count < 100:
                figures += "; fewer than 100 requests: p99 is close to max, a floor"
            if r.route in (OTHER, NO_ROUTE):
                lines.append(f"  # {r.method} {r.route}: {figures}; would need {{{budget}}}")
            else:
                key = f"{r.method} {r.route}"
                lines.append(f"  {quoted(key)}: {{{budget}}},  # {figures}")
        return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    """``1 request``, ``2 requests``, ``1,200 requests``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def quoted(text: str) -> str:
    """A Python (and JSON) string literal in double quotes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _figure(h: _Histogram) -> Figure:
    return Figure(median=h.quantile(0.5), p99=h.quantile(0.99), max=h.max)
