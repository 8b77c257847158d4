"""Scalar fields of blocks: a number, or an expression over hyperparameters, with a valid range.

``scalar(ge=0, lt=1)`` is the field type for e.g. a beta. A literal is range-checked when the spec is
validated; an expression (``$betas[1]``) is range-checked at bind time and whenever its hyperparameters
change, against the concrete values of each parameter group.
"""
from __future__ import annotations

import functools
import math
from types import MappingProxyType
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping, Union, get_args, get_origin

import torch
from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

from opdsl.expr import Expr, ExprSyntaxError, parse_expr

__all__ = ["Scalar", "ScalarRange", "scalar", "scalar_ranges", "parse_scalar", "evaluator_at", "to_float", "Condition", "condition_fields"]

_EXPRESSION_JSON = {"type": "string", "description": "expression over hyperparameters, e.g. '$betas[0]' or '1 - $momentum'"}


def to_float(value: int | float) -> float:
    """``float(value)``, or a clear error for an integer too large for a float (a 400-digit literal)."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"the number {str(value)[:12]}... ({len(str(value))} digits) is too large") from None


def evaluator_at(env: Mapping[str, Any]) -> Callable[[Any], Callable[[Any], Any]]:
    """``evaluate_at(step)``: a field's value at these hyperparameter values and that step (a literal as it
    is, an expression evaluated); ``step`` may be a float or a tensor of steps."""

    def evaluate_at(step: Any) -> Callable[[Any], Any]:
        at = {**env, "step": step}
        return lambda value: value.evaluate(at) if isinstance(value, Expr) else value

    return evaluate_at


def parse_scalar(value: Any) -> float | Expr:
    """Numbers stay numbers; strings are parsed as expressions (constant ones folded to numbers)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number or an expression, got the boolean {value!r}")
    if isinstance(value, (int, float)):
        return to_float(value)
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        try:
            expr = parse_expr(value)
        except ExprSyntaxError as err:
            raise ExprSyntaxError(f"bad expression {value!r}: {err.message}", err.col) from None
        if not expr.hypers and not expr.uses_step:
            folded = expr.evaluate({})
            if isinstance(folded, bool):
                raise ValueError(f"expected a number, got the condition {value!r}")
            return float(folded)
        return expr
    raise ValueError(f"expected a number or an expression such as '$lr', got {type(value).__name__}")


def _parse_condition(value: Any) -> bool | Expr:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return parse_expr(value)
        except ExprSyntaxError as err:
            raise ExprSyntaxError(f"bad condition {value!r}: {err.message}", err.col) from None
    raise ValueError("expected true, false or a condition such as '$momentum != 0'")


def _serialize(value: Any) -> Any:
    return str(value) if isinstance(value, Expr) else value


@dataclass(frozen=True)
class ScalarRange:
    """Bounds of a scalar field; ``violation`` says what is wrong with a value, or returns ''."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str:
        if not math.isfinite(value):
            return "must be a finite number" + ("" if self == ScalarRange() else f" with {self.describe()}")
        if (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt):
            return f"must be {self.describe()}"
        if (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt):
            return f"must be {self.describe()}"
        return ""

    def outside(self, values: Any) -> Any:
        """:meth:`violation` for a tensor of values at once: True where a value is not finite or out of range."""
        values = torch.as_tensor(values, dtype=torch.float64)
        out = ~torch.isfinite(values)
        if self.ge is not None:
            out |= values < self.ge
        if self.gt is not None:
            out |= values <= self.gt
        if self.le is not None:
            out |= values > self.le
        if self.lt is not None:
            out |= values >= self.lt
        return out

    def describe(self) -> str:
        lower = f"{self.ge:g} <= " if self.ge is not None else f"{self.gt:g} < " if self.gt is not None else ""
        upper = f" <= {self.le:g}" if self.le is not None else f" < {self.lt:g}" if self.lt is not None else ""
        return f"{lower}value{upper}" if lower or upper else "finite"

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of a scalar field with these bounds: a number in range, or an expression (checked later)."""
        bounds = {"minimum": self.ge, "exclusiveMinimum": self.gt, "maximum": self.le, "exclusiveMaximum": self.lt}
        number = {"type": "number", **{key: bound for key, bound in bounds.items() if bound is not None}}
        if len(number) > 1:
            number["description"] = f"a number with {self.describe()}"
        return {"anyOf": [number, dict(_EXPRESSION_JSON)]}

    def check_literal(self, value: float | Expr) -> float | Expr:
        if isinstance(value, float):
            message = self.violation(value)
            if message:
                raise ValueError(f"{value:g} is out of range: {message}")
        return value


def scalar(ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """Field type: a number or an expression, with the given bounds."""
    rng = ScalarRange(ge=ge, gt=gt, le=le, lt=lt)
    return Annotated[
        Union[float, Expr],
        BeforeValidator(parse_scalar),
        AfterValidator(rng.check_literal),
        PlainSerializer(_serialize),
        WithJsonSchema(rng.json_schema()),
        rng,
    ]


#: An unbounded scalar field.
Scalar = scalar()

class _BuildTime:
    """Marks a field decided once per parameter group when the spec is bound (not inside the step)."""


BUILD_TIME = _BuildTime()

#: A build-time condition: ``if:`` on a node, or a structural switch such as ``amsgrad: $amsgrad``.
Condition = Annotated[
    Union[bool, Expr],
    BeforeValidator(_parse_condition),
    PlainSerializer(_serialize),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "string"}]}),
    BUILD_TIME,
]


@functools.cache  # per class: read on every hyperparameter change
def condition_fields(model: type) -> tuple[str, ...]:
    """Names of a model's build-time condition fields, in declaration order."""
    return tuple(name for name, info in model.model_fields.items() if any(m is BUILD_TIME for m in info.metadata))


@functools.cache
def scalar_ranges(model: type) -> Mapping[str, ScalarRange]:
    """Field name -> bounds, for every scalar field of a pydantic model class (optional ones included)."""
    out = {}
    for name, info in model.model_fields.items():
        # ``scalar(...)`` keeps its range in the field's metadata; ``scalar(...) | None`` inside the union
        annotated = [a for a in get_args(info.annotation) if get_origin(a) is Annotated]
        for meta in [*info.metadata, *(m for a in annotated for m in a.__metadata__)]:
            if isinstance(meta, ScalarRange):
                out[name] = meta
    return MappingProxyType(out)
