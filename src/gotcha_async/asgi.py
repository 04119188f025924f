"""ASGI middleware: every HTTP request and websocket connection in a limit of its own.

::

    from starlette.applications import Starlette
    from gotcha_async.asgi import LimitMiddleware

    app = Starlette(routes=...)
    app.add_middleware(LimitMiddleware, bytes="8 MiB", routes={"/upload/*": {"bytes": "1 GiB"}})

or, around any ASGI callable, ``app = LimitMiddleware(app, bytes="8 MiB")``.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Unpack

import anyio
import anyio.lowlevel

from . import _report, _routes, _web
from ._context import Context, HardLimitError, LimitExceeded, _scope_var
from ._meter import ReceiveGuard, SendGuard
from ._report import NO_ROUTE, Exceeded, RouteSummary
from ._web import WS_POLICY_VIOLATION

__all__ = ["Exceeded", "LimitMiddleware", "RouteSummary", "middleware_of", "summary"]

# The ASGI types, spelt out so that the middleware needs no framework.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ExceededHook = Callable[..., Awaitable[None] | None]
#: ``response=``: an ASGI application, or a callable taking the LimitExceeded and
#: returning one
Answer = ASGIApp | Callable[[LimitExceeded], ASGIApp]

logger = _report.logger

_UNBOUND: Any = object()  # the router before the application's first call


class _DropReported(logging.Filter):
    """Drops the server's traceback for a response this package aborted and logged.

    The only way to tell an ASGI server that a started response is not a success is to
    raise to it; uvicorn then logs "Exception in ASGI application" with the whole
    traceback, after the one line that already said what happened.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and getattr(info[1], "_gotcha_reported", False))


def _silence_server_tracebacks() -> None:
    for name in ("uvicorn.error", "hypercorn.error"):
        server_logger = logging.getLogger(name)
        if not any(isinstance(f, _DropReported) for f in server_logger.filters):
            server_logger.addFilter(_DropReported())


