"""The resources a scope counts, unit constants, size strings and the validation of
limit arguments: one validator per kind of argument, used by the scopes, the middlewares
and the pytest plugin alike (the plugin keeps its own copy of RESOURCES and UNITS only,
for use before it imports anything of the package; tests/test_units.py keeps it the
same)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

#: What a scope counts, in the order of the C counters (_meter.h: R_BYTES ... R_MEMORY)
RESOURCES = ("bytes", "objects", "calls", "memory")
#: Each resource's figure, in words ("8 MiB bytes allocated")
USED = {
    "bytes": "bytes allocated",
    "objects": "objects allocated",
    "calls": "allocator calls",
    "memory": "bytes held at peak",
}
#: The unit of a count of each resource ("1,750 allocator calls")
UNITS = {
    "bytes": "bytes",
    "objects": "objects",
    "calls": "allocator calls",
    "memory": "bytes of memory held",
}

KiB: int = 1024
MiB: int = 1024**2
GiB: int = 1024**3
TiB: int = 1024**4
PiB: int = 1024**5
EiB: int = 1024**6
KB: int = 1000
MB: int = 1000**2
GB: int = 1000**3
TB: int = 1000**4
PB: int = 1000**5
EB: int = 1000**6
Kilo, Mega, Giga, Tera, Peta, Exa = KB, MB, GB, TB, PB, EB

_PREFIXES = "kmgtpe"
# "64 MiB", "1.5GB", "10k", "512": a number, a decimal or binary prefix, an optional B
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtpe])(i?))?b?\s*", re.IGNORECASE)
# the counters are 64-bit in C
_MAX = 2**64 - 2

Limit = int | str | None


def parse_size(text: str) -> int:
    """Parse a size string such as ``"64 MiB"``, ``"1.5GB"`` or ``"10k"`` into an int.

    Decimal prefixes (k, M, G, T, P, E, with or without B) are powers of 1000, binary
    ones (KiB, MiB, ...) powers of 1024, case-insensitively. The result must be a whole
    number.

    :raises ValueError: if the string is not a size or not a whole number.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (expected e.g. '64 MiB', '1.5GB', '10k')")
    number, prefix, binary = m.groups()
    scale = 1
    if prefix:
        scale = (1024 if binary else 1000) ** (_PREFIXES.index(prefix.lower()) + 1)
    value = Fraction(number) * scale
    if value.denominator != 1:
        raise ValueError(f"not a whole number of units: {text!r}")
    return int(value)


def check_limit(name: str, value: object) -> int | None:
    """Validate one limit argument; return it as an int, or None for no limit.

    :raises TypeError: for a value that is not an int, an integral float, a size
        string or None.
    :raises ValueError: for a negative, non-integral or unparsable value.
    """
    if value is None:
        return None
    if type(value) is int:
        result = value
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a size string or None, not {value!r}")
    elif isinstance(value, int):
        result = int(value)
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        result = int(value)
    elif isinstance(value, str):
        try:
            result = parse_size(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    else:
        raise TypeError(
            f"{name} must be an int, a size string or None, not {type(value).__name__} {value!r}"
        )
    if result < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if result > _MAX:
        raise ValueError(f"{name} is too large: {value!r}")
    return result


def check_bool(name: str, value: object) -> bool:
    """Validate a flag (``hard``, ``enforce`` ...): True or False, nothing else.

    :raises TypeError: for anything else, naming the parameter and the value
    """
    if type(value) is not bool:
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


#: The limit arguments a route (a middleware's ``routes=``) or a test's marker gives.
LIMIT_ARGS = (*RESOURCES, "hard")


def check_limit_args(kwargs: object, where: str | None = None) -> dict[str, Any]:
    """Validate a mapping of limit arguments (some of :data:`LIMIT_ARGS`); return them
    as a plain dict of checked values (limits as ints or None).

    :param where: how to name the mapping in an error, e.g. ``"routes['/upload/*']"``
        (each value is then named ``routes['/upload/*']['bytes']``); None: the values
        are parameters of their own, named ``bytes`` ...
    :raises TypeError: for a value that is not a mapping, or a limit of the wrong type
    :raises ValueError: for an unknown key, or a negative or malformed limit
    """
    if not isinstance(kwargs, Mapping):
        raise TypeError(
            f"{where} must be a mapping of limit arguments ({', '.join(LIMIT_ARGS)}), "
            f"not {type(kwargs).__name__} {kwargs!r}"
        )
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in LIMIT_ARGS:
            raise ValueError(
                f"{where or 'the limit arguments'} has an unknown key {key!r}; expected "
                f"some of {', '.join(sorted(LIMIT_ARGS))}"
            )
        name = key if where is None else f"{where}[{key!r}]"
        out[key] = check_bool(name, value) if key == "hard" else check_limit(name, value)
    return out


@functools.lru_cache(maxsize=64)
def _ratio(value: float | Fraction) -> tuple[int, int]:
    f = Fraction(value)
    return f.numerator, f.denominator


def check_ceiling(value: object, hard: object) -> tuple[int, int]:
    """Validate a ``ceiling`` argument (a multiple >= 1 of every limit).

    :raises TypeError: for a value that is not a real number
    :raises ValueError: for a value below 1, not finite, or given with ``hard=True``
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise TypeError(f"ceiling must be a number >= 1 or None, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"ceiling must be a finite number >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"ceiling must be >= 1 (a multiple of each limit), got {value!r}")
    if hard is True:
        raise ValueError(
            f"give hard=True or a ceiling, not both (hard=True is ceiling=1), got ceiling={value!r}"
        )
    return (value, 1) if type(value) is int else _ratio(value)  # type: ignore[arg-type,unused-ignore]


def scaled(limit: int | None, factor: tuple[int, int]) -> int | None:
    """A limit times a ceiling factor (numerator, denominator), rounded up and capped
    to what the counters hold: integer arithmetic, as this runs for every request."""
    if limit is None:
        return None
    num, den = factor
    return min(_MAX, -(-limit * num // den))


#: A sampled memory= scope expects this many samples at its limit: the relative
#: standard error of what it reports held there is 1/sqrt(1024) = 3.1%.
SAMPLES_AT_LIMIT = 1024
MIN_SAMPLING_RATE = 256
MAX_SAMPLING_RATE = 1024**2
#: Mean bytes between samples for track_memory=True without a memory= limit.
TRACKING_RATE = 16 * 1024


def sampling_rate(memory: int | None, exact: bool) -> int:
    """Mean bytes between samples of held memory for a scope (0: every block, exactly)."""
    if exact:
        return 0
    if memory is None:
        return TRACKING_RATE
    # not max(min()): on 3.11 each parses its arguments as keywords (500 instructions)
    rate = memory // SAMPLES_AT_LIMIT
    return MIN_SAMPLING_RATE if rate < MIN_SAMPLING_RATE else \
        MAX_SAMPLING_RATE if rate > MAX_SAMPLING_RATE else rate
