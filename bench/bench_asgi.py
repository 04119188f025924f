"""Requests per second of examples/asgi_app.py with and without LimitMiddleware.

    python bench/bench_asgi.py            # 4 rounds of 4 s per side (about 80 s)
    python bench/bench_asgi.py --quick    # 2 rounds of 2 s

Four sides, the same Starlette app each time: ``asgi_app:bare_app`` (no gotcha),
``asgi_app:app`` (with LimitMiddleware), and two to tell the costs apart: the bare app
inside a plain ``gotcha.limit()`` per request (:func:`limit_only_app`: the core without
the middleware), and inside nothing but the anyio cancel scope a ``Context`` wraps
(:func:`cancel_scope_app`: the floor under the core). Each is served by uvicorn in a
subprocess of its own on 127.0.0.1 (one worker, uvicorn's default loop and HTTP
parser). The load comes from another process: ``wrk`` if it is on PATH, otherwise this
script's own HTTP/1.1 keep-alive client (``--load``), which is slower than wrk, so it
saturates the server less and hides part of the cost. On a machine with two CPUs or
more, the servers get one CPU and the load the other.

Within each round the sides take turns (in a rotating order) on the normal route
``/``; the table shows every round's ratios and their medians, so a burst of noise
on a shared machine hits all sides of a round alike. Loopback only; bounded in
requests (by time) and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HOST = "127.0.0.1"
GOAL = 0.95          # with LimitMiddleware / the app in a bare cancel scope
MEMORY_GOAL = 0.93   # with memory= / without it
# with LimitMiddleware / the bare app, for uvicorn's two usual set-ups (loop, parser)
BARE_GOALS = {("uvloop", "httptools"): 0.97, ("asyncio", "h11"): 0.95}


def server_setup(loop: str, http: str) -> tuple[str, str]:
    """The loop and parser uvicorn picks for ``--loop``/``--http`` (``auto``: uvloop and
    httptools where they are installed)."""
    import importlib.util

    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def limit_only_app() -> Any:
    """The bare example app, each HTTP request inside ``gotcha.limit(bytes=4 MiB)``.

    The same budget as the middleware's, without the middleware: what the core costs.
    A factory (``uvicorn --factory``) so that importing this script loads no app.
    """
    sys.path.insert(0, str(EXAMPLES))
    from asgi_app import bare_app

    import gotcha_async as gotcha

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await bare_app(scope, receive, send)
            return
        async with gotcha.limit(bytes=4 * gotcha.MiB):
            await bare_app(scope, receive, send)

    return app


def memory_app() -> Any:
    """``asgi_app:app`` with held memory measured too: ``memory=4 MiB`` beside its bytes.

    The goal: at least MEMORY_GOAL of the throughput of the same middleware without it.
    """
    sys.path.insert(0, str(EXAMPLES))
    from asgi_app import build

    return build(limited=True, memory=4 * 2**20)


def cancel_scope_app() -> Any:
    """The bare example app, each HTTP request inside an anyio cancel scope, nothing else.

    What every ``Context`` is built on (it wraps anyio's backend scope), so the
    floor under ``limit()``: the same backend class that ``limit()`` creates, entered and
    exited around the request.
    """
    sys.path.insert(0, str(EXAMPLES))
    # private, but it is the class limit() instantiates on asyncio (and uvloop);
    # anyio.CancelScope() would add a backend lookup per request that limit() skips
    from anyio._backends._asyncio import CancelScope
    from asgi_app import bare_app

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await bare_app(scope, receive, send)
            return
        with CancelScope():
            await bare_app(scope, receive, send)

    return app


# -- the servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def pin(pid: int, cpu: int) -> None:
    if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, {cpu})


class Server:
    """uvicorn serving ``target`` (its app arguments) in a subprocess."""

    def __init__(self, target: list[str], options: list[str]) -> None:
        attr = target[-1]
        self.port = free_port()
        # the server's log (a hog's warning, its traceback) is shown only if it fails
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *target,
             "--host", HOST, "--port", str(self.port), "--log-level", "warning",
             "--no-access-log", *options],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        pin(self.proc.pid, 0)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(
                    f"uvicorn for {attr} exited with {self.proc.returncode}:\n{self.log.read()}"
                )
            try:
                if get(self.port, "/", timeout=1) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"uvicorn for {attr} did not answer within 20 s")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the load ---------------------------------------------------------------------------


def load_wrk(wrk: str, port: int, connections: int, seconds: float) -> float:
    proc = subprocess.Popen(
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         f"http://{HOST}:{port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    pin(proc.pid, 1)
    out, _ = proc.communicate(timeout=seconds + 30)
    if proc.returncode != 0 or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk failed or saw errors:\n{out}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    return float(m.group(1))


def load_python(port: int, connections: int, seconds: float) -> float:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--load", str(port), "--connections", str(connections),
         "--duration", str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )
    pin(proc.pid, 1)
    out, _ = proc.communicate(timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed: {out}")
    return float(out.split()[-1])


async def get_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: bytes) -> None:
    """One keep-alive GET on an open connection; anything but a 200 is an error."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {head[:60]!r}")
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if m is None:
        raise RuntimeError("the load generator needs Content-Length responses")
    await reader.readexactly(int(m.group(1)))


