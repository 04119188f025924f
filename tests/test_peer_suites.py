"""CPython's own suites pass with the hook installed and every test inside a scope."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cpython_suite import needs

SCRIPT = Path(__file__).parent.parent / "scripts" / "peer_suites.py"


@pytest.mark.parametrize(
    "args",
    [
        ["test.test_context", "test.test_asyncio.test_tasks"],
        ["--hard", "test.test_context", "test.test_asyncio.test_tasks"],
    ],
    ids=["unlimited", "hard"],
)
@needs("test.test_context", "test.test_asyncio.test_tasks")
@pytest.mark.slow  # 20 to 25 s each: two of CPython's test modules
@pytest.mark.timeout(900)  # above the subprocess's own 600 s, which reports first
def test_cpython_suites_pass_inside_scopes(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\nOK" in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("gotcha: ") and " 0 bytes" not in summary
