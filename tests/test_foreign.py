"""_foreign: each private name of another project, found, and its fallback working.

Each fallback is forced the way a release without the name would force it: the
adapter's constant for the name is pointed at one that does not exist and the
adapter's answers are forgotten (taking the name away from the library itself would
break the library). Then the feature runs end to end: a real scope on asyncio and trio,
a real aiohttp server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from fresh_scripts import run as run_fresh
from test_aiohttp import LIMIT, State, get, gotcha_records, make_app, serving

import gotcha_async as gotcha
from gotcha_async import _context, _foreign

OVER = 256 * 1024  # one allocation well past SMALL
SMALL = 64 * 1024

Force = Callable[[str, Any], None]


@pytest.fixture
def force(monkeypatch: pytest.MonkeyPatch) -> Iterator[Force]:
    """force(NAME, value): point _foreign.NAME elsewhere and ask everything again."""

    def forcing(name: str, value: Any) -> None:
        monkeypatch.setattr(_foreign, name, value)
        _foreign.reset()
        _context._forget_fast_paths()

    yield forcing
    monkeypatch.undo()
    _foreign.reset()
    _context._forget_fast_paths()


async def scopes_work() -> None:
    """Plain scopes (enough for the fast path to be set up), a broken limit that raises,
    one that moves on, and a cancel(): the scope machinery, end to end."""
    for _ in range(3):
        async with gotcha.limit() as plain:
            await anyio.sleep(0)
        assert not plain.exceeded()
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=SMALL):
            data = bytearray(OVER)
            await anyio.sleep(0)
            pytest.fail(f"not cancelled at its checkpoint ({len(data)})")
    assert info.value.resource == "bytes"
    async with gotcha.move_on_limit(bytes=SMALL) as ctx:
        data = bytearray(OVER)
        await anyio.sleep(0)
        pytest.fail(f"not cancelled at its checkpoint ({len(data)})")
    assert ctx.exceeded() and ctx.cancelled_caught
    async with gotcha.limit() as cancelled:
        cancelled.cancel()
        await anyio.sleep(0)
        pytest.fail("not cancelled")
    assert cancelled.cancelled_caught


# -- asyncio's _get_running_loop ----------------------------------------------------------


def test_running_loop_is_asyncios_own_function() -> None:
    # the same object: the C half's fast path calls it
    assert _foreign.running_loop() is asyncio.events._get_running_loop
    assert _context._get_running_loop is _foreign.running_loop()


@pytest.mark.anyio
async def test_without_get_running_loop_the_public_one_answers_the_same(
    force: Force, anyio_backend: str
) -> None:
    force("ASYNCIO_RUNNING_LOOP", ("asyncio.events", "_no_such_function"))
    assert _foreign.running_loop() is _foreign.running_loop_public
    assert _context._get_running_loop is _foreign.running_loop_public
    expected = asyncio.get_running_loop() if anyio_backend == "asyncio" else None
    assert _foreign.running_loop()() is expected
    await scopes_work()
    if anyio_backend == "asyncio":
        assert _context._fast_path  # and the C half calls the public one


def test_the_public_running_loop_is_none_outside_a_loop() -> None:
    assert _foreign.running_loop_public() is None


# -- anyio's backend scope class ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_scope_class_that_takes_no_deadline_is_never_made_directly(
    force: Force, anyio_backend: str
) -> None:
    force("SCOPE_CLASS_PARAMS", ("deadline", "shield", "no_such_parameter"))
    await scopes_work()
    assert _foreign.scope_class("asyncio") is None
    assert not _context._fast_path  # every scope through anyio.CancelScope()


@pytest.mark.anyio
async def test_the_scope_class_is_learnt_from_anyio(anyio_backend: str) -> None:
    await scopes_work()
    if anyio_backend == "asyncio":
        assert _foreign.scope_class("asyncio") is type(anyio.CancelScope())


# -- anyio's internals for lazy scopes ---------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_without_anyios_internals_every_scope_is_made_at_entry(force: Force) -> None:
    force("LAZY_SCOPE_NEEDS", (*_foreign.LAZY_SCOPE_NEEDS, "_no_such_field"))
    await scopes_work()
    assert _context._fast_path
    async with gotcha.limit() as ctx:
        assert ctx._scope is not None and ctx._host is None  # eager
    # nested in a task group, whose cancellation passes through untouched
    async with anyio.create_task_group() as tg:
        async def child() -> None:
            async with gotcha.limit():
                await anyio.sleep_forever()

        tg.start_soon(child)
        await anyio.sleep(0)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_lazy_scope_reads_its_host_where_asyncios_current_task_does() -> None:
    # where current_task is 3.11's Python function, its dict is read instead
    source = _foreign.current_task_source()
    fn = asyncio.current_task
    if getattr(fn, "__code__", None) is not None:
        assert source is asyncio.tasks._current_tasks  # type: ignore[attr-defined]
    else:
        assert source is fn
    await scopes_work()
    if _context._lazy_class is None:
        pytest.skip("this anyio has no task states: no scope is lazy")
    hosts: list[tuple[Any, Any]] = []

    async def in_a_task() -> None:
        async with gotcha.limit() as ctx:
            hosts.append((ctx._host, asyncio.current_task()))

    async with gotcha.limit() as outer:
        hosts.append((outer._host, asyncio.current_task()))
        await asyncio.gather(in_a_task(), in_a_task())
        await asyncio.create_task(in_a_task())
    assert len(hosts) == 4
    for host, task in hosts:
        assert host is task and task is not None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_replaced_current_task_is_called_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[Any] = []
    real = asyncio.current_task

    def current_task(loop: Any = None) -> Any:
        asked.append(loop)
        return real(loop)

    monkeypatch.setattr(asyncio, "current_task", current_task)
    _foreign.reset()
    _context._forget_fast_paths()
    try:
        assert _foreign.current_task_source() is current_task
        await scopes_work()
        if _context._lazy_class is None:
            pytest.skip("this anyio has no task states: no scope is lazy")
        assert asked  # the fast path asks it
        asked.clear()
        async with gotcha.limit() as ctx:
            assert ctx._host is real()
        assert asked == [asyncio.get_running_loop()]
    finally:
        monkeypatch.undo()
        _foreign.reset()
        _context._forget_fast_paths()


@pytest.mark.parametrize("missing", ["_task_states", "TaskState"])
def test_lazy_scopes_need_the_backends_task_states(
    force: Force, missing: str
) -> None:
    import anyio._backends._asyncio as backend

    assert isinstance(_foreign.lazy_possible(backend.CancelScope), bool)
    force("LAZY_BACKEND_NEEDS", tuple(
        "_no_such_name" if n == missing else n for n in _foreign.LAZY_BACKEND_NEEDS))
    assert not _foreign.lazy_possible(backend.CancelScope)


def test_gotcha_eager_scopes_turns_lazy_scopes_off(
    force: Force, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio._backends._asyncio as backend

    monkeypatch.setenv("GOTCHA_EAGER_SCOPES", "1")
    force("LAZY_SCOPE_NEEDS", _foreign.LAZY_SCOPE_NEEDS)  # forget the answer
    assert not _foreign.lazy_possible(backend.CancelScope)


# -- trio's run context ------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_without_trios_run_context_trio_scopes_take_the_python_path(
    force: Force,
) -> None:
    force("TRIO_RUN_CONTEXT", ("trio._core._run", "_no_such_name"))
    await scopes_work()
    assert _context._fast_trio and _foreign.trio_run_context() is None


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_trios_run_context_is_found_in_a_trio_task() -> None:
    await scopes_work()
    assert _foreign.trio_run_context() is sys.modules["trio._core._run"].GLOBAL_RUN_CONTEXT


# -- the loops' dispatch frames ----------------------------------------------------------


def test_dispatch_frames_are_read_from_the_functions_themselves() -> None:
    import trio

    places = _foreign.dispatch_frames()
    assert (asyncio.events.__file__, "_run") in places
    assert (sys.modules["asyncio.runners"].__file__, "run") in places
    assert (trio._core._run.__file__, "unrolled_run") in places


def test_a_loop_not_imported_yet_is_found_by_its_file(
    force: Force, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio

    run_file = trio._core._run.__file__
    # as before trio's first import: found by its file, without importing it
    monkeypatch.delitem(sys.modules, "trio._core._run")
    force("DISPATCH", (("trio._core._run", "unrolled_run"),))
    assert _foreign.dispatch_frames() == ((run_file, "unrolled_run"),)
    assert "trio._core._run" not in sys.modules
    force("DISPATCH", (("trio._core._renamed", "unrolled_run"),))
    with pytest.warns(RuntimeWarning, match=r"trio._core._renamed.unrolled_run was not found"):
        assert _foreign.dispatch_frames() == ()


def test_a_missing_dispatch_function_is_said_once(force: Force) -> None:
    force("DISPATCH", (("asyncio.events", "Handle._no_such_function"), *_foreign.DISPATCH[1:]))
    with pytest.warns(RuntimeWarning, match=r"Handle._no_such_function was not found"):
        places = _foreign.dispatch_frames()
    assert all(name != "_no_such_function" for _, name in places)
    assert (sys.modules["asyncio.runners"].__file__, "run") in places


@pytest.mark.needs_frames
def test_without_a_dispatch_function_sites_are_still_recorded() -> None:
    # in a process of its own: the dispatch functions reach the C half at install
    run_fresh("dispatch_missing.py", timeout=60)


# -- aiohttp's payload writer and websocket writer ---------------------------------------


PIECE = 1024
PIECES = 50  # 50 KiB: aiohttp's writer drains (and may wait) past 64 KiB buffered


async def stream_over(request: web.Request) -> web.StreamResponse:
    """Over its limit once started, then small writes, none of which waits."""
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"<" * PIECE)
    data = bytearray(2 * LIMIT)
    for _ in range(PIECES):
        await response.write(b"." * PIECE)
    await response.write_eof(str(len(data)).encode())
    return response


@pytest.mark.parametrize("private", [True, False], ids=["payload_writer", "public_methods"])
@pytest.mark.asyncio
async def test_a_stream_whose_writes_never_wait_is_stopped_at_a_write(
    force: Force, private: bool, caplog: pytest.LogCaptureFixture
) -> None:
    if not private:
        force("AIOHTTP_PAYLOAD_WRITER", "_no_such_writer")
    state = State()
    body = b""
    # no ceiling: only a write can stop a handler whose writes never wait
    app = make_app(state, bytes=LIMIT, ceiling=None)
    app.router.add_get("/stream-over", stream_over)
    async with serving(app) as url:
        ok = await get(url + "/ok")
        hog = await get(url + "/hog")
        async with aiohttp.ClientSession() as session, \
                session.get(url + "/stream-over") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in response.content.iter_any():
                    body += chunk
    assert ok == (200, b"ok")
    assert hog[0] == 503
    assert body == b"<" * PIECE  # nothing written after the limit broke
    [hog_record, stream_record] = gotcha_records(caplog)
    assert (hog_record.outcome, hog_record.status) == ("refused", 503)  # type: ignore[attr-defined]
    assert (stream_record.outcome, stream_record.status) == (  # type: ignore[attr-defined]
        "aborted", 200)
    assert _foreign._found["aiohttp_writer"] is private


@pytest.mark.asyncio
async def test_added_by_hand_without_the_payload_writer_says_what_is_lost(
    force: Force,
) -> None:
    force("AIOHTTP_PAYLOAD_WRITER", "_no_such_writer")
    state = State()
    async with serving(make_app(state, by_hand=True, bytes=LIMIT)) as url:
        with pytest.warns(RuntimeWarning, match="added by hand"):
            hog = await get(url + "/hog")
        ok = await get(url + "/ok")  # said once
    assert (hog[0], ok) == (503, (200, b"ok"))


FRAMES = 50


async def ws_flood(request: web.Request) -> web.WebSocketResponse:
    """Over its limit, then frames whose sends never wait."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.receive()
    data = bytearray(2 * LIMIT)
    for i in range(FRAMES):
        await ws.send_str(f"frame {i} of {len(data)}")
    await ws.send_json({"done": True})
    return ws


