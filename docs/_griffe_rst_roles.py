"""Turn the reST roles of the docstrings into mkdocstrings cross-references.

The docstrings are written for Sphinx (``:class:`Context```, ``:param:`` fields, as trio's
and anyio's are); mkdocstrings parses the fields but shows the roles as written. This
rewrites each role to a link when its target is on the API reference page, and to plain
code otherwise (``:class:`RuntimeError```), so that ``mkdocs build --strict`` never meets a
link that goes nowhere.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PACKAGE = "gotcha_async"
ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):`(~?)([^`<]+?)\s*(?:<([^>]+)>)?`")


def _enclosing_class(obj: griffe.Object) -> griffe.Object | None:
    while obj is not None and not obj.is_class:
        obj = obj.parent  # type: ignore[assignment]
    return obj


def _target(name: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The public path NAME refers to from OBJ's docstring, or None."""
    name = name.removeprefix(f"{PACKAGE}.")
    candidates = [name]
    cls = _enclosing_class(obj)
    if cls is not None:
        # a method's own class: the public name it is re-exported under, if any
        if cls.name in pkg.members:
            candidates.insert(0, f"{cls.name}.{name}")
        module = cls.module.path.removeprefix(f"{PACKAGE}.")
        if module != PACKAGE:
            candidates.insert(1, f"{module}.{cls.name}.{name}")
    for candidate in candidates:
        # only public names are on the reference page: a link to another would dangle
        if any(part.startswith("_") for part in candidate.split(".")):
            continue
        try:
            found = pkg[candidate]
            documented = found.docstring is not None  # undocumented members are not shown
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if documented:
            return f"{PACKAGE}.{candidate}"
    return None


class RstRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == PACKAGE:
            self._rewrite(pkg, pkg, seen=set())

    def _rewrite(self, obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: self._link(m, obj, pkg), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member, pkg, seen)  # type: ignore[arg-type]

    def _link(self, match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
        short, text, explicit = match.groups()
        name = (explicit or text).strip()
        shown = text.split(".")[-1] if short else text
        target = _target(name, obj, pkg)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"
