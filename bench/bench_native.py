"""What counting C libraries costs: each workload with ``install(native=True)`` and without.

    python bench/bench_native.py            # about a minute on two cores
    python bench/bench_native.py --quick    # fewer rounds

Native counting is process-wide and cannot be undone, so each side runs in a process
of its own: a worker process per side, started once, times one repeat of a workload
whenever it is asked, and the two sides are asked in turn, round after round, so that
what the machine does meanwhile falls on both alike. Both sides run every workload inside
the same ``gotcha.limit(bytes=...)`` scope (the PEP 445 hook and the scope cost them
alike); the only difference is the native hooks. The table shows, per workload, the
median of the per-round ratios (native / without), beside its goal:

- lxml: ``etree.fromstring`` of a 20 MB document;
- Pillow: decode a 2000x1500 PNG and resize it to 1000x750;
- JSON handler: bench_core.py's handler workload (``json.loads`` of a 50-item body, a sum, a list
  comprehension, a checkpoint, ``json.dumps``), 500 concurrent requests, each in its
  own ``limit()``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

GOALS = {"lxml parse 20 MB": 1.15, "Pillow decode+resize": 1.15, "JSON handler": 1.02}

BODY = json.dumps([{"id": i, "name": f"item-{i}", "price": i * 1.5} for i in range(50)])


def workloads() -> dict[str, Callable[[], float]]:
    from lxml import etree
    from PIL import Image

    import gotcha_async as gotcha

    doc = b"<root>" + b"".join(
        b"<item id='%d' kind='k%d'>text of item %d</item>" % (i, i % 7, i)
        for i in range(420_000)
    ) + b"</root>"
    assert len(doc) >= 20_000_000, len(doc)
    png = io.BytesIO()
    Image.effect_noise((2000, 1500), 64).convert("RGB").save(png, "PNG")
    png_bytes = png.getvalue()

    def lxml_parse() -> float:
        async def run() -> float:
            async with gotcha.limit(bytes="64 GiB"):
                t0 = time.perf_counter()
                tree = etree.fromstring(doc)
                t = time.perf_counter() - t0
            del tree
            return t

        return asyncio.run(run())

    def pillow() -> float:
        async def run() -> float:
            async with gotcha.limit(bytes="64 GiB"):
                t0 = time.perf_counter()
                im = Image.open(io.BytesIO(png_bytes))
                im.load()
                small = im.resize((1000, 750))
                t = time.perf_counter() - t0
            del im, small
            return t

        return asyncio.run(run())

    async def handler(body: str) -> str:
        async with gotcha.limit(bytes="64 MiB"):
            items = json.loads(body)
            total = sum(item["price"] for item in items)
            names = [item["name"].upper() for item in items]
            await asyncio.sleep(0)
            out = json.dumps({"total": total, "names": names})
        return out

    def json_handler() -> float:
        async def run() -> float:
            t0 = time.perf_counter()
            for _ in range(20):
                await asyncio.gather(*(handler(BODY) for _ in range(500)))
            return time.perf_counter() - t0

        return asyncio.run(run())

    return {"lxml parse 20 MB": lxml_parse, "Pillow decode+resize": pillow,
            "JSON handler": json_handler}


def worker(native: bool) -> None:
    """Answer each line naming a workload with the seconds one repeat took."""
    import gotcha_async as gotcha

    gotcha.install(native=native)
    cases = workloads()
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        cases[name]()  # warm: the first repeat of a round pays for the caches
        print(min(cases[name]() for _ in range(3)), flush=True)


def ask(proc: subprocess.Popen[str], name: str) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(name + "\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    parser.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker == "on")
        return
    procs: dict[str, subprocess.Popen[str]] = {}
    for side in ("off", "on"):
        procs[side] = subprocess.Popen(
            [sys.executable, __file__, "--worker", side],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
    for proc in procs.values():
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()
        if ready != "ready":
            raise SystemExit(f"a worker did not start: {ready!r}")
    rounds = 3 if args.quick else 9
    ratios: dict[str, list[float]] = {name: [] for name in GOALS}
    times: dict[str, dict[str, list[float]]] = {n: {"off": [], "on": []} for n in GOALS}
    for r in range(rounds):
        for name in GOALS:
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            got = {side: ask(procs[side], name) for side in order}
            ratios[name].append(got["on"] / got["off"])
            for side in got:
                times[name][side].append(got[side])
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait()
    print(f"{'workload':<22} {'without':>10} {'native':>10} {'ratio':>7} {'goal':>8}")
    for name, goal in GOALS.items():
        off = statistics.median(times[name]["off"])
        on = statistics.median(times[name]["on"])
        ratio = statistics.median(ratios[name])
        verdict = "ok" if ratio <= goal else "MISSED"
        print(f"{name:<22} {off * 1e3:>8.1f}ms {on * 1e3:>8.1f}ms {ratio:>7.3f} "
              f"{'<= ' + str(goal):>8} {verdict}")
    print(f"({rounds} rounds; each figure the best of 3 repeats after a warm one; "
          "ratio: the median of the per-round ratios)")


if __name__ == "__main__":
    main()
