"""Memory held by a scope, and where it was allocated.

Which blocks a scope holds comes from the C hook's table: every block recorded inside
a scope that tracks held memory (every block with ``exact_memory=True``, a sample
otherwise) is kept with its weight and its site, the innermost user frames at the
time, and whoever frees it -- another task, another thread -- credits the scope back.
The result is an ordinary ``tracemalloc.Snapshot`` restricted to the scope, so that
tracemalloc's own filters and statistics apply to it; tracemalloc itself need not run.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._context import Context

# allocation sites in this package are bookkeeping, never the user's
_OWN_FRAMES = (tracemalloc.Filter(False, os.path.join(os.path.dirname(__file__), "*")),)
SITES_IN_MESSAGES = 5
SITE_FRAMES = 4


def snapshot(ctx: Context) -> tracemalloc.Snapshot:
    """A snapshot of the blocks ctx (and the scopes inside it) still holds.

    :raises RuntimeError: if the scope does not track held memory
    """
    if ctx._memory() is None:
        raise RuntimeError(
            "this scope does not track held memory: give it a memory= limit or "
            "track_memory=True"
        )
    traces = [
        (0, size, frames, len(frames))
        for size, frames in ctx._held_blocks()
        if frames is not None  # no user code on the stack
    ]
    return tracemalloc.Snapshot(traces, SITE_FRAMES)


def allocation_sites(
    ctx: Context,
    limit: int | None = 10,
    *,
    key_type: str = "lineno",
    filters: Sequence[tracemalloc.Filter | tracemalloc.DomainFilter] = (),
) -> list[tracemalloc.Statistic]:
    """Where the memory ctx holds was allocated, biggest first (see Context)."""
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, not {limit!r}")
    every: list[tracemalloc.Filter | tracemalloc.DomainFilter] = [*_OWN_FRAMES, *filters]
    snap = snapshot(ctx).filter_traces(every)
    stats = snap.statistics(key_type)
    return stats if limit is None else stats[:limit]


def format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")  # pragma: no cover


def format_sites(stats: Sequence[tracemalloc.Statistic]) -> str:
    lines = []
    for stat in stats:
        frame = stat.traceback[0]
        blocks = "block" if stat.count == 1 else "blocks"
        lines.append(
            f"  {format_size(stat.size):>10} in {stat.count:,} {blocks} at "
            f"{frame.filename}:{frame.lineno}"
        )
    return "\n".join(lines)


def sites_report(ctx: Context) -> str:
    """The top allocation sites of what ctx holds, for an error message ('' if none)."""
    if ctx._memory() is None:
        return ""
    stats = allocation_sites(ctx, SITES_IN_MESSAGES)
    if not stats:
        return ""
    return "\ntop allocation sites still held by the scope:\n" + format_sites(stats)
