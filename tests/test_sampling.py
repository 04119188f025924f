"""Sampled held memory: unbiased, with the spread its documentation gives.

These are statistical tests with fixed seeds for the workload and many trials; the
sampler's own randomness is not seeded, so every run is a fresh draw. The bounds are
several standard errors wide: a correct sampler fails them far less than once in a
million runs, and a biased or mis-weighted one fails them every time.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from collections.abc import Callable

import pytest

import gotcha_async as gotcha
from gotcha_async._units import SAMPLES_AT_LIMIT, sampling_rate

KiB, MiB = gotcha.KiB, gotcha.MiB
LIMIT = 8 * MiB
RATE = sampling_rate(LIMIT, exact=False)
TRIALS = 200
SIZES = [random.Random(11).randrange(16, 2000) for _ in range(3000)]


def bytearrays() -> list[object]:
    return [bytearray(n) for n in SIZES]


def lists() -> list[object]:
    return [[None] * (n // 8) for n in SIZES]


# each workload, and the one block besides its object that each of its items allocates:
# a bytearray's buffer (n + 1 bytes) is a realloc, which takes the hook's realloc path;
# a list's items (8 bytes each) and the list are plain mallocs, the inline path
def buffer_size(n: int) -> int:
    return n + 1


def items_size(n: int) -> int:
    return n // 8 * 8


WORKLOADS: dict[str, tuple[Callable[[], list[object]], Callable[[int], int]]] = {
    "bytearray": (bytearrays, buffer_size),
    "list": (lists, items_size),
}


def hold(
    exact: bool, make: Callable[[], list[object]] = bytearrays, limit: int = LIMIT
) -> tuple[int, list[object]]:
    with gotcha.Context(memory=limit, exact_memory=exact) as ctx:
        kept = make()
    held = ctx.memory()
    assert held is not None
    return held.current, kept


def block_variance(s: int, rate: float) -> float:
    """A block is a Bernoulli draw with p = 1 - exp(-s/rate) and weight s/p."""
    p = -math.expm1(-s / rate)
    return s * s * (1 - p) / p


def sampling_sd(sizes: list[int], rate: int) -> float:
    """The standard deviation of the estimate at one rate throughout."""
    return math.sqrt(sum(block_variance(s, rate) for s in sizes))


def tiered_sd(sizes: list[int], limit: int) -> float:
    """The standard deviation of the estimate of a scope that allocates ``sizes`` in
    that order and keeps them: sampled at 4 times its rate while it holds less than a
    16th of its limit, at 4/5 of it after, blocks of the rate or more exactly (the
    scope switches on its estimate; the truth stands in for it)."""
    base = sampling_rate(limit, exact=False)
    var = 0.0
    held = 0
    for s in sizes:
        rate = 4 * base if held < limit // 16 else base - base // 5
        if s < rate:
            var += block_variance(s, rate)
        held += s
    return math.sqrt(var)


def test_the_rate_follows_the_limit() -> None:
    assert RATE == LIMIT // SAMPLES_AT_LIMIT == 8 * KiB
    assert sampling_rate(None, exact=False) == 16 * KiB
    assert sampling_rate(10, exact=False) == 256  # clamped
    assert sampling_rate(100 * 1024**3, exact=False) == MiB  # clamped
    assert sampling_rate(LIMIT, exact=True) == 0


@pytest.mark.parametrize("workload", WORKLOADS)
def test_estimates_are_unbiased_and_spread_as_documented(workload: str) -> None:
    make, block = WORKLOADS[workload]
    truth, kept = hold(exact=True, make=make)
    del kept
    # what each item allocates: its object and one block
    blocks = [block(n) for n in SIZES]
    objects = truth - sum(blocks)
    assert 0 < objects < 200 * len(SIZES)
    per_object = objects // len(SIZES)
    expected_sd = tiered_sd([size for b in blocks for size in (per_object, b)], LIMIT)
    errors = []
    for _ in range(TRIALS):
        estimate, kept = hold(exact=False, make=make)
        del kept
        errors.append(estimate - truth)
    mean = statistics.fmean(errors)
    sd = statistics.stdev(errors)
    # unbiased: the mean error is within 5 standard errors of 0
    assert abs(mean) < 5 * expected_sd / math.sqrt(TRIALS), (mean, expected_sd)
    # spread as the model says
    assert 0.75 * expected_sd < sd < 1.3 * expected_sd, (sd, expected_sd)
    # and no tail beyond it
    assert sum(abs(e) > 5 * expected_sd for e in errors) <= 1
    # under the documented bound at the limit: 1/sqrt(1024) of it, 3.1%
    assert expected_sd < LIMIT / math.sqrt(SAMPLES_AT_LIMIT)


def test_near_its_limit_a_scope_errs_by_the_documented_bound() -> None:
    # 80% of a 2 MiB limit in small blocks, past the 16th where the rate turns finer:
    # what the blocks sampled coarsely early on add is made up for by the finer rate,
    # and the error is what one rate throughout gives, 1/32 of the limit at the limit
    limit = 2 * MiB
    n = int(0.8 * limit / 1100)
    items = SIZES * (n // len(SIZES) + 1)

    def make() -> list[object]:
        return [bytearray(k) for k in items[:n]]

    truth, kept = hold(exact=True, make=make, limit=limit)
    del kept
    assert 0.7 * limit < truth < 0.9 * limit
    per_object = (truth - sum(k + 1 for k in items[:n])) // n
    expected_sd = tiered_sd([size for k in items[:n] for size in (per_object, k + 1)], limit)
    one_rate = sampling_sd([per_object + k + 1 for k in items[:n]],
                           sampling_rate(limit, exact=False))
    assert 0.95 < expected_sd / one_rate < 1.1  # the same error as at one rate
    assert expected_sd < limit / math.sqrt(SAMPLES_AT_LIMIT)
    errors = []
    for _ in range(TRIALS):
        estimate, kept = hold(exact=False, make=make, limit=limit)
        del kept
        errors.append(estimate - truth)
    assert abs(statistics.fmean(errors)) < 5 * expected_sd / math.sqrt(TRIALS)
    # a sampler that stayed at the coarse rate would spread twice as wide
    assert 0.75 * expected_sd < statistics.stdev(errors) < 1.3 * expected_sd


@pytest.mark.needs_frames  # counted through allocation sites
def test_far_below_its_limit_a_scope_takes_a_quarter_of_the_samples() -> None:
    # 1 MB of small blocks under a 64 MiB limit: the estimate would have to be six
    # standard errors off to reach a 16th of the limit, where the rate turns finer
    limit = 64 * MiB
    base = sampling_rate(limit, exact=False)

    def make() -> list[object]:
        return [bytearray(n) for n in SIZES[:1000]]

    truth, kept = hold(exact=True, make=make, limit=limit)
    del kept
    assert truth + 6 * math.sqrt(4 * base * truth) < limit // 16

    def samples() -> int:
        with gotcha.Context(memory=limit) as ctx:
            kept = make()
            count = sum(stat.count for stat in ctx.allocation_sites(None))
        del kept
        return count

    counts = [samples() for _ in range(TRIALS)]
    # every block is far below the rate: one sample per rate's worth of bytes, a
    # count whose variance is at most its mean
    expected = truth / (4 * base)
    assert abs(statistics.fmean(counts) - expected) < 5 * math.sqrt(expected / TRIALS)
    assert statistics.fmean(counts) < truth / base / 2   # not the base rate's


def test_a_grown_block_is_a_fresh_draw_and_freed_leaves_nothing_held() -> None:
    # Growing a bytearray reallocates its buffer: the old block, if it was sampled, is
    # forgotten, and the new one is sampled as a malloc of its size would be.
    def grow(exact: bool) -> tuple[int, int]:
        with gotcha.Context(memory=LIMIT, exact_memory=exact) as ctx:
            kept = [bytearray(n) for n in SIZES]
            for b in kept:
                b.extend(b"x" * 64)
            grown = ctx.memory()
            del kept, b
            freed = ctx.memory()
        assert grown is not None and freed is not None
        return grown.current, freed.current

    truth, left = grow(exact=True)
    assert left == 0
    # the grown buffers' sizes are the allocator's business: 8 standard errors of a
    # block of the mean size
    sd = tiered_sd([truth // len(SIZES)] * len(SIZES), LIMIT)
    for _ in range(20):
        estimate, left = grow(exact=False)
        assert abs(estimate - truth) < 8 * sd, (estimate, truth, sd)
        assert left == 0  # every sampled block, old or grown, was credited back


def test_blocks_of_the_rate_or_more_are_recorded_exactly() -> None:
    # a scope samples at 4 times its base rate at most: a block of that size or more is
    # held at its exact size, so that freeing it credits exactly that (a sampled one
    # would credit nothing or its weight); the reads in between are not charged
    header = sys.getsizeof(b"")
    with gotcha.Context(memory=LIMIT) as ctx:
        for size in (4 * RATE, 8 * RATE, 100 * RATE):
            for _ in range(10):
                block = bytes(size)
                before = ctx.memory().current  # type: ignore[union-attr]
                del block
                after = ctx.memory().current  # type: ignore[union-attr]
                assert before - after == size + header, (size, before - after)


def false_stops(fraction: float, trials: int) -> int:
    limit = 2 * MiB
    with gotcha.Context(memory=limit, exact_memory=True) as ctx:
        kept = [bytearray(540) for _ in range(1000)]
    per_block = ctx.memory().current / 1000  # type: ignore[union-attr]
    del kept
    n = int(fraction * limit / per_block)  # held exactly: that fraction of the limit
    trips = 0
    for _ in range(trials):
        with gotcha.move_on_limit(memory=limit) as ctx:
            kept = [bytearray(540) for _ in range(n)]
        trips += ctx.exceeded()
        del kept
    return trips


def test_false_stops_below_the_limit_are_as_rare_as_documented() -> None:
    # documented: about 1 in 10,000 at 90% of the limit, none seen at 80%; the bounds
    # here fail with a probability below 1e-4 for a sampler that meets them
    assert false_stops(0.8, 100) == 0
    assert false_stops(0.9, 100) <= 3


def test_exact_mode_is_exact() -> None:
    first, kept_a = hold(exact=True)
    second, kept_b = hold(exact=True)
    assert first == second
    del kept_a, kept_b
