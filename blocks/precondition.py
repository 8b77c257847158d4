"""Divide by a power of a diagonal preconditioner built from a second moment computed elsewhere.

    D   = (v^q + eps) / (1 - beta^t)^q          q = ``exponent`` (0.5: Adam's sqrt(v); 1: v itself)
    out = input / D^p                           p = ``power``

``second_moment`` is the node holding v (e.g. ``{block: ema, input: grad, power: 2}``), so one statistic can
precondition on both sides of a non-elementwise block. ``beta: null`` drops the bias correction.

MuAdam / MuAdam-SANIA (Veprikov et al., "Preconditioned Norms: A Unified Framework for Steepest Descent,
Quasi-Newton and Adaptive Methods", arXiv 2510.10777) use it twice around ``orthogonalize``, with p = 1/2:

    MuAdam        q = 1/2:  D = (sqrt(v) + eps) / sqrt(1 - beta2^t)
    MuAdam-SANIA  q = 1:    D = (v + eps) / (1 - beta2^t)
    X = mhat / sqrt(D);   U = NS(X) * sqrt(max(1, rows/cols)) / sqrt(D)

which is the LMO of the preconditioned spectral norm ||sqrt(D) * X||_op. With q = 1/2, p = 1 it is Adam's
division with eps outside the bias correction (the Subset-Norm code's form).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from opdsl.blocks.base import Block, Ref, scalar
from opdsl.blocks.scalar_ops import as_weight


def _pow(x: torch.Tensor, p: float) -> torch.Tensor:
    if p == 1.0:
        return x
    if p == 0.5:
        return x.sqrt()
    if p == 0.25:
        return x.sqrt().sqrt()
    return x.pow(p)


class Precondition(Block):
    """input / ((v^q + eps) / (1 - beta^t)^q)^p, v read from another node."""

    block: Literal["precondition"]
    input: Ref
    second_moment: Ref
    exponent: Literal[0.5, 1.0] = 0.5
    power: float = Field(0.5, allow_inf_nan=False)
    beta: scalar(ge=0.0, lt=1.0) | None = None
    eps: scalar(ge=0.0) = 1e-8

    PORTS: ClassVar[tuple[str, ...]] = ("input", "second_moment")

    def forward(self, ctx, x, state, totals=None):
        v = x["second_moment"]
        d = _pow(v, self.exponent) + as_weight(ctx.value(self.eps), v)
        if self.beta is not None:
            correction = 1 - ctx.value(self.beta) ** ctx.step
            if self.exponent != 1.0:
                correction = correction ** self.exponent
            d = d / as_weight(ctx.once(correction), v)  # one 0-d kernel, not one pow per element
        return x["input"] / _pow(d, self.power), {}
