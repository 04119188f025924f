"""The allocator hook's life: installed on first use, kept through tracemalloc and fork.

Importing gotcha_async installs nothing, starts no thread and patches nothing: the first
scope that is entered does (:func:`ensure_installed`), once per process.
"""

from __future__ import annotations

import _thread
import contextlib
import contextvars
import dis
import functools
import opcode  # with the package: installing at shutdown can import nothing
import os
import sys
import threading
import tracemalloc
import warnings
from typing import TYPE_CHECKING, Any

from . import _foreign, _meter
from ._units import check_bool

if TYPE_CHECKING:
    from ._context import Context

# The innermost scope of the running task. Tasks and worker threads inherit it with
# the rest of their contextvars: that is what makes charges follow the work.
scope_var: contextvars.ContextVar[Context] = contextvars.ContextVar("gotcha_async.scope")

# Reentrant: a signal handler that enters a scope can run in the middle of the first
# installation, in the thread that holds the lock (a plain Lock hung there).
_lock = threading.RLock()
_installed = False
_done: set[str] = set()


class HardLimitError(MemoryError):
    """Raised into the code of a hard scope that went past its ceiling.

    A :class:`MemoryError`, so that code written to survive running out of memory
    survives this too. The scope raises :class:`~gotcha_async.LimitExceeded` (or, for
    :func:`~gotcha_async.move_on_limit`, swallows it) when it exits.
    """

    def __str__(self) -> str:
        return super().__str__() or "a hard gotcha limit was exceeded"


_find_spec = _foreign.find_spec


@functools.cache
def machinery_dirs() -> tuple[str, ...]:
    """Where the event loops, anyio and this package live.

    A hard limit refuses allocations and interrupts code only while user code runs: a
    MemoryError in the middle of asyncio's task step would break the loop for every
    task.
    """
    paths: list[str] = []
    for name in ("asyncio", "concurrent.futures", "logging", "anyio", "sniffio",
                 "trio", "outcome", "uvloop", "gotcha_async"):
        spec = _find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths.extend(os.path.join(p, "") for p in spec.submodule_search_locations)
    # the standard library's helpers the loops run through (an interrupt landing in
    # _weakrefset broke asyncio.run's shutdown), and what formats their debug stacks
    for name in ("threading", "selectors", "contextlib", "traceback", "linecache", "weakref",
                 "_weakrefset", "abc", "_collections_abc", "tokenize", "functools", "enum",
                 "socket", "ssl", "signal", "warnings", "queue", "heapq", "inspect",
                 "reprlib", "types", "typing", "copyreg", "importlib._bootstrap",
                 "importlib._bootstrap_external", "zipimport", "os", "posixpath",
                 "genericpath", "codecs", "io"):
        spec = _find_spec(name)
        if spec is not None and spec.origin == "frozen":
            # 3.15 freezes linecache; all versions freeze abc and the import system, whose
            # unmarshalling grows the interned-strings dict (3.13 crashed on a refusal there)
            paths.append(f"<frozen {name}>")
        elif spec is not None and spec.origin:
            paths.append(spec.origin)
    return tuple(paths)


UNCHECKED = (
    f"gotcha-async was not checked on CPython {sys.version.split()[0]}: hard limits and "
    "ceilings cannot stop code that never awaits here, and allocation sites are not "
    "recorded; soft limits, counting and cancellation work"
)


def _interrupt_opcodes() -> tuple[
    int, int, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]
]:
    """RESUME, EXTENDED_ARG and the backward jumps with their inline caches, as numbered
    by the running interpreter: the core reads a frame's bytecode to tell whether an
    interrupt raised there would be caught by the handler around it. Then the
    instructions a coroutine suspended in an await is at (1: a yield, 2: a resume,
    with their specialized and instrumented forms), to tell a throw passing through
    it from its own code."""
    # a list up to 3.12, a mapping after
    entries: Any = opcode._inline_cache_entries  # type: ignore[attr-defined]
    jumps = []
    for name, op in opcode.opmap.items():
        if "JUMP_BACKWARD" in name and not name.startswith("INSTRUMENTED"):
            caches = entries[op] if isinstance(entries, list) else entries.get(name, 0)
            jumps.append((op, caches))
    every: dict[str, int] = {}
    every.update(getattr(opcode, "_specialized_opmap", None) or {})  # 3.13 on
    every.update(getattr(dis, "_all_opmap", None) or {})  # 3.11, 3.12
    every.update(opcode.opmap)
    awaiting = tuple(
        (op, 1 if "YIELD_VALUE" in name else 2)
        for name, op in sorted(every.items())
        if name in ("YIELD_VALUE", "INSTRUMENTED_YIELD_VALUE")
        or (name.startswith(("RESUME", "INSTRUMENTED_RESUME")) and op < 256)
    )
    return opcode.opmap["RESUME"], opcode.opmap["EXTENDED_ARG"], tuple(jumps), awaiting


def _deliver(ctx: Context) -> None:
    # Called by the C core with the hook paused: from a pending call, at whatever
    # point the main thread had reached, or from the core's delivery thread.
    ctx._on_trip()


def _start_delivery() -> None:
    # Through _thread, not threading: the thread state is made here, under the GIL (see
    # deliver.c), and the thread is nobody's to join at exit.
    _thread.start_new_thread(_meter.delivery_loop, ())


def _after_fork() -> None:
    _meter.after_fork()
    _start_delivery()


