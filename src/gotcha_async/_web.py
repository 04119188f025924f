"""What the ASGI and aiohttp middlewares share: their options (one definition,
:class:`MiddlewareOptions`, with their defaults and their checks), what they tell about
themselves (:class:`Middleware`), which limits apply to a request, the scope that
measures it, and what happens once it is over (the log line, the hook, the metrics, the
per-route summary).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from functools import partial
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, TypedDict

from . import _hook, _otel, _report, _routes
from ._context import Context, LimitExceeded, _Recipe, _recipe
from ._units import Limit, check_bool, check_ceiling, check_limit_args

#: The middlewares' default ceiling: a request that never reaches a checkpoint is
#: stopped at twice its budget, wherever it is.
DEFAULT_CEILING = 2

LimitKwargs = dict[str, Any]
RouteLimits = (
    Mapping[str | re.Pattern[str], Mapping[str, Any]]
    | Callable[[Any], Mapping[str, Any] | None]
)

# RFC 6455: "a message that violates its policy"
WS_POLICY_VIOLATION = 1008


def _compile_pattern(pattern: object) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise TypeError(f"routes: a regex pattern must be a str pattern, not {pattern!r}")
        return pattern
    if isinstance(pattern, str):
        # fnmatch's translation matches the whole path; "*" crosses "/" as in fnmatch
        return re.compile(fnmatch.translate(pattern))
    raise TypeError(
        f"routes: a pattern must be a glob string or a compiled regex, "
        f"not {type(pattern).__name__} {pattern!r}"
    )


def plain_text(status_code: int, resource: str) -> bytes:
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        phrase = "Error"
    return f"{phrase}: the request exceeded its {resource} limit\n".encode()


class Plan:
    """What applies to the requests of one route: their limit arguments, checked once,
    and ``new_scope()``, which makes the scope that measures one request (enforcing, the
    request's limit; observing, a pure measurement) in one C call."""

    __slots__ = ("kwargs", "new_scope")

    def __init__(self, kwargs: LimitKwargs, recipe: _Recipe, fail: bool) -> None:
        self.kwargs = kwargs
        self.new_scope: Callable[[], Context] = partial(Context._made, recipe, fail)


class MiddlewareOptions(TypedDict, total=False):
    """The options of both middlewares, by keyword: ``asgi.LimitMiddleware(app, **options)``
    and ``aiohttp.LimitMiddleware(**options)``. What each one means is in
    :class:`gotcha_async.asgi.LimitMiddleware`'s docstring; their defaults are
    :data:`DEFAULTS`; they are checked, all of them, when the middleware is made."""

    bytes: Limit
    objects: Limit
    calls: Limit
    memory: Limit
    hard: bool
    ceiling: float | None
    status_code: int
    #: the framework's own kind of answer (each middleware checks its own)
    response: Any
    routes: RouteLimits | None
    on_exceeded: Callable[..., Any] | None
    enforce: bool
    meter_provider: Any
    track_memory: bool
    native: bool
    summary_routes: int


#: Every option's default.
DEFAULTS: MiddlewareOptions = {
    "bytes": None, "objects": None, "calls": None, "memory": None, "hard": False,
    "ceiling": DEFAULT_CEILING, "status_code": 503, "response": None, "routes": None,
    "on_exceeded": None, "enforce": True, "meter_provider": None, "track_memory": False,
    "native": False, "summary_routes": 200,
}


class Middleware:
    """What both ``LimitMiddleware`` classes are: their options, checked when one is
    made, and what they tell about themselves; the framework's own class adds how a
    request runs."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        # options: a MiddlewareOptions, but a caller may not have been type-checked
        unknown = [name for name in options if name not in DEFAULTS]
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}"
            )
        self._options = Options({**DEFAULTS, **options})  # type: ignore[typeddict-item]
        self._response = self._options.response
        if self._response is not None:
            self._check_response(self._response)

    def _check_response(self, response: object) -> None:
        """Raise TypeError for a ``response`` that this framework cannot send."""
        raise NotImplementedError

    @property
    def limits(self) -> Mapping[str, Any]:
        """The default limit arguments, validated (read-only)."""
        return self._options.limits

    @property
    def status_code(self) -> int:
        """The status a request stopped before its response started gets (read-only)."""
        return self._options.status_code

    @property
    def enforce(self) -> bool:
        """False in observe mode: measure and report, never stop (read-only)."""
        return self._options.enforce

    @property
    def on_exceeded(self) -> Callable[..., Any] | None:
        """The hook called once per request that broke its limit (read-only)."""
        return self._options.on_exceeded

    def summary(self) -> list[_report.RouteSummary]:
        """Per route: request count, median, p99 and max of bytes and peak memory, and a
        suggested budget (see :data:`gotcha_async._report.SUGGESTION_RULE`), the most
        requested route first. Kept in fixed memory since the middleware started."""
        return self._options.summary.rows()

    def summary_text(self) -> str:
        """The summary as logged at shutdown in observe mode."""
        return self._options.summary.text()


class Options:
    """The validated options of a middleware, and the per-request steps they imply."""

    def __init__(self, options: MiddlewareOptions) -> None:
        bytes, objects, calls, memory = (options["bytes"], options["objects"],
                                         options["calls"], options["memory"])
        hard, ceiling, status_code = options["hard"], options["ceiling"], options["status_code"]
        routes, on_exceeded, enforce = (options["routes"], options["on_exceeded"],
                                        options["enforce"])
        meter_provider, track_memory = options["meter_provider"], options["track_memory"]
        summary_routes, native = options["summary_routes"], options["native"]
        #: The default limit arguments, validated (read-only).
        self.limits: Mapping[str, Any] = MappingProxyType(check_limit_args(
            {"bytes": bytes, "objects": objects, "calls": calls, "memory": memory,
             "hard": hard}))
        if ceiling is not None:
            check_ceiling(ceiling, False)
        #: The ceiling of every soft limit, a multiple of it (None: purely soft).
        self.ceiling = ceiling
        if type(status_code) is not int:
            raise TypeError(f"status_code must be an int, not {status_code!r}")
        if not 400 <= status_code <= 599:
            raise ValueError(
                f"status_code must be an HTTP error status (400 to 599), got {status_code!r}"
            )
        self.status_code = status_code
        self.enforce = check_bool("enforce", enforce)
        self.track_memory = check_bool("track_memory", track_memory)
        #: Whether C libraries' allocations are counted (read-only): install(native=True)
        #: has run, process-wide, when the middleware was made.
        self.native = check_bool("native", native)
        #: What a request stopped before its response started is answered (the
        #: framework's middleware checks it), None for status_code with a line of text.
        self.response = options["response"]
        if native:
            _hook.install(native=True)
        # route keys: (method or None, template) -> (key, plan), matched against the
        # route the framework names; globs and regexes against the raw path, in order
        self.route_keys: dict[tuple[str | None, str], tuple[str, Plan]] = {}
        self.globs: list[tuple[str | None, re.Pattern[str], str, Plan]] = []
        self._order: dict[str, int] = {}  # a glob's place in routes=: the first match wins
        self.route_fn: Callable[[Any], Mapping[str, Any] | None] | None = None
        if isinstance(routes, Mapping):
            for index, (key, kw) in enumerate(routes.items()):
                self._order[key.pattern if isinstance(key, re.Pattern) else key] = index
                plan = self._plan({**self.limits,
                                   **check_limit_args(kw, f"routes[{key!r}]")})
                if isinstance(key, re.Pattern):
                    self.globs.append((None, _compile_pattern(key), key.pattern, plan))
                    continue
                if not isinstance(key, str):
                    _compile_pattern(key)  # raises the TypeError naming the key
                method, pattern = _routes.split_key(key)
                if _routes.is_glob(pattern):
                    self.globs.append((method, _compile_pattern(pattern), pattern, plan))
                else:
                    self.route_keys[method, pattern] = (key, plan)
        elif callable(routes):
            self.route_fn = routes
        elif routes is not None:
            raise TypeError(
                "routes must be a mapping of route templates or path patterns to limit "
                "arguments, a callable (scope) -> limit arguments or None, or None; not "
                f"{type(routes).__name__} {routes!r}"
            )
        #: set by bind_routes() once the application's routes are known
        self.normalize: Callable[[str], str] | None = None
        self.routed = routes is not None
        if on_exceeded is not None and not callable(on_exceeded):
            raise TypeError(f"on_exceeded must be callable or None, not {on_exceeded!r}")
        self.on_exceeded = on_exceeded
        self.hook_arity = _report.hook_arity(on_exceeded) if on_exceeded is not None else 2
        self.instruments = _otel.instruments_for(meter_provider)
        self.summary = _report.Summary(summary_routes)
        self.default_plan = self._plan(dict(self.limits))

    # -- which limits --------------------------------------------------------------------

    def _plan(self, kwargs: LimitKwargs) -> Plan:
        """The plan of requests with these (checked, complete) limit arguments.

        Enforcing, their scope is their limit; observing, a pure measurement whose
        figures are compared with the limits once the request is over.
        """
        track = self.track_memory or kwargs["memory"] is not None
        if self.enforce:
            hard = kwargs["hard"]
            recipe = _recipe(kwargs["bytes"], kwargs["objects"], kwargs["calls"],
                             kwargs["memory"], hard, None if hard else self.ceiling, track,
                             False)
        else:
            recipe = _recipe(None, None, None, None, False, None, track, False)
        return Plan(kwargs, recipe, self.enforce)

    def bind_routes(self, templates: list[str] | None,
                    normalize: Callable[[str], str] = str) -> None:
        """The application's routes are known now (``templates``; None: it has no
        router): each route key that names none of them is reported, once.

        Without a router, a route key is compared with the raw path instead.
        """
        if self.normalize is not None:
            return
        self.normalize = normalize
        self.route_keys = {(method, normalize(t)): entry
                           for (method, t), entry in self.route_keys.items()}
        if templates is None or not self.route_keys:
            return
        known = {normalize(t) for t in templates}
        listed = ", ".join(repr(t) for t in sorted(known)[:20])
        if len(known) > 20:
            listed += f" and {len(known) - 20} more"
        for (method, template), (key, plan) in list(self.route_keys.items()):
            if template in known:
                continue
            # as before route keys existed: a literal path, so that nothing that matched
            # then stops matching now; but said, since a mistyped route ends up here
            del self.route_keys[method, template]
            literal = _routes.split_key(key)[1]  # as written: normalize() may strip a "/"
            self.globs.append((method, re.compile(re.escape(literal)), literal, plan))
            _report.logger.warning(
                "routes key %r names no route of the application: it applies only to "
                "requests whose path is exactly %r. The application's routes: %s. (A key "
                "with *, ? or [ is a glob on the raw path.)", key, literal, listed or "none",
            )
        order = self._order
        self.globs.sort(key=lambda g: order.get(g[2] if g[0] is None else f"{g[0]} {g[2]}", 0))

    def limits_for(
        self, method: str, path: str, template: str | None, target: Any, routed: bool
    ) -> tuple[Plan, str | None]:
        """The plan for a request, and the glob or regex key that chose it if one did
        (the summary's name for requests that match no route).

        ``template``: the route the framework matched; ``routed``: whether the
        application has a router at all (without one a route key is a literal path);
        ``target`` goes to a routes callable.
        """
        if not self.routed:
            return self.default_plan, None
        keys = self.route_keys
        if keys:
            name = template if routed else path
            if name is not None:
                if routed and self.normalize is not None:
                    name = self.normalize(name)
                found = keys.get((method, name)) or keys.get((None, name))
                if found is not None:
                    return found[1], None
        for want, pattern, text, plan in self.globs:
            if (want is None or want == method) and pattern.fullmatch(path):
                return plan, text
        if self.route_fn is not None:
            found_kw = self.route_fn(target)
            if found_kw is not None:
                # a callable's answer is checked per request: it exists only now
                route = check_limit_args(found_kw, f"routes({path!r})")
                return self._plan({**self.limits, **route}), None
        return self.default_plan, None

    # -- once it is over -----------------------------------------------------------------

    def breach(
        self, ctx: Context, plan: Plan, exc: LimitExceeded | None
    ) -> tuple[str, int, int] | None:
        """(resource, used, limit) the request went over, or None."""
        if exc is not None:
            return exc.resource, exc.used, exc.limit
        if self.enforce:
            return None
        kwargs = plan.kwargs
        held = ctx.memory()
        limits = (kwargs["bytes"], kwargs["objects"], kwargs["calls"], kwargs["memory"])
        return _report.first_breach(limits, tuple(ctx.used()), held.peak if held else None)

    async def finish(
        self,
        ctx: Context,
        breach: tuple[str, int, int] | None,
        *,
        outcome: str,
        status: int | None,
        method: str,
        path: str,
        route: str | None,
        name: str,
        scheme: str | None,
        client: str | None,
        hook_target: Any,
        record: bool = True,
    ) -> None:
        """Report a finished request: log line and hook if over, metrics, summary.

        ``route``: the template the framework matched, if any (log line, metrics);
        ``name``: the request's summary row (the template, a glob key or no route).
        """
        if breach is None:  # no log line, no hook
            if record:
                self.record(ctx, method, route, name, status, scheme)
            return
        used = ctx.used()
        held = ctx.memory()
        peak = held.peak if held is not None else None
        resource, value, lim = breach
        exceeded = _report.Exceeded(
            resource=resource, used=value, limit=lim, enforced=self.enforce,
            outcome=outcome if self.enforce else "observed", status=status,
            method=method, path=path, route=route, client=client,
        )
        exceeded.log()
        if record:
            self.summary.add(method, name, used[0], peak, True)
            if self.instruments is not None:
                self.instruments.record(method, route, status, scheme,
                                        (used[0], used[1], used[2]), peak, exceeded)
        if self.on_exceeded is not None:
            await _report.call_hook(self.on_exceeded, self.hook_arity, hook_target, ctx,
                                    exceeded)

    def record(
        self, ctx: Context, method: str, route: str | None, name: str, status: int | None,
        scheme: str | None,
    ) -> None:
        """Metrics and summary of a request that stayed within its limits (finish()'s
        common case, without a coroutine: it runs for every request)."""
        held = ctx._memory()
        peak = held.peak if held is not None else None
        self.summary.add(method, name, ctx._bytes, peak, False)
        instruments = self.instruments
        if instruments is not None and instruments.ready():
            b, o, c = ctx._counts()
            instruments.record(method, route, status, scheme, (b, o, c), peak, None)

    def log_summary(self) -> None:
        for line in self.summary.text().splitlines():
            _report.logger.info("%s", line.strip())
