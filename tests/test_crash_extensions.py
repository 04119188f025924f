"""A refusal only where CPython's own code asked for the memory (item 31/1 of the failure
table in docs/reliability.md).

orjson and every pyo3 extension (pydantic-core) crash or panic on a NULL they did not
expect from the allocator. Each case runs in a subprocess (tests/crash_scripts/), which
fails the test on a signal, an abort, a panic's traceback or a hang.
"""

from __future__ import annotations

import sys

import pytest
from crash_scripts import run_script

import gotcha_async as gotcha
from gotcha_async import _meter

pytest.importorskip("orjson")
pytest.importorskip("pydantic")


@pytest.mark.parametrize("library", ["orjson", "pydantic"])
def test_extensions_are_never_refused_only_stopped(library: str) -> None:
    out = run_script("extensions.py", library)
    r = out.result
    assert "PanicException" not in out.stderr, out.stderr[-3000:]
    # every scope was stopped all the same: at the bytecode boundary after the call
    for kind in ("hard", "ceiling"):
        assert r[f"{kind}_task_exceeded"], r
        assert r[f"{kind}_thread_exceeded"], r
    assert r["roomy_ok"], r


def test_fastapi_orjson_response_under_the_middleware_defaults() -> None:
    pytest.importorskip("fastapi")
    # a SIGSEGV of the whole server before: the cached result rendered by orjson
    # went past the default ceiling inside orjson.dumps
    r = run_script("extensions.py", "server").result
    assert set(r["statuses"]) <= {200, 503}, r
    assert 503 in r["statuses"], r  # the budget was enforced
    assert r["after"] == 200, r


@pytest.mark.anyio
@pytest.mark.needs_frames
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's unwinder")
async def test_cpython_own_allocations_are_still_refused() -> None:
    # the measurement at install found where CPython's calls go, on this interpreter
    async with gotcha.limit():
        pass
    assert _meter._debug.refusals()
    seen: list[BaseException] = []
    async with gotcha.move_on_limit(bytes=gotcha.MiB, hard=True) as ctx:
        try:
            bytearray(gotcha.GiB)
        except MemoryError as exc:
            seen.append(exc)
    assert len(seen) == 1 and ctx.exceeded()
    assert ctx.used().bytes < gotcha.MiB  # refused, so never charged
