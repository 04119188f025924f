"""Programs that a test runs in an interpreter of its own: where no scope may be alive
(a test suite keeps scopes in the tracebacks it stores), numpy not imported yet, the
global OpenTelemetry provider not set yet, or the process forks.

Each program asserts what it checks and prints ``ok`` at the end; :func:`run` fails the
test with the program's stderr otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).parent


def run(name: str, *args: str, python_args: Sequence[str] = (), timeout: float = 120) -> str:
    """Run tests/fresh_scripts/NAME with ARGS; return its stdout once it printed ``ok``."""
    proc = subprocess.run(
        [sys.executable, *python_args, str(HERE / name), *args],
        capture_output=True, text=True, timeout=timeout,
    )
    what = f"{name} {' '.join(args)}".strip()
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.endswith("ok\n"), f"{what}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout
