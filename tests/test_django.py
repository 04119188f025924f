"""Django through its own ASGI handler under a real uvicorn on 127.0.0.1.

A request stopped for its limit is answered by the middleware and said in one line;
Django must not also log it as an "Internal Server Error", and no task of Django's may
be left to fail unretrieved. Routes are Django's own (``request.resolver_match.route``).
"""

from __future__ import annotations

import ast
import gc
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_server import serving

pytest.importorskip("django")

import django_site

import gotcha_async as gotcha
from gotcha_async.asgi import LimitMiddleware

HERE = Path(__file__).parent


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def django(**middleware: Any) -> LimitMiddleware:
    return LimitMiddleware(django_site.application(), **middleware)  # type: ignore[arg-type]


def get_all(url: str, paths: list[str]) -> list[httpx.Response]:
    with httpx.Client(base_url=url) as client:  # one kept-alive connection
        return [client.get(p) for p in paths]


def test_stopped_requests_are_answered_once_and_django_logs_no_error(
    log: pytest.LogCaptureFixture,
) -> None:
    app = django(bytes="4 MiB")
    with serving(app, lifespan="auto") as server:
        responses = get_all(server.url, ["/hog", "/hog-no-checkpoint", "/hog-sync", "/ok",
                                         "/boom"])
    gc.collect()  # an unretrieved task exception is logged when the task is collected
    assert [r.status_code for r in responses] == [503, 503, 503, 200, 500]
    for r in responses[:3]:
        assert r.text == "Service Unavailable: the request exceeded its bytes limit\n"
    stops = [r.getMessage() for r in log.records if r.name == "gotcha_async"]
    assert [line.split(" exceeded")[0] for line in stops] == [
        "GET hog", "GET hog-no-checkpoint", "GET hog-sync"]
    errors = [(r.name, r.getMessage()) for r in log.records if r.levelno >= logging.ERROR]
    # the view's own bug is Django's to log, as always; nothing else
    assert errors == [("django.request", "Internal Server Error: /boom")]
    assert not [r for r in log.records if "never retrieved" in r.getMessage()]


def test_only_a_stop_left_in_an_unread_future_is_dropped_from_asyncios_log(
    log: pytest.LogCaptureFixture,
) -> None:
    # a sync view stopped in its worker thread while the request was being cancelled:
    # asgiref re-raises the cancellation and leaves the executor's future unread (3.15
    # logged it in 2 runs of 6 of the test above)
    django(bytes="4 MiB")._bind({"type": "http", "app": None})  # Django's: the filters on
    asyncio_log = logging.getLogger("asyncio")
    for exc in (gotcha.HardLimitError(), ValueError("a real one")):
        asyncio_log.error("Future exception was never retrieved\nfuture: <Future finished>",
                          exc_info=(type(exc), exc, None))
    asyncio_log.error("Task exception was never retrieved",
                      exc_info=(gotcha.HardLimitError, gotcha.HardLimitError(), None))
    kept = [(r.getMessage().split("\n")[0], type(r.exc_info[1]).__name__)
            for r in log.records if r.name == "asyncio" and r.exc_info]
    assert kept == [("Future exception was never retrieved", "ValueError"),
                    ("Task exception was never retrieved", "HardLimitError")]


def test_routes_keys_are_djangos_routes_with_or_without_the_leading_slash(
    log: pytest.LogCaptureFixture,
) -> None:
    routes = {
        "GET hog": {"bytes": "16 MiB"},
        "/api/users/<int:user_id>/": {"bytes": 100},
        "items/<int:id>/": {"bytes": 100},  # a typo: Django's route says item_id
    }
    app = django(bytes="4 MiB", routes=routes, ceiling=None)
    with serving(app, lifespan="auto") as server:
        responses = get_all(server.url, ["/hog", "/api/users/3/", "/items/3/"])
    assert [r.status_code for r in responses] == [200, 503, 200]
    assert responses[2].json() == {"item_id": 3, "route": "items/<int:item_id>/"}
    [warning] = [r.getMessage() for r in log.records
                 if r.name == "gotcha_async" and "names no route" in r.getMessage()]
    assert warning.startswith("routes key 'items/<int:id>/' names no route of the application")
    assert "'items/<int:item_id>/'" in warning and "'api/users/<int:user_id>/'" in warning


def test_summary_rows_are_djangos_routes_and_unrouted_requests_share_one() -> None:
    app = django(enforce=False)
    with serving(app, lifespan="auto") as server:
        codes = [r.status_code for r in get_all(
            server.url, ["/items/1/", "/items/2/", "/api/users/5/", "/nope", "/nope/2"])]
    assert codes == [200, 200, 200, 404, 404]
    rows = {(r.method, r.route): r.count for r in app.summary()}
    assert rows == {("GET", "items/<int:item_id>/"): 2, ("GET", "api/users/<int:user_id>/"): 1,
                    ("GET", "(no route)"): 2, ("GET", "ok"): 1}


def test_response_is_the_applications() -> None:
    async def busy(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"retry-after", b"5"), (b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"busy, retry later"})

    app = django(bytes="4 MiB", response=busy)
    with serving(app, lifespan="auto") as server:
        [r] = get_all(server.url, ["/hog"])
    assert (r.status_code, r.headers["retry-after"], r.text) == (429, "5", "busy, retry later")


def test_observe_mode_logs_the_summary_at_exit_without_a_lifespan(tmp_path: Path) -> None:
    # Django's handler refuses the lifespan protocol: the summary is logged at exit
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import logging
        import httpx
        from asgi_server import serving
        import django_site
        from gotcha_async.asgi import LimitMiddleware

        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        app = LimitMiddleware(django_site.application(), bytes="4 MiB", enforce=False)
        with serving(app, lifespan="auto") as server:
            with httpx.Client(base_url=server.url) as client:
                for path in ("/items/1/", "/items/2/", "/hog"):
                    assert client.get(path).status_code == 200
        print("served", flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "served\n"
    lines = [line.removeprefix("gotcha_async ") for line in done.stderr.splitlines()
             if line.startswith("gotcha_async ")]
    assert lines[0].startswith("GET hog exceeded its bytes limit")
    assert lines[1].startswith("per-route allocation summary")
    pasted = ast.literal_eval("{\n" + "\n".join(lines[2:]) + "\n}")
    assert set(pasted) == {"GET items/<int:item_id>/", "GET hog", "GET ok"}
    assert gotcha.parse_size(pasted["GET hog"]["bytes"]) >= 8 * gotcha.MiB
