"""C libraries' allocations, charged with ``gotcha.install(native=True)`` (native.c).

Native counting is process-wide and cannot be undone, so the tests that need it run in a
pytest process of their own (``test_native_suite_in_a_process_of_its_own`` starts it, with
``GOTCHA_NATIVE_CHILD=1``): the rest of the suite keeps its figures. The sizes are known
exactly from a small C library built here with the system's compiler (``grab(n)`` mallocs
and touches n bytes, ``drop(p)`` frees): loaded through ``ctypes.CDLL`` it runs without
the GIL (the thread's log, settled later), through ``ctypes.PyDLL`` with it (charged at
once).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import gotcha_async as gotcha
from gotcha_async import _meter

# in the process test_native_suite_in_a_process_of_its_own starts, or in a whole suite run
# with native counting on (tests/conftest.py, GOTCHA_TEST_NATIVE)
CHILD = "1" in (os.environ.get("GOTCHA_NATIVE_CHILD"), os.environ.get("GOTCHA_TEST_NATIVE"))
SUPPORTED = _meter.native_supported()
MiB = gotcha.MiB
# what the call itself costs beside the block (ctypes' argument conversion, a few
# small blocks of the scope's own bookkeeping)
SLACK = 16 * 1024

LIB_C = r"""
#include <stdlib.h>
#include <string.h>
void *grab(size_t n) { char *p = malloc(n); if (p) memset(p, 1, n); return p; }
void *grab_zeroed(size_t n) { return calloc(1, n); }
void *regrab(void *p, size_t n) { return realloc(p, n); }
void drop(void *p) { free(p); }
"""

# deselected (tests/conftest.py) but where test_native_suite_in_a_process_of_its_own runs
# them, with native counting on for the whole process
child_only = pytest.mark.native_child


def build(tmp: Path, name: str) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the test library")
    src = tmp / f"{name}.c"
    src.write_text(LIB_C)
    out = tmp / f"lib{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(src)], check=True)
    return out


def load(path: Path, gil: bool) -> Any:
    lib = (ctypes.PyDLL if gil else ctypes.CDLL)(str(path))
    for name in ("grab", "grab_zeroed"):
        getattr(lib, name).restype = ctypes.c_void_p
        getattr(lib, name).argtypes = [ctypes.c_size_t]
    lib.regrab.restype = ctypes.c_void_p
    lib.regrab.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.drop.argtypes = [ctypes.c_void_p]
    lib.drop.restype = None
    return lib


@pytest.fixture(scope="module")
def libpath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if CHILD:
        gotcha.install(native=True)  # before the library is loaded: dlopen patches it
    return build(tmp_path_factory.mktemp("native"), "grab")


@pytest.fixture(params=[False, True], ids=["nogil", "gil"])
def lib(request: pytest.FixtureRequest, libpath: Path) -> Any:
    loaded = load(libpath, request.param)
    # ctypes' dlopen() searches its own RUNPATH, so it is not wrapped: what it loads is
    # patched by the delivery thread's next look, or at once by install() again
    gotcha.install(native=True)
    return loaded


# ---------------------------------------------------------------------------------------
# The API, in this process: nothing here turns native counting on


def test_install_native_rejects_a_non_bool() -> None:
    with pytest.raises(TypeError, match=r"native must be True or False, not 'yes'"):
        gotcha.install(native="yes")  # type: ignore[arg-type]
    assert _meter._debug.native_state()["on"] is False or CHILD


def test_install_native_raises_where_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    if SUPPORTED:
        # the check made before anything changes, as on a platform without support
        monkeypatch.setattr(_meter, "native_supported", lambda: False)
    before = _meter._debug.native_state()
    with pytest.raises(NotImplementedError, match="needs Linux with glibc"):
        gotcha.install(native=True)
    assert _meter._debug.native_state() == before


def test_middleware_native_must_be_a_bool() -> None:
    from gotcha_async.asgi import LimitMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    with pytest.raises(TypeError, match=r"native must be True or False, not 1"):
        LimitMiddleware(app, native=1)  # type: ignore[arg-type]


@pytest.mark.skipif(CHILD or not SUPPORTED, reason="the parent's test")
def test_native_suite_in_a_process_of_its_own() -> None:
    env = {**os.environ, "GOTCHA_NATIVE_CHILD": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


# ---------------------------------------------------------------------------------------
# In the child process, native counting on

@child_only
def test_the_aiohttp_middleware_turns_native_counting_on(libpath: Path) -> None:
    pytest.importorskip("aiohttp")
    from gotcha_async.aiohttp import LimitMiddleware

    middleware = LimitMiddleware(memory="64 MiB", native=True)
    assert middleware._options.native is True
    assert _meter._debug.native_state()["on"] is True


@child_only
def test_install_native_twice_changes_nothing(libpath: Path) -> None:
    state = _meter._debug.native_state()
    assert state["on"] is True and state["slots"] > 0
    gotcha.install(native=True)
    gotcha.install()
    assert _meter._debug.native_state()["slots"] == state["slots"]


@child_only
@pytest.mark.anyio
@pytest.mark.parametrize("n", [1000, 100_000, 10 * MiB])
async def test_a_malloc_of_n_bytes_is_charged_n(lib: Any, n: int) -> None:
    async with gotcha.limit() as ctx:
        p = lib.grab(n)
        z = lib.grab_zeroed(n)
    assert 2 * n <= ctx.used().bytes <= 2 * n + SLACK
    assert ctx.used().calls >= 2
    lib.drop(p)
    lib.drop(z)


@child_only
@pytest.mark.anyio
async def test_a_realloc_charges_its_new_size(lib: Any) -> None:
    p = lib.grab(1000)
    async with gotcha.limit() as ctx:
        p = lib.regrab(p, 4 * MiB)
    assert 4 * MiB <= ctx.used().bytes <= 4 * MiB + SLACK
    lib.drop(p)


@child_only
@pytest.mark.anyio
async def test_frees_are_credited_in_memory(lib: Any) -> None:
    async with gotcha.limit(memory="1 GiB", exact_memory=True) as ctx:
        ps = [lib.grab(MiB) for _ in range(8)]
        current, _ = ctx.memory()  # type: ignore[misc]
        assert 8 * MiB <= current <= 8 * MiB + SLACK
        for p in ps:
            lib.drop(p)
        current, peak = ctx.memory()  # type: ignore[misc]
    assert current <= SLACK
    assert 8 * MiB <= peak <= 8 * MiB + SLACK


@child_only
@pytest.mark.anyio
async def test_a_block_freed_after_the_scope_is_credited_to_it(lib: Any) -> None:
    async with gotcha.limit(memory="1 GiB", exact_memory=True) as ctx:
        p = lib.grab(2 * MiB)
    assert ctx.memory().current >= 2 * MiB  # type: ignore[union-attr]
    lib.drop(p)
    async with gotcha.limit():  # any settling point of this thread
        pass
    assert ctx.memory().current <= SLACK  # type: ignore[union-attr]


@child_only
@pytest.mark.anyio
async def test_two_concurrent_tasks_are_charged_apart(lib: Any) -> None:
    sizes = {"big": 8 * MiB, "small": MiB}
    used: dict[str, int] = {}
    both_in = anyio.Event()
    entered: list[str] = []

    async def work(name: str) -> None:
        async with gotcha.limit() as ctx:
            entered.append(name)
            if len(entered) == 2:
                both_in.set()
            await both_in.wait()
            p = lib.grab(sizes[name])
            await anyio.lowlevel.checkpoint()  # the other task runs in between
            lib.drop(p)
        used[name] = ctx.used().bytes

    async with anyio.create_task_group() as tg:
        tg.start_soon(work, "big")
        tg.start_soon(work, "small")
    for name, size in sizes.items():
        assert size <= used[name] <= size + SLACK, (name, used)


@child_only
@pytest.mark.anyio
async def test_a_worker_thread_is_charged_to_the_scope(lib: Any) -> None:
    async with gotcha.limit() as ctx:
        p = await anyio.to_thread.run_sync(lib.grab, 6 * MiB)
    assert 6 * MiB <= ctx.used().bytes <= 6 * MiB + 4 * SLACK
    lib.drop(p)


@child_only
@pytest.mark.anyio
async def test_a_thread_no_scope_started_is_not_charged(lib: Any) -> None:
    got: list[int] = []
    done = threading.Event()

    def outsider() -> None:
        got.append(lib.grab(6 * MiB))
        done.set()

    async with gotcha.limit() as ctx:
        threading.Thread(target=outsider).start()
        await anyio.to_thread.run_sync(done.wait)
    assert ctx.used().bytes < MiB
    lib.drop(got[0])


def wait_for_a_scan_after(scans: int) -> None:
    """The delivery thread looks for new objects every 20 ms (a second when idle)."""
    deadline = time.monotonic() + 10
    while _meter._debug.native_state()["scans"] == scans:
        assert time.monotonic() < deadline, "no patching pass in 10 s"
        time.sleep(0.005)


@child_only
@pytest.mark.anyio
async def test_a_library_loaded_after_install_is_counted(
    tmp_path: Path, libpath: Path
) -> None:
    scans = _meter._debug.native_state()["scans"]
    late = load(build(tmp_path, "late"), gil=False)
    wait_for_a_scan_after(scans)
    async with gotcha.limit() as ctx:
        p = late.grab(3 * MiB)
    assert 3 * MiB <= ctx.used().bytes <= 3 * MiB + SLACK
    late.drop(p)


EXT_C = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>
static void *kept;
static PyObject *grab(PyObject *m, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && PyErr_Occurred()) return NULL;
    free(kept);
    kept = malloc((size_t)n);
    if (kept) memset(kept, 1, (size_t)n);
    Py_RETURN_NONE;
}
static PyObject *drop(PyObject *m, PyObject *unused) { free(kept); kept = NULL; Py_RETURN_NONE; }
static PyMethodDef methods[] = {{"grab", grab, METH_O, NULL},
                                {"drop", drop, METH_NOARGS, NULL}, {NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "lateext", NULL, -1, methods};
PyMODINIT_FUNC PyInit_lateext(void) { return PyModule_Create(&mod); }
"""


