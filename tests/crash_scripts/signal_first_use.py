"""Item 31/12: a signal handler that uses gotcha while its first use is under way.

    signal_first_use.py import|install

The program imports gotcha_async, installs a SIGUSR1 handler that enters a scope, and
raises the signal in the middle of the program's first use of gotcha: the handler then
runs at a bytecode boundary of whatever that first use was doing. ``import``: at the
first import made by that first use (before, the package loaded its scope API lazily
there, and the handler saw the half-imported module: AttributeError, RecursionError on
3.11; now the first use imports nothing, and the signal never comes);
``install``: while the hook is being installed (the handler's scope waited on the
installer's lock, held by the very code it interrupted: a hang).
"""

from __future__ import annotations

import signal
import sys

from _common import report

import gotcha_async as gotcha

SEEN: list[str] = []
IMPORTS: list[str] = []
armed = False


def handler(signum: int, frame: object) -> None:
    try:
        assert gotcha.current() is None
        with gotcha.limit(bytes=10 * gotcha.MiB) as ctx:
            data = bytearray(100_000)
        SEEN.append(f"ok {ctx.used().bytes >= 100_000} {len(data)}")
    except BaseException as exc:
        SEEN.append(f"{type(exc).__name__}: {exc}"[:200])


class Finder:
    """First on sys.meta_path: sees every import, finds nothing itself."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        global armed
        IMPORTS.append(name)
        # not the scope API's own module (not made yet), but what it imports
        if armed and name != "gotcha_async._context":
            armed = False
            signal.raise_signal(signal.SIGUSR1)


signal.signal(signal.SIGUSR1, handler)
if sys.argv[1] == "import":
    # (not an audit hook: those run as tools do, with the thread's tracing flag set)
    sys.meta_path.insert(0, Finder)  # type: ignore[arg-type,unused-ignore]
else:
    from gotcha_async import _hook

    # the point is chosen by wrapping a step the installer calls; not cached yet
    dirs = _hook.machinery_dirs

    def machinery_dirs() -> tuple[str, ...]:
        global armed
        if armed:
            armed = False
            signal.raise_signal(signal.SIGUSR1)
        return dirs()

    _hook.machinery_dirs = machinery_dirs  # type: ignore[assignment]
armed = True
with gotcha.limit(bytes=10 * gotcha.MiB) as outer:
    kept = bytearray(200_000)
report(seen=SEEN, fired=not armed, imports=IMPORTS, outer=outer.used().bytes,
       current_none=gotcha.current() is None)
