"""SQLAlchemy's asyncio layer under a plain ``asyncio.timeout``, gotcha not even imported:
a cancellation at a random instant can leave the SQLite database locked.

    python scripts/repro_sqlalchemy_timeout.py [FIRST_SEED [LAST_SEED]]

The ecosystem run's SQLAlchemy row (three ORM sessions and Core inserts in a task group,
on aiosqlite) under ``asyncio.timeout(t)``, t uniform in [5, 300] ms, 20 rounds a seed;
then the same work outside any timeout, which fails with "database is locked" when a
cancelled round left a write transaction open. What remains of the ecosystem run's
SQLAlchemy row (docs/reliability.md) is this, and its soft scopes (cancellation only) show
it too. Prints, per seed, whether gotcha_async was loaded (it must not be) and the
problems.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ecosystem_inject as eco  # the row's work, as the ecosystem run does it


async def one_seed(seed: int) -> list[str]:
    rng = random.Random(seed)
    lib = eco.SQLAlchemy()
    lib.setup(tempfile.mkdtemp())
    problems: list[str] = []
    await lib.start(problems)
    for i in range(20):
        rows, seconds = rng.randint(1000, 10000), rng.uniform(0.005, 0.3)
        try:
            async with asyncio.timeout(seconds):
                await lib.awork(((i + 1) * 10, rows))
        except TimeoutError:
            pass
        except BaseException as exc:
            problems.append(f"round {i}: {exc!r}")
    try:
        await lib.finish(problems)
    except Exception as exc:
        problems.append(f"after the rounds: {exc!r}")
    return problems


def main() -> int:
    first = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    last = int(sys.argv[2]) if len(sys.argv) > 2 else first + 4
    locked = 0
    for seed in range(first, last + 1):
        problems = asyncio.run(one_seed(seed))
        locked += any("database is locked" in p for p in problems)
        print(f"seed {seed}: gotcha_async loaded: {'gotcha_async' in sys.modules}; "
              f"problems: {[p[:160] for p in problems]}")
    print(f"{locked} of {last - first + 1} seeds left the database locked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
