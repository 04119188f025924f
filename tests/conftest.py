from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest

try:
    import uvloop
except ImportError:  # Windows: uvloop does not exist there
    uvloop = None  # type: ignore[assignment]

# anyio's plugin runs every @pytest.mark.anyio test on both backends.
BACKENDS = ["asyncio", "trio"]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # pytest-asyncio runs every @pytest.mark.asyncio test on the stock loop and on uvloop
    factories = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("GOTCHA_TEST_NATIVE") == "1":
        # the whole suite with C libraries' memory counted too (.ci/run's native step)
        import gotcha_async

        gotcha_async.install(native=True)
    config.addinivalue_line(
        "markers",
        "needs_frames: needs the interpreter's frames read (interrupts, refusals, sites): "
        "skipped on a build for a CPython it was not checked on (GOTCHA_UNCHECKED=1)",
    )
    config.addinivalue_line(
        "markers",
        "native_child: needs native counting on (process-wide): deselected but in the "
        "process tests/test_native.py starts for them (GOTCHA_NATIVE_CHILD=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from gotcha_async import _meter

    if "1" not in (os.environ.get("GOTCHA_NATIVE_CHILD"), os.environ.get("GOTCHA_TEST_NATIVE")):
        native = [item for item in items if item.get_closest_marker("native_child")]
        if native:
            config.hook.pytest_deselected(items=native)
            items[:] = [item for item in items if not item.get_closest_marker("native_child")]
    if _meter.checked():
        return
    skip = pytest.mark.skip(reason="a build for an unchecked CPython reads no frames")
    for item in items:
        if item.get_closest_marker("needs_frames") is not None:
            item.add_marker(skip)