@pytest.fixture
def lateext_dir(tmp_path: Path, libpath: Path) -> Path:
    import sysconfig

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "lateext.c"
    src.write_text(EXT_C)
    out = tmp_path / ("lateext" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run([cc, "-shared", "-fPIC", "-O1", f"-I{include}", "-o", str(out), str(src)],
                   check=True)
    return tmp_path


@child_only
@pytest.mark.anyio
async def test_an_extension_imported_after_install_is_counted_at_once(
    lateext_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(lateext_dir))
    ext = importlib.import_module("lateext")  # the interpreter's dlopen: patched at once
    async with gotcha.limit(memory="1 GiB", exact_memory=True) as ctx:
        ext.grab(5 * MiB)
        held = ctx.memory().current  # type: ignore[union-attr]
        ext.drop()
    assert 5 * MiB <= ctx.used().bytes <= 5 * MiB + SLACK
    assert 5 * MiB <= held <= 5 * MiB + SLACK
    assert ctx.memory().current <= SLACK  # type: ignore[union-attr]


def _hog(lib: Any, keep: list[int]) -> None:
    for _ in range(1000):
        p = lib.grab(MiB)
        assert p  # a C library is never refused: NULL would be a MemoryError of its own
        keep.append(p)


@child_only
@pytest.mark.anyio
@pytest.mark.needs_frames
@pytest.mark.parametrize(("how", "where"), [("hard", "task"), ("ceiling", "task"),
                                            ("hard", "worker thread")])
async def test_a_hard_scope_stops_a_c_hog_between_bytecodes(
    lib: Any, how: str, where: str
) -> None:
    keep: list[int] = []
    kwargs: dict[str, Any] = {"hard": True} if how == "hard" else {"ceiling": 2}
    try:
        with pytest.raises(gotcha.LimitExceeded) as info:
            async with gotcha.limit(bytes=32 * MiB, **kwargs):
                if where == "task":
                    _hog(lib, keep)
                else:
                    await anyio.to_thread.run_sync(_hog, lib, keep)
    finally:
        for p in keep:
            lib.drop(p)
    assert info.value.resource == "bytes"
    assert 30 <= len(keep) < 200


@child_only
@pytest.mark.anyio
async def test_a_thread_that_exits_hands_its_log_over(libpath: Path) -> None:
    import contextvars
    import gc

    lib = load(libpath, gil=False)
    gotcha.install(native=True)
    async with gotcha.limit() as ctx:
        context = contextvars.copy_context()

    def in_scope() -> None:
        # one Python allocation under the scope sets the thread's target, then a block
        # without the GIL, and the thread ends in C's hands: nothing settles it there
        got.append(lib.grab(2 * MiB))

    got: list[int] = []
    before = ctx.used().bytes
    logs = _meter._debug.native_state()["logs"]
    for _ in range(20):
        thread = threading.Thread(target=context.run, args=(in_scope,))
        thread.start()
        thread.join()
    async with gotcha.limit() as other:  # a scope freed: exited threads' logs are taken in
        pass
    del other
    gc.collect()
    for p in got:
        lib.drop(p)
    # the exited scope's figures stay those of its exit (frozen); the logs of the 20
    # threads are gone with them, and nothing crashed on the way
    assert ctx.used().bytes == before
    assert _meter._debug.native_state()["logs"] <= logs + 1


CHURN_C = r"""
#include <stdlib.h>
void churn(long n, long size) {
    void *keep[16] = {0};
    for (long i = 0; i < n; i++) {
        free(keep[i & 15]);
        keep[i & 15] = malloc((size_t)(size + (i & 63)));
    }
    for (int j = 0; j < 16; j++) free(keep[j]);
}
"""


@pytest.fixture(scope="module")
def churn_lib(tmp_path_factory: pytest.TempPathFactory, libpath: Path) -> Any:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("churn")
    (tmp / "churn.c").write_text(CHURN_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(tmp / "libchurn.so"),
                    str(tmp / "churn.c")], check=True)
    libs = (ctypes.CDLL(str(tmp / "libchurn.so")), ctypes.PyDLL(str(tmp / "libchurn.so")))
    for lib in libs:
        lib.churn.argtypes = [ctypes.c_long, ctypes.c_long]
        lib.churn.restype = None
    gotcha.install(native=True)
    return libs


