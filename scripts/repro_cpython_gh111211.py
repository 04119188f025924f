"""CPython gh-111211 shown without gotcha: the fault-injection harness hits it on 3.12.1.

    python scripts/repro_cpython_gh111211.py    # 3.12.1: SIGSEGV collecting; 3.11, 3.13: clean

CPython 3.12.1's ``test_pickle`` dies in the collector when a hard scope's HardLimitError
stops the pure-Python pickler while its framer writes a frame (``_Framer.commit_frame``
holds a memoryview of the frame's ``BytesIO.getbuffer()``) and the stopped test's
traceback keeps that frame in a cycle. Here a KeyboardInterrupt, as Ctrl-C would raise it,
is raised by the file's ``write`` of that view, and the exception is put in a cycle of its
own: collecting it, 3.12.1 clears the buffer's exporter before the memoryview and
segfaults in ``bytesiobuf_releasebuffer`` (from ``mbuf_clear``), the fault injection's
backtrace. The fix reached 3.12 after 3.12.1 (GH-113096).
"""

from __future__ import annotations

import gc
import io
import pickle
import sys


class Failing(io.RawIOBase):
    """A file whose write of a frame's view raises, as an interrupt there would."""

    def write(self, b: object) -> int:
        if isinstance(b, memoryview) and type(b.obj).__name__ != "bytes":
            raise KeyboardInterrupt
        return len(b)  # type: ignore[arg-type]


kept: list[BaseException] = []
for _ in range(200):
    try:
        pickle._Pickler(Failing(), protocol=5).dump(
            [str(j) * 20 for j in range(20_000)])
    except KeyboardInterrupt as e:
        e.__notes__ = [e]  # type: ignore[list-item]  # the error, its traceback's frames: a cycle
        kept.append(e)
kept.clear()
print("collecting", flush=True)
gc.collect()
print("survived", sys.version.split()[0])