def ensure_installed() -> None:
    """Install the hook and start the delivery thread, once per process.

    The whole can be retried: a KeyboardInterrupt between two steps leaves the next
    scope to finish the job. It can also be re-entered: a signal handler's scope may
    run it to the end in the middle of a first run, which then finds its steps done.
    """
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        if not _meter.installed():
            main = threading.main_thread().ident or threading.get_ident()
            dirs, places = machinery_dirs(), _foreign.dispatch_frames()
            try:
                _meter.install(scope_var, _deliver, dirs, places, main, HardLimitError)
            except RuntimeError:
                # a signal handler's scope installed it while this one was on its way
                if not _meter.installed():
                    raise
            # a build asked for with GOTCHA_UNCHECKED=1 (CI's) is not warned about
            # where the same variable is set when it runs
            if not _meter.checked() and not os.environ.get("GOTCHA_UNCHECKED"):
                warnings.warn(UNCHECKED, RuntimeWarning, stacklevel=2)
        if "opcodes" not in _done:
            _meter.set_opcodes(*_interrupt_opcodes())
            _done.add("opcodes")
        # each flag is set after its step: interrupted in between, a step runs twice on
        # the retry, which is harmless (a second delivery thread, a second fork handler)
        if "delivery" not in _done:
            try:
                _start_delivery()
                _done.add("delivery")
            except RuntimeError:
                # No thread at interpreter shutdown (PythonFinalizationError, a
                # RuntimeError: in a finalizer, or an atexit handler on some
                # versions), nor past the system's limit. Scopes work without it: the
                # main thread's pending calls deliver, to every thread; only a worker
                # thread's interrupt while the main thread is blocked in C waits.
                # Asked again by the next scope, unless the process is ending.
                if sys.is_finalizing():
                    _done.add("delivery")
        if "fork" not in _done and hasattr(os, "register_at_fork"):  # not on Windows
            os.register_at_fork(after_in_child=_after_fork)
            _done.add("fork")
        _keep_hook_through_tracemalloc_stop()
        # sys.meta_path is None at interpreter shutdown: nothing is imported any more
        if "numpy" not in _done and "numpy" not in sys.modules and sys.meta_path is not None:
            sys.meta_path.insert(0, _NumpyWatch())
            _done.add("numpy")
        _installed = True


class _NumpyWatch:
    """Counts numpy's arrays from the moment numpy is imported, inside a scope too.

    numpy's arrays are charged through a data handler of ours that each scope makes
    current in its context as it is entered, once numpy is in ``sys.modules``
    (numpy.c): without this, a scope during which numpy is imported for the first time
    (a handler that imports it lazily) would not count its arrays. The watch finds
    numpy's spec as the finders after it would, and wraps its loader for the one
    import: when numpy's ``__init__`` has run, the scope of the importing context gets
    the handler, and numpy keeps its own loader. Anything unexpected leaves the import
    to the other finders, untouched.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "numpy":
            return None
        try:
            rest = sys.meta_path[sys.meta_path.index(self) + 1:]
        except ValueError:
            return None
        for finder in rest:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AdoptingLoader(spec.loader, self)
        return spec


class _AdoptingLoader:
    """numpy's own loader, and the handler put in place once it has run."""

    def __init__(self, loader: Any, watch: _NumpyWatch) -> None:
        self.loader = loader
        self.watch = watch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self.watch)
        if scope_var.get(None) is not None:
            _meter.numpy_adopt()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _keep_hook_through_tracemalloc_stop() -> None:
    """Re-install the hook as soon as tracemalloc.stop() has removed it.

    tracemalloc.stop() puts back the allocator it found at start(): if the hook went in
    after that, it silently drops out of the chain. Wrapping the public function lets
    running scopes go on counting without a gap; a ``stop`` bound before this ran (or
    the C-level one) is caught at the next scope's entry, where the core probes the
    chain.
    """
    original: Any = tracemalloc.stop
    if getattr(original, "__gotcha_wrapped__", False):
        return

    @functools.wraps(original)
    def stop() -> None:
        try:
            original()
        finally:
            _meter.tracemalloc_stopped()

    stop.__gotcha_wrapped__ = True  # type: ignore[attr-defined]
    tracemalloc.stop = stop


def install(*, native: bool = False) -> None:
    """Install the allocator hook now, and with ``native=True`` count C libraries too.

    Scopes install the hook themselves when the first one is entered; call this once at
    start-up to do it earlier, or to count the memory of C libraries.

    ``native=True`` charges every loaded library's ``malloc``, ``calloc``, ``realloc``,
    ``free``, the aligned variants (``posix_memalign``, ``aligned_alloc``, ``memalign``,
    ``valloc``, ``pvalloc``), ``strdup`` and ``strndup`` to the scope of the thread that
    calls them, from then on, process-wide, and the same for libraries loaded later
    (imports, ``ctypes``, ``dlopen``). Nothing is counted twice: Python's own allocators
    and numpy's arrays are counted already, and the interpreter, libc and numpy's core
    are not patched. A C library is never refused memory: a scope past its limit is
    cancelled (soft) or stopped at the next bytecode boundary (a ceiling, ``hard=True``).
    The patching cannot be undone, and calling this again does nothing more.

    What stays invisible: threads that never ran Python inside a scope (a BLAS pool's
    workers), statically linked allocators, libc's own allocations outside these
    functions, and the freeing of a block by another thread while its allocation still
    waits, unsettled, in the log of a thread that has not held the GIL since.

    :param native: count C libraries' allocations too (Linux with glibc, on x86-64 or
        aarch64).
    :raises TypeError: ``native`` is not a bool.
    :raises NotImplementedError: ``native=True`` where it is not supported; nothing is
        changed then.
    """
    check_bool("native", native)
    if native and not _meter.native_supported():
        raise NotImplementedError(
            "gotcha.install(native=True) needs Linux with glibc on x86-64 or aarch64 "
            f"(this is {sys.platform}); nothing was changed"
        )
    ensure_installed()
    if native:
        with _lock:
            _meter.native_install()
