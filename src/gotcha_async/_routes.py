"""Route templates as the frameworks name them: which template a request matches, and
which templates an application has (to report a ``routes=`` key that matches none).

Starlette (and FastAPI) and Django are asked here, before the application runs: the
request's limits must be chosen before its first allocation, and those frameworks only
route inside the application. aiohttp routes before its middlewares run
(``request.match_info``). Nothing is imported at import time: each framework is looked
up in ``sys.modules`` when an application of its kind is seen.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

_METHOD = re.compile(r"[A-Z]+")
_GLOB_CHARS = frozenset("*?[")


def split_key(key: str) -> tuple[str | None, str]:
    """``"GET /items/{id}"`` -> ``("GET", "/items/{id}")``; ``"/x"`` -> ``(None, "/x")``.

    :raises ValueError: for a method that is not an upper-case token
    """
    head, sep, rest = key.partition(" ")
    if not sep:
        return None, key
    if not _METHOD.fullmatch(head) or not rest or " " in rest.strip():
        raise ValueError(
            f"routes key {key!r} must be a route or path pattern, optionally after a method "
            f"in upper case and one space, as in 'GET /items/{{item_id}}'"
        )
    return head, rest


def is_glob(pattern: str) -> bool:
    """A glob on the raw path (``/upload/*``) rather than a route template."""
    return not _GLOB_CHARS.isdisjoint(pattern)


class Router:
    """A framework's router, asked for the template a request matches."""

    #: Django writes its routes without the leading slash; keys are compared without it
    strip_slash = False

    def resolve(self, scope: Any) -> str | None:
        raise NotImplementedError

    def templates(self) -> list[str]:
        raise NotImplementedError

    def normalize(self, template: str) -> str:
        return template.lstrip("/") if self.strip_slash else template


class StarletteRouter(Router):
    """Starlette's own matching, route by route in the router's order (first full match,
    else the first route whose path matched but not its method, as the router does),
    through mounts.

    Each route's own compiled ``path_regex`` is matched against the path, as the
    route's ``matches()`` does, without the child scope and converted parameters it
    builds (a third of the cost); a route of another kind is asked ``matches()``.
    """

    def __init__(self, router: Any) -> None:
        from starlette.routing import Match, Mount, Route, WebSocketRoute

        self._router = router
        self._full = Match.FULL
        self._partial = Match.PARTIAL
        self._mount = Mount
        self._kinds = {"http": Route, "websocket": WebSocketRoute}

    def resolve(self, scope: Any) -> str | None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]  # Starlette's route path: below the root path
        kind = self._kinds.get(scope.get("type", "http"))
        return self._match(self._router.routes, path, scope.get("method"), kind, scope)

    def _match(self, routes: Iterable[Any], path: str, method: str | None, kind: Any,
               scope: Any) -> str | None:
        partial: str | None = None
        for route in routes:
            regex = getattr(route, "path_regex", None)
            if isinstance(route, self._mount) and regex is not None:
                found = regex.match(path)
                if found is None:
                    continue
                inner = self._match(route.routes or (), "/" + found["path"], method, kind,
                                    scope)
                if inner is not None:
                    return route.path + inner
                continue
            if isinstance(route, kind) and regex is not None:
                if regex.match(path) is None:
                    continue
                methods = getattr(route, "methods", None)
                if methods and method not in methods:
                    partial = partial if partial is not None else route.path
                    continue
                return route.path  # type: ignore[no-any-return]
            if isinstance(route, tuple(self._kinds.values())):
                continue  # a route for the other kind of scope
            match, _ = route.matches(scope)  # a route of its own kind (a Host, ...)
            template = getattr(route, "path", None)
            if match is self._full:
                return template if isinstance(template, str) else None
            if match is self._partial and partial is None and isinstance(template, str):
                partial = template
        return partial

    def templates(self) -> list[str]:
        return list(self._walk(self._router.routes, ""))

    def _walk(self, routes: Iterable[Any], prefix: str) -> Iterator[str]:
        for route in routes:
            path = getattr(route, "path", None)
            if not isinstance(path, str):
                continue
            if isinstance(route, self._mount):
                yield from self._walk(route.routes or (), prefix + path)
            else:
                yield prefix + path


class DjangoRouter(Router):
    """Django's URL resolver: the route is ``request.resolver_match.route``, found here
    from the path before Django runs (resolving is what Django does first, and cheap)."""

    strip_slash = True

    def __init__(self) -> None:
        from django.urls import Resolver404, get_resolver

        self._get_resolver = get_resolver
        self._not_found = Resolver404

    def resolve(self, scope: Any) -> str | None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]  # Django's path_info: the path below the script name
        try:
            match = self._get_resolver().resolve(path)
        except self._not_found:
            return None
        route = getattr(match, "route", None)
        return route if isinstance(route, str) else None

    def templates(self) -> list[str]:
        return list(self._walk(self._get_resolver().url_patterns, ""))

    def _walk(self, patterns: Iterable[Any], prefix: str) -> Iterator[str]:
        for entry in patterns:
            here = prefix + str(entry.pattern).lstrip("^")
            children = getattr(entry, "url_patterns", None)
            if children is not None:
                yield from self._walk(children, here)
            else:
                yield here


def _chain(app: Any) -> Iterator[Any]:
    """``app`` and what it wraps, through the ``app`` attribute most ASGI middlewares
    keep (Starlette's among them) and a Starlette app's built middleware stack."""
    seen: set[int] = set()
    todo = [app]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen or len(seen) > 100:
            continue
        seen.add(id(obj))
        yield obj
        todo.append(getattr(obj, "app", None))
        stack = getattr(obj, "middleware_stack", None)
        if stack is not None:
            todo.append(stack)


def is_django(app: Any) -> bool:
    """Is ``app`` Django's ASGI handler, or a middleware chain ending in it?"""
    module = sys.modules.get("django.core.handlers.asgi")
    if module is None:
        return False
    return any(isinstance(obj, module.ASGIHandler) for obj in _chain(app))


def router_of(app: Any, scope_app: Any = None) -> Router | None:
    """The router of the application behind ``app`` (a Starlette or FastAPI app, a
    Starlette router, Django's ASGI handler), or None for an app without one."""
    if is_django(app):
        return DjangoRouter()
    routing = sys.modules.get("starlette.routing")
    if routing is None:
        return None
    for start in (app, scope_app):
        for obj in _chain(start):
            router = getattr(obj, "router", obj)
            if isinstance(router, routing.Router):
                return StarletteRouter(router)
    return None