@child_only
@pytest.mark.anyio
async def test_many_threads_churning_with_and_without_the_gil_give_everything_back(
    churn_lib: Any,
) -> None:
    # blocks made and freed in every thread, with and without the GIL, in scopes that
    # hold memory exactly and by sample, scopes entered and left all the while
    results: list[tuple[int, int]] = []

    async def one(i: int) -> None:
        exact = i % 2 == 0
        async with gotcha.limit(memory="1 GiB", exact_memory=exact) as ctx:
            for round_ in range(5):
                lib = churn_lib[(i + round_) % 2]
                await anyio.to_thread.run_sync(lib.churn, 20_000, 64 + 512 * (i % 3))
        current, peak = ctx.memory()  # type: ignore[misc]
        results.append((current, peak))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    assert len(results) == 8
    for current, peak in results:
        assert current <= 64 * 1024, results
        assert peak < 64 * MiB, results


@child_only
@pytest.mark.anyio
async def test_a_soft_memory_limit_cancels_a_c_hog(lib: Any) -> None:
    keep: list[int] = []
    try:
        with pytest.raises(gotcha.LimitExceeded) as info:
            async with gotcha.limit(memory=16 * MiB):
                for _ in range(64):
                    keep.append(lib.grab(MiB))
                await anyio.lowlevel.checkpoint()
                pytest.fail("not cancelled")
    finally:
        for p in keep:
            lib.drop(p)
    assert info.value.resource == "memory"


