"""Issue 31 item 12: a signal handler that uses gotcha while its first use is under way.

    signal_first_use.py import|install

The program imports gotcha_async, installs a SIGUSR1 handler that enters a scope, and
raises the signal in the middle of the program's first use of gotcha: the handler then
runs at a bytecode boundary of whatever that first use was doing. ``import``: at an
audit event of that first use (before, the package loaded its scope API lazily there,
and the handler saw the half-imported module: AttributeError, RecursionError on 3.11);
``install``: while the hook is being installed (the handler's scope waited on the
installer's lock, held by the very code it interrupted: a hang).
"""

from __future__ import annotations

import signal
import sys

from _common import report

import gotcha_async as gotcha

SEEN: list[str] = []
armed = False


def handler(signum: int, frame: object) -> None:
    try:
        assert gotcha.current() is None
        with gotcha.limit(bytes=10 * gotcha.MiB) as ctx:
            data = bytearray(100_000)
        SEEN.append(f"ok {ctx.used().bytes >= 100_000} {len(data)}")
    except BaseException as exc:
        SEEN.append(f"{type(exc).__name__}: {exc}"[:200])


def audit(event: str, args: tuple[object, ...]) -> None:
    global armed
    # not the import of the scope API itself (the module is not made yet), but the
    # first event after it: the modules that one imports, or what the first scope does
    if armed and not (event == "import" and args[0] == "gotcha_async._context"):
        armed = False
        signal.raise_signal(signal.SIGUSR1)


signal.signal(signal.SIGUSR1, handler)
if sys.argv[1] == "import":
    sys.addaudithook(audit)
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
report(seen=SEEN, fired=not armed, outer=outer.used().bytes,
       current_none=gotcha.current() is None)
