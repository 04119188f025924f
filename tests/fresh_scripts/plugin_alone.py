"""The pytest plugin without the package's own ``__init__`` (tests/test_pytest_plugin.py).

Run in the inner session's folder with the package's folder as argument: a bare package
object takes the package's place, so that what gets imported is what the plugin module
and its hooks import. Prints ``LOADED [...]``, the package's modules then loaded, and
exits with the inner session's code.
"""

from __future__ import annotations

import sys
import types

bare = types.ModuleType("gotcha_async")
bare.__path__ = [sys.argv[1]]
sys.modules["gotcha_async"] = bare

import pytest  # noqa: E402  (after the bare package is in place)

# the bare package was imported before pytest could mark it for assertion rewriting
code = pytest.main(["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA",
                    "-W", "ignore::pytest.PytestAssertRewriteWarning"])
assert "gotcha_async.pytest_plugin" in sys.modules
loaded = sorted(m for m in sys.modules if m.startswith("gotcha_async."))
print("LOADED", loaded)
sys.exit(code)
