"""Importing the middleware and its instruments' module imports no OpenTelemetry
(tests/test_otel.py)."""

from __future__ import annotations

import sys

import gotcha_async._otel
import gotcha_async.asgi

assert gotcha_async.asgi and gotcha_async._otel
imported = [m for m in sys.modules if m.startswith("opentelemetry")]
assert not imported, imported
print("ok")
