"""aiohttp middleware: every request and websocket of an ``aiohttp.web`` app in a limit
of its own.

::

    from aiohttp import web
    from gotcha_async.aiohttp import setup

    app = web.Application()
    setup(app, bytes="8 MiB", routes={"/upload/*": {"bytes": "1 GiB"}})

The options and the behaviour are those of :class:`gotcha_async.asgi.LimitMiddleware`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Unpack

import anyio.lowlevel
from aiohttp import web

from . import _foreign, _report, _web
from ._context import Context, LimitExceeded
from ._report import NO_ROUTE, Exceeded, RouteSummary
from ._web import WS_POLICY_VIOLATION

__all__ = ["Exceeded", "LimitMiddleware", "RouteSummary", "middleware_of", "setup", "summary"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# a typed key where aiohttp has them (it warns about plain strings since then)
_STATE: Any = (
    web.RequestKey("gotcha_async.state", object)
    if hasattr(web, "RequestKey") else "gotcha_async.state"
)
_MIDDLEWARE: Any = (
    web.AppKey("gotcha_async.middleware", object)
    if hasattr(web, "AppKey") else "gotcha_async.middleware"
)


class _State:
    """How far one request's response has gone."""

    __slots__ = ("aborted", "complete", "ctx", "in_handler", "public", "response", "started",
                 "status")

    def __init__(self, ctx: Context | None = None) -> None:
        self.ctx = ctx
        self.started = False
        self.complete = False
        self.aborted = False
        self.in_handler = True
        self.status: int | None = None
        self.response: web.StreamResponse | None = None
        #: the response's public methods are guarded at prepare (aiohttp has no payload
        #: writer where this package knows it: _foreign.wrap_payload_writer)
        self.public = False


async def _guard(ctx: Context, state: _State) -> None:
    """Refuse a write of an aborted response; stop a handler over its limit right here."""
    if state.aborted:
        raise ConnectionResetError("response aborted: the request exceeded its limit")
    if state.in_handler and ctx.exceeded():
        parent = ctx.parent
        if parent is None or not parent.exceeded():
            ctx.cancel()  # its own limit (an ancestor's is the ancestor's to deliver)
        await anyio.lowlevel.checkpoint()


class _GuardedWsWriter:
    """A websocket's frame writer, checking the limit on every frame the handler sends.

    Sending a websocket frame does not wait either; the close frame the middleware
    sends goes through the wrapped writer's own ``close``.
    """

    __slots__ = ("_ctx", "_state", "_writer")

    def __init__(self, writer: Any, ctx: Context, state: _State) -> None:
        self._writer = writer
        self._ctx = ctx
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    async def send_frame(self, *args: Any, **kwargs: Any) -> None:
        await _guard(self._ctx, self._state)
        await self._writer.send_frame(*args, **kwargs)


class _GuardedWriter:
    """The request's payload writer, checking the limit on every write.

    aiohttp's writes go to the transport's buffer and rarely wait: a handler streaming
    20 MB in a loop of ``await response.write(...)`` may never reach a checkpoint, so a
    soft limit would never be delivered. Each write here is that checkpoint. Once the
    response is aborted, nothing more reaches the client.
    """

    __slots__ = ("_ctx", "_state", "_writer")

    def __init__(self, writer: Any, ctx: Context, state: _State) -> None:
        object.__setattr__(self, "_writer", writer)
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # aiohttp sets length, chunked... on its writer
        setattr(self._writer, name, value)

    async def _guard(self) -> None:
        await _guard(self._ctx, self._state)

    async def write_headers(self, status_line: str, *args: Any, **kwargs: Any) -> None:
        await self._guard()
        state = self._state
        state.started = True
        try:
            state.status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            pass
        await self._writer.write_headers(status_line, *args, **kwargs)

    async def write(self, *args: Any, **kwargs: Any) -> None:
        await self._guard()
        await self._writer.write(*args, **kwargs)

    async def write_eof(self, *args: Any, **kwargs: Any) -> None:
        await self._guard()
        await self._writer.write_eof(*args, **kwargs)
        self._state.complete = True


