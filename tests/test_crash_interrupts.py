"""Crash regressions: KeyboardInterrupt in a scope's enter and exit and in delivery, and
interrupts aimed at a thread (items 10, 11, 31/3, 31/4, 31/7 and 31/11 of the failure table
in docs/reliability.md).

Two ways to inject: deterministically, an opcode tracer raises KeyboardInterrupt at
every instruction the package executes during one enter/exit (interrupt_points.py);
and with real signals, a timer whose handler raises KeyboardInterrupt while scopes
keep tripping (interrupt_storm.py).
"""

from __future__ import annotations

import sys

import pytest
from crash_scripts import run_script


@pytest.mark.timeout(400)  # above the script's own 300 s, which reports first
@pytest.mark.parametrize("hard", ["soft", "hard"])
@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_item10_keyboardinterrupt_at_every_instruction_of_enter_and_exit(
    mode: str, hard: str
) -> None:
    # an interrupt between setting the scope and returning from __enter__, or at the
    # start of __exit__, left the scope entered for good (and a dead hard scope then
    # refused code outside any scope)
    r = run_script("interrupt_points.py", mode, hard, timeout=300).result
    assert r["points"] > 0, r  # the tracer did reach the package's code
    assert r["nbad"] == 0, r["bad"]
    assert r["current_none"] and r["active"] == 0, r


@pytest.mark.timeout(400)  # above the script's own 300 s, which reports first
@pytest.mark.parametrize("handler", ["python", "c"])
@pytest.mark.parametrize("hard", ["soft", "hard"])
def test_item10_item11_keyboardinterrupts_from_a_timer_are_never_lost(
    hard: str, handler: str
) -> None:
    # 4 to 10% of the interrupts landed in the delivery callback and were printed as
    # "Exception ignored" and dropped; about one in five landing in enter/exit left
    # the scope entered. A Python-level handler (asyncio.run's and trio's SIGINT
    # handlers are) must not be hit by a hard scope's interrupt either: that one
    # swallowed by the body's except MemoryError, CPython re-arms the signal, and
    # the next try is hit again, for as long as scopes keep tripping ("stuck")
    out = run_script("interrupt_storm.py", "300", hard, handler, timeout=300)
    r = out.result
    assert r["fired"] == 300, r
    assert r["escaped"] == 0, r  # each one is raised where the code was when it came
    assert r["stuck"] == 0, r  # every handler got to run
    assert r["lost"] == 0, r  # Ctrl-C always reaches the program
    assert "Exception ignored" not in out.stderr, out.stderr[-3000:]
    if r["cpython_with_leaks"] == 0:
        assert r["dead"] == 0, r  # no scope left entered by an interrupt
    # else CPython itself lets an interrupt in between a C __enter__ and the with
    # block (3.14.10: a threading.Lock is left held): no __enter__ can close that
    assert r["refused_outside"] == 0, r
    assert r["active"] == 0, r


# -- items 31/3, 31/4, 31/7, 31/11: an interrupt lands only in the frame that asked ----


@pytest.mark.parametrize(
    # while_if: 10 s of races; `while`, the same check on the other loop shape, is fast
    "kind", ["while", pytest.param("while_if", marks=pytest.mark.slow)]
)
@pytest.mark.needs_frames
def test_issue31_item3_item4_thread_interrupts_land_where_they_were_aimed(kind: str) -> None:
    # 3.13: the eval breaker reads its bits before it drops the GIL, so an async
    # exception set meanwhile was raised at the thread's next check: in the package's
    # own __exit__ (it escaped move_on_limit: 1 in 320 bodies, in 2 runs of 4), or at a
    # `while cond:` loop's closing jump, outside the exception table, past the body's
    # except (1 or 2 in 320 in 6 runs of 8). A loop whose body ends in an `if` has a
    # second closing jump outside the table on 3.13 and 3.14: 192 and 250 of 320 skipped
    # the except. Races: several runs of 320
    for _ in range(5 if kind == "while" else 2):
        r = run_script("interrupt_aim.py", "threads", "8", "40", kind, timeout=180).result
        assert r["escaped"] == 0, r
        assert r["skipped"] == 0, r
        assert r["killed"] == 0, r
        assert r["caught"] == 320, r
        assert r["active"] == 0, r


@pytest.mark.needs_frames
def test_issue31_item7_trio_run_inside_a_hard_scope() -> None:
    # the frame that asked was known by its address alone: the interrupt landed in the
    # next call at the same depth inside trio's run loop (TrioInternalError 20 of 20 on
    # 3.11), and on 3.13 in an attrs __init__ of trio's, whose caller looked like user
    # code (3.13 runs __init__ on top of a shim frame whose file is "__init__")
    r = run_script("interrupt_aim.py", "trio", "20", timeout=180).result
    assert r["outcomes"] == {"caught": 20}, r
    assert r["active"] == 0, r


@pytest.mark.needs_frames
def test_issue31_item11_finalizers_collected_inside_a_breached_scope() -> None:
    # 3.12 hung: an interrupt raised at the jump from `except MemoryError: pass` back to
    # the end of the try was caught by that try again (3.12 unwinds a backward jump
    # from the instruction before its target), and making the exception asked for the
    # next interrupt
    r = run_script("interrupt_aim.py", "gc_del", "5", timeout=120).result
    assert r["caught"] == 5, r
    assert r["active"] == 0, r


@pytest.mark.parametrize("mode", ["future", "pytask", "uvloop", "callback", "trio_token"])
@pytest.mark.needs_frames
def test_issue31_item11_code_a_loop_calls_outside_a_coroutine_is_never_stopped(
    mode: str,
) -> None:
    # a hang on every version (found by scripts/fault_inject.py, test_asyncio.test_tasks
    # seed 3, on 3.14 and 3.15): the interrupt landed in a Future subclass's
    # add_done_callback, which a task's step calls after its coroutine yielded; asyncio
    # handed it to the loop's exception handler and never woke the task (future: C
    # tasks; pytask: asyncio's Python Task; uvloop: the same hang there). A call_soon
    # callback's stop was only logged (30 of 30 lost); trio's run_sync_soon callbacks
    # run outside the scope (the control)
    if mode == "uvloop":
        pytest.importorskip("uvloop")
    r = run_script("loop_callouts.py", mode, "30", timeout=180).result
    assert r["hung"] == 0 and r["lost"] == 0, r
    assert r["stopped"] == 30, r
    assert r["done"] >= 30 and r["current_none"], r


@pytest.mark.needs_frames
def test_issue31_item4_loops_with_one_check_are_stopped_or_left_whole() -> None:
    # 3.13: an interrupt at a `while` loop's closing jump (outside the exception table)
    # went past the body's try and the scope's `with` in the same frame, and the
    # program died. A loop that calls a function (which returns before any check) is
    # interrupted at that function's entry, as if at the call; a loop with no call has
    # no other check, and on 3.13 runs to its end rather than be interrupted where its
    # handler is skipped (3.14 covers that jump; it leaves out the one of a body that
    # ends in an `if`)
    r = run_script("interrupt_aim.py", "loops", timeout=120).result
    assert r["outcomes"]["call"] == ["caught", "caught"], r
    holes = sys.version_info[:2] == (3, 13)
    assert r["outcomes"]["callfree"] == (["finished"] * 2 if holes else ["caught"] * 2), r
    assert r["active"] == 0, r
