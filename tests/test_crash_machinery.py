"""Issue 31, the interpreter's own machinery around a scope (items 5, 6, 8, 9, 12).

Each test runs a program in a subprocess (tests/crash_scripts/) that fails on every way
a process can die or hang, then asserts on what the program saw.
"""

from __future__ import annotations

import pytest
from crash_scripts import run_script

# -- item 12: a signal handler during first use ---------------------------------------


@pytest.mark.parametrize("when", ["import", "install"])
def test_item12_signal_handler_uses_gotcha_during_first_use(when: str) -> None:
    # import: the names were loaded on first access, and the handler saw the half-made
    # module (AttributeError); install: the handler's scope waited on the lock the
    # code it interrupted held (a hang)
    r = run_script("signal_first_use.py", when, timeout=30).result
    assert r["fired"], r
    assert r["seen"] == ["ok True 100000"], r
    assert r["outer"] >= 200_000 and r["current_none"], r


# -- item 6: finalizers ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["del", "weakref", "gc", "map"])
def test_item06_finalizers_are_never_interrupted(mode: str) -> None:
    # a __del__ or weakref callback that allocated past a hard scope's ceiling got the
    # HardLimitError, printed as "Exception ignored" (150 to 180 in 30 scopes), and its
    # work was left undone; the body is still stopped, by its own allocations
    # (map: a function C calls that is no finalizer, the control: still interrupted,
    # as the body there allocates nothing else)
    r = run_script("finalizers.py", mode, "30").result
    assert r["lost"] == 0, r
    assert r["stopped"] == 30, r
    assert r["current_none"], r
    if mode != "map":
        assert r["done"] >= 30, r
