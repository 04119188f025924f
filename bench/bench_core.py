"""Core benchmarks: what gotcha costs, as ratios measured side by side in one run.

    python bench/bench_core.py            # the full table (a few minutes)
    python bench/bench_core.py --quick    # fewer repeats
    python bench/bench_core.py --goals    # only what a governed request costs

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
from typing import Any, Protocol

import anyio

import gotcha_async as gotcha
from gotcha_async import _meter

BODY = json.dumps([{"id": i, "name": f"item-{i}", "price": i * 1.5} for i in range(50)])


async def handler(body: str) -> str:
    """A JSON request handler: parse a 50-item body, compute, one checkpoint, serialize."""
    items = json.loads(body)
    total = sum(item["price"] for item in items)
    names = [item["name"].upper() for item in items]
    await asyncio.sleep(0)
    return json.dumps({"total": total, "names": names})


async def governed_handler(body: str) -> str:
    """The same handler governing itself, as the examples write one: its own
    ``limit(bytes=1 MiB)`` around its work, and no coroutine more than the bare one."""
    async with gotcha.limit(bytes=gotcha.MiB):
        items = json.loads(body)
        total = sum(item["price"] for item in items)
        names = [item["name"].upper() for item in items]
        await asyncio.sleep(0)
        answer = json.dumps({"total": total, "names": names})
    return answer


# serve()'s wrap for the handler that enters its scope itself
SELF_GOVERNED = "self-governed"


class NoScope:
    """An ``async with`` that does nothing: the coroutine every wrapped row adds, alone."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return False


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


class TimeoutNoneOnly:
    """``asyncio.timeout(None)`` per request: asyncio's own cancel scope, for reference."""

    async def __aenter__(self) -> None:
        self.scope = asyncio.timeout(None)
        await self.scope.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        await self.scope.__aexit__(exc_type, exc, tb)  # raises what it does not swallow
        return False


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


async def serve(rounds: int, concurrency: int, wrap: ScopeFactory | str | None) -> None:
    for _ in range(rounds):
        if wrap is None:
            await asyncio.gather(*(handler(BODY) for _ in range(concurrency)))
        elif wrap == SELF_GOVERNED:
            await asyncio.gather(*(governed_handler(BODY) for _ in range(concurrency)))
        else:
            assert not isinstance(wrap, str)
            await asyncio.gather(*(handler_in(wrap, BODY) for _ in range(concurrency)))


