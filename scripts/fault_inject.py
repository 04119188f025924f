"""Fault injection through the public API: CPython's own test suites, every test inside
a hard scope with a random budget.

    python scripts/fault_inject.py                      # the default modules, seeds 1 2 3
    python scripts/fault_inject.py --seeds 7 --modules test.test_json test.test_re
    python scripts/fault_inject.py --python /work/venv-crash-313/bin/python ...
    python scripts/fault_inject.py --soft               # the same draws as soft scopes

Every test of each module runs inside ``gotcha.move_on_limit(bytes=B, hard=True)``,
B drawn log-uniformly between 1 KiB and 16 MiB from (seed, test id): a draw is
reproducible on its own. Each (module, seed) runs in its own interpreter, with a
timeout. Tests may fail (a test refused its memory has every right to); the verdict
is the process's fate only: it must not die on a signal, abort, hang, or print
``SystemError`` / ``Fatal Python error``. Prints a table (version, module, seed,
tests run, failures, verdict) and exits 1 on any death, hang or internal error.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import subprocess
import sys
import unittest
from dataclasses import dataclass
from typing import Any

from _child import run_child

MODULES = [
    "test.test_json",
    "test.test_pickle",
    "test.test_re",
    "test.test_exceptions",
    "test.test_generators",
    "test.test_coroutines",
    "test.test_traceback",
    "test.test_contextlib",
    "test.test_gc",
    "test.test_asyncio.test_tasks",
]
LOW, HIGH = 1024, 16 * 1024 * 1024
MARKERS = ("Fatal Python error", "SystemError", "AddressSanitizer", "free(): invalid",
           "double free", "corrupted size")
SUMMARY = "FAULT_INJECT"


def budget(seed: int, test_id: str) -> int:
    """B for one test: log-uniform in [1 KiB, 16 MiB], from (seed, test id)."""
    rng = random.Random(f"{seed}/{test_id}")
    return int(math.exp(rng.uniform(math.log(LOW), math.log(HIGH))))


# -- the child: one module, one seed ---------------------------------------------------

# What doctest's runner patches process-wide and puts back in a finally block. A test
# stopped inside that block (a HardLimitError, as a Ctrl-C would) leaves linecache.getlines
# bound to its runner, which keeps the test's globs alive until shutdown; on 3.12.1 a tee
# among them (test_generators' refleaks doctest) segfaults the final collection: CPython
# gh-115874, fixed upstream by gh-116204. KeyboardInterrupt at the same point does the
# same without gotcha. Put back after every test, as a runner isolating its tests would.
# test_gc's GCCallbackTests register gc.callbacks in setUp and remove them in tearDown: a
# setUp stopped after the append (no tearDown then) left them registered, and every later
# collection ran them ("Exception ignored ... no attribute 'visit'") inside the next tests'
# scopes. The list is put back too.
def process_patches() -> tuple[Any, ...]:
    import gc
    import linecache

    pdb = sys.modules.get("pdb")
    return (linecache.getlines, sys.displayhook, sys.gettrace(),
            pdb, pdb.set_trace if pdb is not None else None, list(gc.callbacks))


def restore_patches(saved: tuple[Any, ...]) -> None:
    import gc
    import linecache

    linecache.getlines, sys.displayhook, trace, pdb, set_trace, callbacks = saved
    if gc.callbacks != callbacks:
        gc.callbacks[:] = callbacks
    if sys.gettrace() is not trace:
        sys.settrace(trace)
    if pdb is not None:
        pdb.set_trace = set_trace


# Tests that hang with no gotcha loaded when one of their tasks fails: two tasks that wait
# for each other, under a synchronous scope that cannot cancel them. A stop in the first
# before it sets the second's future leaves the loop waiting for good (3.13.0, seed 1);
# a MemoryError raised at the same line without gotcha does the same
# (scripts/repro_test_tasks_interleaving_hang.py). They run outside any scope.
DEADLOCK_WHEN_A_TASK_FAILS = {"test_current_task_with_interleaving_tasks"}


def child(module: str, seed: int, hard: bool, verbose: bool) -> int:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(f"{SUMMARY} missing: {exc}", flush=True)
        return 0

    import gotcha_async as gotcha

    dump_after = float(os.environ.get("FAULT_INJECT_DUMP_AFTER", "0"))
    if dump_after > 0:
        import faulthandler

        # where a hang hangs: every thread's stack, shortly before the parent's timeout
        faulthandler.dump_traceback_later(dump_after, exit=False)
    stats = {"scopes": 0, "exceeded": 0}
    original = unittest.TestCase.run

    def run(
        self: unittest.TestCase, result: unittest.TestResult | None = None
    ) -> unittest.TestResult | None:
        if self._testMethodName in DEADLOCK_WHEN_A_TASK_FAILS:
            return original(self, result)
        b = budget(seed, self.id())
        if verbose:
            print(f"  {self.id()} bytes={b}", file=sys.stderr, flush=True)
        outcome = None  # a refusal that escapes run() is swallowed by the scope
        saved = process_patches()
        with gotcha.move_on_limit(bytes=b, hard=hard) as ctx:
            outcome = original(self, result)
        restore_patches(saved)
        stats["scopes"] += 1
        stats["exceeded"] += ctx.exceeded()
        return outcome

    unittest.TestCase.run = run  # type: ignore[method-assign]
    # the real streams: a test stopped in its cleanup can leave sys.stdout replaced
    out, err = sys.__stdout__, sys.__stderr__
    assert out is not None and err is not None
    suite = unittest.defaultTestLoader.loadTestsFromName(module)
    result = unittest.TextTestRunner(stream=err, verbosity=0).run(suite)
    print(f"{SUMMARY} tests={result.testsRun} failures={len(result.failures)} "
          f"errors={len(result.errors)} skipped={len(result.skipped)} "
          f"scopes={stats['scopes']} exceeded={stats['exceeded']}", file=out, flush=True)
    return 0


# -- the parent: a subprocess per (interpreter, module, seed) --------------------------


@dataclass
class Row:
    version: str
    module: str
    seed: int
    tests: str
    failures: str
    exceeded: str
    seconds: float
    verdict: str

    @property
    def dead(self) -> bool:
        return not (self.verdict == "ok" or self.verdict.startswith("skipped"))


def version_of(python: str) -> str:
    code = ("import sys; print(sys.version.split()[0] + "
            "('d' if hasattr(sys, 'gettotalrefcount') else ''))")
    out = subprocess.run([python, "-c", code],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"


def run_one(python: str, version: str, module: str, seed: int, hard: bool, timeout: float,
            log_dir: str | None) -> Row:
    cmd = [python, "-X", "faulthandler", os.path.abspath(__file__), "--child", module,
           "--seeds", str(seed)]
    if not hard:
        cmd.append("--soft")
    env = dict(os.environ)
    env.pop("PYTHONDEVMODE", None)
    env["FAULT_INJECT_DUMP_AFTER"] = str(max(timeout - 10, timeout * 0.9))
    child = run_child(cmd, env, timeout, "fault_inject-")
    found = re.search(rf"{SUMMARY} tests=(\d+) failures=(\d+) errors=(\d+) skipped=\d+ "
                      r"scopes=\d+ exceeded=(\d+)", child.out)
    tests, failures, exceeded = ("-", "-", "-")
    if found:
        tests = found.group(1)
        failures = str(int(found.group(2)) + int(found.group(3)))
        exceeded = found.group(4)
    death = child.death(timeout, MARKERS)
    if not child.hung and child.rc == 0 and f"{SUMMARY} missing" in child.out:
        verdict = "skipped (module not installed)"
    elif death is not None:
        verdict = death
    elif child.rc != 0 or not found:
        verdict = f"DIED (exit {child.rc}, no summary)"
    else:
        verdict = "ok"
    if log_dir is not None and verdict != "ok" and not verdict.startswith("skipped"):
        child.save(log_dir, f"{version}-{module}-{seed}{'' if hard else '-soft'}.log")
    return Row(version, module, seed, tests, failures, exceeded, child.seconds, verdict)


def print_row(row: Row) -> None:
    print(f"{row.version:<9} {row.module:<30} {row.seed:>4} {row.tests:>6} {row.failures:>8} "
          f"{row.exceeded:>8} {row.seconds:>7.1f}  {row.verdict}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=MODULES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--python", action="append", default=None,
                        help="interpreter to run the children with (repeatable; each "
                             "must have gotcha_async installed); default: this one")
    parser.add_argument("--timeout", type=float, default=600, help="per module and seed")
    parser.add_argument("--soft", action="store_true", help="soft scopes (the baseline)")
    parser.add_argument("--log-dir", default=None, help="write the output of bad runs here")
    parser.add_argument("--child", metavar="MODULE", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="(child) each budget")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.seeds[0], not args.soft, args.verbose)

    pythons = args.python or [sys.executable]
    rows: list[Row] = []
    print(f"{'version':<9} {'module':<30} {'seed':>4} {'tests':>6} {'failures':>8} "
          f"{'exceeded':>8} {'seconds':>7}  verdict", flush=True)
    for python in pythons:
        version = version_of(python)
        for module in args.modules:
            for seed in args.seeds:
                row = run_one(python, version, module, seed, not args.soft, args.timeout,
                              args.log_dir)
                rows.append(row)
                print_row(row)
    dead = [r for r in rows if r.dead]
    total = sum(int(r.tests) for r in rows if r.tests.isdigit())
    print(f"fault_inject: {len(rows)} runs, {total} tests, {len(dead)} died/hung/erred "
          f"({'hard' if not args.soft else 'soft'} scopes, seeds "
          f"{' '.join(map(str, args.seeds))})", flush=True)
    return 1 if dead else 0


if __name__ == "__main__":
    sys.exit(main())
