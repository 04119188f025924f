"""ASGI middleware: every HTTP request and websocket connection in a limit of its own.

::

    from starlette.applications import Starlette
    from gotcha_async.asgi import LimitMiddleware

    app = Starlette(routes=...)
    app.add_middleware(LimitMiddleware, bytes="8 MiB", routes={"/upload/*": {"bytes": "1 GiB"}})

or, around any ASGI callable, ``app = LimitMiddleware(app, bytes="8 MiB")``.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

import anyio.lowlevel

from ._context import Context, LimitExceeded, limit
from ._units import Limit, check_limit

__all__ = ["LimitMiddleware"]

# The ASGI types, spelt out so that the middleware needs no framework.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LimitKwargs = dict[str, Any]
RouteLimits = (
    Mapping[str | re.Pattern[str], Mapping[str, Any]]
    | Callable[[Scope], Mapping[str, Any] | None]
)
ExceededHook = Callable[[Scope, Context], Awaitable[None] | None]

logger = logging.getLogger("gotcha_async")

_RESOURCES = ("bytes", "objects", "calls", "memory")
_LIMIT_KEYS = frozenset((*_RESOURCES, "hard"))
# RFC 6455: "a message that violates its policy"
WS_POLICY_VIOLATION = 1008


def _check_hard(where: str, value: object) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{where} must be True or False, not {value!r}")
    return value


def _check_limit_kwargs(where: str, kwargs: object) -> LimitKwargs:
    """Validate a route's limit kwargs; return them as a plain dict of checked values.

    :param where: how to name the mapping in an error, e.g. ``"routes['/upload/*']"``
    :raises TypeError: for a value that is not a mapping, or a limit of the wrong type
    :raises ValueError: for an unknown key, or a negative or malformed limit
    """
    if not isinstance(kwargs, Mapping):
        raise TypeError(
            f"{where} must be a mapping of limit arguments (bytes, objects, calls, memory, "
            f"hard), not {type(kwargs).__name__} {kwargs!r}"
        )
    out: LimitKwargs = {}
    for key, value in kwargs.items():
        if key not in _LIMIT_KEYS:
            raise ValueError(
                f"{where} has an unknown key {key!r}; expected some of "
                f"{', '.join(sorted(_LIMIT_KEYS))}"
            )
        if key == "hard":
            out[key] = _check_hard(f"{where}['hard']", value)
        else:
            out[key] = check_limit(f"{where}[{key!r}]", value)
    return out


def _unlimited(kwargs: Mapping[str, Any]) -> bool:
    return all(kwargs[name] is None for name in _RESOURCES)


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


async def _stop(ctx: Context) -> None:
    """Cancel a request that is over its limit, from a checkpoint of its own task.

    The core cancels a broken scope by itself, but through a pending call that only
    the main thread runs: with the event loop in another thread, or the main thread
    busy in C, that can come late. The request's own send or receive is a safe point
    in the request's task to do it at once.
    """
    parent = ctx.parent
    if parent is None or not parent.exceeded():
        # its own limit broke (an ancestor's breach is the ancestor's to deliver)
        ctx.cancel()
    await anyio.lowlevel.checkpoint()


async def _stop_then_receive(ctx: Context, receive: Receive) -> Message:
    await _stop(ctx)
    return await receive()


def _plain_text(status_code: int, resource: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        phrase = "Error"
    body = f"{phrase}: the request exceeded its {resource} limit\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    return headers, body


def _guard_receive(ctx: Context, receive: Receive) -> Receive:
    """receive, stopped at once (cancelled, at a checkpoint) once ctx is exceeded."""

    def guarded_receive() -> Awaitable[Message]:
        if ctx.exceeded():
            return _stop_then_receive(ctx, receive)
        return receive()

    return guarded_receive


class LimitMiddleware:
    """Run every HTTP request and every websocket connection inside its own :func:`limit`.

    Everything the request's handler allocates -- in its task, in tasks it starts and in
    worker threads they use -- is charged to the request's scope; nothing another request
    allocates is. Lifespan and any other scope type pass through untouched.

    **HTTP.** A request that breaks a limit is cancelled at its next checkpoint (see
    :class:`~gotcha_async.Context` for when a limit is delivered; with ``hard=True`` the
    allocation is refused at once). What the client gets depends on how far the response
    had gone:

    - the response had not started: the client gets ``status_code`` (503 by default) with
      a short plain-text body, never the handler's own status, even when the handler
      finished without ever reaching a checkpoint after the allocation that broke the
      limit (the scope raises on exit);
    - the response had started: its status can no longer change, so the middleware stops
      passing the handler's messages on and raises :class:`~gotcha_async.LimitExceeded`
      to the server, which drops the connection: the client sees a broken response (an
      incomplete body), never a truncated success;
    - the response had completed (the limit broke afterwards, e.g. in a background task):
      the client keeps its response; the breach is logged and reported all the same.

    **Websockets.** A connection gets one limit for its whole life (``bytes``, ``objects``
    and ``calls`` are cumulative, so a long-lived connection is better capped by
    ``memory``). Once it breaks it, the middleware stops passing the application's messages
    on and closes the connection with code 1008 (policy violation). If the handshake had
    not been answered yet, the handshake is refused instead: with ``status_code`` where the
    server supports the ASGI websocket denial response extension, otherwise with a plain
    close (servers answer 403).

    **Reporting.** Each request that breaks its limit produces one ``WARNING`` record on
    the ``"gotcha_async"`` logger, whose ``extra`` fields are ``method`` (``"WEBSOCKET"``
    for a websocket), ``path``, ``resource``, ``used``, ``limit`` and ``status`` (the status
    code answered, or ``None`` when the response was aborted or had completed); then
    ``on_exceeded(scope, ctx)`` is called (a function or a coroutine function) before the
    client is answered. An exception from the hook is logged and the client is answered
    all the same.

    **Per-route limits.** ``routes`` is either

    - a mapping from path patterns to limit arguments: a pattern is a glob string
      (:mod:`fnmatch` rules, matched against the whole ``scope["path"]``; ``*`` also
      matches ``/``) or a compiled regex (which must match the whole path); the first
      pattern that matches wins; or
    - a callable ``routes(scope)`` returning limit arguments, or ``None`` for the defaults.

    Limit arguments are a mapping with some of ``bytes``, ``objects``, ``calls``,
    ``memory`` and ``hard``: they override the middleware's own arguments key by key, so
    ``{"bytes": None}`` lifts the ``bytes`` limit for that route. A request left with no
    limit at all passes through unmeasured.

    Configuration is checked when the middleware is built (with ``app.add_middleware``,
    Starlette builds its middleware at the first ASGI call, the lifespan startup).

    :param app: the ASGI application to wrap
    :param bytes: limit on the bytes each request allocates (int, size string or None)
    :param objects: limit on each request's object allocations
    :param calls: limit on each request's allocator calls
    :param memory: limit on the peak of memory each request holds
    :param hard: refuse the allocation that would break a limit instead of letting it
        through and cancelling at the next checkpoint
    :param status_code: the HTTP status answered to a request that broke its limit
        before its response started (400 to 599)
    :param routes: per-route limits, as above
    :param on_exceeded: called as ``on_exceeded(scope, ctx)`` (and awaited if it returns
        an awaitable) once per request that broke its limit
    :raises TypeError: for an argument of the wrong type
    :raises ValueError: for a bad limit, status code, route pattern or route key
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        bytes: Limit = None,  # shadows the builtin: the contract's name
        objects: Limit = None,
        calls: Limit = None,
        memory: Limit = None,
        hard: bool = False,
        status_code: int = 503,
        routes: RouteLimits | None = None,
        on_exceeded: ExceededHook | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI callable, not {app!r}")
        self.app = app
        #: The default limit arguments, validated (read-only).
        self.limits: Mapping[str, Any] = MappingProxyType({
            "bytes": check_limit("bytes", bytes),
            "objects": check_limit("objects", objects),
            "calls": check_limit("calls", calls),
            "memory": check_limit("memory", memory),
            "hard": _check_hard("hard", hard),
        })
        if type(status_code) is not int:
            raise TypeError(f"status_code must be an int, not {status_code!r}")
        if not 400 <= status_code <= 599:
            raise ValueError(
                f"status_code must be an HTTP error status (400 to 599), got {status_code!r}"
            )
        self.status_code = status_code
        self._route_table: list[tuple[re.Pattern[str], LimitKwargs]] | None = None
        self._route_fn: Callable[[Scope], Mapping[str, Any] | None] | None = None
        if isinstance(routes, Mapping):
            table = []
            for pattern, kwargs in routes.items():
                table.append(
                    (_compile_pattern(pattern), _check_limit_kwargs(f"routes[{pattern!r}]", kwargs))
                )
            self._route_table = table
        elif callable(routes):
            self._route_fn = routes
        elif routes is not None:
            raise TypeError(
                "routes must be a mapping of path patterns to limit arguments, a callable "
                f"(scope) -> limit arguments or None, or None; not {type(routes).__name__} "
                f"{routes!r}"
            )
        self._routed = routes is not None
        # a plain dict: ** unpacks it faster than the read-only view, once per request
        self._default_limits = None if _unlimited(self.limits) else dict(self.limits)
        if on_exceeded is not None and not callable(on_exceeded):
            raise TypeError(f"on_exceeded must be callable or None, not {on_exceeded!r}")
        self.on_exceeded = on_exceeded

    # -- which limits --------------------------------------------------------------------

    def _limits_for(self, scope: Scope) -> Mapping[str, Any] | None:
        """The limit arguments for this request, or None when nothing limits it."""
        route: Mapping[str, Any] | None = None
        if self._route_table is not None:
            path = scope.get("path", "")
            for pattern, kwargs in self._route_table:
                if pattern.fullmatch(path):
                    route = kwargs
                    break
        elif self._route_fn is not None:
            found = self._route_fn(scope)
            if found is not None:
                # a callable's answer is checked per request: it exists only now
                route = _check_limit_kwargs(f"routes({scope.get('path', '')!r})", found)
        if route is None:
            return self._default_limits
        kwargs = {**self.limits, **route}
        return None if _unlimited(kwargs) else kwargs

    # -- the ASGI callable ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        # the common case, no routes, costs one attribute read per request
        kwargs = self._default_limits if self._routed is False else self._limits_for(scope)
        if kwargs is None:
            await self.app(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send, kwargs)
        else:
            await self._websocket(scope, receive, send, kwargs)

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, kwargs: Mapping[str, Any]
    ) -> None:
        response_started = False
        response_complete = False
        trailers = False
        ctx = limit(**kwargs)

        # Plain functions that hand back the server's own awaitable: an async wrapper
        # would add a coroutine per message, a measurable share of a small request.
        guarded_receive = _guard_receive(ctx, receive)

        def guarded_send(message: Message) -> Awaitable[None]:
            nonlocal response_started, response_complete, trailers
            if ctx.exceeded():
                # Nothing more of this response may reach the client: before the start
                # the status will be ours, after it the response will be aborted.
                return _stop(ctx)
            kind = message["type"]
            if kind == "http.response.start":
                response_started = True
                trailers = bool(message.get("trailers", False))
            elif kind == "http.response.body" or kind == "http.response.zerocopysend":
                if not message.get("more_body", False) and not trailers:
                    response_complete = True
            elif kind == "http.response.trailers":
                response_complete = not message.get("more_trailers", False)
            elif kind == "http.response.pathsend":
                response_complete = True
            return send(message)

        try:
            with ctx:  # enter and exit never wait: the plain form is cheaper
                await self.app(scope, guarded_receive, guarded_send)
        except LimitExceeded as exc:
            if exc.context is not ctx:
                raise  # the application's own limit, not the request's
            if response_complete:
                await self._report(scope, ctx, exc, None)
            elif response_started:
                await self._report(scope, ctx, exc, None)
                # The status line is gone already: dropping the connection is the only
                # way left to tell the client that this response is not a success.
                raise
            else:
                await self._report(scope, ctx, exc, self.status_code)
                headers, body = _plain_text(self.status_code, exc.resource)
                await send(
                    {"type": "http.response.start", "status": self.status_code,
                     "headers": headers}
                )
                await send({"type": "http.response.body", "body": body})

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, kwargs: Mapping[str, Any]
    ) -> None:
        accepted = False
        closed = False
        ctx = limit(**kwargs)
        guarded_receive = _guard_receive(ctx, receive)

        def guarded_send(message: Message) -> Awaitable[None]:
            nonlocal accepted, closed
            if ctx.exceeded():
                return _stop(ctx)
            kind = message["type"]
            if kind == "websocket.accept":
                accepted = True
            elif kind == "websocket.close" or kind == "websocket.http.response.start":
                closed = True
            return send(message)

        try:
            with ctx:  # enter and exit never wait: the plain form is cheaper
                await self.app(scope, guarded_receive, guarded_send)
        except LimitExceeded as exc:
            if exc.context is not ctx:
                raise
            if closed:
                await self._report(scope, ctx, exc, None)
            elif accepted:
                await self._report(scope, ctx, exc, None)
                # the reason must fit a control frame: 123 bytes
                reason = f"{exc.resource} limit exceeded"
                try:
                    await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION,
                                "reason": reason})
                except OSError:
                    pass  # the client is gone already: nothing is left to close
            elif "websocket.http.response" in (scope.get("extensions") or {}):
                await self._report(scope, ctx, exc, self.status_code)
                headers, body = _plain_text(self.status_code, exc.resource)
                await send({"type": "websocket.http.response.start",
                            "status": self.status_code, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await self._report(scope, ctx, exc, None)
                await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})

    # -- reporting -----------------------------------------------------------------------

    async def _report(
        self, scope: Scope, ctx: Context, exc: LimitExceeded, status: int | None
    ) -> None:
        """Log the breach, then call the hook; never let the hook's failure escape."""
        method = scope.get("method", "WEBSOCKET")
        path = scope.get("path", "")
        logger.warning(
            "%s %s exceeded its %s limit: %d used, limit %d",
            method, path, exc.resource, exc.used, exc.limit,
            extra={"method": method, "path": path, "resource": exc.resource,
                   "used": exc.used, "limit": exc.limit, "status": status},
        )
        hook = self.on_exceeded
        if hook is None:
            return
        try:
            result = hook(scope, ctx)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_exceeded hook %r failed for %s %s", hook, method, path)
