"""Errors that point at the place in a spec file (or the parameter) that is wrong.

Every user-facing problem is a :class:`Problem` with a location; a :class:`SpecError` carries all the
problems found in one pass, so a user fixes a file in one round trip instead of one error at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Location:
    """A 1-based position in a source file (``file`` may be ``"<string>"`` for inline specs)."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where, and what (the message says what would be valid)."""

    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class SpecError(ValueError):
    """A spec (or its binding to parameters) is invalid. ``problems`` lists every issue found."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems: list[Problem] = sorted(
            set(problems), key=lambda p: (p.location.file, p.location.line, p.location.col, p.message)
        )
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid spec")


class BindError(ValueError):
    """The spec is valid but cannot be applied to the given parameters (shape, routing, groups)."""


class StateDictError(ValueError):
    """A state_dict cannot be loaded into this optimizer (another spec, missing or mis-shaped state)."""