@pytest.mark.parametrize("private", [True, False], ids=["post_start", "public_methods"])
@pytest.mark.asyncio
async def test_a_websocket_whose_sends_never_wait_is_closed_at_a_send(
    force: Force, private: bool
) -> None:
    if not private:
        force("AIOHTTP_POST_START", "_no_such_method")
    state = State()
    app = make_app(state, bytes=LIMIT, ceiling=None)
    app.router.add_get("/ws-flood", ws_flood)
    frames = []
    async with serving(app) as url:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "/ws-flood") as ws:
            await ws.send_str("go")
            while True:
                message = await ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frames.append(message.data)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert (message.data, message.extra) == (1008, "bytes limit exceeded")
    assert len(frames) < FRAMES
    [exceeded] = state.exceeded
    assert (exceeded.method, exceeded.outcome) == ("WEBSOCKET", "closed")
    assert _foreign._found["aiohttp_post_start"] is private


# -- OpenTelemetry's placeholder provider ------------------------------------------------


class Placeholder:
    _real_meter_provider: object = None


def test_the_placeholder_tells_when_the_sdk_is_set() -> None:
    placeholder = Placeholder()
    sdk_is_set = _foreign.otel_sdk_is_set(placeholder)
    assert not sdk_is_set()
    placeholder._real_meter_provider = object()
    assert sdk_is_set()


def test_without_the_placeholders_attribute_the_global_provider_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import metrics

    placeholder = object()
    current: list[object] = [placeholder]
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: current[0])
    sdk_is_set = _foreign.otel_sdk_is_set(placeholder)
    assert not sdk_is_set()
    current[0] = object()
    assert sdk_is_set()
