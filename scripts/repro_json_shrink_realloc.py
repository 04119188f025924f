"""3.12 and 3.13: a refused shrinking realloc in ``json.dumps`` is a ``SystemError``.

    python scripts/repro_json_shrink_realloc.py

Found by scripts/ecosystem_inject.py. ``_PyUnicodeWriter_Finish`` shrinks the encoded
string with ``resize_compact``; a hard scope refuses that realloc (it charges a realloc's
new size), ``resize_compact`` sets ``MemoryError`` and returns NULL, and ``encoder_call``
(``Modules/_json.c`` of 3.12.1 and 3.13.0) hands the NULL to ``PyTuple_SetItem``
unchecked: ``SystemError: <_json.Encoder object> returned a result with an exception
set``. 5 of 81 budgets on 3.12.1 and 3.13.0, 0 on 3.11.7 and 3.14.10.
"""

from __future__ import annotations

import asyncio
import json

import gotcha_async as gotcha

ROWS = [{"id": i, "name": f"row {i}", "tags": ["a", "b", "c"][: i % 4], "score": i / 7,
         "active": i % 2 == 0, "parent": None if i % 5 else i // 5} for i in range(7273)]
BUDGETS = range(200_000, 8_000_000, 97_003)


async def main() -> None:
    bad = []
    for b in BUDGETS:
        try:
            async with gotcha.move_on_limit(bytes=b, hard=True):
                json.dumps(ROWS)
        except SystemError as exc:
            bad.append(b)
            if len(bad) == 1:
                print(f"bytes={b}: {exc!r}, caused by {exc.__cause__!r}")
    print(f"SystemError for {len(bad)} of {len(BUDGETS)} budgets: {bad}")


if __name__ == "__main__":
    asyncio.run(main())
