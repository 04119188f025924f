"""CPython gh-115874 shown without gotcha: the fault-injection harness hit it on 3.12.1.

    python scripts/repro_cpython_gh115874.py    # 3.12.1: SIGSEGV at exit; 3.11, 3.13: clean

CPython 3.12.1's test_generators doctests run under unittest, and a KeyboardInterrupt is
raised (from a profile hook: at a call boundary, as a signal handler would raise it) in
``doctest.DocTestRunner.run``'s ``finally`` block right after ``sys.settrace(save_trace)``,
the point where a hard scope's HardLimitError landed. The rest of that block is skipped, so
``linecache.getlines`` stays bound to the runner, which keeps the refleaks doctest's globs
(and its deliberate ``tee`` cycle) alive until shutdown, where 3.12.1 segfaults in
``teedataobject_clear`` from ``finalize_modules``.
"""

from __future__ import annotations

import doctest
import linecache
import sys
import types
import unittest
from typing import Any

import test.test_generators as generators  # type: ignore[import-not-found]

TARGET = sys.argv[1] if len(sys.argv) > 1 else "refleaks"


def profile(frame: types.FrameType, event: str, arg: Any) -> None:
    if (event == "c_return" and arg is sys.settrace and frame.f_code.co_name == "run"
            and frame.f_code.co_filename == doctest.__file__
            and TARGET in frame.f_locals["test"].name):
        sys.setprofile(None)
        raise KeyboardInterrupt


tests = [t for t in doctest.DocTestSuite(generators) if TARGET in t.id()]  # type: ignore[union-attr]
suite = unittest.TestSuite(tests)
sys.setprofile(profile)
try:
    unittest.TextTestRunner(verbosity=0).run(suite)
except KeyboardInterrupt:
    print("interrupted in DocTestRunner.run's finally", flush=True)
patched = getattr(linecache.getlines, "__self__", None) is not None
print("linecache.getlines still patched:", patched, flush=True)
