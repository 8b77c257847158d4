"""An elementwise expression over the node's inputs: the arithmetic no other block has.

    out = f(x, a, b, ...)          x = input, a, b, ... = the nodes named in ``with``
    value_t = out_t                with keep: true, so that ``node@prev`` reads out_{t-1} (``initial``, 0 by
                                   default, before step 1)

``expr`` is written in the expression language of the scalar fields (numbers, ``$hyper``, ``step``,
``+ - * / % **``, comparisons, ``and or not``, ``sqrt exp log abs sign floor min max clamp where``) plus the names
``x`` and those of ``with``, each an elementwise tensor; a comparison gives 1 where it holds and 0
elsewhere. Adamax's infinity norm is ``{block: map, input: grad, with: {u: u@prev},
expr: "max($betas[1] * u, abs(x) + $eps)", keep: true}``; a mask of agreeing signs (Cautious
optimizers) is ``"m * x > 0"``. A part that reads no input (``1 - $beta ** step``) is computed once per
step, not once per element.

``tensor_sum``, ``tensor_mean`` and ``tensor_norm`` reduce their argument over each parameter tensor and
give that value at every element of it: LAMB's trust ratio is ``"x * where(tensor_norm(p) > 0 and
tensor_norm(x) > 0, tensor_norm(p) / tensor_norm(x), 1)"`` with ``with: {p: param}``.

With ``scalar: true`` the node is one value per step instead (float64 where the device has it), read by
other nodes through ``with``: a named piece of scalar arithmetic (RAdam's rectification), or with
``keep: true`` and ``initial:`` a recurrence over steps (NAdam's product of momenta, ``initial: 1``). A
scalar map reads only scalar maps, scalar states (``@prev``), hyperparameters and ``step``.
"""
from __future__ import annotations

from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
from pydantic import Field, FiniteFloat, PlainSerializer, StrictBool, WithJsonSchema, field_validator

from opdsl.blocks.base import Block, Ref, Scope, StateKind, StateSpec
from opdsl.expr import (
    DTYPE, EXPRESSION_WORDS, HOIST, NAME, PER_TENSOR, PER_TENSOR_FUNCTIONS, Expr, ExprSyntaxError, parse_expr, variables,
)

_INPUT = "x"
# the fields' own names too: `opdsl show` prints `with` entries beside the fields
_RESERVED = {_INPUT, "input", "with", "expr", "keep", "initial", "scalar", "export", "block", "if", "else", *EXPRESSION_WORDS}


