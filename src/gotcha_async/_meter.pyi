"""The C core: the allocator hook and the per-scope counters (see _meter.h)."""

from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, type_check_only

class Meter:
    """The C counters of one scope; gotcha_async.Context derives from it."""

    _quiet_machinery: bool
    _scope: Any
    _waker: Any
    _done: tuple[Any, Any] | None
    _deadline: float
    _shield: bool
    _cancel_pending: bool
    _host: Any
    _anyio_outer: Any
    _cancelling0: int
    _limits: tuple[int | None, ...]
    _cancel_reason: str | None
    _hard: bool
    _fail: bool
    @property
    def _bytes(self) -> int: ...
    @property
    def parent(self) -> Any: ...
    @property
    def _state(self) -> int: ...
    @property
    def _request(self) -> bool: ...  # made by _made: a request's scope
    def _setup(
        self,
        parent: Any,
        limits: tuple[int | None, ...],
        ceilings: tuple[int | None, ...],
        track: bool,
        rate: int,
        /,
    ) -> None: ...
    def _apply(
        self,
        recipe: tuple[tuple[int | None, ...], bool, tuple[int | None, ...], bool, int, bool],
        parent: Any,
        shield: bool,
        fail: bool,
        /,
    ) -> None: ...
    @classmethod
    def _made(
        cls,
        recipe: tuple[tuple[int | None, ...], bool, tuple[int | None, ...], bool, int, bool],
        fail: bool,
        /,
    ) -> Any: ...
    def _set_parent(self, parent: Any, /) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> bool: ...
    def __aenter__(self) -> Any: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> Any: ...
    def _counts(self) -> Any: ...
    def _memory(self) -> Any: ...
    def _add(self, bytes: int, objects: int, calls: int, /) -> None: ...
    def _reset(self) -> None: ...
    def exceeded(self) -> bool:
        """Whether this scope's own limit or any ancestor's has been exceeded."""
    def _broken(self) -> tuple[int, int] | None: ...
    def _stopped(self) -> bool: ...
    def _held_blocks(self) -> list[tuple[int, tuple[tuple[str, int], ...] | None]]: ...

class Ready:
    """An awaitable that returns its value at once, allocating nothing."""

    def __init__(self, value: object = None, /) -> None: ...
    def __await__(self) -> Any: ...
    def __iter__(self) -> Any: ...
    def __next__(self) -> Any: ...

def install(
    var: ContextVar[Any],
    deliver: Callable[[Any], object],
    exempt_dirs: tuple[str, ...],
    dispatch: tuple[tuple[str, str], ...],
    main_thread_ident: int,
    interrupt_type: type[BaseException],
    /,
) -> None: ...
def installed() -> bool: ...
def delivery_loop() -> None: ...
def set_types(usage: type, memory: type, /) -> None: ...
def checked() -> bool: ...
def set_opcodes(
    resume: int,
    extended_arg: int,
    jumps: tuple[tuple[int, int], ...],
    awaiting: tuple[tuple[int, int], ...],
    /,
) -> None: ...
def set_fast_trio(run_context: Any, scope_class: type | None, /) -> None: ...
def set_fast(
    get_running_loop: Any,
    scope_class: type | None,
    current_task: Any = None,
    task_states: dict[Any, Any] | None = None,
    /,
) -> None: ...
def tracemalloc_stopped() -> bool: ...
def after_fork() -> None: ...
def grace() -> tuple[int, int, int, int]: ...
def refuse_min() -> int: ...
def numpy_adopt() -> None: ...

class SendGuard:
    """The ASGI middleware's send (guard.c)."""

    status: Any
    started: bool
    complete: bool
    def __init__(self, ctx: Meter, send: Any, stop: Callable[[Any], Any], /) -> None: ...
    def __call__(self, message: Any, /) -> Any: ...

class ReceiveGuard:
    """The ASGI middleware's receive (guard.c)."""

    def __init__(self, ctx: Meter, receive: Any, stop: Callable[[Any, Any], Any], /) -> None: ...
    def __call__(self) -> Any: ...
def native_supported() -> bool: ...
def native_install() -> None: ...

@type_check_only
class _Debug:
    """_meter._debug: the hook's state, for tests and benchmarks (module.c)."""

    @staticmethod
    def set_hooked(flag: bool, /) -> None: ...
    @staticmethod
    def hooked() -> bool: ...
    # "out", "full", "light", "light, watched": how frees reach the hook
    @staticmethod
    def hook_form() -> str: ...
    @staticmethod
    def reads_thread_state() -> bool: ...  # the thread state read where CPython keeps it
    @staticmethod
    def thread_state_agrees() -> bool | None: ...  # None: the hook asks for it
    @staticmethod
    def active() -> int: ...
    @staticmethod
    def held_blocks() -> int: ...
    @staticmethod
    def dict_fragile() -> int: ...
    @staticmethod
    def refusals() -> bool: ...
    @staticmethod
    def numpy_state() -> int: ...  # 0: numpy not found yet, 1: its arrays counted, 2: too old
    @staticmethod
    def native_state() -> dict[str, Any]: ...

_debug: _Debug
