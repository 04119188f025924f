"""Core benchmarks: what gotcha costs, as ratios measured side by side in one run.

    python bench/bench_core.py            # the full table (about a minute)
    python bench/bench_core.py --quick    # fewer repeats

Each variant runs interleaved with its baseline, several times; the table shows the
median of the per-round ratios, so a burst of noise on this shared machine hits
both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol

import anyio

import gotcha_async as gotcha
from gotcha_async import _meter

BODY = json.dumps([{"id": i, "name": f"item-{i}", "price": i * 1.5} for i in range(50)])


async def handler(body: str) -> str:
    """The JSON request handler of DESIGN §5."""
    items = json.loads(body)
    total = sum(item["price"] for item in items)
    names = [item["name"].upper() for item in items]
    await asyncio.sleep(0)
    return json.dumps({"total": total, "names": names})


class CancelScopeOnly:
    """An anyio.CancelScope() per request, nothing else: the floor under limit()."""

    async def __aenter__(self) -> None:
        self.scope = anyio.CancelScope()
        self.scope.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self.scope.__exit__(exc_type, exc, tb))


class BackendScopeOnly:
    """anyio's asyncio cancel scope class itself per request: what limit() creates inside.

    anyio.CancelScope() looks the backend up on every call; limit() keeps the class.
    """

    async def __aenter__(self) -> None:
        from anyio._backends._asyncio import CancelScope  # private: the class limit() uses

        self.scope = CancelScope()
        self.scope.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self.scope.__exit__(exc_type, exc, tb))


class AsyncScope(Protocol):
    """What a request is wrapped in: a Context, or one of the classes above."""

    def __aenter__(self) -> Awaitable[object]: ...

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> Awaitable[bool | None]: ...


ScopeFactory = Callable[[], AsyncScope]


async def handler_in(scope_factory: ScopeFactory, body: str) -> str:
    async with scope_factory():
        return await handler(body)


async def serve(rounds: int, concurrency: int, wrap: ScopeFactory | None) -> None:
    for _ in range(rounds):
        if wrap is None:
            await asyncio.gather(*(handler(BODY) for _ in range(concurrency)))
        else:
            await asyncio.gather(*(handler_in(wrap, BODY) for _ in range(concurrency)))


def time_workload(
    wrap: ScopeFactory | None,
    rounds: int = 20,
    concurrency: int = 500,
    setup: Callable[[], object] | None = None,
    teardown: Callable[[], object] | None = None,
) -> float:
    gc.collect()
    # Every run starts from an idle hook: a run that left scopes entered or held blocks
    # tracked would slow the next one down and skew the ratios of all that follow.
    if _meter.active() or _meter.held_blocks():
        raise RuntimeError(
            f"not idle before a run: {_meter.active()} scopes active, "
            f"{_meter.held_blocks()} held blocks"
        )
    if setup:
        setup()
    try:
        t = time.perf_counter()
        asyncio.run(serve(rounds, concurrency, wrap))
        return time.perf_counter() - t
    finally:
        if teardown:
            teardown()


def tm_start() -> None:
    tracemalloc.start(1)


def side_by_side(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median over rounds of each variant's time / the first variant's time."""
    names = list(variants)
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for _ in range(repeats):
        times = {n: variants[n]() for n in names}
        for n in names[1:]:
            ratios[n].append(times[n] / times[names[0]])
    return {n: statistics.median(r) for n, r in ratios.items()}


# -- scope enter+exit --------------------------------------------------------------

N_SCOPES = 20_000


async def cancel_scopes() -> float:
    t = time.perf_counter()
    for _ in range(N_SCOPES):
        with anyio.CancelScope():
            pass
    return time.perf_counter() - t


async def limit_scopes() -> float:
    t = time.perf_counter()
    for _ in range(N_SCOPES):
        async with gotcha.limit():
            pass
    return time.perf_counter() - t


async def limited_scopes() -> float:
    t = time.perf_counter()
    for _ in range(N_SCOPES):
        async with gotcha.limit(bytes=gotcha.MiB, objects=10_000, calls=10_000):
            pass
    return time.perf_counter() - t


def scope_costs(backend: str, repeats: int) -> tuple[float, float, float, float]:
    async def measure() -> tuple[float, float, float, float]:
        await cancel_scopes()  # warm up
        base: list[float] = []
        plain: list[float] = []
        limited: list[float] = []
        for _ in range(repeats):
            base.append(await cancel_scopes())
            plain.append(await limit_scopes())
            limited.append(await limited_scopes())
        ratios = [p / b for p, b in zip(plain, base, strict=True)]
        ratios_l = [p / b for p, b in zip(limited, base, strict=True)]
        us = statistics.median(base) / N_SCOPES * 1e6
        return us, statistics.median(plain) / N_SCOPES * 1e6, statistics.median(ratios), \
            statistics.median(ratios_l)

    return anyio.run(measure, backend=backend)


# -- allocation loop with the hook in, no scope active --------------------------------