class _DropStopped(logging.Filter):
    """Drops Django's "Internal Server Error" for a request stopped for its limit.

    A view stopped at its ceiling gets a MemoryError, which Django turns into a 500 and
    logs with the traceback: the middleware has answered the request already, and said
    why in one line. The record is logged from the request's own task or thread, so
    the request's scope is in its context; often exited by then (Django renders the
    error in a worker thread that outlives the request's cancelled task), so it is
    read from the variable itself rather than :func:`current`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if not info or not isinstance(info[1], (MemoryError, LimitExceeded)):
            return True
        ctx = _scope_var.get(None)
        return ctx is None or not ctx.exceeded()


class _DropUnretrievedStop(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for a stopped sync view.

    Django runs a sync view in a worker thread (asgiref's ``run_in_executor``), and a
    view stopped there ends that future with the stop, while the middleware has Django
    cancel the request: when the cancellation reaches the awaiting coroutine before the
    future's result does, asgiref re-raises the cancellation and nobody reads the
    future. The stop was the request's, answered and logged in one line already; the
    record, logged by the future's finalizer wherever the garbage collector runs, can
    name no scope, so it is known by its exception alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and isinstance(info[1], HardLimitError)
                    and record.getMessage().startswith("Future exception was never retrieved"))


def _silence_django_errors() -> None:
    django_logger = logging.getLogger("django.request")
    if not any(isinstance(f, _DropStopped) for f in django_logger.filters):
        django_logger.addFilter(_DropStopped())
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropUnretrievedStop) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropUnretrievedStop())


_DISCONNECT: Message = {"type": "http.disconnect"}


async def _done(ctx: Context) -> None:
    await ctx


def _django_receive(ctx: Context, receive: Receive) -> Receive:
    """The receive Django gets: once the request is over its limit, the client has
    gone away as far as Django can tell.

    Django waits for ``http.disconnect`` in a task of its own for the whole request,
    and on a disconnect cancels the view and cleans up: the one way to stop a Django
    request that leaves nothing behind (cancelling Django's handler instead leaves
    that task to fail unretrieved, "Task exception was never retrieved").
    """
    body_read = False

    async def guarded() -> Message:
        nonlocal body_read
        if ctx.exceeded():
            return dict(_DISCONNECT)
        if not body_read:
            # the body, as it comes: no race needed, the next message is at hand
            message = await receive()
            body_read = message.get("type") != "http.request" or not message.get("more_body")
            return message
        server = asyncio.ensure_future(receive())
        stopped = asyncio.ensure_future(_done(ctx))
        try:
            await asyncio.wait((server, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.cancel()
            stopped.cancel()
        if server.done() and not server.cancelled():
            return server.result()
        return dict(_DISCONNECT)

    return guarded


async def _run_django(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                      ctx: Context) -> None:
    """Run Django's handler in a task of its own, inside the request's scope.

    The scope's cancellation stops this task's wait, not Django's handler: Django is
    stopped by the disconnect its receive reports, and winds down its own tasks; this
    waits for that. A cancellation from outside (a server shutting down) is passed on
    to Django, as Django would have got it without the middleware.
    """
    task = asyncio.ensure_future(app(scope, receive, send))  # in the request's context
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not ctx.exceeded():
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # what the stop caused, already reported by the stop
        raise


def _check_response(response: object) -> bool:
    """Is ``response`` an ASGI application (True) or a callable returning one (False)?

    :raises TypeError: for anything else, naming it
    """
    expected = (
        "response must be an ASGI application such as starlette's JSONResponse(...), "
        "or a callable taking the LimitExceeded and returning one"
    )
    if not callable(response):
        raise TypeError(f"{expected}; not {type(response).__name__} {response!r}")
    try:
        params = inspect.signature(response).parameters.values()
    except (TypeError, ValueError):
        raise TypeError(f"{expected}; the signature of {response!r} cannot be read") from None
    required = [p for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    if len(required) == 3:
        return True
    if len(required) == 1:
        return False
    raise TypeError(
        f"{expected}; {response!r} takes {len(required)} positional arguments, neither "
        f"(scope, receive, send) nor (exc)"
    )


def _log_summary_at_exit(ref: weakref.ref[LimitMiddleware]) -> None:
    middleware = ref()
    if middleware is not None:
        middleware._log_summary_once()


def middleware_of(app: Any) -> LimitMiddleware:
    """The :class:`LimitMiddleware` in ``app``: the middleware itself, or an application
    it was added to with ``app.add_middleware(LimitMiddleware, ...)`` (Starlette,
    FastAPI), or any ASGI middleware chain that keeps the next application in ``.app``.

    :raises LookupError: when there is none, or not yet: Starlette builds its
        middleware at the application's first call (the lifespan startup)
    """
    for obj in _routes._chain(app):
        if isinstance(obj, LimitMiddleware):
            return obj
    if getattr(app, "middleware_stack", False) is None:
        raise LookupError(
            f"{app!r} has not built its middleware yet: Starlette does at the application's "
            "first call (the lifespan startup or the first request); ask after that"
        )
    raise LookupError(f"no LimitMiddleware in {app!r}")


def summary(app: Any) -> list[RouteSummary]:
    """The per-route summary of the :class:`LimitMiddleware` in ``app`` (see
    :func:`middleware_of`), e.g. ``gotcha_async.asgi.summary(app)`` in a FastAPI
    endpoint or at shutdown."""
    return middleware_of(app).summary()


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


def _error_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]


def route_of(scope: Scope, root_path: str) -> str | None:
    """The route template the framework matched (Starlette, FastAPI), or None.

    Starlette's router puts the matched route in ``scope["route"]``; inside a
    ``Mount`` that route's path is relative to the mount, whose matched prefix the
    router adds to ``root_path``.
    """
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        return None
    mounted = scope.get("root_path", "")
    if mounted == root_path:
        return template  # not mounted: the common case, without a new string
    if isinstance(mounted, str) and mounted.startswith(root_path):
        return mounted[len(root_path):] + template
    return template


class LimitMiddleware(_web.Middleware):
    """Run every HTTP request and every websocket connection inside its own :func:`limit`.

    Everything the request's handler allocates -- in its task, in tasks it starts and in
    worker threads they use -- is charged to the request's scope; nothing another request
    allocates is. Lifespan and any other scope type pass through (in observe mode the
    lifespan shutdown also logs the per-route summary).

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
      incomplete body), never a truncated success. The server's own traceback for it is
      filtered out of uvicorn's and hypercorn's error loggers: the one line logged here
      says what happened;
    - the response had completed (the limit broke afterwards, in background work such
      as Starlette's ``BackgroundTasks``, which run inside the request): that work is
      stopped, the client keeps its response, and the line says so.

    **Observe mode** (``enforce=False``): every request is measured exactly as when
    enforcing, nothing is cancelled, refused or aborted, and every request that would
    have broken a limit is reported all the same (log line, metrics, ``on_exceeded``,
    with ``Exceeded.enforced`` false). At the lifespan shutdown the per-route summary
    (:meth:`summary`) is logged, with a suggested budget per route.

    **Websockets.** A connection gets one limit for its whole life (``bytes``, ``objects``
    and ``calls`` are cumulative, so a long-lived connection is better capped by
    ``memory``). Once it breaks it, the middleware stops passing the application's messages
    on and closes the connection with code 1008 (policy violation). If the handshake had
    not been answered yet, the handshake is refused instead: with ``status_code`` where the
    server supports the ASGI websocket denial response extension, otherwise with a plain
    close (servers answer 403). Websockets are not in the metrics.

    **Reporting.** Each request over its limit produces one ``WARNING`` line on the
    ``"gotcha_async"`` logger, e.g. ``GET /users/{id} exceeded its bytes limit: 8.4 MiB
    of 8 MiB; answered 503; enforced; client 127.0.0.1:50312``; its ``extra`` fields are
    ``method`` (``"WEBSOCKET"`` for a websocket), ``path``, ``route``, ``resource``,
    ``used``, ``limit``, ``status`` (the status the client got, None if none),
    ``client``, ``enforced`` and ``outcome`` (see :class:`Exceeded`). Then
    ``on_exceeded(scope, ctx)`` -- or ``on_exceeded(scope, ctx, exceeded)`` if it takes
    three arguments -- is called (a function or a coroutine function) before the client
    is answered. An exception from the hook is logged and the client is answered all the
    same.

    **Metrics.** Every request is recorded on ``meter_provider`` (see
    ``docs/operating.md`` for the names, units and attributes), and in the per-route
    :meth:`summary`.

    **Per-route limits.** ``routes`` is either

    - a mapping from keys to limit arguments. A key names a route as the framework
      writes it, optionally after a method: ``"GET /items/{item_id}"`` (Starlette and
      FastAPI route paths, with a ``Mount``'s prefix), ``"GET items/<int:pk>/"``
      (Django's ``request.resolver_match.route``), ``"/health"`` (the raw path, for an
      application without a router). A key with ``*``, ``?`` or ``[`` is a glob matched
      against the whole raw path (``*`` also matches ``/``), and a compiled regex must
      match the whole raw path. The key of the request's route and method wins, then
      the route's key without a method, then the globs and regexes in their order. A
      key that names no route of the application is logged once, as a warning, at the
      application's first call (it then only matches the raw path it spells); or
    - a callable ``routes(scope)`` returning limit arguments, or ``None`` for the defaults.

    Limit arguments are a mapping with some of ``bytes``, ``objects``, ``calls``,
    ``memory`` and ``hard``: they override the middleware's own arguments key by key, so
    ``{"bytes": None}`` lifts the ``bytes`` limit for that route. A request with no limit
    at all is still measured (metrics, summary) and never stopped.

    **Summary.** :meth:`summary` per route, named as ``routes=`` keys are (requests that
    match no route share one ``"(no route)"`` row); :meth:`summary_text` prints each
    route as a ``routes=`` entry, to paste. Added with ``app.add_middleware``, the
    middleware is reached with :func:`summary` / :func:`middleware_of` on the app.

    **Django.** Wrap Django's ASGI handler (``LimitMiddleware(get_asgi_application())``):
    routes are Django's, a request over its limit is stopped through Django's own
    client-disconnect path (no "Internal Server Error" logged for it, no task left
    behind), and in observe mode the summary is logged at exit (Django has no lifespan).

    Configuration is checked when the middleware is built (with ``app.add_middleware``,
    Starlette builds its middleware at the first ASGI call, the lifespan startup).

    **Options**, all by keyword (``**options``; the aiohttp middleware takes the same,
    defined once, in ``gotcha_async._web.MiddlewareOptions``):

    - ``bytes``: limit on the bytes each request allocates (int, size string or None)
    - ``objects``: limit on each request's object allocations
    - ``calls``: limit on each request's allocator calls
    - ``memory``: limit on the peak of memory each request holds
    - ``hard``: stop the request at the limit itself, checkpoint or not
      (``ceiling=1``)
    - ``ceiling``: a multiple of every limit at which a request is stopped whether it
      reaches a checkpoint or not (2 by default: a handler that builds a big list
      without ever awaiting is stopped at twice its budget, with a ``MemoryError`` in
      its own code, and answered ``status_code``); None for purely soft limits.
      Requests that stay within their budget never see it.
    - ``status_code``: the HTTP status answered to a request that broke its limit
      before its response started (400 to 599), when ``response`` is None, and to a
      websocket refused before its handshake
    - ``response``: what a request that broke its limit before its response started is
      answered: an ASGI application (a Starlette ``JSONResponse(...)`` is one), or a
      callable taking the :class:`~gotcha_async.LimitExceeded` and returning one. None:
      ``status_code`` with a short plain-text body
    - ``routes``: per-route limits, as above
    - ``on_exceeded``: called as ``on_exceeded(scope, ctx)`` or
      ``on_exceeded(scope, ctx, exceeded)`` (and awaited if it returns an awaitable)
      once per request that broke its limit
    - ``enforce``: False for observe mode: measure and report, never stop anything
    - ``meter_provider``: an OpenTelemetry ``MeterProvider`` for the per-request
      metrics; None for OpenTelemetry's global provider when ``opentelemetry-api`` is
      installed (``pip install "gotcha-async[otel]"``), no metrics otherwise; a
      ``NoOpMeterProvider`` for none
    - ``track_memory``: measure the peak of memory held by every request, even without
      a ``memory`` limit (it costs a table lookup per free while the request runs)
    - ``summary_routes``: how many distinct routes the summary keeps apart; requests of
      later ones are summed up as ``"(other)"``
    - ``native``: count the memory of every C library too (lxml, Pillow, ...), as
      :func:`gotcha_async.install` with ``native=True`` does, process-wide, from the
      middleware's creation on

    :param app: the ASGI application to wrap
    :raises TypeError: for an argument of the wrong type, or a ``response`` that is
        neither an ASGI application nor a callable of one argument
    :raises ValueError: for a bad limit, status code, route pattern or route key
    """

    def __init__(self, app: ASGIApp, **options: Unpack[_web.MiddlewareOptions]) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI callable, not {app!r}")
        self.app = app
        super().__init__(options)
        self._router: _routes.Router | None = _UNBOUND
        self._django = False
        self._resolve_first = False
        self._summary_logged = False
        if self._options.enforce:
            _silence_server_tracebacks()
        else:
            # no lifespan (Django's handler has none): the summary is logged at exit
            atexit.register(_log_summary_at_exit, weakref.ref(self))

    #: whether ``response`` is an ASGI application (or a callable returning one)
    _response_is_app = False

    def _check_response(self, response: object) -> None:
        self._response_is_app = _check_response(response)

    def _log_summary_once(self) -> None:
        if not self._summary_logged:
            self._summary_logged = True
            self._options.log_summary()

    def _route_after(self, scope: Scope, root_path: str) -> str | None:
        """The route of a request that is being reported, once it has run.

        Starlette's router names it in the scope; a request stopped before the router
        ran (at a ceiling, in the middlewares in between) is matched by the middleware's
        own copy of the router, so that its log line, metrics and summary row are its
        route's, not the raw path's. Not on the common path: it runs for requests that
        broke a limit.
        """
        route = route_of(scope, root_path)
        if route is None and isinstance(self._router, _routes.Router):
            route = self._router.resolve(scope)
        return route

    # -- the ASGI callable ---------------------------------------------------------------

    def _bind(self, scope: Scope) -> None:
        """Learn the application's router, at its first call (with ``add_middleware``,
        Starlette builds the middleware then, and every route is added by then)."""
        router = _routes.router_of(self.app, scope.get("app"))
        django = isinstance(router, _routes.DjangoRouter)
        # observing, nothing is stopped: Django needs none of it
        self._django = django and self._options.enforce
        if self._django:
            _silence_django_errors()
        templates = None
        if router is not None:
            try:
                templates = router.templates()
            except Exception:  # a router we could not walk: no report, nothing else lost
                logger.debug("could not list the routes of %r", self.app, exc_info=True)
        self._options.bind_routes(templates, router.normalize if router else str)
        # Django names a route only inside the application: resolved here, once per
        # request; Starlette's is in the scope afterwards, resolved first only when a
        # routes= key needs it to choose the limits
        self._resolve_first = router is not None and (
            django or bool(self._options.route_keys))
        self._router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._router is _UNBOUND:
            self._bind(scope)
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        # An HTTP request, in this coroutine rather than one more: it runs for every
        # request.
        options = self._options
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        router = self._router
        template = router.resolve(scope) if self._resolve_first else None  # type: ignore[union-attr]
        if options.routed:
            plan, glob = options.limits_for(method, path, template, scope, router is not None)
        else:
            plan, glob = options.default_plan, None
        root_path = scope.get("root_path", "")
        ctx = plan.new_scope()

        # Each hands back the server's own awaitable: an async wrapper would add a
        # coroutine per message, a measurable share of a small request. Both are C
        # (guard.c), the send running for every message: once ctx is over its limit
        # nothing more of the response reaches the client (before the start the
        # status will be ours, after it the response will be aborted) and the receive
        # stops the request; until then the send notes the response's status and how
        # far it has gone.
        guarded_send = SendGuard(ctx, send, _stop)
        try:
            with ctx:  # enter and exit never wait: the plain form is cheaper
                if self._django:
                    await _run_django(self.app, scope, _django_receive(ctx, receive),
                                      guarded_send, ctx)
                else:
                    await self.app(scope, ReceiveGuard(ctx, receive, _stop_then_receive),
                                   guarded_send)
        except LimitExceeded as exc:
            if exc.context is not ctx:
                raise  # the application's own limit, not the request's
            error: LimitExceeded | None = exc
        else:
            if options.enforce:
                # the common case: no breach, no log line, no finish() coroutine
                route = template if template is not None else route_of(scope, root_path)
                options.record(ctx, method, route, route or glob or NO_ROUTE,
                               guarded_send.status, scope.get("scheme"))
                return
            error = None
        try:
            breach = options.breach(ctx, plan, error)
            status = guarded_send.status
            answer: ASGIApp | None = None
            if guarded_send.complete:
                outcome = "completed"
            elif guarded_send.started:
                outcome = "aborted"
            else:
                outcome = "refused"
                if error is not None:
                    answer = self._answer_for(error)
                    status = getattr(answer, "status_code", None) if answer else options.status_code
            route = template if template is not None else self._route_after(scope, root_path)
            name = route or glob or NO_ROUTE
            scheme = scope.get("scheme")
            if breach is None:
                options.record(ctx, method, route, name, status, scheme)
                return
            await options.finish(
                ctx, breach, outcome=outcome, status=status, method=method, path=path,
                route=route, name=name, scheme=scheme,
                client=_report.client_of(scope.get("client")), hook_target=scope,
            )
            if error is None:
                return
            if outcome == "aborted":
                # The status line is gone already: dropping the connection is the only way
                # left to tell the client that this response is not a success.
                error._gotcha_reported = True  # type: ignore[attr-defined]
                raise error
            if outcome == "refused":
                if answer is not None:
                    await answer(scope, receive, send)
                    return
                body = _web.plain_text(options.status_code, error.resource)
                await send({"type": "http.response.start", "status": options.status_code,
                            "headers": _error_headers(body)})
                await send({"type": "http.response.body", "body": body})
        finally:
            # the error's traceback holds this frame, and this frame the error: without this,
            # they and the frames and buffers of the stopped request wait for the cyclic
            # collector (a server's stopped requests piled up by the hundred between runs)
            error = None

    def _answer_for(self, error: LimitExceeded) -> ASGIApp | None:
        """The application's answer to a request stopped before its response started:
        ``response=`` (or what its callable returns), None for the default one."""
        response: Any = self._response
        if response is None or self._response_is_app:
            return response  # type: ignore[no-any-return]
        try:
            answer = response(error)
        except Exception:
            logger.exception("response=%r failed; answered the default %d instead",
                             response, self._options.status_code)
            return None
        if not callable(answer):
            logger.error("response=%r returned %r, not an ASGI application; answered the "
                         "default %d instead", response, answer, self._options.status_code)
            return None
        return answer  # type: ignore[no-any-return]

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan" and not self._options.enforce:
            await self.app(scope, self._watch_shutdown(receive), send)
        else:
            await self.app(scope, receive, send)

    def _watch_shutdown(self, receive: Receive) -> Receive:
        async def watched() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                # the server has drained its connections: every request is in
                self._log_summary_once()
            return message

        return watched

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        options = self._options
        path = scope.get("path", "")
        template = self._router.resolve(scope) if self._resolve_first else None  # type: ignore[union-attr]
        plan, glob = options.limits_for("WEBSOCKET", path, template, scope,
                                        self._router is not None)
        root_path = scope.get("root_path", "")
        accepted = False
        closed = False
        ctx = plan.new_scope()
        guarded_receive = ReceiveGuard(ctx, receive, _stop_then_receive)

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

        error: LimitExceeded | None = None
        try:
            with ctx:  # enter and exit never wait: the plain form is cheaper
                await self.app(scope, guarded_receive, guarded_send)
        except LimitExceeded as exc:
            if exc.context is not ctx:
                raise
            error = exc
        try:
            breach = options.breach(ctx, plan, error)
            denial = "websocket.http.response" in (scope.get("extensions") or {})
            if closed:
                outcome, status = "completed", None
            elif accepted:
                outcome, status = "closed", None
            elif denial:
                outcome, status = "refused", options.status_code
            else:
                outcome, status = "denied", None
            route = template if template is not None else self._route_after(scope, root_path)
            await options.finish(
                ctx, breach, outcome=outcome, status=status, method="WEBSOCKET", path=path,
                route=route, name=route or glob or NO_ROUTE, scheme=scope.get("scheme"),
                client=_report.client_of(scope.get("client")), hook_target=scope, record=False,
            )
            if error is None or closed:
                return
            if accepted:
                # the reason must fit a control frame: 123 bytes
                reason = f"{error.resource} limit exceeded"
                try:
                    await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION,
                                "reason": reason})
                except OSError:
                    pass  # the client is gone already: nothing is left to close
            elif denial:
                body = _web.plain_text(options.status_code, error.resource)
                await send({"type": "websocket.http.response.start",
                            "status": options.status_code, "headers": _error_headers(body)})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        finally:
            # as in __call__: the error and this frame would hold each other
            error = None
