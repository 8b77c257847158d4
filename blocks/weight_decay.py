"""Weight decay as one block; where it is placed decides what it is.

    out = x + wd * param                              timing: before-step (the default)

Placed on the gradient, this is L2 regularisation coupled into the moments (torch Adam, SGD, Adagrad).
Placed after the preconditioner, it is decoupled weight decay (AdamW, Loshchilov & Hutter 2019): with
the engine's update ``param <- param - lr * out`` it gives ``param * (1 - lr*wd) - lr * x``.

``timing: after-step`` decays the *updated* parameter instead (the Subset-Norm reference code):

    param' = (param - lr*x) * (1 - lr*wd)   i.e.   out = x * (1 - lr*wd) + wd * param
"""
from __future__ import annotations

from typing import Literal

from opdsl.blocks.base import Block, Ref, scalar


class WeightDecay(Block):
    """x + weight_decay * param (or the after-step form)."""

    block: Literal["weight-decay", "decoupled-decay"]
    input: Ref
    param: Ref = "param"
    weight_decay: scalar(ge=0.0)
    timing: Literal["before-step", "after-step"] = "before-step"

    PORTS = ("input", "param")
    CARRIES_NONFINITE = "input"  # inf or NaN in x stays inf or NaN in x * c + wd * param

    def forward(self, ctx, x, state, totals=None):
        wd, update, param = ctx.value(self.weight_decay), x["input"], x["param"]
        if self.timing == "after-step":
            update = update * (1 - ctx.hyper("lr") * wd)
        return update + param * wd, {}
