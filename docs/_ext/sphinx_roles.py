"""A griffe extension for the docs build: Sphinx roles in docstrings become links.

The package's docstrings use Sphinx roles (:class:`RoomManager`, :meth:`Room.flush`,
``:func:`~canvas_store_trio.ops.metrics_text```), which Markdown would show as they are.
This rewrites each to a code span, linked (through mkdocs-autorefs) when the target is a
public name that the API reference renders: a name exported by ``canvas_store_trio``,
``canvas_store_trio.ops``, ``canvas_store_trio.client`` or ``canvas_store_trio.testing``,
or a public member of one. Other targets (private helpers)
stay plain code. A leading ``~`` shows only the last part of the name, as in Sphinx.

It also shows each ``Limits`` field as its default, with its ``serve --help`` text as
its docstring (the fields are declared as ``_limit(default, help)``).
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

PUBLIC_MODULES = (
    "canvas_store_trio",
    "canvas_store_trio.ops",
    "canvas_store_trio.client",
    "canvas_store_trio.testing",
)
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|data|obj|mod):`(~?)([\w.]+)(?:\(\))?`")


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != "canvas_store_trio":
            return
        public = _public_paths(loader)
        for obj in _walk(pkg):
            _limit_field(obj)
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(
                    lambda match, obj=obj: _rewrite(match, obj, loader, public),
                    obj.docstring.value,
                )


def _public_paths(loader: griffe.GriffeLoader) -> dict[str, str]:
    """Canonical path -> the public path the reference renders it under.

    A module's public names are its aliases of the package's own objects, not named
    ``_*`` (``testing`` also imports ``annotations``, ``importlib``, ``Any``...).
    """
    public: dict[str, str] = {}
    for module_path in PUBLIC_MODULES:
        module = loader.modules_collection.get_member(module_path)
        for name, member in module.members.items():
            if name.startswith("_") or not member.is_alias:
                continue
            try:
                target = member.final_target
            except griffe.AliasResolutionError:
                continue  # a name from outside the package
            if not target.path.startswith("canvas_store_trio."):
                continue
            public.setdefault(target.path, f"{module_path}.{name}")
            if target.is_class:
                for child_name in target.members:
                    if not child_name.startswith("_"):
                        public.setdefault(
                            f"{target.path}.{child_name}", f"{module_path}.{name}.{child_name}"
                        )
    return public


def _limit_field(obj: griffe.Object) -> None:
    value = getattr(obj, "value", None)
    if not (isinstance(value, griffe.ExprCall) and str(value.function) == "_limit"):
        return
    default, help_text = value.arguments
    obj.value = default  # type: ignore[attr-defined]
    obj.docstring = griffe.Docstring(ast.literal_eval(str(help_text)) + ".", parent=obj)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


def _rewrite(
    match: re.Match[str], obj: griffe.Object, loader: griffe.GriffeLoader, public: dict[str, str]
) -> str:
    short, target = match.group(1) == "~", match.group(2)
    text = target.rsplit(".", 1)[-1] if short else target
    for candidate in _candidates(target, obj):
        try:
            found = loader.modules_collection.get_member(candidate)
        except (KeyError, ValueError, griffe.AliasResolutionError):
            continue
        try:
            path = found.final_target.path if found.is_alias else found.path
        except griffe.AliasResolutionError:
            continue
        if path in public:
            return f"[`{text}`][{public[path]}]"
        break
    return f"`{text}`"


def _candidates(target: str, obj: griffe.Object) -> list[str]:
    """Where a role's target may live, nearest first (as Sphinx looks it up)."""
    scopes = []
    scope: griffe.Object | None = obj
    while scope is not None:
        if scope.is_class or scope.is_module:
            scopes.append(scope.path)
        scope = scope.parent
    return [f"{scope}.{target}" for scope in scopes] + [target, f"canvas_store_trio.{target}"]