async def _client(port: int, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    try:
        while time.monotonic() < deadline:
            await get_on(reader, writer, request)
            counts[0] += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def _load(port: int, connections: int, seconds: float) -> float:
    counts = [0]
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(_client(port, deadline, counts) for _ in range(connections)))
    return counts[0] / (time.monotonic() - start)


def run_load(port: int, connections: int, seconds: float) -> None:
    try:
        import uvloop
    except ImportError:
        rps = asyncio.run(_load(port, connections, seconds))
    else:
        rps = uvloop.run(_load(port, connections, seconds))
    print(f"{rps:.1f}")


# -- the table --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per side")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="uvicorn's event loop (auto: uvloop if installed)")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                        help="uvicorn's HTTP parser (auto: httptools if installed)")
    parser.add_argument("--python-load", action="store_true",
                        help="use the Python load generator even if wrk is there")
    parser.add_argument("--load", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        run_load(args.load, args.connections, args.duration)
        return
    if args.quick:
        args.rounds, args.duration = 2, 2.0
    if not 1 <= args.rounds <= 20 or not 0.5 <= args.duration <= 60:
        parser.error("rounds must be 1 to 20 and duration 0.5 to 60 s")

    wrk = None if args.python_load else shutil.which("wrk")

    def load(port: int, seconds: float) -> float:
        if wrk is not None:
            return load_wrk(wrk, port, args.connections, seconds)
        return load_python(port, args.connections, seconds)

    here = str(Path(__file__).resolve().parent)
    targets = {
        "without": ["--app-dir", str(EXAMPLES), "asgi_app:bare_app"],
        "cancel scope": ["--app-dir", here, "--factory", "bench_asgi:cancel_scope_app"],
        "limit()": ["--app-dir", str(Path(__file__).resolve().parent), "--factory",
                    "bench_asgi:limit_only_app"],
        "with": ["--app-dir", str(EXAMPLES), "asgi_app:app"],
        "with memory=": ["--app-dir", here, "--factory", "bench_asgi:memory_app"],
    }
    servers: dict[str, Server] = {}
    try:
        for side, target in targets.items():
            servers[side] = Server(target, ["--loop", args.loop, "--http", args.http])
        # the sides do differ: the limited ones refuse the hog
        hog = {side: get(s.port, "/hog", timeout=30) for side, s in servers.items()}
        if hog != {"without": 200, "cancel scope": 200, "limit()": 500, "with": 503,
                   "with memory=": 503}:
            raise RuntimeError(f"unexpected answers to /hog: {hog}")
        for s in servers.values():
            load(s.port, 1.0)  # warm-up
        rows = []
        sides = list(targets)
        for r in range(args.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            rows.append({side: load(servers[side].port, args.duration) for side in order})
    finally:
        for s in servers.values():
            s.close()

    generator = f"wrk -t1 -c{args.connections}" if wrk else \
        f"Python keep-alive client, {args.connections} connections"
    print(f"examples/asgi_app.py `/` under uvicorn (--loop {args.loop} --http {args.http}), "
          f"{args.duration:g} s per side, "
          f"load: {generator}\n")
    bare_goal = BARE_GOALS.get(server_setup(args.loop, args.http))
    ratios = {
        "with / without": ("with", "without",
                           f">= {bare_goal}" if bare_goal else "(reference)"),
        "with / cancel scope": ("with", "cancel scope", f">= {GOAL}"),
        "limit() / cancel scope": ("limit()", "cancel scope", "(the core)"),
        "with / limit()": ("with", "limit()", "(the middleware's own)"),
        "with memory= / with": ("with memory=", "with", f">= {MEMORY_GOAL}"),
    }
    print("| round | " + " | ".join(f"{side} (req/s)" for side in targets) + " | "
          + " | ".join(ratios) + " |")
    print("|---|" + "---:|" * (len(targets) + len(ratios)))
    per_round = {name: [r[a] / r[b] for r in rows] for name, (a, b, _) in ratios.items()}
    for i, row in enumerate(rows):
        print(f"| {i + 1} | " + " | ".join(f"{row[side]:,.0f}" for side in targets) + " | "
              + " | ".join(f"{per_round[name][i]:.3f}" for name in ratios) + " |")
    med = {name: statistics.median(values) for name, values in per_round.items()}
    print("| median | " + " | ".join(
        f"{statistics.median(row[side] for row in rows):,.0f}" for side in targets) + " | "
        + " | ".join(f"**{med[name]:.3f}**" for name in ratios) + " |")
    print("| goal | " + " | ".join("" for _ in targets) + " | "
          + " | ".join(goal for _, _, goal in ratios.values()) + " |")
    goals = [("with / cancel scope", GOAL), ("with memory= / with", MEMORY_GOAL)]
    if bare_goal:
        goals.insert(0, ("with / without", bare_goal))
    for name, goal in goals:
        verdict = "met" if med[name] >= goal else "NOT met"
        print(f"\ngoal: {name} >= {goal}: {verdict}.", end="")
    print("\n\n\"cancel scope\" is the app inside nothing but the anyio cancel scope every "
          "Context wraps; \"limit()\" inside a plain limit() per request (the core without "
          "the middleware); \"with memory=\" is the middleware measuring held memory too.")


if __name__ == "__main__":
    main()
