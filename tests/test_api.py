"""The public names: a contract other projects' tests rely on."""

from __future__ import annotations

import importlib.metadata
import inspect

import anyio

import gotcha_async as gotcha

CONTRACT = {
    "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "KB", "MB", "GB", "TB", "PB", "EB",
    "Kilo", "Mega", "Giga", "Tera", "Peta", "Exa",
    "Usage", "Context", "limit", "move_on_limit", "run", "current", "LimitExceeded",
}


def test_all_matches_the_exports() -> None:
    # (pytest rewrites the asserts of plugin packages: it adds "@"-names of its own)
    public = {n for n in dir(gotcha) if n.isidentifier() and not n.startswith("_")}
    modules = {"aiohttp", "asgi", "pytest_plugin"}  # submodules, imported on demand
    assert set(gotcha.__all__) == public - modules
    assert CONTRACT <= set(gotcha.__all__)


def test_public_classes_show_the_package_name() -> None:
    for name in ("Context", "LimitExceeded", "Usage", "Memory"):
        assert getattr(gotcha, name).__module__ == "gotcha_async"


def test_context_is_a_cancel_scope_with_the_contract_methods() -> None:
    assert issubclass(gotcha.Context, anyio.CancelScope)
    for name in ("used", "limits", "remains", "exceeded", "add", "reset", "cancel",
                 "__await__", "__str__"):
        assert callable(getattr(gotcha.Context, name))
    for name in ("cancel_called", "cancelled_caught", "shield", "deadline", "parent"):
        assert hasattr(gotcha.Context, name)
    params = inspect.signature(gotcha.Context).parameters
    for name in ("bytes", "objects", "calls", "memory", "hard", "parent", "shield"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default in (None, False)


def test_scope_factories_take_the_contract_keywords() -> None:
    for factory in (gotcha.limit, gotcha.move_on_limit):
        params = inspect.signature(factory).parameters
        for name in ("bytes", "objects", "calls", "memory", "hard", "shield"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    params = inspect.signature(gotcha.run).parameters
    for name in ("bytes", "objects", "calls", "memory", "hard"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert gotcha.Usage._fields == ("bytes", "objects", "calls")


def test_limit_exceeded_carries_the_contract_attributes() -> None:
    err = gotcha.LimitExceeded(None, "calls", 11, 10)
    assert (err.context, err.resource, err.used, err.limit) == (None, "calls", 11, 10)
    assert isinstance(err, Exception)


def test_version_is_the_distribution_version() -> None:
    assert gotcha.__version__ == importlib.metadata.version("gotcha-async")