SHUTDOWN = r"""
import asyncio, ctypes, sys, threading
import gotcha_async as gotcha
gotcha.install(native=True)
from lxml import etree
from PIL import Image
lib = ctypes.CDLL(sys.argv[1])
lib.grab.restype = ctypes.c_void_p
lib.grab.argtypes = [ctypes.c_size_t]
lib.drop.argtypes = [ctypes.c_void_p]
started = threading.Event()

def churn():
    # C work without the GIL, in a scope's context, while the interpreter shuts down
    started.set()
    while True:
        lib.drop(lib.grab(4096))

async def main():
    global kept
    async with gotcha.limit(memory="1 GiB") as ctx:
        kept = [etree.fromstring(b"<r>" + b"<i/>" * 1000 + b"</r>"), Image.new("L", (500, 500))]
        threading.Thread(target=churn, daemon=True).start()
        await asyncio.to_thread(started.wait)
    print("ok", ctx.used().bytes > 250_000)

asyncio.run(main())
"""


@child_only
def test_the_interpreter_shuts_down_while_c_libraries_allocate(
    libpath: Path, tmp_path: Path
) -> None:
    pytest.importorskip("lxml")
    pytest.importorskip("PIL")
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN)
    for _ in range(3):
        out = subprocess.run([sys.executable, str(script), str(libpath)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip() == "ok True"


# ---------------------------------------------------------------------------------------
# Real libraries


@child_only
@pytest.mark.anyio
async def test_pillow_image_new_is_its_pixels() -> None:
    Image = pytest.importorskip("PIL.Image")
    w, h = 2000, 1500
    async with gotcha.limit(memory="1 GiB", exact_memory=True) as ctx:
        im = Image.new("L", (w, h))
        held = ctx.memory().current  # type: ignore[union-attr]
    assert w * h <= ctx.used().bytes <= w * h + 64 * 1024
    assert w * h <= held <= w * h + 64 * 1024
    del im


@child_only
@pytest.mark.anyio
async def test_an_lxml_parse_is_charged_and_given_back() -> None:
    etree = pytest.importorskip("lxml.etree")
    doc = b"<r>" + b"".join(b"<i n='%d'>text %d</i>" % (i, i) for i in range(20000)) + b"</r>"
    async with gotcha.limit(memory="1 GiB", exact_memory=True) as ctx:
        tree = etree.fromstring(doc)
        held = ctx.memory().current  # type: ignore[union-attr]
        del tree
        after = ctx.memory().current  # type: ignore[union-attr]
    assert ctx.used().bytes > len(doc)
    assert held > len(doc)
    assert after < held / 20


@child_only
@pytest.mark.anyio
@pytest.mark.needs_frames
async def test_a_hard_scope_stops_a_pillow_hog() -> None:
    Image = pytest.importorskip("PIL.Image")
    keep: list[Any] = []
    with pytest.raises(gotcha.LimitExceeded) as info:
        async with gotcha.limit(bytes=64 * MiB, hard=True):
            for _ in range(1000):
                keep.append(Image.new("L", (1024, 1024)))
    assert info.value.resource == "bytes"
    assert len(keep) < 200


@child_only
@pytest.mark.anyio
async def test_a_soft_limit_stops_an_lxml_hog() -> None:
    etree = pytest.importorskip("lxml.etree")
    doc = b"<r>" + b"<i>x</i>" * 20000 + b"</r>"
    keep: list[Any] = []
    with pytest.raises(gotcha.LimitExceeded):
        async with gotcha.limit(memory=32 * MiB):
            for _ in range(1000):
                keep.append(etree.fromstring(doc))
                await anyio.lowlevel.checkpoint()
    assert len(keep) < 500


@child_only
@pytest.mark.anyio
@pytest.mark.needs_frames
async def test_the_middleware_answers_503_to_a_pillow_hog_and_serves_on() -> None:
    Image = pytest.importorskip("PIL.Image")
    httpx = pytest.importorskip("httpx")
    from gotcha_async.asgi import LimitMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        keep = []
        if scope["path"] == "/hog":
            for _ in range(1000):
                keep.append(Image.new("L", (1024, 1024)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % len(keep)})

    guarded = LimitMiddleware(app, memory=32 * MiB, native=True)
    transport = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        hog = await client.get("/hog")
        ok = await client.get("/")
    assert hog.status_code == 503
    assert ok.status_code == 200 and ok.text == "0"


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) starts again from the current one


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@child_only
@pytest.mark.needs_frames
def test_worker_threads_that_release_the_gil_after_allocating_are_stopped_soon() -> None:
    # Pillow makes a new image's block with the GIL and fills it without: the stop was
    # asked from inside that step, and from 3.13 the thread taking the GIL as it was let
    # go ran the queued call, put the stop back, and the worker asked again at its next
    # step only. Four such workers at once, ten rounds (40 stops, a 64 MiB ceiling): the
    # 90th percentile of how far past it each was stopped was 8.7 to 37.6 MiB on 3.13 and
    # 3.15, at most 78.7; now 0.5 to 1.0 (beside two busy processes too). 3.11 and 3.12
    # deliver a worker's interrupt when it next holds the GIL: 1.0 to 7.5 MiB
    image = pytest.importorskip("PIL.Image")
    gotcha.install(native=True)
    ceiling = 64 * MiB
    late: list[float] = []

    def hog(go: threading.Event) -> None:
        go.wait()
        with gotcha.move_on_limit(memory=ceiling, hard=True) as ctx:
            keep = []
            for _ in range(1000):
                keep.append(image.new("L", (1024, 1024)))  # 1 MiB of Pillow's malloc a step
        held = ctx.memory()
        assert ctx.exceeded() and held is not None
        late.append((held.peak - ceiling) / MiB)

    for _ in range(10):
        go = threading.Event()
        workers = [threading.Thread(target=hog, args=(go,)) for _ in range(4)]
        for w in workers:
            w.start()
        go.set()
        for w in workers:
            w.join()
    assert len(late) == 40, late
    late.sort()
    p90 = late[int(len(late) * 0.9)]
    bound = 4 if sys.version_info >= (3, 13) else 16
    assert 0 < late[0] and p90 < bound, [f"{x:.1f}" for x in late]


@child_only
@pytest.mark.parametrize("library", ["Pillow", "lxml"])
@pytest.mark.needs_frames
def test_a_real_server_answers_concurrent_c_hogs_503_and_stays_near_its_budget(
    library: str,
) -> None:
    # four requests at once, each growing a C library's memory in a worker thread (lxml's
    # parse without the GIL) by 1 MiB or more a step, 1 GiB if nothing stopped it: each is
    # stopped at its ceiling (twice 32 MiB by default), answered 503, and the process
    # grows by about what four ceilings allow, not by the 4 GiB asked for
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from asgi_server import serving

    from gotcha_async.asgi import LimitMiddleware

    if library == "Pillow":
        Image = pytest.importorskip("PIL.Image")

        def step() -> Any:
            return Image.new("L", (1024, 1024))  # 1 MiB of pixels, Pillow's own malloc
    else:
        etree = pytest.importorskip("lxml.etree")
        doc = b"<r>" + b"<i>x</i>" * 20_000 + b"</r>"

        def step() -> Any:
            return etree.fromstring(doc)  # about 1.7 MiB of libxml2 nodes

    def hog() -> int:
        keep = []
        for _ in range(1000):
            keep.append(step())
        return len(keep)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        n = await anyio.to_thread.run_sync(hog) if scope["path"] == "/hog" else 0
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % n})

    budget = 32 * MiB
    stops: list[int] = []  # what each hog held when it was stopped

    def on_exceeded(scope: Any, ctx: Any, exceeded: Any) -> None:
        stops.append(exceeded.used)

    with serving(LimitMiddleware(app, memory=budget, native=True,
                                 on_exceeded=on_exceeded)) as server:

        async def four_hogs() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                codes = [0] * 4

                async def one(i: int) -> None:
                    codes[i] = (await client.get("/hog")).status_code

                async with anyio.create_task_group() as tg:
                    for i in range(4):
                        tg.start_soon(one, i)
                return codes

        _peak_rss_reset()
        before = _peak_rss()
        codes = anyio.run(four_hogs)
        growth = _peak_rss() - before
        assert codes == [503] * 4
        assert httpx.get(f"{server.url}/").text == "0"
    # the process grows by what the four held when they were stopped, no more: their C
    # memory is charged, and freed with them
    assert len(stops) == 4 and min(stops) > 2 * budget, stops
    assert growth < sum(stops) + 128 * MiB, f"grew by {growth / MiB:.0f} MiB: {stops}"
    # each is stopped soon past its ceiling (twice 32 MiB): in 20 runs of this test (160
    # stops) at most 5.6 MiB past it on 3.13 and 3.15; 10.2 on 3.11 and 12.0 on 3.12 in
    # 15 (120), whose worker interrupts wait for the GIL. Before a stop put back asked
    # again at any block, not only a sampled one, up to 37 on 3.13 in 30 runs and 57
    # once in CI (see the test above)
    late = 32 * MiB
    assert max(stops) < 2 * budget + late, [f"{s / MiB:.1f} MiB" for s in stops]
