"""Crash regressions: lifetimes and bookkeeping (items 9, 12, 14 of the failure table in
docs/reliability.md)."""

from __future__ import annotations

import pytest
from crash_scripts import run_script

import gotcha_async as gotcha

# -- item 9: long parent= chains ------------------------------------------------------


def test_item09_dropping_a_long_chain_in_a_small_thread_stack() -> None:
    # recursive dealloc: a chain of ~5,000 overflowed a 1 MiB stack on 3.13
    r = run_script("parent_chain.py", "20000", "1024").result
    assert r["freed"] and r["root_used"] == 7, r


def test_item09_building_a_long_chain_is_not_quadratic() -> None:
    # each new link walked the whole chain (the cycle check): 150,000 took minutes
    r = run_script("parent_chain.py", "150000", "8192", timeout=60).result
    assert r["freed"] and r["root_used"] == 7, r
    assert r["build_s"] < 5, r


# -- item 12: tracemalloc stopped behind the wrapper's back ---------------------------


@pytest.mark.parametrize("how", ["early", "c"])
def test_item12_tracemalloc_stop_that_bypasses_the_wrapper(how: str) -> None:
    # the hook was dropped for good while the module believed it was in the chain: a
    # 50 MB bytearray passed a 1 MB hard scope, and every later scope counted 0
    r = run_script("tracemalloc_bypass.py", how).result
    results = r["results"]
    assert results[0::2] == ["LimitExceeded bytes"] * 3, results
    for later in results[1::2]:
        assert int(later.split()[1]) >= 100_000, results
    assert r["current_none"], r


# -- item 14: overflow, validation, thread ends, table inserts ------------------------


def test_item14_add_beyond_64_bits_is_not_masked() -> None:
    ctx = gotcha.Context(bytes=100)
    try:
        ctx.add(bytes=2**64 + 5)
    except (OverflowError, ValueError):
        assert ctx.used().bytes == 0  # refused whole, not in part
        return
    assert ctx.exceeded()
    assert ctx.used().bytes > 100  # saturated, not 5


def test_item14_counters_do_not_wrap() -> None:
    ctx = gotcha.Context(bytes=100)
    try:
        ctx.add(bytes=2**63)
        ctx.add(bytes=2**63)  # 2**64: wrapped to 0, after which exceeded() was False
    except (OverflowError, ValueError):
        pass
    assert ctx.exceeded()
    assert ctx.used().bytes >= 2**63


@pytest.mark.parametrize("value", ["yes", 1, 0.0, [True]])
def test_item14_track_memory_is_validated(value: object) -> None:
    with pytest.raises(TypeError, match="track_memory"):
        gotcha.Context(track_memory=value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="track_memory"):
        gotcha.limit(track_memory=value)  # type: ignore[arg-type]


def test_item14_a_thread_that_ends_inside_a_scope_does_not_keep_the_hook() -> None:
    r = run_script("thread_ends_inside.py").result
    assert r["before"] == [0, False], r
    assert r["after"] == [0, False], r  # nothing active, the hook out of the chain
    assert r["counted"] >= 1000, r
    assert r["big"] == 10 * gotcha.MiB, r
