"""Instructions per request of the ASGI benchmark's server, counted by callgrind.

    python bench/bench_asgi_instructions.py              # about five minutes on two cores
    python bench/bench_asgi_instructions.py --requests 1000
    python bench/bench_asgi_instructions.py --loop asyncio --http h11   # pure Python

bench_asgi.py's sides (the same Starlette app bare, in a bare anyio cancel scope, in a
plain limit(), behind LimitMiddleware, and behind it with memory=), each served by
uvicorn under callgrind. The load is this script's own keep-alive client in this
process, a fixed number of requests over 32 connections as bench_asgi.py's wrk runs
use: the server is the slower side by far under valgrind, so every loop iteration
finds requests waiting, as it does under wrk. After a warm-up the server's counters
are zeroed (callgrind_control), the requests are made, and the counters dumped: what
the server executed for those requests, start-up and warm-up left out, divided by
their number. Its throughput ratios on this shared two-core machine move by a tenth
from run to run (bench_asgi.py shows them); these counts move by a few tenths of a
percent, and by more where the cycle collector ran more often in one run than in
another (the server's own garbage: the same build has been seen at 248 and 303
collections for 2,000 requests), so the table also gives the counts without the
collector's work, and how many collections there were. An instruction is not a
nanosecond, so this is the second measure beside bench_asgi.py, not a replacement.

Needs valgrind (with callgrind_control) on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_asgi

HERE = Path(__file__).resolve().parent
CONNECTIONS = 32

TARGETS = {
    "without": ["--app-dir", str(bench_asgi.EXAMPLES), "asgi_app:bare_app"],
    "cancel scope": ["--app-dir", str(HERE), "--factory", "bench_asgi:cancel_scope_app"],
    "limit()": ["--app-dir", str(HERE), "--factory", "bench_asgi:limit_only_app"],
    "with": ["--app-dir", str(bench_asgi.EXAMPLES), "asgi_app:app"],
    "with memory=": ["--app-dir", str(HERE), "--factory", "bench_asgi:memory_app"],
}

# (side, baseline, goal as a minimum of baseline/side, or None for a reference row);
# "with" / "without" takes its goal from the server's set-up (bench_asgi.BARE_GOALS)
ROWS = [
    ("with", "without", None),
    ("with", "cancel scope", bench_asgi.GOAL),
    ("limit()", "cancel scope", None),
    ("with", "limit()", None),
    ("with memory=", "with", bench_asgi.MEMORY_GOAL),
]


async def _client(port: int, left: list[int]) -> None:
    reader, writer = await asyncio.open_connection(bench_asgi.HOST, port)
    request = f"GET / HTTP/1.1\r\nHost: {bench_asgi.HOST}:{port}\r\n\r\n".encode()
    try:
        while left[0] > 0:
            left[0] -= 1
            await bench_asgi.get_on(reader, writer, request)
    finally:
        writer.close()
        await writer.wait_closed()


def requests(port: int, n: int) -> None:
    async def run() -> None:
        left = [n]
        await asyncio.gather(*(_client(port, left) for _ in range(CONNECTIONS)))

    asyncio.run(run())


def control(pid: int, flag: str) -> None:
    out = subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"callgrind_control {flag} failed:\n{out.stdout}{out.stderr}")


def collector(text: str) -> tuple[int, int]:
    """(collections, instructions) of the cycle collector in a callgrind dump: the
    calls of gc_collect_main and their inclusive cost, over all its callers."""
    names: dict[str, str] = {}
    calls = cost = 0
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^c?fn=\((\d+)\)(?: (.*))?$", line)
        if m is None:
            continue
        if m.group(2):
            names[m.group(1)] = m.group(2)
        if line.startswith("cfn=") and names.get(m.group(1)) == "gc_collect_main":
            c = re.match(r"^calls=(\d+)", lines[i + 1])
            if c is None:
                raise RuntimeError(f"unexpected callgrind line after {line!r}")
            calls += int(c.group(1))
            cost += int(lines[i + 2].split()[1])
    return calls, cost


def count(side: str, warmup: int, n: int, keep: str | None, setup: tuple[str, str]
          ) -> tuple[float, float, int]:
    """Instructions per request of one side's server, the same without the cycle
    collector's, and the number of collections."""
    port = bench_asgi.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = open(f"{tmp}/log", "w+")
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, "-m", "uvicorn", *TARGETS[side], "--host", bench_asgi.HOST,
             "--port", str(port), "--log-level", "warning", "--no-access-log",
             "--loop", setup[0], "--http", setup[1]],
            stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"uvicorn for {side} exited:\n{log.read()[-3000:]}")
                try:
                    if bench_asgi.get(port, "/", timeout=30) == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn for {side} did not answer within 300 s")
                time.sleep(0.5)
            requests(port, warmup)
            control(proc.pid, "--zero")
            requests(port, n)
            control(proc.pid, "--dump")
            dumps = [f for f in glob.glob(f"{tmp}/out*") if not f.endswith("out")]
            if len(dumps) != 1:
                raise RuntimeError(f"expected one dump for {side}, found {dumps}")
            text = Path(dumps[0]).read_text()
            if keep is not None:  # for callgrind_annotate
                shutil.copy(dumps[0], Path(keep) / f"callgrind.{side.replace(' ', '_')}")
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no totals in the dump of {side}")
    collections, gc_cost = collector(text)
    total = int(m.group(1))
    return total / n, (total - gc_cost) / n, collections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--keep", metavar="DIR", help="keep each side's dump in DIR")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="uvicorn's event loop (auto: uvloop if installed)")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                        help="uvicorn's HTTP parser (auto: httptools if installed)")
    args = parser.parse_args()
    setup = bench_asgi.server_setup(args.loop, args.http)
    if not 100 <= args.requests <= 100_000 or not 0 <= args.warmup <= 100_000:
        parser.error("--requests: 100 to 100000; --warmup: 0 to 100000")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_asgi_instructions.py needs {tool} on PATH")

    with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:
        counted = dict(zip(TARGETS, pool.map(
            lambda s: count(s, args.warmup, args.requests, args.keep, setup), TARGETS),
            strict=True))
    per = {side: c[0] for side, c in counted.items()}
    per_no_gc = {side: c[1] for side, c in counted.items()}

    print(f"Instructions per request of the uvicorn server ({setup[0]}, {setup[1]}), "
          f"examples/asgi_app.py `/`, "
          f"{CONNECTIONS} keep-alive connections (callgrind: {args.requests} requests after "
          f"{args.warmup} of warm-up, CPython {sys.version.split()[0]})\n")
    print("| side | instructions per request | without the cycle collector | collections |")
    print("|---|---:|---:|---:|")
    for side in TARGETS:
        print(f"| {side} | {per[side]:,.0f} | {per_no_gc[side]:,.0f} | "
              f"{counted[side][2]} |")
    print()
    print("As throughput ratios (the baseline's instructions over the side's), beside "
          "bench_asgi.py's goals:\n")
    width = max(len(f"{s} / {b}") for s, b, _ in ROWS)
    print(f"| {'ratio':<{width}} | value | without the collector | goal |")
    print(f"|{'-' * (width + 2)}|-------|-----------------------|------|")
    for side, base, goal in ROWS:
        if (side, base) == ("with", "without"):
            goal = bench_asgi.BARE_GOALS.get(setup)
        ratio = per[base] / per[side]
        ratio_no_gc = per_no_gc[base] / per_no_gc[side]
        mark = "(reference)" if goal is None else \
            f">= {goal}" + ("" if min(ratio, ratio_no_gc) >= goal else " (missed)")
        print(f"| {f'{side} / {base}':<{width}} | {ratio:.3f} | {ratio_no_gc:.3f} "
              f"| {mark} |")


if __name__ == "__main__":
    main()