class Map(Block):
    """out = expr(x = input, with-inputs...), elementwise; keep: true stores out for node@prev."""

    block: Literal["map"]
    input: Ref | None = Field(None, validate_default=True, description="the value the expression reads as `x` (none: it reads no x)")
    with_: dict[str, Ref] = Field(default_factory=dict, alias="with", description="more inputs, by the name expr reads")
    expr: Annotated[Expr, PlainSerializer(str), WithJsonSchema({"type": ["string", "number"]})] = Field(
        description="an expression over x, the `with` names, $hyperparameters and step (or a number)"
    )
    keep: StrictBool = Field(False, description="store the output as state `value`, which node@prev reads")
    initial: FiniteFloat = Field(0.0, description="the kept state's value before the first step")
    scalar: StrictBool = Field(False, description="one value per step, not one per element")
    export: StrictBool = Field(False, description="kept for the user to read from optimizer.state: may feed nothing")

    PORTS: ClassVar[tuple[str, ...]] = ("input", "with_")
    PRIMARY_STATE: ClassVar[str] = "value"
    SUMS_PER_TENSOR: ClassVar[bool] = True  # tensor_norm and co. are segment sums, broadcast back
    PREV_NEEDS: ClassVar[str] = "set `keep: true` on it"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("expr",)

    @field_validator("input")
    @classmethod
    def _passes_something(cls, value: Ref | None, info: Any) -> Ref | None:
        if value is None and info.data.get("when") is not None and info.data.get("otherwise") is None:
            raise ValueError("a map switched by `if:` needs `else:` or `input:`: it passes one of them through when off")
        return value

    @field_validator("with_")
    @classmethod
    def _names(cls, value: dict[str, Ref]) -> dict[str, Ref]:
        for name in value:
            if not NAME.fullmatch(name) or name in _RESERVED:
                raise ValueError(
                    f"input name {name!r} cannot be used: a name is letters, digits and '_' (ASCII, not starting "
                    f"with a digit), other than {', '.join(sorted(_RESERVED))}"
                )
        return value

    @field_validator("expr", mode="before")
    @classmethod
    def _expression(cls, value: Any, info: Any) -> Expr:
        if isinstance(value, Expr):
            value = value.source
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = repr(value)  # a constant: `expr: 1.0`
        if not isinstance(value, str):
            raise ValueError(f"expected an expression (a string), got {type(value).__name__}")
        if "with_" in info.data:
            names = {_INPUT, *info.data["with_"]}
        else:  # `with` failed and is reported: read any name as an input rather than report it again
            names = set(NAME.findall(value)) - EXPRESSION_WORDS
        try:
            expr = parse_expr(value, names)  # a syntax error names its column
        except ExprSyntaxError:
            if info.data.get("input", _INPUT) is None:  # the same error, not offering x to a node without `input:`
                parse_expr(value, names - {_INPUT})
            raise
        read = expr.read_variables
        if "with_" in info.data and "input" in info.data and (_INPUT in read) != (info.data["input"] is not None):
            raise ValueError("the expression reads x, the node's `input:`, which is not set" if _INPUT in read else
                             "`input:` is read as x, which the expression does not read; remove it")
        unused = sorted(set(info.data.get("with_", {})) - read)
        if unused:
            raise ValueError(f"`with` input(s) {', '.join(unused)} are not read by the expression; remove them")
        return expr

    @field_validator("scalar")
    @classmethod
    def _scalar_reads_no_tensor(cls, value: bool, info: Any) -> bool:
        used = sorted(set(PER_TENSOR_FUNCTIONS) & info.data["expr"].functions) if "expr" in info.data else []
        if value and used:
            raise ValueError(f"a scalar map has no tensors to reduce: {', '.join(used)} needs `scalar: false`")
        return value

    def scope(self) -> Scope:
        return Scope.TENSOR if set(PER_TENSOR_FUNCTIONS) & self.expr.functions else Scope.ELEMENTWISE

    def problems_at(self, evaluate: Callable[[Any], Any]) -> list[tuple[str | None, str]]:
        """The fields', and the expression's at these values with every input 1: an index out of range,
        a list not indexed, a list as the result, a part that reads no input and is not finite at step 1
        (``log(step - 1)``, unless a ``where`` guards it) are found where the spec is read, not mid-step."""
        problems = super().problems_at(evaluate)
        ones = {name: torch.ones((), dtype=torch.float64) for name in self.expr.variables}
        probe: dict[str, Any] = {PER_TENSOR: lambda name, v, of: v}
        try:
            try:
                value = evaluate(self.expr.bound(ones, probe))
            except (ArithmeticError, ValueError):
                # 1 / (step - 1) fails at step 1 in Python numbers; with `step` a tensor, as in the step, it is
                # inf: accepted where a `where` guards it (the result is finite), refused where it does not
                guarded = evaluate(self.expr.bound(ones, {**probe, "step": torch.ones((), dtype=torch.float64)}))
                if not (isinstance(guarded, torch.Tensor) and bool(torch.isfinite(guarded).all())):
                    raise
                value = guarded
            if isinstance(value, (tuple, list)):
                raise TypeError(f"it gives the list {list(value)}; a map gives one number per element (index it)")
        except (ValueError, TypeError, ArithmeticError, RuntimeError, IndexError) as err:
            said = str(err).startswith("cannot evaluate") or repr(self.expr.source) in str(err)
            text = str(err) if said else f"cannot evaluate {self.expr.source!r}: {err}"
            problems.append(("expr", text))
        return problems

    @field_validator("initial", "export")
    @classmethod
    def _needs_keep(cls, value: Any, info: Any) -> Any:
        if value and not info.data.get("keep", True):
            what = "`initial:` is the kept state's first value" if info.field_name == "initial" else "`export:` reads the kept state"
            raise ValueError(f"{what}: it needs `keep: true`")
        return value

    def __hash__(self) -> int:  # compiled steps are cached by plan, blocks included; `with` is a dict
        return hash((self.input, tuple(sorted(self.with_.items())), self.expr.source, self.keep, self.initial, self.scalar, self.export,
                     self.when, self.otherwise))

    def read_from_outside(self) -> bool:
        return self.export  # said so, a kept value that feeds nothing is state to read (ASGD's averaged iterate)

    def scalar_output(self) -> bool:
        return self.scalar

    def scalar_ports(self) -> list[str]:
        if not self.scalar:
            return []
        return [*self.with_, *(["input"] if self.input is not None else [])]

    def inputs(self) -> dict[str, Ref]:
        out = {**({"input": self.input} if self.input is not None else {}), **self.with_}
        if self.otherwise is not None:
            out["else"] = self.otherwise
        return out

    def state_specs(self) -> dict[str, StateSpec]:
        if not self.keep:
            return {}
        if self.scalar:
            return {"value": StateSpec(StateKind.SCALAR, init=self.initial, dtype=torch.float64)}
        return {"value": StateSpec(StateKind.ELEMENTWISE, init=self.initial)}

    def forward(self, ctx, x, state, totals=None):
        # an elementwise map gives a parameter-like value whatever its inputs (one may be a float64 scalar
        # state); a scalar map one value in the step count's precision
        dtype, shape = (ctx.step.dtype, ()) if self.scalar else (ctx.param.dtype, ctx.value_shape)
        reduced: dict[tuple[str, str], torch.Tensor] = {}

        def per_tensor(name: str, value: Any, of: str | None) -> torch.Tensor:
            """`tensor_norm(p)` written three times is one reduction: memoised by function and variable name
            (never by the tensor's identity, which dynamo would guard on: a fresh gradient view every step)."""
            if of is None:
                return _per_tensor(ctx, name, value)
            if (name, of) not in reduced:
                reduced[(name, of)] = _per_tensor(ctx, name, value)
            return reduced[(name, of)]

        env = {**ctx.env, HOIST: ctx.once, DTYPE: dtype, PER_TENSOR: per_tensor,
               **variables({**({_INPUT: x["input"]} if self.input is not None else {}), **{n: x[n] for n in self.with_}})}
        out = self.expr.evaluate(env)  # a number stays exact: made a tensor of `dtype` directly, not of float32 first
        out = out.to(dtype) if isinstance(out, torch.Tensor) else torch.as_tensor(out, dtype=dtype, device=ctx.param.device)
        if self.scalar:
            out = ctx.once(out)  # realised once per step: not re-derived inside every elementwise loop that reads it
        elif out.shape != shape:
            out = out.expand(shape)
        return out, ({"value": out} if self.keep else {})


def _per_tensor(ctx, name: str, value: Any) -> torch.Tensor:
    """tensor_sum / tensor_mean / tensor_norm of ``value`` over each parameter, at every element of it."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():  # a number, a count: the params' type
        value = torch.as_tensor(value, dtype=ctx.param.dtype, device=ctx.param.device)
    if value.shape != ctx.value_shape:
        value = value.expand(ctx.value_shape).contiguous()
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()  # sums in at least float32
    if name == "tensor_norm":
        return ctx.expand(ctx.segment_sum(value * value).sqrt())
    total = ctx.segment_sum(value)
    if name == "tensor_mean":
        total = total / ctx.table([s.numel for s in ctx.segments], total.dtype)
    return ctx.expand(total)

