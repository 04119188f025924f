"""pytest plugin: allocation budgets for tests (``@pytest.mark.gotcha``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gotcha(bytes=None, objects=None, calls=None, memory=None): allocation budget"
    )
