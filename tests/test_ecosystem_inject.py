"""Ecosystem fault injection, reduced: each library's real workload under hard
and ceiling scopes with random budgets, a few draws each, in its own interpreter. Draws
may be stopped; the library and the process must come through: no signal, abort, hang,
panic, ``SystemError``, lost exception, wrong answer, leaked connection or lost coverage
data. The full run is ``python scripts/ecosystem_inject.py`` (.ci/run runs it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "ecosystem_inject.py"

# library (as the script names it) -> the modules it needs
LIBRARIES = {
    "orjson": ["orjson"],
    "ujson": ["ujson"],
    "msgpack": ["msgpack"],
    "pydantic-core": ["pydantic", "pydantic_core"],
    "numpy": ["numpy"],
    "lxml": ["lxml"],
    "Pillow": ["PIL"],
    "yarl/multidict": ["yarl", "multidict"],
    "uvloop": ["uvloop"],
    "sqlalchemy+greenlet": ["sqlalchemy", "greenlet", "aiosqlite"],
    "coverage-ctrace": ["coverage"],
    "coverage-pytrace": ["coverage"],
    "coverage-sysmon": ["coverage"],
    "memray": ["memray"],
}

# Open failure classes (docs/reliability.md, Ecosystem fault injection): the reduced run
# finds them here.
# Not strict: whether a draw lands the stop in the wrong place depends on timing.
# (coverage's cores are fixed: nothing is stopped while a tracer runs; clean in
# 3 seeds x 12 draws on 3.12.1, 3.13.0 and 3.15.2)
KNOWN = {
    # 'database is locked' after a cancellation (a plain asyncio.timeout does it too:
    # scripts/repro_sqlalchemy_timeout.py), and a first stop landing inside SQLAlchemy's
    # own bookkeeping
    "sqlalchemy+greenlet": "a cancellation leaves SQLite locked (asyncio.timeout too), or a "
                           "first stop lands in SQLAlchemy's bookkeeping "
                           "(docs/reliability.md, Ecosystem fault injection)",
}


def installed(modules: list[str]) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def params() -> list[object]:
    out: list[object] = []
    for name, modules in LIBRARIES.items():
        marks: list[pytest.MarkDecorator] = []
        if not installed(modules):
            marks.append(pytest.mark.skip(reason=f"{', '.join(modules)} not installed"))
        elif name == "coverage-sysmon" and sys.version_info < (3, 12):
            marks.append(pytest.mark.skip(reason="sys.monitoring needs 3.12"))
        elif name in KNOWN:
            # not strict (xfail_strict is on for the rest of the suite): whether one of
            # ten draws stops the library at the wrong place is a race, and a run that
            # misses it passes
            marks.append(pytest.mark.xfail(reason=KNOWN[name], strict=False))
        out.append(pytest.param(name, marks=marks, id=name.replace("/", "+")))
    return out


@pytest.mark.slow  # 1 to 13 s a library; .ci/run also runs the full script
@pytest.mark.timeout(400)  # above the subprocess's own 300 s, which reports first
@pytest.mark.parametrize("library", params())
def test_library_survives_random_budgets(library: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--libraries", library, "--seeds", "1", "2",
         "--draws", "5", "--timeout", "60"],
        capture_output=True, text=True, timeout=300,
    )
    table = proc.stdout + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()
            if ln.startswith(sys.version.split()[0] + " ")]
    assert len(rows) == 2, table
    for row in rows:
        assert row[-1] == "ok", table  # never died, hung, erred, lost or broke anything
    assert proc.returncode == 0, table
    assert all(int(row[4]) == 5 for row in rows), table  # every draw ran
    assert sum(int(row[5]) for row in rows) > 0, table  # and some were stopped


@pytest.mark.needs_frames
def test_a_refusal_inside_a_resumed_greenlet_does_not_crash() -> None:
    pytest.importorskip("greenlet")
    script = SCRIPT.parent / "repro_greenlet_caller_walk.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = int(proc.stdout.split("survived, ")[1].split()[0])
    assert refused > 0, proc.stdout  # the refusals were made, in the greenlet


def test_json_dumps_under_hard_budgets_never_system_error() -> None:
    script = SCRIPT.parent / "repro_json_shrink_realloc.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SystemError for 0 of" in proc.stdout, proc.stdout

