"""How close native counting comes to what the process really takes: the table in
docs/how-it-works.md ("C libraries' memory: how close").

    python scripts/native_accuracy.py            # a Markdown table, about half a minute

For each workload, in a fresh process of its own with ``gotcha.install(native=True)``,
the workload runs in ``gotcha.limit(memory=..., exact_memory=True)`` and keeps its result:

- charged: the scope's ``used().bytes`` (everything allocated, frees not subtracted);
- held peak: ``ctx.memory().peak``;
- RSS growth: the process's peak resident set (``VmHWM``, reset first through
  ``/proc/self/clear_refs``) less its resident set before the workload;

and, in another fresh process without gotcha, tracemalloc's peak over the same workload
(``tracemalloc.get_traced_memory()``: what Python's allocators, and numpy's arrays, which
numpy reports to tracemalloc, saw). The last column is held peak / RSS growth.

The inputs (the CSV text, the PNG, the XML document) are made before the measurement,
and every module is imported and warmed first, then ``malloc_trim(0)`` gives the warm
run's freed memory back to the system (reused, it would show as no growth): what is
measured is the workload's own.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

WORKLOADS = ["numpy zeros (touched)", "pandas read_csv+groupby", "Pillow decode+resize",
             "lxml parse"]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def make(name: str) -> Callable[[], Any]:
    if name.startswith("numpy"):
        import numpy as np

        def numpy_zeros() -> Any:
            a = np.zeros((4000, 4000))  # 128 MB, calloc: untouched pages take no RSS
            a += 1.0
            return a

        numpy_zeros()
        return numpy_zeros
    if name.startswith("pandas"):
        import pandas as pd

        text = "k,a,b,c\n" + "".join(f"k{i % 97},{i},{i * 0.5},name{i % 1013}\n"
                                     for i in range(400_000))

        def pandas_csv() -> Any:
            df = pd.read_csv(io.StringIO(text))
            return df, df.groupby("k").agg({"a": "sum", "b": "mean", "c": "nunique"})

        pandas_csv()
        return pandas_csv
    if name.startswith("Pillow"):
        from PIL import Image

        png = io.BytesIO()
        Image.effect_noise((2000, 1500), 64).convert("RGB").save(png, "PNG")
        data = png.getvalue()

        def pillow() -> Any:
            im = Image.open(io.BytesIO(data))
            im.load()
            return im, im.resize((1000, 750))

        pillow()
        return pillow
    from lxml import etree

    doc = b"<root>" + b"".join(
        b"<item id='%d' kind='k%d'>text of item %d</item>" % (i, i % 7, i)
        for i in range(420_000)
    ) + b"</root>"

    def lxml_parse() -> Any:
        return etree.fromstring(doc)

    lxml_parse()
    return lxml_parse


def settle_heap() -> None:
    """Give the warm-up's freed memory back to the system: reused, it would be no growth."""
    import ctypes

    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def measure_native(name: str) -> dict[str, int]:
    import asyncio

    import gotcha_async as gotcha

    gotcha.install(native=True)
    work = make(name)
    settle_heap()

    def reset_peak_rss() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    async def run() -> dict[str, int]:
        reset_peak_rss()
        before = rss()
        async with gotcha.limit(memory="8 GiB", exact_memory=True) as ctx:
            kept = work()
            peak_rss = hwm()
        memory = ctx.memory()
        assert memory is not None
        del kept
        return {"charged": ctx.used().bytes, "held_peak": memory.peak,
                "rss_growth": peak_rss - before}

    return asyncio.run(run())


def measure_tracemalloc(name: str) -> dict[str, int]:
    import tracemalloc

    work = make(name)
    settle_heap()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    kept = work()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del kept
    return {"tracemalloc_peak": peak}


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--how", choices=["native", "tracemalloc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        fn = measure_native if args.how == "native" else measure_tracemalloc
        print(json.dumps(fn(args.one)))
        return
    rows = []
    for name in WORKLOADS:
        got: dict[str, int] = {}
        for how in ("native", "tracemalloc"):
            out = subprocess.run([sys.executable, __file__, "--one", name, "--how", how],
                                 capture_output=True, text=True, check=True)
            got.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append((name, got))
    print("| workload | charged | held peak | tracemalloc peak | RSS growth (peak) "
          "| held / RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, g in rows:
        ratio = g["held_peak"] / g["rss_growth"] if g["rss_growth"] > 0 else float("nan")
        print(f"| {name} | {mib(g['charged'])} | {mib(g['held_peak'])} | "
              f"{mib(g['tracemalloc_peak'])} | {mib(g['rss_growth'])} | {ratio:.2f} |")
    print(f"\n(CPython {sys.version.split()[0]}; one run, each side in a fresh process)")


if __name__ == "__main__":
    main()
