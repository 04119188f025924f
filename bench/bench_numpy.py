"""What counting numpy's arrays costs: numpy work with gotcha's data handler and without.

    python bench/bench_numpy.py                  # wall clock, about 20 seconds
    python bench/bench_numpy.py --quick          # fewer rounds
    python bench/bench_numpy.py --instructions   # counted by callgrind, about 2 minutes

Both sides run inside the same `gotcha.limit(memory=...)` scope, so the PEP 445 hook
and the scope cost them alike; the only difference is numpy's data-memory handler in
the scope's context: gotcha's (numpy.c, which charges each array's data) or numpy's
own default (what a scope saw before). A third row is numpy work outside any scope,
in a context where gotcha's handler is current (after a scope ran there) against the
default: what the handler costs code no scope governs. Each pair runs interleaved,
round after round; the table shows the median of the per-round ratios.

On a loaded two-core machine the wall clock moves by more than the 5% goal from run to
run; --instructions counts instructions under callgrind instead (as
bench_instructions.py does): each case runs with a few and with more iterations, and
the difference of the main thread's totals over the iterations between them is what one
costs, start-up and imports cancelled out. Needs valgrind on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import gotcha_async as gotcha

GOAL = "<= 1.05"


def _api() -> Any:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    table = get(CORE._multiarray_umath._ARRAY_API, None)
    return ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p))


CORE: Any = np._core  # type: ignore[attr-defined]  # numpy 2's, which its stubs leave out
MULTIARRAY = CORE.multiarray
API = _api()
SET_HANDLER = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(API[304])
GET_HANDLER = ctypes.PYFUNCTYPE(ctypes.py_object)(API[305])
DEFAULT = ctypes.cast(API[306], ctypes.POINTER(ctypes.py_object)).contents.value


def empty8(n: int) -> None:
    empty = np.empty
    for _ in range(n):
        empty(8)


def empty4096(n: int) -> None:
    empty = np.empty
    for _ in range(n):
        empty(4096)


A = np.arange(1000.0)


def arrays(n: int) -> None:
    """Small array arithmetic, the kind a request handler does: temporaries galore."""
    a = A
    for _ in range(n):
        b = a * 2.0 + 1.0
        c = np.sqrt(b)
        d = np.concatenate((b, c))
        d.sum()
        d.reshape(2, -1).mean(axis=1)


WORKLOADS: list[tuple[str, Callable[[int], None], int]] = [
    ("np.empty(8)", empty8, 200_000),
    ("np.empty(4096)", empty4096, 200_000),
    ("array loop (5 ops on 1000 floats)", arrays, 20_000),
]


def timed(fn: Callable[[int], None], n: int) -> float:
    t = time.perf_counter_ns()
    fn(n)
    return (time.perf_counter_ns() - t) / n


async def in_scope(fn: Callable[[int], None], n: int, ours: bool) -> float:
    async with gotcha.limit(memory="1 GiB"):
        if not ours:
            SET_HANDLER(DEFAULT)  # in this task's context, after the scope made it ours
        name = MULTIARRAY.get_handler_name()
        assert name.startswith("gotcha_async") == ours, name
        ns = timed(fn, n)
    return ns


async def outside(fn: Callable[[int], None], n: int, ours: bool) -> float:
    async with gotcha.limit():
        pass  # leaves gotcha's handler current in this task's context
    if not ours:
        SET_HANDLER(DEFAULT)
    assert gotcha.current() is None
    return timed(fn, n)


def cases(scale: int) -> list[tuple[str, Any, Callable[[int], None], int]]:
    out = [(f"{name}, in a scope", in_scope, fn, n // scale) for name, fn, n in WORKLOADS]
    out.append((f"{WORKLOADS[2][0]}, no scope", outside, arrays, WORKLOADS[2][2] // scale))
    return out


def count(valgrind: str, case: int, ours: bool, n: int) -> int:
    """Instructions of the main thread: gotcha's delivery thread polls while a scope is
    entered, so its count follows the wall clock (the machine's load), not the work."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [valgrind, "--tool=callgrind", "--separate-threads=yes",
             f"--callgrind-out-file={tmp}/out",
             sys.executable, __file__, "--child", str(case), str(int(ours)), str(n)],
            capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"case {case} under callgrind failed:\n{proc.stderr[-2000:]}")
        with open(f"{tmp}/out-01") as f:
            m = re.search(r"^totals:\s*(\d+)", f.read(), re.MULTILINE)
    if m is None:
        raise RuntimeError("no instruction count in callgrind's output for the main thread")
    return int(m.group(1))


def instructions() -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind on PATH")
    all_cases = cases(20)  # a twentieth of the wall-clock iterations: callgrind is slow
    jobs = [
        (i, ours, k * n)
        for i, (_, _, _, n) in enumerate(all_cases)
        for ours in (True, False)
        for k in (1, 3)
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: count(valgrind, *job), jobs), strict=True))
    width = max(len(c[0]) for c in all_cases)
    print(
        f"Python {sys.version.split()[0]}, numpy {np.__version__}, "
        "instructions per iteration (callgrind)"
    )
    print(f"| {'workload'.ljust(width)} | with handler | without | ratio | goal |")
    print(f"|{'-' * (width + 2)}|--------------|---------|-------|------|")
    for i, (label, _, _, n) in enumerate(all_cases):
        per = {
            ours: (totals[i, ours, 3 * n] - totals[i, ours, n]) / (2 * n) for ours in (True, False)
        }
        print(
            f"| {label.ljust(width)} | {per[True]:12.0f} | {per[False]:7.0f} | "
            f"{per[True] / per[False]:5.3f} | {GOAL} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--instructions", action="store_true", help="count under callgrind")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, ours, n = args.child
        _, where, fn, _ = cases(1)[case]
        asyncio.run(where(fn, 100, bool(ours)))  # numpy's cache and ours warmed alike
        asyncio.run(where(fn, n, bool(ours)))
        return
    if args.instructions:
        instructions()
        return
    rounds = 5 if args.quick else 15
    scale = 4 if args.quick else 1
    rows: list[tuple[str, float, float, float]] = []
    for label, where, fn, n in cases(scale):
        asyncio.run(where(fn, n // 10, True))  # warm caches, numpy's own included
        ratios, ours_ns, base_ns = [], [], []
        for _ in range(rounds):
            a = asyncio.run(where(fn, n, True))
            b = asyncio.run(where(fn, n, False))
            ratios.append(a / b)
            ours_ns.append(a)
            base_ns.append(b)
        rows.append(
            (
                label,
                statistics.median(ours_ns),
                statistics.median(base_ns),
                statistics.median(ratios),
            )
        )
    width = max(len(r[0]) for r in rows)
    print(
        f"Python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"median of {rounds} side-by-side rounds"
    )
    print(f"| {'workload'.ljust(width)} | with handler | without | ratio | goal |")
    print(f"|{'-' * (width + 2)}|--------------|---------|-------|------|")
    for label, a, b, r in rows:
        print(f"| {label.ljust(width)} | {a:9.0f} ns | {b:4.0f} ns | {r:5.3f} | {GOAL} |")


if __name__ == "__main__":
    main()