def time_workload(
    wrap: ScopeFactory | str | None,
    rounds: int = 20,
    concurrency: int = 500,
    setup: Callable[[], object] | None = None,
    teardown: Callable[[], object] | None = None,
) -> float:
    gc.collect()
    # Every run starts from an idle hook: a run that left scopes entered or held blocks
    # tracked would slow the next one down and skew the ratios of all that follow.
    if _meter._debug.active() or _meter._debug.held_blocks():
        raise RuntimeError(
            f"not idle before a run: {_meter._debug.active()} scopes active, "
            f"{_meter._debug.held_blocks()} held blocks"
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


def side_by_side(
    variants: dict[str, Callable[[], float]], repeats: int
) -> list[dict[str, float]]:
    """Each round's time of every variant, the variants interleaved within a round."""
    rounds = []
    for _ in range(repeats):
        rounds.append({n: run() for n, run in variants.items()})
    return rounds


def ratio(rounds: list[dict[str, float]], variant: str, baseline: str) -> float:
    """Median over rounds of variant / baseline, both timed in the same round."""
    return statistics.median(r[variant] / r[baseline] for r in rounds)


# -- scope enter+exit --------------------------------------------------------------

N_SCOPES = 20_000


async def cancel_scopes(on_trio: bool = False) -> float:
    """anyio.CancelScope() on asyncio; on trio, trio.CancelScope() (what anyio's wraps)."""
    t = time.perf_counter()
    if on_trio:
        import trio

        for _ in range(N_SCOPES):
            with trio.CancelScope():
                pass
    else:
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
        on_trio = backend == "trio"
        await cancel_scopes(on_trio)  # warm up
        base: list[float] = []
        plain: list[float] = []
        limited: list[float] = []
        for _ in range(repeats):
            base.append(await cancel_scopes(on_trio))
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
        _meter._debug.set_hooked(False)
        gc.collect()
        bare = alloc_loop()
        if in_chain:
            _meter._debug.set_hooked(True)
        else:
            with gotcha.Context():
                pass
        gc.collect()
        ours = alloc_loop()
        ratios.append(ours / bare)
    _meter._debug.set_hooked(False)
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--goals", action="store_true",
                        help="only the rows of a governed request's cost (about 3 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 7)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)

    rows: list[tuple[str, float, str]] = []
    limited: dict[str, Any] = {"bytes": gotcha.MiB, "objects": 100_000, "calls": 100_000}
    goals = ("bare", "wrapper", "CancelScope", "timeout", "limit", "bytes", "inside", "memory")
    variants: dict[str, Callable[[], float]] = {
        "bare": lambda: time_workload(None),
        "wrapper": lambda: time_workload(NoScope),
        "CancelScope": lambda: time_workload(CancelScopeOnly),
        "timeout": lambda: time_workload(TimeoutNoneOnly),
        "limit": lambda: time_workload(gotcha.limit),
        "bytes": lambda: time_workload(lambda: gotcha.limit(bytes=gotcha.MiB)),
        "inside": lambda: time_workload(SELF_GOVERNED),
        "limited": lambda: time_workload(lambda: gotcha.limit(**limited)),
        "ceiling": lambda: time_workload(lambda: gotcha.limit(**limited, ceiling=2)),
        "hard": lambda: time_workload(lambda: gotcha.limit(**limited, hard=True)),
        "memory": lambda: time_workload(lambda: gotcha.limit(memory=gotcha.MiB)),
        "memory16": lambda: time_workload(lambda: gotcha.limit(memory=16 * gotcha.MiB)),
        "exact": lambda: time_workload(
            lambda: gotcha.limit(memory=gotcha.MiB, exact_memory=True)
        ),
        "tracemalloc": lambda: time_workload(
            None, setup=tm_start, teardown=tracemalloc.stop
        ),
    }
    if args.goals:
        variants = {name: run for name, run in variants.items() if name in goals}
    rounds = side_by_side(variants, repeats)
    handler = "JSON handler, 500 in flight:"
    for variant, baseline, what, goal in (
        ("inside", "bare", "limit(bytes=1 MiB) entered by the handler vs no scope",
         "<= 1.05"),
        ("bytes", "bare", "limit(bytes=1 MiB) vs no scope", "<= 1.05"),
        ("limit", "bare", "limit() vs no scope", "<= 1.05"),
        ("limit", "CancelScope", "limit() vs a bare anyio.CancelScope()", "<= 1.00"),
        ("wrapper", "bare", "the wrapping coroutine alone vs no scope", "(reference)"),
        ("bytes", "wrapper", "limit(bytes=1 MiB) vs the wrapping coroutine alone", "(reference)"),
        ("CancelScope", "bare", "anyio.CancelScope() alone vs no scope", "(reference)"),
        ("timeout", "bare", "asyncio.timeout(None) alone vs no scope", "(reference)"),
        ("limited", "limit", "limit(bytes, objects, calls) vs limit()", "<= 1.02"),
        ("ceiling", "limited", "the same with ceiling=2 vs without", "<= 1.02"),
        ("hard", "limited", "the same with hard=True vs without", "<= 1.02"),
        # a request allocates ~33 KB: 3% of a 1 MiB budget (~33 samples), 0.2% of 16 MiB (~2)
        ("memory", "limit", "limit(memory=1 MiB), sampled, vs limit()", "<= 1.05"),
        ("memory16", "limit", "limit(memory=16 MiB), sampled, vs limit()", "<= 1.05"),
        ("exact", "limit", "limit(memory=1 MiB, exact_memory=True) vs limit()", "<= 2.0"),
        ("tracemalloc", "bare", "tracemalloc.start(1) alone vs no scope", "(reference)"),
    ):
        if variant in variants and baseline in variants:
            rows.append((f"{handler} {what}", ratio(rounds, variant, baseline), goal))
    for backend, floor, goal in (("asyncio", "anyio.CancelScope()", "<= 0.60"),
                                 ("trio", "trio.CancelScope()", "<= 1.10")):
        base_us, ours_us, scope_ratio, ratio_l = scope_costs(backend, repeats)
        rows.append((f"limit() enter+exit vs {floor} [{backend}: "
                     f"{ours_us:.2f} us vs {base_us:.2f} us]", scope_ratio, goal))
        rows.append((f"limit(bytes, objects, calls) enter+exit vs {floor} [{backend}]",
                     ratio_l, goal))
    if args.goals:
        print_table(rows, max(len(r[0]) for r in rows), repeats)
        return
    rows.append(("1M small objects, no scope active (hook steps aside) vs no gotcha",
                 hooked_vs_bare(repeats, in_chain=False), "<= 1.02"))
    rows.append(("1M small objects, no scope active, hook forced into the chain",
                 hooked_vs_bare(repeats, in_chain=True), "(reference)"))

    width = max(len(r[0]) for r in rows)
    print_table(rows, width, repeats)
    print()
    print_overshoot()


STOP_AFTER = 256 * gotcha.MiB  # a loop that is never stopped ends here


def overshoot(size: int, how: dict[str, Any], every: int | None,
              limit: int = 16 * gotcha.MiB) -> int:
    """Bytes charged past the limit when a tight loop of allocations is stopped.

    The loop reaches a checkpoint every `every` allocations (None: never, as a
    handler that builds a big list without awaiting); a soft scope stops it at the
    next checkpoint, a ceiling at the allocation or bytecode boundary past it.
    """

    async def loop() -> int:
        keep: list[bytearray] = []
        async with gotcha.move_on_limit(bytes=limit, **how) as ctx:
            for i in range(STOP_AFTER // size):
                keep.append(bytearray(size))
                if len(keep) * size > 4 * limit:
                    keep.clear()  # what is kept does not matter here, what is made does
                if every is not None and i % every == 0:
                    await asyncio.sleep(0)
        return ctx.used().bytes - limit

    return asyncio.run(loop())


def print_overshoot() -> None:
    modes: list[tuple[str, dict[str, Any]]] = [
        ("soft", {}), ("ceiling=2", {"ceiling": 2}), ("hard=True", {"hard": True}),
    ]
    for every in (100, None):
        when = f"a checkpoint every {every} allocations" if every else "no checkpoint at all"
        print(f"MiB allocated past a 16 MiB bytes limit, {when} "
              f"(a loop never stopped ends at {STOP_AFTER // gotcha.MiB} MiB)")
        print("| allocation | " + " | ".join(name for name, _ in modes) + " |")
        print("|------------|" + "|".join("-" * (len(name) + 2) for name, _ in modes) + "|")
        for size, label in ((1024, "1 KiB"), (64 * 1024, "64 KiB"), (1024 * 1024, "1 MiB")):
            cells = [f"{overshoot(size, how, every) / gotcha.MiB:.2f}".rjust(len(name))
                     for name, how in modes]
            print(f"| {label:>10} | " + " | ".join(cells) + " |")
        print()


def print_table(rows: list[tuple[str, float, str]], width: int, repeats: int) -> None:
    print(f"Python {sys.version.split()[0]}, median of {repeats} side-by-side rounds")
    print(f"| {'measurement'.ljust(width)} | ratio | goal |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, ratio, goal in rows:
        print(f"| {name.ljust(width)} | {ratio:5.2f} | {goal} |")


if __name__ == "__main__":
    main()
