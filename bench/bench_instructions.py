"""Instructions per request of the JSON handler benchmark, counted by callgrind.

    python bench/bench_instructions.py            # about a minute on two cores
    python bench/bench_instructions.py --rounds 2 4

Wall-clock ratios on a shared two-core machine move by a few hundredths from run to
run, as much as the goals they are held to (bench_core.py shows them). Callgrind
counts the instructions executed instead: the same count for the same binary and
input, whatever else the machine is doing. Each variant runs twice, with fewer and
with more rounds of 500 requests in flight, and the difference of the two totals
divided by the requests between them is what one request costs, start-up and import
cancelled out, with string hashing fixed so that every run lays its dicts out
alike. An instruction is not a nanosecond (a cache miss costs more than an
add), so these are the second measure beside bench_core.py's, not a replacement.

Needs valgrind on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONCURRENCY = 500

# name: (what wraps each request, as bench_core.py spells it)
VARIANTS = {
    "no scope": "None",
    "the wrapping coroutine alone": "bench_core.NoScope",
    "anyio.CancelScope()": "bench_core.CancelScopeOnly",
    "asyncio.timeout(None)": "bench_core.TimeoutNoneOnly",
    "limit()": "gotcha.limit",
    "limit(bytes=1 MiB)": "lambda: gotcha.limit(bytes=gotcha.MiB)",
    "limit(bytes=1 MiB) entered by the handler": "bench_core.SELF_GOVERNED",
    "limit(memory=1 MiB)": "lambda: gotcha.limit(memory=gotcha.MiB)",
    "limit(memory=16 MiB)": "lambda: gotcha.limit(memory=16 * gotcha.MiB)",
    "limit(memory=1 MiB, exact_memory=True)":
        "lambda: gotcha.limit(memory=gotcha.MiB, exact_memory=True)",
    "no scope, another task's scope open": "None",
}

# (variant, baseline, goal or None for a reference row)
ROWS = [
    ("limit(bytes=1 MiB) entered by the handler", "no scope", 1.05),
    ("limit(bytes=1 MiB)", "no scope", 1.05),
    ("limit()", "no scope", 1.05),
    ("limit()", "anyio.CancelScope()", 1.00),
    ("the wrapping coroutine alone", "no scope", None),
    ("limit(bytes=1 MiB)", "the wrapping coroutine alone", None),
    ("anyio.CancelScope()", "no scope", None),
    ("asyncio.timeout(None)", "no scope", None),
    ("limit(memory=1 MiB)", "limit()", 1.05),
    ("limit(memory=16 MiB)", "limit()", 1.05),
    ("limit(memory=1 MiB, exact_memory=True)", "limit()", 2.0),
    ("no scope, another task's scope open", "no scope", None),
]


def child(variant: str, rounds: int) -> None:
    """The workload itself, in the process valgrind runs."""
    sys.path.insert(0, str(HERE))
    import bench_core

    import gotcha_async as gotcha

    wrap: Any = eval(VARIANTS[variant], {"bench_core": bench_core, "gotcha": gotcha})

    async def main() -> None:
        release = asyncio.Event()

        async def keep_a_scope_open() -> None:
            # the hook meters while any scope is entered: this one leaves the
            # requests themselves unmetered, as a server's own work between them
            async with gotcha.limit():
                await release.wait()

        keeper = None
        if variant == "no scope, another task's scope open":
            keeper = asyncio.create_task(keep_a_scope_open())
            await asyncio.sleep(0)
        await bench_core.serve(rounds, CONCURRENCY, wrap)
        if keeper is not None:
            release.set()
            await keeper

    asyncio.run(main())


def count(valgrind: str, variant: str, rounds: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, __file__, "--child", variant, str(rounds)],
            capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts every run
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} under callgrind failed:\n{proc.stderr[-2000:]}")
    m = re.search(r"(?:Collected|I\s+refs)\s*:\s*([\d,]+)", proc.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{proc.stderr}")
    return int(m.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, nargs=2, default=(2, 4), metavar=("FEW", "MORE"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child[0], int(args.child[1]))
        return
    few, more = args.rounds
    if not 1 <= few < more <= 40:
        parser.error("--rounds: two counts, 1 <= FEW < MORE <= 40")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench_instructions.py needs valgrind on PATH")

    jobs = [(v, r) for v in VARIANTS for r in (few, more)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: count(valgrind, *job), jobs), strict=True))
    requests = (more - few) * CONCURRENCY
    per = {v: (totals[v, more] - totals[v, few]) / requests for v in VARIANTS}

    print(f"Instructions per request, JSON handler, {CONCURRENCY} in flight "
          f"(callgrind: {more} rounds minus {few}, CPython {sys.version.split()[0]})\n")
    print("| variant | instructions per request |")
    print("|---|---:|")
    for v in VARIANTS:
        print(f"| {v} | {per[v]:,.0f} |")
    print()
    width = max(len(f"{v} vs {b}") for v, b, _ in ROWS)
    print(f"| {'measurement':<{width}} | ratio | goal |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for v, b, goal in ROWS:
        ratio = per[v] / per[b]
        if goal is None:
            mark = "(reference)"
        else:
            mark = f"<= {goal}" + ("" if ratio <= goal else " (missed)")
        print(f"| {f'{v} vs {b}':<{width}} | {ratio:5.3f} | {mark} |")


if __name__ == "__main__":
    main()
