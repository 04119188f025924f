"""gotcha_async: per-task allocation budgets for asyncio and trio.

What each module and each C file does: docs/how-it-works.md, "The pieces" (a test keeps
that table in step with the tree).

Importing the package imports everything its public names need (the C extension,
anyio) and does nothing else: no hook is installed and no thread started until the
first scope is entered. The names are not loaded lazily on first access: a signal
handler that used gotcha while that first access was importing them saw a half-made
module (docs/reliability.md, row 31/12).
"""

from typing import Any as _Any

__version__ = "0.1.0"


from . import _interpreter as _interpreter  # first: refuses subinterpreters
from ._context import GRACE as GRACE
from ._context import REFUSE_MIN as REFUSE_MIN
from ._context import Context as Context
from ._context import HardLimitError as HardLimitError
from ._context import LimitExceeded as LimitExceeded
from ._context import Memory as Memory
from ._context import Usage as Usage
from ._context import current as current
from ._context import limit as limit
from ._context import move_on_limit as move_on_limit
from ._context import run as run
from ._hook import install as install
from ._units import EB as EB
from ._units import GB as GB
from ._units import KB as KB
from ._units import MB as MB
from ._units import PB as PB
from ._units import TB as TB
from ._units import EiB as EiB
from ._units import Exa as Exa
from ._units import GiB as GiB
from ._units import Giga as Giga
from ._units import KiB as KiB
from ._units import Kilo as Kilo
from ._units import Mega as Mega
from ._units import MiB as MiB
from ._units import Peta as Peta
from ._units import PiB as PiB
from ._units import Tera as Tera
from ._units import TiB as TiB
from ._units import parse_size as parse_size

__all__ = [
    "EB", "GB", "KB", "MB", "PB", "TB",
    "GRACE", "REFUSE_MIN", "Context", "EiB", "Exa", "GiB", "Giga", "HardLimitError", "KiB",
    "Kilo", "LimitExceeded", "Mega", "Memory", "MiB", "Peta", "PiB", "Tera", "TiB", "Usage",
    "current", "install", "limit", "move_on_limit", "parse_size", "run",
]



def _public(obj: _Any) -> _Any:
    # reprs and docs show gotcha_async.Context, not gotcha_async._context.Context
    if getattr(obj, "__module__", "").startswith("gotcha_async."):
        obj.__module__ = __name__
    return obj


for _name in __all__:
    _public(globals()[_name])
del _name
