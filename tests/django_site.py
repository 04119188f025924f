"""A small Django site for the Django tests: settings, views and URLs in one module
(``ROOT_URLCONF`` is this module), served through Django's own ASGI handler."""

from __future__ import annotations

import asyncio

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="test only",
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        # the test process's logging stays as pytest set it: Django's records propagate
        LOGGING_CONFIG=None,
    )
    django.setup()

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path

HOG = 8 * 2**20


async def ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


async def item(request: HttpRequest, item_id: int) -> HttpResponse:
    match = request.resolver_match
    assert match is not None
    return JsonResponse({"item_id": item_id, "route": match.route})


async def hog(request: HttpRequest) -> HttpResponse:
    data = bytearray(HOG)
    await asyncio.sleep(0)  # a checkpoint: a soft limit stops it here
    return HttpResponse(str(len(data)))


async def hog_no_checkpoint(request: HttpRequest) -> HttpResponse:
    # never awaits: stopped at the ceiling, with a MemoryError in this very line
    chunks = [bytearray(2**20) for _ in range(3 * HOG // 2**20)]
    return HttpResponse(str(len(chunks)))


def hog_sync(request: HttpRequest) -> HttpResponse:
    # a sync view: Django runs it in a worker thread, charged to the request all the same
    chunks = [bytearray(2**20) for _ in range(3 * HOG // 2**20)]
    return HttpResponse(str(len(chunks)))


async def boom(request: HttpRequest) -> HttpResponse:
    raise ValueError("a bug of the view's own")


async def user(request: HttpRequest, user_id: int) -> HttpResponse:
    return HttpResponse(str(user_id))


api = [path("users/<int:user_id>/", user)]

urlpatterns = [
    path("ok", ok),
    path("items/<int:item_id>/", item),
    path("hog", hog),
    path("hog-no-checkpoint", hog_no_checkpoint),
    path("hog-sync", hog_sync),
    path("boom", boom),
    path("api/", include(api)),
]


def application() -> object:
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
