"""What every crash script shares (imported as ``_common``: the script's own folder
is first on ``sys.path``)."""

from __future__ import annotations

import json
import sys
from typing import Any


def report(**values: Any) -> None:
    """Print the RESULT line that run_script() parses."""
    print("RESULT " + json.dumps(values), flush=True)


def version() -> tuple[int, int]:
    return sys.version_info[:2]
