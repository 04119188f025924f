"""Item 7: an isolated subinterpreter imports gotcha_async (or loads its extension
directly) before the main interpreter does.

    subinterp_import.py package|extension

The import there must fail with a clear ImportError (or work) and leave nothing
behind: the main interpreter then imports the package, counts, and exits cleanly.
"""

from __future__ import annotations

import importlib.util
import sys

from _common import report
from _subinterp import create_isolated, destroy, run

spec = importlib.util.find_spec("gotcha_async")
assert spec is not None and spec.submodule_search_locations
if sys.argv[1] == "package":
    code = "import gotcha_async"
else:
    ext = importlib.util.find_spec("gotcha_async._meter")
    assert ext is not None and ext.origin
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('gotcha_async._meter', {ext.origin!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
    )
interp = create_isolated()
failure = run(interp, code)
destroy(interp)

import gotcha_async as gotcha  # noqa: E402 - after the subinterpreter, on purpose

with gotcha.limit(bytes=gotcha.MiB, hard=True) as ctx:
    data = bytearray(1000)
try:
    with gotcha.limit(bytes=gotcha.MiB, hard=True):
        bytearray(50 * gotcha.MiB)
    refused = False
except gotcha.LimitExceeded:
    refused = True
report(sub=failure if failure is None else failure.strip().splitlines()[-1],
       used=ctx.used().bytes, refused=refused, current_none=gotcha.current() is None)
