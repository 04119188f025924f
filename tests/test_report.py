"""What an operator reads: human sizes, the per-route summary and its suggested budgets."""

from __future__ import annotations

import ast
import random
import sys
from bisect import bisect_right
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gotcha_async as gotcha
from gotcha_async._report import (
    _LOWS,
    NO_ROUTE,
    OTHER,
    Figure,
    Summary,
    budget_size,
    hook_arity,
    human_size,
    quoted,
    suggest,
    used_of_limit,
)
from gotcha_async._units import parse_size


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
     (8_808_038, "8.4 MiB"), (3 * gotcha.GiB, "3 GiB")],
)
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


def test_used_of_limit_in_human_units() -> None:
    assert used_of_limit("bytes", 8_808_038, 8 * gotcha.MiB) == "8.4 MiB of 8 MiB"
    assert used_of_limit("objects", 1750, 1000) == "1,750 objects of 1,000"
    assert used_of_limit("calls", 12, 10) == "12 allocator calls of 10"


def test_used_never_looks_like_the_limit() -> None:
    limit = 8 * gotcha.MiB
    assert used_of_limit("memory", limit + 2 * gotcha.KiB, limit) == "8.002 MiB of 8 MiB"
    assert used_of_limit("bytes", limit + 10, limit) == "8,388,618 B of 8,388,608 B"


@pytest.mark.parametrize("n", [5, 1024, 1_310_720, 655_360, 939_524_096, 8_808_038])
def test_budget_size_reads_back_exactly(n: int) -> None:
    assert gotcha.parse_size(budget_size(n)) == n


def test_suggested_budget_rule() -> None:
    # twice the p99 wins: 2 x 3 MiB = 6 MiB = 1.5 x 4 MiB
    assert suggest(Figure(median=gotcha.MiB, p99=3 * gotcha.MiB, max=4 * gotcha.MiB)) == (
        6 * gotcha.MiB
    )
    # 1.25 x the max wins: 12.5 MiB, rounded up to 14 MiB (1.75 x 8 MiB)
    assert suggest(Figure(median=gotcha.MiB, p99=gotcha.MiB, max=10 * gotcha.MiB)) == (
        14 * gotcha.MiB
    )
    assert suggest(Figure(0, 0, 0)) == 1


def test_quantiles_are_within_nine_percent() -> None:
    rng = random.Random(13)
    values = [int(rng.lognormvariate(12, 1.5)) for _ in range(20_000)]
    summary = Summary()
    for v in values:
        summary.add("GET", "/x", v, v // 2, False)
    [row] = summary.rows()
    ordered = sorted(values)
    exact_median = ordered[len(ordered) // 2]
    exact_p99 = ordered[int(len(ordered) * 0.99)]
    assert exact_median <= row.bytes.median <= exact_median * 1.09 + 1
    assert exact_p99 <= row.bytes.p99 <= exact_p99 * 1.09 + 1
    assert row.bytes.max == max(values)
    assert row.memory is not None and row.memory.max == max(values) // 2
    assert row.count == 20_000


# runs of repeated values, as a route's requests often are, and values on and around
# the bucket bounds, where the remembered bucket must give way to a bisection
_AROUND_BOUNDS = st.sampled_from(_LOWS).flatmap(lambda low: st.integers(low - 1, low + 1))


@given(st.lists(st.tuples(st.one_of(_AROUND_BOUNDS, st.integers(-5, 2**70)),
                          st.integers(1, 4)), max_size=60))
def test_each_value_lands_in_its_bucket_whatever_came_before(
    runs: list[tuple[int, int]],
) -> None:
    summary = Summary()
    expected = [0] * (len(_LOWS) + 1)
    for value, repeat in runs:
        for _ in range(repeat):
            summary.add("GET", "/x", value, value, False)
            expected[bisect_right(_LOWS, value) if value > 0 else 0] += 1
    if not runs:
        return
    stats = summary._routes[("GET", "/x")]
    assert list(stats.bytes.counts) == expected
    assert stats.memory is not None and list(stats.memory.counts) == expected


def test_summary_keeps_a_fixed_number_of_routes() -> None:
    summary = Summary(max_routes=3)
    for i in range(1000):
        summary.add("GET", f"/users/{i}", 100, None, i % 2 == 0)
    rows = summary.rows()
    assert [r.route for r in rows] == [OTHER, "/users/0", "/users/1", "/users/2"]
    assert (rows[0].count, rows[0].exceeded) == (997, 498)
    assert sys.getsizeof(summary._routes) < 1024  # four rows, whatever the traffic


def test_summary_text_says_how_budgets_are_derived() -> None:
    summary = Summary()
    assert summary.text() == "per-route allocation summary: no request was measured"
    for _ in range(200):
        summary.add("POST", "/upload", 3 * gotcha.MiB, None, False)
    text = summary.text().splitlines()
    assert "2 x p99 and 1.25 x max" in text[0]
    assert text[1] == (
        '  "POST /upload": {"bytes": "6 MiB"},  # 200 requests, 0 over the limit; '
        "bytes median 3 MiB, p99 3 MiB, max 3 MiB"
    )


def test_summary_lines_paste_into_routes_and_read_well() -> None:
    summary = Summary()
    summary.add("GET", "/items/{item_id}", 3 * gotcha.MiB, 2 * gotcha.MiB, False)
    summary.add("GET", NO_ROUTE, 1000, None, False)
    summary.add("GET", NO_ROUTE, 1000, None, False)
    _, unrouted, routed = summary.text().splitlines()  # the most requested first
    # as pasted between the braces of routes={...}: a valid entry, the limits parse
    pasted = ast.literal_eval("{\n" + routed + "\n}")
    assert pasted == {"GET /items/{item_id}": {"bytes": "6 MiB", "memory": "4 MiB"}}
    assert parse_size(pasted["GET /items/{item_id}"]["bytes"]) == 6 * gotcha.MiB
    assert "# 1 request, 0 over the limit;" in routed
    # the requests that match no route: one row, a comment (no key to paste)
    assert unrouted.startswith("  # GET (no route): 2 requests, 0 over the limit;")
    assert ast.literal_eval("{\n" + unrouted + "\n" + routed + "\n}") == pasted


def test_quoted_is_a_python_string_literal() -> None:
    for text in ('GET /a"b', "GET /a\\b", "GET /{x}"):
        assert ast.literal_eval(quoted(text)) == text


def test_hook_arity() -> None:
    def two(scope: Any, ctx: Any) -> None: ...
    def three(scope: Any, ctx: Any, exceeded: Any) -> None: ...
    def star(*args: Any) -> None: ...

    assert (hook_arity(two), hook_arity(three), hook_arity(star)) == (2, 3, 3)
