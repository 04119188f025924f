"""CPython's own test modules, which some distributions ship apart from the interpreter."""

from __future__ import annotations

import importlib.util
import sys

import pytest


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing too
        return False


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip a test that runs these modules where they are not installed, saying so."""
    missing = [m for m in modules if not _installed(m)]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"CPython's test modules {', '.join(missing)} are not installed with "
        f"{sys.executable} (Debian and Ubuntu ship them as libpython3.X-testsuite)",
    )
