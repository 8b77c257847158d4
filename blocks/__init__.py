"""The primitive blocks of opdsl. Each module defines one block (or a family sharing one ``block`` name).

Blocks register themselves by subclassing :class:`opdsl.blocks.base.Block` with a ``block`` literal
(and a ``rule`` literal for families such as ``direction-mixer``; classes named ``_X`` are shared bases);
every module of this package is imported here, so adding a block is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil
import typing

from opdsl.blocks.base import Block

__all__ = ["BLOCKS", "Block", "block_names", "block_class"]

#: block name -> {rule -> class}; blocks without rules are stored under the rule None.
Families = dict[str, dict[str | None, type[Block]]]


def _literals(cls: type[Block], field: str) -> tuple[str, ...]:
    info = cls.model_fields.get(field)
    if info is None or typing.get_origin(info.annotation) is not typing.Literal:
        return ()
    return typing.get_args(info.annotation)


def _discover() -> Families:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    found: Families = {}
    pending = list(Block.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__name__.startswith("_"):
            continue  # shared bases of a family (e.g. _Preconditioner) are not blocks themselves
        rules = _literals(cls, "rule") or (None,)
        for name in _literals(cls, "block"):
            family = found.setdefault(name, {})
            for rule in rules:
                if rule in family and family[rule] is not cls:
                    raise RuntimeError(f"block {name!r} rule {rule!r} is defined twice: {family[rule]} and {cls}")
                family[rule] = cls
    return {name: dict(sorted(found[name].items(), key=lambda kv: str(kv[0]))) for name in sorted(found)}


BLOCKS: Families = _discover()


def block_names() -> list[str]:
    return list(BLOCKS)


def block_class(name: str, rule: str | None) -> type[Block] | None:
    """The class for a block name and (for rule families) a rule; None if unknown."""
    family = BLOCKS.get(name)
    if family is None:
        return None
    return family.get(None) if None in family else family.get(rule)
