"""What the injection scripts share: one child run, watched for how it ended.

``fault_inject.py`` and ``ecosystem_inject.py`` run each case in a child interpreter of
its own, in a folder of its own (the code under test makes temporary files in the
current one, and a child that dies leaves them behind), with a timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Child:
    cmd: Sequence[str]
    rc: int | None  # None: it hung
    out: str
    err: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.rc is None

    def death(self, timeout: float, markers: Sequence[str]) -> str | None:
        """The verdict for a child that hung, died or printed a marker; None if not."""
        if self.rc is None:
            return f"HANG (>{timeout:.0f}s)"
        if self.rc < 0:
            try:
                return f"DIED ({signal.Signals(-self.rc).name})"
            except ValueError:
                return f"DIED (signal {-self.rc})"
        for m in markers:
            if m in self.err or m in self.out:
                return f"ERROR ({m})"
        return None

    def save(self, log_dir: str, name: str) -> None:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, name), "w") as f:
            f.write(f"$ {' '.join(self.cmd)}\n--- stdout ---\n{self.out}\n"
                    f"--- stderr ---\n{self.err}\n")


def run_child(cmd: Sequence[str], env: Mapping[str, str], timeout: float, prefix: str) -> Child:
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, cwd=workdir)
        rc: int | None = proc.returncode
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Child(cmd, rc, out, err, time.monotonic() - t0)
