"""The examples run and print what the README and the docs say they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_nested() -> None:
    lines = run("nested.py").splitlines()
    assert lines[0].startswith("initial allocation ")
    assert lines[1].startswith("derived allocation ")
    initial = int(lines[0].split()[2])
    derived = int(lines[1].split()[2])
    total = int(lines[2].split()[2])
    assert 800 <= initial < 1024 and 40_000 <= derived < 41_000
    assert total >= initial + derived
    assert lines[3] == "5000 True"


def test_request_handler() -> None:
    out = run("request_handler.py")
    assert "hog: 503 bytes limit exceeded" in out
    assert "small: 200" in out and "another: 200" in out


def test_untrusted() -> None:
    out = run("untrusted.py")
    assert "small: 100" in out
    assert "large: bytes limit exceeded" in out


@pytest.mark.needs_frames
def test_hard_limit() -> None:
    out = run("hard_limit.py")
    kept = int(out.split("holding ")[1].split(" KiB")[0].replace(",", ""))
    assert 3 * 1024 < kept <= 4 * 1024 + 64
    assert "exceeded: True" in out


def test_aiohttp_app() -> None:
    out = run("aiohttp_app.py")
    assert "GET /: 200 " in out
    assert "GET /hog: 503 Service Unavailable: the request exceeded its bytes limit" in out
    cut = float(out.split("GET /stream: 200, cut off after ")[1].split(" MiB")[0])
    assert cut < 5  # of the 20 MiB the handler tried to send
    assert "response aborted, status 200 already sent; enforced;" in out


def test_observe_prometheus() -> None:
    out = run("observe_prometheus.py")
    assert out.count("GET /report: 200") == 3  # observe mode refuses nothing
    assert "observed only, not enforced: status 200 sent" in out
    scraped = [line for line in out.splitlines() if line.startswith("  gotcha_")]
    route = 'http_route="/items/{n:int}"'
    assert any(line.startswith("  gotcha_request_allocated_bytes_count{") and route in line
               and line.endswith(" 20.0") for line in scraped)
    assert any(line.startswith("  gotcha_request_exceeded_total{") and 'gotcha_enforced="false"'
               in line and line.endswith(" 3.0") for line in scraped)
    assert '"GET /report": {"bytes": "' in out
    assert "# 3 requests, 3 over the limit; bytes median " in out


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_a_run_line(name: str) -> None:
    assert f"python examples/{name}" in (EXAMPLES / name).read_text()