def _guard_public_methods(response: web.StreamResponse, ctx: Context, state: _State,
                          names: tuple[str, ...]) -> None:
    """Check the limit at each call of these methods of this one response (instance
    attributes): where aiohttp's writers cannot be wrapped, its public methods are."""
    for name in names:
        method = getattr(response, name)

        async def guarded(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            await _guard(ctx, state)
            return await _method(*args, **kwargs)

        setattr(response, name, guarded)


def _client(request: web.BaseRequest) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return _report.client_of(peer) if peer is not None else request.remote


def _templates(router: web.UrlDispatcher) -> list[str]:
    """Every resource's canonical path, those of sub-applications included."""
    out = []
    for resource in router.resources():
        sub = resource.get_info().get("app")  # a sub-application's resource names it
        if isinstance(sub, web.Application):
            out.extend(_templates(sub.router))
        elif isinstance(resource.canonical, str):
            out.append(resource.canonical)
    return out


def _check_response(response: object) -> None:
    if isinstance(response, web.Response) or (
        callable(response) and not isinstance(response, web.StreamResponse)
    ):
        return
    raise TypeError(
        "response must be an aiohttp web.Response (sent as a copy to each request stopped) "
        "or a callable taking the LimitExceeded and returning a web.StreamResponse; not "
        f"{type(response).__name__} {response!r}"
    )


def _copy(response: web.Response) -> web.Response:
    """A fresh response like ``response``: an aiohttp response is sent once only."""
    headers = response.headers.copy()
    headers.pop("Content-Length", None)
    return web.Response(status=response.status, reason=response.reason,
                        body=response.body, headers=headers)


def middleware_of(app: web.Application) -> LimitMiddleware:
    """The :class:`LimitMiddleware` installed in ``app`` by :func:`setup` or
    :meth:`LimitMiddleware.install`.

    :raises LookupError: when there is none
    """
    try:
        middleware = app[_MIDDLEWARE]
    except KeyError:
        raise LookupError(f"no gotcha_async LimitMiddleware installed in {app!r}") from None
    assert isinstance(middleware, LimitMiddleware)
    return middleware


def summary(app: web.Application) -> list[RouteSummary]:
    """The per-route summary of the middleware installed in ``app``."""
    return middleware_of(app).summary()


def _route(request: web.Request) -> str | None:
    resource = getattr(request.match_info.route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) else None


class LimitMiddleware(_web.Middleware):
    """An aiohttp middleware running each request and websocket in its own limit.

    The same options and behaviour as :class:`gotcha_async.asgi.LimitMiddleware`:

    - a request over its limit before its response started gets ``status_code`` with a
      short plain-text body;
    - after it started (a :class:`~aiohttp.web.StreamResponse` already prepared), the
      rest of the response is dropped and the connection closed: the client sees an
      incomplete body, never a truncated success. Every write of the response checks the
      limit, so a handler whose writes never wait is stopped at its next write;
    - a websocket over its limit is closed with 1008 (policy violation); before the
      handshake, it is answered ``status_code``;
    - ``enforce=False`` only observes: measured, reported (log line, metrics, hook),
      never stopped; the per-route summary is logged at the app's shutdown.

    Install it with :meth:`install` (or :func:`setup`), which also lets it see the
    websocket responses it must close and log the summary at shutdown. Put in
    ``web.Application(middlewares=[...])`` by hand it works for HTTP, but a websocket
    over its limit has its connection dropped rather than closed with 1008.

    ``routes`` keys are resources' canonical paths, optionally after a method
    (``"GET /items/{id}"``; a key naming no resource is logged once, at the app's
    startup), globs and regexes match ``request.path``; a routes callable is called with
    the request; ``on_exceeded(request, ctx)`` or ``on_exceeded(request, ctx,
    exceeded)``. ``response`` is a ``web.Response`` (a copy is sent to each request
    stopped before its response started) or a callable taking the
    :class:`~gotcha_async.LimitExceeded` and returning a response. The ``http.route``
    attribute and the summary use the resource's canonical path (``/items/{id}``);
    :func:`summary` reaches the summary from the app.
    """

    __middleware_version__ = 1  # a new-style middleware, for aiohttp 3

    def __init__(self, **options: Unpack[_web.MiddlewareOptions]) -> None:
        super().__init__(options)
        self._installed = False

    def _check_response(self, response: object) -> None:
        _check_response(response)

    def install(self, app: web.Application) -> None:
        """Add this middleware to ``app`` with the signals it uses."""
        if self._installed:
            raise RuntimeError("this LimitMiddleware is installed in an application already")
        self._installed = True
        app.middlewares.append(self)
        app[_MIDDLEWARE] = self
        app.on_response_prepare.append(self._on_prepare)
        app.on_startup.append(self._on_startup)
        if not self._options.enforce:
            app.on_shutdown.append(self._on_shutdown)

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        state = request.get(_STATE)
        if not isinstance(state, _State):
            return
        state.response = response
        ctx = state.ctx
        if ctx is None:
            return
        if isinstance(response, web.WebSocketResponse):
            # The frame writer is handed to the response right after this signal:
            # wrapped on the way, for this one response only
            if not _foreign.wrap_ws_writer(response, lambda w: _GuardedWsWriter(w, ctx, state)):
                _guard_public_methods(response, ctx, state, ("send_frame", "send_str",
                                                             "send_bytes"))
        if state.public:
            # the headers go out right after this signal
            state.started = True
            state.status = response.status
            _guard_public_methods(response, ctx, state, ("write",))
            write_eof = response.write_eof

            async def guarded_write_eof(*args: Any, **kwargs: Any) -> None:
                await _guard(ctx, state)
                await write_eof(*args, **kwargs)
                state.complete = True

            response.write_eof = guarded_write_eof  # type: ignore[method-assign]

    async def _on_startup(self, app: web.Application) -> None:
        # the router is frozen from now on: every route is known
        self._options.bind_routes(_templates(app.router))

    def _answer(self, error: LimitExceeded) -> web.StreamResponse | None:
        response = self._response
        if response is None:
            return None
        if isinstance(response, web.Response):
            return _copy(response)
        try:
            answer = response(error)
        except Exception:
            _report.logger.exception("response=%r failed; answered the default %d instead",
                                     response, self._options.status_code)
            return None
        if not isinstance(answer, web.StreamResponse):
            _report.logger.error(
                "response=%r returned %r, not an aiohttp response; answered the default %d "
                "instead", response, answer, self._options.status_code)
            return None
        return answer

    async def _on_shutdown(self, app: web.Application) -> None:
        self._options.log_summary()

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        options = self._options
        template = _route(request)
        if options.routed:
            plan, glob = options.limits_for(request.method, request.path, template, request,
                                            True)
        else:
            plan, glob = options.default_plan, None
        ctx = plan.new_scope()
        state = _State(ctx)
        request[_STATE] = state
        if not _foreign.wrap_payload_writer(request, lambda w: _GuardedWriter(w, ctx, state)):
            state.public = True
            if not self._installed:
                _foreign.degraded(
                    "aiohttp_by_hand", "this aiohttp has no request._payload_writer: a "
                    "LimitMiddleware added by hand (not with install() or setup()) cannot "
                    "stop a handler at its writes, only at its checkpoints and its ceiling")
        error: LimitExceeded | None = None
        response: web.StreamResponse | None = None
        try:
            with ctx:  # enter and exit never wait: the plain form is cheaper
                response = await handler(request)
        except LimitExceeded as exc:
            if exc.context is not ctx:
                raise  # the application's own limit, not the request's
            error = exc
        except web.HTTPException as exc:
            # aiohttp answers these (a 404 for a path no resource matches, among them):
            # the request is over and within its limits, since the scope did not raise
            options.record(ctx, request.method, template, template or glob or NO_ROUTE,
                           exc.status, request.scheme)
            raise
        finally:
            state.in_handler = False
        # a websocket whose handshake was answered; before that, an HTTP request
        ws = state.response if isinstance(state.response, web.WebSocketResponse) else None
        if ws is not None and not state.started:
            ws = None
        websocket = ws is not None
        answer: web.StreamResponse | None = None
        try:
            breach = options.breach(ctx, plan, error)
            status = state.status
            if status is None and response is not None and error is None:
                status = response.status
            if ws is not None:
                outcome = "completed" if ws.closed else "closed"
            elif state.complete:
                outcome = "completed"
            elif state.started:
                outcome = "aborted"
            else:
                outcome = "refused"
                if error is not None:
                    answer = self._answer(error)
                    status = answer.status if answer is not None else options.status_code
            await options.finish(
                ctx, breach, outcome=outcome, status=status,
                method="WEBSOCKET" if websocket else request.method, path=request.path,
                route=template, name=template or glob or NO_ROUTE, scheme=request.scheme,
                client=_client(request), hook_target=request, record=not websocket,
            )
            if error is None:
                assert response is not None
                return response
            if ws is not None:
                if not ws.closed:
                    await ws.close(code=WS_POLICY_VIOLATION,
                                   message=f"{error.resource} limit exceeded".encode())
                return ws
            if outcome == "refused":
                if answer is not None:
                    return answer
                return web.Response(
                    status=options.status_code,
                    body=_web.plain_text(options.status_code, error.resource),
                    content_type="text/plain", charset="utf-8",
                )
            # Started (or complete, with work after it over the limit): nothing more may
            # reach the client. The writer refuses every write from now on, which aiohttp
            # takes for a client that went away: it drops the connection, quietly.
            state.aborted = True
            return state.response if state.response is not None else web.StreamResponse()
        finally:
            # the error's traceback holds this frame, and this frame the error: without this,
            # they and the frames and buffers of the stopped request wait for the cyclic
            # collector (a server's stopped requests piled up by the hundred between runs)
            error = None


def setup(app: web.Application, **options: Any) -> LimitMiddleware:
    """Install a :class:`LimitMiddleware` built with ``options`` in ``app``; return it."""
    middleware = LimitMiddleware(**options)
    middleware.install(app)
    return middleware
