"""An elementwise expression over the node's inputs: the arithmetic no other block has.

    out = f(x, a, b, ...)          x = input, a, b, ... = the nodes named in ``with``
    value_t = out_t                with keep: true, so that ``node@prev`` reads out_{t-1} (0 before step 1)

``expr`` is written in the expression language of the scalar fields (numbers, ``$hyper``, ``step``,
``+ - * / **``, comparisons, ``and or not``, ``sqrt exp log abs sign min max where``) plus the names
``x`` and those of ``with``, each an elementwise tensor; a comparison gives 1 where it holds and 0
elsewhere. Adamax's infinity norm is ``{block: map, input: grad, with: {u: u@prev},
expr: "max($betas[1] * u, abs(x) + $eps)", keep: true}``; a mask of agreeing signs (Cautious
optimizers) is ``"m * x > 0"``. Scalar sub-expressions (``$beta ** step``) are evaluated for every
element: where they are costly, compute them in a scalar field of another block (``lr-scale``).
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, PlainSerializer, WithJsonSchema, field_validator

from opdsl.blocks.base import Block, Ref, StateKind, StateSpec
from opdsl.expr import EXPRESSION_WORDS, Expr, parse_expr

_INPUT = "x"
_RESERVED = {_INPUT, "input", "else", *EXPRESSION_WORDS}


class Map(Block):
    """out = expr(x = input, with-inputs...), elementwise; keep: true stores out for node@prev."""

    block: Literal["map"]
    input: Ref = "grad"
    with_: dict[str, Ref] = Field(default_factory=dict, alias="with", description="more inputs, by the name expr reads")
    expr: Annotated[Expr, PlainSerializer(str), WithJsonSchema({"type": "string"})] = Field(
        description="an expression over x, the `with` names, $hyperparameters and step"
    )
    keep: bool = Field(False, description="store the output as state `value`, which node@prev reads (0 at first)")

    PORTS: ClassVar[tuple[str, ...]] = ("input", "with_")
    PRIMARY_STATE: ClassVar[str] = "value"
    PREV_NEEDS: ClassVar[str] = "set `keep: true` on it"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("expr",)

    @field_validator("with_")
    @classmethod
    def _names(cls, value: dict[str, Ref]) -> dict[str, Ref]:
        for name in value:
            if not name.isidentifier() or name in _RESERVED:
                raise ValueError(
                    f"input name {name!r} cannot be used: a name is a Python-style identifier other than "
                    f"{', '.join(sorted(_RESERVED))}"
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
        return parse_expr(value, {_INPUT, *info.data.get("with_", {})})  # a syntax error names its column

    def __hash__(self) -> int:  # compiled steps are cached by plan, blocks included; `with` is a dict
        return hash((self.input, tuple(self.with_.items()), self.expr.source, self.keep, self.when, self.otherwise))

    def inputs(self) -> dict[str, Ref]:
        out = {"input": self.input, **self.with_}
        if self.otherwise is not None:
            out["else"] = self.otherwise
        return out

    def state_specs(self) -> dict[str, StateSpec]:
        return {"value": StateSpec(StateKind.ELEMENTWISE)} if self.keep else {}

    def forward(self, ctx, x, state, totals=None):
        like = x["input"]
        env = {**ctx.env, _INPUT: like, **{name: x[name] for name in self.with_}}
        out = self.expr.evaluate(env)
        out = torch.as_tensor(out, device=like.device).to(like.dtype)
        if out.shape != like.shape:
            out = out.expand(like.shape)
        return out, ({"value": out} if self.keep else {})
