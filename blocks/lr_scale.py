"""Scale the update by a scalar and, optionally, by a factor that depends on each parameter's shape.

    out = factor * shape_factor(param) * x

shape rules for a matrix of ``rows x cols`` (the first two dims; Muon and its variants):
    none             1
    muon             sqrt(max(1, rows/cols))        Keller Jordan's Muon, torch.optim.Muon "original"
    match-rms-adamw  0.2 * sqrt(max(rows, cols))    Moonshot's Muon ("Muon is scalable for LLM training")
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from opdsl.blocks.base import Block, Ref, Scope, scalar
from opdsl.blocks.scalar_ops import as_weight

SHAPE_RULES = {
    "none": lambda rows, cols: 1.0,
    "muon": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
    "match-rms-adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
}


class LRScale(Block):
    """factor * shape_factor * x."""

    SUMS_PER_TENSOR: ClassVar[bool] = True  # its per-tensor work is a number per tensor, broadcast back

    block: Literal["lr-scale"]
    input: Ref
    factor: scalar() = 1.0
    shape_rule: Literal["none", "muon", "match-rms-adamw"] = "none"

    def scope(self) -> Scope:
        return Scope.ELEMENTWISE if self.shape_rule == "none" else Scope.TENSOR

    def check_shape(self, shape: torch.Size) -> str | None:
        if self.shape_rule != "none" and len(shape) < 2:
            return f"shape_rule {self.shape_rule!r} needs a matrix (ndim >= 2)"
        return None

    def forward(self, ctx, x, state, totals=None):
        out = x["input"]
        if self.shape_rule != "none":
            rule = SHAPE_RULES[self.shape_rule]
            factors = [rule(s.shape[0], s.shape[1]) for s in ctx.segments]
            if len(set(factors)) == 1:
                out = out * factors[0]
            else:
                per_segment = ctx.table(factors, out.dtype)
                out = ctx.per_parameter(torch.mul, out, per_segment)
        factor = ctx.value(self.factor)
        if not (isinstance(factor, float) and factor == 1.0):
            out = out * as_weight(factor, out)
        return out, {}
