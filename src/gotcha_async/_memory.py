"""Memory held by a scope, and where it was allocated (through tracemalloc)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._context import Context


def sites_report(ctx: Context) -> str:
    """The top allocation sites of what ctx holds, for an error message ('' if none)."""
    return ""
