"""The low-level subinterpreter API of each version, reduced to what the scripts use."""

from __future__ import annotations

from typing import Any

try:
    import _interpreters as _api  # type: ignore[import-not-found,unused-ignore]  # 3.13+

    NEW_API = True
except ImportError:
    import _xxsubinterpreters as _api  # type: ignore[import-not-found,no-redef,unused-ignore]  # 3.11, 3.12

    NEW_API = False


def create_isolated() -> Any:
    """An isolated interpreter: its own GIL on 3.12+, no single-phase extensions."""
    if NEW_API:
        return _api.create("isolated")
    return _api.create(isolated=True)


def run(interp: Any, code: str) -> str | None:
    """Run code there; None if it ran, else the error's text."""
    if NEW_API:
        failure = _api.run_string(interp, code)
        return None if failure is None else str(failure.formatted)
    try:
        _api.run_string(interp, code)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def destroy(interp: Any) -> None:
    _api.destroy(interp)
