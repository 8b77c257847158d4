"""Mix the current input (usually the gradient) with a previous direction.

    lerp     out = x + weight * (previous - x)       Muon's Nesterov (weight = momentum); Lion's
                                                     interpolation (previous = m@prev, weight = beta1)
    linear   out = a * x + b * previous              torch SGD's Nesterov: a = 1, b = momentum

``previous`` is another node's output (this step's momentum) or ``node@prev`` (its value before this
step). The seed-catalog rules (min-norm, conjugate, scaled-conjugate, multi-timescale) extend this file's
family in their own modules.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from opdsl.blocks.base import Block, Ref, scalar
from opdsl.blocks.scalar_ops import as_weight


class _Mixer(Block):
    block: Literal["direction-mixer"]
    input: Ref = "grad"
    previous: Ref

    PORTS: ClassVar[tuple[str, ...]] = ("input", "previous")


class LerpMixer(_Mixer):
    """x + weight * (previous - x)."""

    rule: Literal["lerp"]
    weight: scalar(ge=0.0, le=1.0)

    def forward(self, ctx, x, state, totals=None):
        g = x["input"]
        return torch.lerp(g, x["previous"], as_weight(ctx.value(self.weight), g)), {}


class LinearMixer(_Mixer):
    """a * x + b * previous."""

    rule: Literal["linear"]
    a: scalar() = 1.0
    b: scalar()

    def forward(self, ctx, x, state, totals=None):
        g = x["input"]
        a, b = ctx.value(self.a), ctx.value(self.b)
        out = g if isinstance(a, float) and a == 1.0 else g * as_weight(a, g)
        return out + x["previous"] * as_weight(b, g), {}
