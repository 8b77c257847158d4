"""The validated form of a spec file (format version 1).

A spec names a graph of blocks (``nodes`` + ``output``), the runtime-tunable hyperparameters the blocks
refer to as ``$name``, optional extra named ``graphs``, and ``groups``: routing rules that send
parameters (by ndim, shape or name glob; first match wins) to another graph and/or hyper overrides.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import numbers
from typing import Annotated, Any, Literal, Mapping, Sequence, Union, get_args

import torch
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, StrictInt, WithJsonSchema, field_validator,
    model_serializer, model_validator,
)

from opdsl.blocks.base import Block
from opdsl.expr import Expr
from opdsl.scalars import Condition, to_float

__all__ = ["ENGINE_OPTIONS", "HyperValue", "Match", "Requirement", "Route", "requirement_problems", "GraphSpec", "OUTPUT_KINDS", "Spec", "SPEC_VERSION", "MAIN_GRAPH", "hyper_value", "lr_problem"]

SPEC_VERSION = 1
MAIN_GRAPH = "main"
#: Names the engine provides to expressions itself.
RESERVED_NAMES = frozenset({"step", "grad", "grad2", "param", "params", "true", "false"})
#: Group options the engine reads itself, in every spec (as torch.optim's optimizers do): no spec
#: hyperparameter may take their names.
ENGINE_OPTIONS = frozenset({"maximize"})


def hyper_value(value: Any) -> Any:
    """A hyperparameter's value: true/false, a finite number, or a list of finite numbers.

    Strict on purpose: pydantic alone would read the strings 'yes', 'on' and '1' as true and 'inf' as a
    number, and ``lr: yes`` would train at lr 1.
    """
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"expected a number, got {v!r} ({type(v).__name__})")
        v = to_float(v)
        if not math.isfinite(v):
            raise ValueError(f"expected a finite number, got {v}")
        return v

    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("expected a list of numbers, got an empty list")
        return tuple(number(v) for v in value)
    if isinstance(value, numbers.Real):
        return number(value)
    raise ValueError(f"expected true, false, a number or a list of numbers, got {value!r} ({type(value).__name__})")


_HYPER_JSON = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "number"},
        {"type": "array", "items": {"type": "number"}, "minItems": 1},
    ],
    "description": "true, false, a finite number or a non-empty list of numbers",
}

HyperValue = Annotated[Union[bool, float, tuple[float, ...]], BeforeValidator(hyper_value), WithJsonSchema(_HYPER_JSON)]


def lr_problem(value: Any) -> str:
    """What is wrong with a learning rate (the engine's own hyperparameter), or ''."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"lr must be a number, got {value!r}"
    if not (math.isfinite(value) and value >= 0):
        return f"lr must be a finite number >= 0, got {value}"
    return ""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Model):
    """Which parameters a route takes. Every given criterion must hold; an empty match takes everything."""

    ndim: Union[int, tuple[int, ...], None] = Field(None, description="ndim, or a list of allowed ndims")
    shape: Union[tuple[Union[int, None], ...], None] = Field(
        None, description="exact shape; null entries match any size"
    )
    name: Union[str, tuple[str, ...], None] = Field(
        None, description="glob(s) on the parameter name, e.g. '*.bias' or 'embed*' (needs named_parameters)"
    )

    def describe(self) -> str:
        parts = []
        if self.ndim is not None:
            parts.append(f"ndim in {list(self.ndim)}" if isinstance(self.ndim, tuple) else f"ndim == {self.ndim}")
        if self.shape is not None:
            parts.append("shape " + "x".join("*" if s is None else str(s) for s in self.shape))
        if self.name is not None:
            parts.append(f"name ~ {self.name if isinstance(self.name, str) else list(self.name)}")
        return " and ".join(parts) or "everything"

    def matches(self, name: str | None, shape: torch.Size) -> bool:
        if self.ndim is not None:
            allowed = self.ndim if isinstance(self.ndim, tuple) else (self.ndim,)
            if len(shape) not in allowed:
                return False
        if self.shape is not None:
            if len(shape) != len(self.shape) or any(w is not None and w != s for w, s in zip(self.shape, shape)):
                return False
        if self.name is not None:
            if name is None:
                return False
            globs = (self.name,) if isinstance(self.name, str) else self.name
            if not any(fnmatch.fnmatchcase(name, g) for g in globs):
                return False
        return True

    @property
    def needs_names(self) -> bool:
        return self.name is not None


