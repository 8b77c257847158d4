"""Divide an update by a diagonal preconditioner built from the squares of ``stats`` (default: grad).

    out = x / D,   D from v, the block's own statistic of s = stats:

    adam      v_t = beta v_{t-1} + (1-beta) s^2        D = sqrt(v_t) / sqrt(1 - beta^t) + eps   (Kingma & Ba)
              amsgrad: true divides by vmax_t = max(vmax_{t-1}, v_t) instead (Reddi et al. 2018, torch's amsgrad)
    rmsprop   v_t = beta v_{t-1} + (1-beta) s^2        D = sqrt(v_t) + eps;  centered: D = sqrt(v_t - mu_t^2) + eps,
              mu_t = beta mu_{t-1} + (1-beta) s        (Tieleman & Hinton 2012; Graves 2013)
    adagrad   v_t = v_{t-1} + s^2,  v_0 = initial      D = sqrt(v_t) + eps    (Duchi et al. 2011)

``bias_correction: false`` drops the sqrt(1 - beta^t) of the adam/amsgrad rules. The order of operations
follows torch.optim, so the shipped specs match it to float32 rounding.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from opdsl.blocks.base import Block, Condition, Ref, StateKind, StateSpec, scalar
from opdsl.blocks.scalar_ops import as_weight


class _Preconditioner(Block):
    block: Literal["preconditioned-norm"]
    input: Ref
    stats: Ref = "grad"
    eps: scalar(ge=0.0) = 1e-8

    PORTS: ClassVar[tuple[str, ...]] = ("input", "stats")
    PRIMARY_STATE: ClassVar[str] = "v"

    def state_specs(self) -> dict[str, StateSpec]:
        return {"v": StateSpec(StateKind.ELEMENTWISE)}

    def second_moment(self, ctx, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        beta = ctx.value(self.beta)
        return v * as_weight(beta, v) + s * s * as_weight(1 - beta, v)

    def divide(self, ctx, x: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        return x / (root + as_weight(ctx.value(self.eps), root))


class AdamNorm(_Preconditioner):
    """x / (sqrt(v_t) / sqrt(1 - beta^t) + eps), v an EMA of stats^2 (its running max with amsgrad)."""

    rule: Literal["adam"]
    beta: scalar(ge=0.0, lt=1.0) = 0.999
    bias_correction: bool = True
    amsgrad: Condition = False

    def state_specs(self) -> dict[str, StateSpec]:
        specs = {"v": StateSpec(StateKind.ELEMENTWISE)}
        if self.amsgrad is True:
            specs["vmax"] = StateSpec(StateKind.ELEMENTWISE)
        return specs

    def forward(self, ctx, x, state, totals=None):
        v = self.second_moment(ctx, x["stats"], state["v"])
        new = {"v": v}
        if self.amsgrad is True:
            v = new["vmax"] = torch.maximum(state["vmax"], v)
        root = v.sqrt()
        if self.bias_correction:
            root = root * ctx.once(torch.rsqrt(1 - ctx.value(self.beta) ** ctx.step)).to(v.dtype)
        return self.divide(ctx, x["input"], root), new


class RMSpropNorm(_Preconditioner):
    """x / (sqrt(v_t [- mu_t^2]) + eps), no bias correction."""

    rule: Literal["rmsprop"]
    beta: scalar(ge=0.0, le=1.0) = 0.99
    centered: Condition = False

    def state_specs(self) -> dict[str, StateSpec]:
        specs = {"v": StateSpec(StateKind.ELEMENTWISE)}
        if self.centered is True:
            specs["mean"] = StateSpec(StateKind.ELEMENTWISE)
        return specs

    def forward(self, ctx, x, state, totals=None):
        s = x["stats"]
        v = self.second_moment(ctx, s, state["v"])
        new = {"v": v}
        if self.centered is True:
            mean = torch.lerp(state["mean"], s, as_weight(1 - ctx.value(self.beta), s))
            new["mean"] = mean
            root = (v - mean * mean).sqrt()
        else:
            root = v.sqrt()
        return self.divide(ctx, x["input"], root), new


class AdagradNorm(_Preconditioner):
    """x / (sqrt(sum of stats^2) + eps)."""

    rule: Literal["adagrad"]
    initial: scalar(ge=0.0) = 0.0
    eps: scalar(ge=0.0) = 1e-10

    def forward(self, ctx, x, state, totals=None):
        s, v = x["stats"], state["v"]
        initial = ctx.value(self.initial)
        if not (isinstance(initial, float) and initial == 0.0):
            v = v + (ctx.step == 1).to(v.dtype) * as_weight(initial, v)  # v_0 = initial, set on the first step
        v = v + s * s
        return self.divide(ctx, x["input"], v.sqrt()), {"v": v}
