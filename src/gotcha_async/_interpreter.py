"""The package loads in the main interpreter only (importing this module checks)."""

from __future__ import annotations


def _refuse_subinterpreters() -> None:
    # The allocator hook is process-wide and guarded by the main interpreter's GIL: the
    # package refuses to load anywhere else, before any of it is set up (the C module
    # refuses too, at the top of its init, for code that loads it directly).
    try:
        import _interpreters as interpreters  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            import _xxsubinterpreters as interpreters  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            return
    if interpreters.get_current() != interpreters.get_main():
        raise ImportError(
            "gotcha_async can only be imported in the main interpreter: its allocator hook "
            "is process-wide"
        )


_refuse_subinterpreters()