class Requirement(_Model):
    """A condition the hyperparameters must meet in every group, as torch's constructors check theirs
    (``nesterov`` needs a momentum): checked when the spec is loaded, when an optimizer is built and
    whenever a value it reads changes."""

    check: Condition = Field(description="a condition over $hyperparameters, e.g. 'not $nesterov or $momentum > 0'")
    message: str = Field(description="what the user is told when the check fails")


def requirement_problems(
    requirements: Sequence[Requirement], env: Mapping[str, Any], changed: frozenset[str] | None = None
) -> list[str]:
    """The message of each requirement that fails at ``env`` (only those reading a changed value)."""
    problems = []
    for req in requirements:
        if not isinstance(req.check, Expr):
            holds = req.check
        elif changed is not None and not req.check.hypers & changed:
            continue
        else:
            try:
                value = req.check.evaluate(env)
            except ValueError as err:
                problems.append(f"cannot evaluate `require: {req.check}`: {err}")
                continue
            if not isinstance(value, bool) and not (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
                problems.append(f"`require: {req.check}` is not a condition (it gives {value!r}); compare it: `... > 0`")
                continue
            holds = bool(value)
        if not holds:
            problems.append(f"{req.message} (require: {req.check})")
    return problems


class Route(_Model):
    """One routing rule of ``groups``."""

    match: Match = Field(default_factory=Match)
    graph: Union[str, None] = Field(None, description="name of a graph in `graphs` (default: the main graph)")
    use: Union[str, None] = Field(None, description="route to another spec's main graph (shipped name or path)")
    hyper: dict[str, HyperValue] = Field(default_factory=dict, description="hyperparameter overrides")
    label: Union[str, None] = Field(None, description="a name for this rule in describe() output")

    @model_validator(mode="after")
    def _one_target(self) -> "Route":
        if self.graph is not None and self.use is not None:
            raise ValueError("a route takes either `graph` or `use`, not both")
        return self

    @property
    def target(self) -> str:
        return self.use or self.graph or MAIN_GRAPH


#: What a graph's output is: ``update`` (the default), param <- param - lr * output; ``param``, the parameter's
#: next value, param <- output (a method whose step size is its own state: Rprop's, ASGD's eta).
OutputKind = Literal["update", "param"]
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)
OUTPUT_IS_DESCRIPTION = (
    "what the output is: `update` (param <- param - lr * output) or `param` (param <- output, the next "
    "value, which the graph computes itself; lr is then only what it reads as $lr)"
)


class GraphSpec(_Model):
    nodes: dict[str, SerializeAsAny[Block]]
    output: str
    output_is: OutputKind = Field("update", description=OUTPUT_IS_DESCRIPTION)

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        data = handler(self)
        if self.output_is == "update" and isinstance(data, dict):
            data.pop("output_is", None)  # the default is left out: digests of specs without the key stay as they were
        return data


class Spec(_Model):
    """A validated spec. Build it with :func:`opdsl.load_spec`, which also checks the graph."""

    opdsl: StrictInt = Field(description="format version; must be 1")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    summary: str = ""
    paper: Union[str, None] = None
    notes: Union[str, None] = None
    hyper: dict[str, HyperValue] = Field(default_factory=dict)
    graphs: dict[str, GraphSpec] = Field(default_factory=dict)
    groups: tuple[Route, ...] = ()
    require: tuple[Requirement, ...] = ()
    # the requirements of specs pulled in by `use:`, by graph name: they hold for the groups of that graph
    used_require: dict[str, tuple[Requirement, ...]] = Field(default_factory=dict, exclude=True)
    source: Union[str, None] = Field(None, exclude=True, description="file the spec came from")

    @field_validator("opdsl")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != SPEC_VERSION:
            raise ValueError(f"unknown spec format version {value}; this opdsl reads version {SPEC_VERSION}")
        return value

    @property
    def main(self) -> GraphSpec:
        """The top-level graph (a spec may have none and route every parameter to named graphs)."""
        if MAIN_GRAPH not in self.graphs:
            raise KeyError(f"spec {self.name!r} has no top-level graph; its graphs are {list(self.graphs)}")
        return self.graphs[MAIN_GRAPH]

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @property
    def digest(self) -> str:
        """A stable hash of the spec's meaning (not of its formatting or comments)."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def route_for(self, name: str | None, shape: torch.Size) -> tuple[int | None, Route | None]:
        """First matching route (index, route), or (None, None) for the main graph with spec defaults."""
        for index, route in enumerate(self.groups):
            if route.match.matches(name, shape):
                return index, route
        return None, None
