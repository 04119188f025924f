"""Item 7: an isolated subinterpreter imports gotcha_async (or loads its extension
directly) before the main interpreter does.

    subinterp_import.py package|extension|control

control: the subinterpreter imports only asyncio (which the package imports), to
tell CPython's own failures apart (3.12.1 aborts at exit with "free(): invalid
pointer" after asyncio is imported in an isolated subinterpreter, gotcha or not).

The import there must fail with a clear ImportError (or work) and leave nothing
behind: the main interpreter then imports the package, counts, and exits cleanly.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig

from _common import report
from _subinterp import create_isolated, destroy, run

assert "gotcha_async" not in sys.modules

spec = importlib.util.find_spec("gotcha_async")
assert spec is not None and spec.submodule_search_locations
if sys.argv[1] == "package":
    code = "import gotcha_async"
elif sys.argv[1] == "control":
    code = "import asyncio"
else:
    # found by name, not by find_spec("gotcha_async._meter"), which would import the
    # package here first
    origin = os.path.join(spec.submodule_search_locations[0],
                          "_meter" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert os.path.exists(origin), origin
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('gotcha_async._meter', {origin!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
    )
assert "gotcha_async" not in sys.modules  # the subinterpreter is first
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