def alloc_loop(n: int = 1_000_000) -> float:
    t = time.perf_counter()
    keep = []
    for i in range(n):
        keep.append((i, i + 1))  # a million small objects
        if len(keep) > 1000:
            keep.clear()
    return time.perf_counter() - t


def hooked_vs_bare(repeats: int, in_chain: bool) -> float:
    """The loop with gotcha imported and no scope active, against the hook taken out.

    in_chain=False is the real idle state: the last scope's exit took the hook out
    of the allocator chain. in_chain=True forces it in (as when held blocks are still
    tracked), to show what the short-circuited hook itself costs.
    """
    ratios = []
    alloc_loop(100_000)
    for _ in range(repeats):
        _meter.set_hooked(False)
        gc.collect()
        bare = alloc_loop()
        if in_chain:
            _meter.set_hooked(True)
        else:
            with gotcha.Context():
                pass
        gc.collect()
        ours = alloc_loop()
        ratios.append(ours / bare)
    _meter.set_hooked(False)
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7

    rows: list[tuple[str, float, str]] = []
    handler_ratios = side_by_side(
        {
            "bare": lambda: time_workload(None),
            "limit()": lambda: time_workload(gotcha.limit),
            "limit(bytes, objects, calls)": lambda: time_workload(
                lambda: gotcha.limit(bytes=gotcha.MiB, objects=100_000, calls=100_000)
            ),
            "anyio.CancelScope() alone": lambda: time_workload(CancelScopeOnly),
            "anyio's asyncio CancelScope class alone": lambda: time_workload(BackendScopeOnly),
            "limit(bytes, objects, calls, hard=True)": lambda: time_workload(
                lambda: gotcha.limit(bytes=gotcha.MiB, objects=100_000, calls=100_000,
                                     hard=True)
            ),
            "limit(memory=1 MiB)": lambda: time_workload(
                lambda: gotcha.limit(memory=gotcha.MiB)
            ),
            "tracemalloc.start(1) alone": lambda: time_workload(
                None, setup=tm_start, teardown=tracemalloc.stop
            ),
        },
        repeats,
    )
    goals = {
        "limit()": "<= 1.15",
        "limit(bytes, objects, calls)": "<= 1.15",
        "limit(bytes, objects, calls, hard=True)": "soft + 0.02",
        "limit(memory=1 MiB)": "<= 1.3",
    }
    for name, ratio in handler_ratios.items():
        if name in goals:
            rows.append((f"JSON handler, every request in {name}", ratio, goals[name]))
        elif name.startswith("anyio"):
            rows.append((f"JSON handler, every request in {name}", ratio, "(reference)"))
        else:
            rows.append((f"JSON handler, {name}", ratio, "(reference)"))
    for backend in ("asyncio", "trio"):
        base_us, ours_us, ratio, ratio_l = scope_costs(backend, repeats)
        rows.append((f"limit() enter+exit vs anyio.CancelScope() [{backend}: "
                     f"{ours_us:.2f} us vs {base_us:.2f} us]", ratio, "<= 1.5"))
        rows.append((f"limit(bytes, objects, calls) enter+exit vs CancelScope() [{backend}]",
                     ratio_l, "<= 1.5"))
    rows.append(("1M small objects, no scope active (hook steps aside) vs no gotcha",
                 hooked_vs_bare(repeats, in_chain=False), "<= 1.02"))
    rows.append(("1M small objects, no scope active, hook forced into the chain",
                 hooked_vs_bare(repeats, in_chain=True), "(reference)"))

    width = max(len(r[0]) for r in rows)
    print_table(rows, width, repeats)
    print()
    print_overshoot()


def overshoot(size: int, hard: bool, limit: int = 16 * gotcha.MiB) -> int:
    """Bytes charged past the limit when a tight loop of allocations is stopped.

    The loop reaches a checkpoint every 100 allocations, as code that awaits now
    and then does; a soft scope stops it at the next checkpoint, a hard one at the
    allocation that would break the limit.
    """

    async def loop() -> int:
        keep = []
        async with gotcha.move_on_limit(bytes=limit, hard=hard) as ctx:
            while True:
                for _ in range(100):
                    keep.append(bytearray(size))
                await asyncio.sleep(0)
        return ctx.used().bytes - limit

    return asyncio.run(loop())


def print_overshoot() -> None:
    print("Overshoot past a 16 MiB bytes limit, a checkpoint every 100 allocations")
    print("| allocation | soft: bytes past the limit | hard: bytes past the limit |")
    print("|------------|----------------------------|----------------------------|")
    for size, label in ((1024, "1 KiB"), (64 * 1024, "64 KiB"), (1024 * 1024, "1 MiB")):
        print(f"| {label:>10} | {overshoot(size, False):>26,} | {overshoot(size, True):>26,} |")


def print_table(rows: list[tuple[str, float, str]], width: int, repeats: int) -> None:
    print(f"Python {sys.version.split()[0]}, median of {repeats} side-by-side rounds")
    print(f"| {'measurement'.ljust(width)} | ratio | goal |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, ratio, goal in rows:
        print(f"| {name.ljust(width)} | {ratio:5.2f} | {goal} |")


if __name__ == "__main__":
    main()
