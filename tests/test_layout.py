"""The one description of the tree, docs/how-it-works.md's "The pieces", names every
module of the package and every C file of the extension, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "how-it-works.md"
PACKAGE = ROOT / "src" / "gotcha_async"
C_SOURCES = ROOT / "src" / "_meter"


def described() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    pieces = text[text.index("## The pieces"):]
    pieces = pieces[:pieces.index("\n## ", 1)]
    return set(re.findall(r"^\| `([\w.]+\.(?:py|c))` \|", pieces, re.MULTILINE))


def test_every_module_and_c_file_is_described_once_and_none_that_is_gone() -> None:
    if not C_SOURCES.is_dir():  # the tests of an installed wheel: no sources to compare
        pytest.skip("no source tree here (an installed wheel's tests)")
    files = {p.name for p in PACKAGE.glob("*.py")} | {p.name for p in C_SOURCES.glob("*.c")}
    assert described() == files
