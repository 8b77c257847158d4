"""Bias correction of a zero-initialised EMA (Kingma & Ba 2015).

    out = x / (1 - beta^t)

with ``t`` the 1-based step count. Adam's numerator is ``bias-correction(ema(grad, beta1), beta1)``.
"""
from __future__ import annotations

from typing import Literal

from opdsl.blocks.base import Block, Ref, scalar


class BiasCorrection(Block):
    """x / (1 - beta^t)."""

    block: Literal["bias-correction"]
    input: Ref
    beta: scalar(ge=0.0, lt=1.0)

    def forward(self, ctx, x, state, totals=None):
        inverse = ctx.once(1 / (1 - ctx.value(self.beta) ** ctx.step))  # one scalar division, not one per element
        return x["input"] * inverse.to(x["input"].dtype), {}
