"""Scripts that the crash regression tests (tests/test_crash_*.py) run in a subprocess.

Each script provokes one class of failure of the table in docs/reliability.md (its
docstring starts with the item's number) and, if the process survives, prints one
line ``RESULT {json}`` with what it observed. :func:`run_script` runs a script with a
timeout and fails the test on every way a process can die: a signal (negative return
code), an abort, ``Fatal Python error``, ``SystemError``, heap corruption reported by
libc, a hang. The test then asserts on the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent

#: Text that means the interpreter died or reported an internal error.
DEATH_MARKERS = (
    "Fatal Python error",
    "SystemError",
    "Segmentation fault",
    "free(): invalid",
    "double free",
    "corrupted size",
    "malloc(): ",
    "AddressSanitizer",
)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any] = field(default_factory=dict)


def describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def run_script(
    name: str,
    *args: str,
    timeout: float = 120,
    python_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    expect_result: bool = True,
) -> Outcome:
    """Run tests/crash_scripts/NAME in a fresh interpreter; fail on any death."""
    cmd = [sys.executable, "-X", "faulthandler", *python_args, str(HERE / name), *args]
    full_env = dict(os.environ)
    full_env.pop("PYTHONDEVMODE", None)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"{name} {' '.join(args)} hung: no exit within {timeout}s\n{out[-2000:]}"
                    f"\n{err[-3000:]}")
    tail = f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
    what = f"{name} {' '.join(args)} (Python {sys.version.split()[0]})"
    assert proc.returncode >= 0, f"{what} died: {describe(proc.returncode)}{tail}"
    for marker in DEATH_MARKERS:
        assert marker not in proc.stderr and marker not in proc.stdout, (
            f"{what} reported {marker!r}{tail}"
        )
    assert proc.returncode == 0, f"{what}: {describe(proc.returncode)}{tail}"
    outcome = Outcome(proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if expect_result:
        assert lines, f"{what} printed no RESULT line{tail}"
        outcome.result = json.loads(lines[-1][len("RESULT "):])
    return outcome
