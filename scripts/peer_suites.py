"""Run other projects' test suites with every test inside a gotcha scope.

    python scripts/peer_suites.py test.test_context test.test_asyncio.test_tasks
    python scripts/peer_suites.py --hard test.test_threading

Each test runs in the main thread, inside ``with gotcha.Context():`` (unlimited by
default; ``--hard`` gives it generous hard limits), so every allocation the test
makes -- in its own event loops, tasks and worker threads, which inherit the scope --
goes through the hook and is charged. The suites must pass as they do without it.
Prints the number of scopes and what they were charged, and exits with unittest's
status.
"""

from __future__ import annotations

import argparse
import sys
import unittest
from typing import Any

import gotcha_async as gotcha


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="unittest module names")
    parser.add_argument("--hard", action="store_true", help="a hard, generous scope per test")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()

    charged = {"scopes": 0, "bytes": 0, "objects": 0, "calls": 0}
    original = unittest.TestCase.run

    def run(
        self: unittest.TestCase, result: unittest.TestResult | None = None
    ) -> unittest.TestResult | None:
        limits: dict[str, Any] = (
            dict(bytes=16 * gotcha.GiB, calls=10**10, hard=True) if args.hard else {}
        )
        with gotcha.Context(**limits) as ctx:
            outcome = original(self, result)
        used = ctx.used()
        charged["scopes"] += 1
        charged["bytes"] += used.bytes
        charged["objects"] += used.objects
        charged["calls"] += used.calls
        return outcome

    unittest.TestCase.run = run  # type: ignore[method-assign]
    program = unittest.main(
        module=None, argv=[sys.argv[0], *(["-v"] if args.verbose else []), *args.modules],
        exit=False,
    )
    print(
        f"gotcha: {charged['scopes']} test scopes charged {charged['bytes']:,} bytes, "
        f"{charged['objects']:,} objects, {charged['calls']:,} calls"
    )
    if charged["scopes"] and not charged["calls"]:
        print("gotcha: the hook charged nothing: it was not in the allocator chain")
        return 1
    return 0 if program.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
