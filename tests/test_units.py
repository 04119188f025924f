from __future__ import annotations

from typing import Any

import pytest

import gotcha_async as gotcha
from gotcha_async._units import check_limit, parse_size


def test_binary_and_decimal_constants() -> None:
    assert (gotcha.KiB, gotcha.MiB, gotcha.GiB) == (1024, 1024**2, 1024**3)
    assert (gotcha.TiB, gotcha.PiB, gotcha.EiB) == (1024**4, 1024**5, 1024**6)
    assert (gotcha.KB, gotcha.MB, gotcha.GB, gotcha.TB, gotcha.PB, gotcha.EB) == tuple(
        1000**n for n in range(1, 7)
    )
    assert (gotcha.Kilo, gotcha.Mega, gotcha.Giga) == (gotcha.KB, gotcha.MB, gotcha.GB)
    assert (gotcha.Tera, gotcha.Peta, gotcha.Exa) == (gotcha.TB, gotcha.PB, gotcha.EB)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("64 MiB", 64 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("10k", 10_000),
        ("10K", 10_000),
        ("10kb", 10_000),
        ("2 KiB", 2048),
        ("0.5 KiB", 512),
        (" 3 g ", 3 * 10**9),
        ("1 EiB", 1024**6),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "1.2.3", "-5", "5 XB", "1e6", "0.3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|whole"):
        parse_size(text)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (0, 0), (10, 10), (3.0, 3), ("1 KiB", 1024)]
)
def test_check_limit_accepts(value: object, expected: int | None) -> None:
    assert check_limit("bytes", value) == expected


@pytest.mark.parametrize(
    ("value", "error", "shown"),
    [
        (-1, ValueError, "-1"),
        (1.5, ValueError, "1.5"),
        ("lots", ValueError, "'lots'"),
        ("0.5B", ValueError, "'0.5B'"),
        (True, TypeError, "True"),
        ([1], TypeError, "[1]"),
        (2**70, ValueError, str(2**70)),
    ],
)
def test_check_limit_rejects_naming_parameter_and_value(
    value: object, error: type[Exception], shown: str
) -> None:
    with pytest.raises(error) as info:
        check_limit("objects", value)
    assert "objects" in str(info.value)
    assert shown in str(info.value)


@pytest.mark.parametrize("name", ["bytes", "objects", "calls", "memory"])
def test_limit_validates_every_parameter(name: str) -> None:
    # Any: the point is to pass each parameter what its annotation forbids
    negative: dict[str, Any] = {name: -3}
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got -3"):
        gotcha.limit(**negative)
    wrong_type: dict[str, Any] = {name: object()}
    with pytest.raises(TypeError, match=name):
        gotcha.move_on_limit(**wrong_type)
    unparsable: dict[str, Any] = {name: "ten"}
    with pytest.raises(ValueError, match=name):
        gotcha.Context(**unparsable)


def test_the_pytest_plugin_names_the_resources_as_the_package_does() -> None:
    # the plugin imports nothing of the package when pytest loads it, so it keeps its own
    # copy of the table
    from gotcha_async import _units, pytest_plugin

    assert pytest_plugin._LIMIT_ARGS == _units.RESOURCES
    assert pytest_plugin._UNITS == _units.UNITS
    assert tuple(_units.USED) == _units.RESOURCES
