"""A global step size learned online from two gradients per step: SGDOL (Zhuang, Cutkosky & Orabona,
ICML 2019, arXiv:1901.09068).

With g and g' two independent stochastic gradients at the same point (``input`` and ``second``):

    S_ip_t   = alpha + sum_{i<=t} <g_i, g'_i>        (global: over every parameter of the graph)
    S_norm_t = alpha + sum_{i<=t} ||g_i||^2
    eta_1 = 1/L,   eta_{t+1} = clip(S_ip_t / (L * S_norm_t), 0, 2/L)
    out_t = eta_t * g_t                              (this round's statistics only affect the NEXT step)

This is FTRL-proximal on the surrogate losses -eta <g,g'> + (L/2) eta^2 ||g||^2 with initial
regulariser alpha. The authors' code steps twice per iteration (odd calls store g); opdsl instead reads
``grad2``, so ``Optimizer.step(closure)`` calls the closure twice at the same parameters.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from opdsl.blocks.base import Block, Ref, Scope, StateKind, StateSpec, scalar


class OnlineStepSize(Block):
    """eta_t * input, eta learned by FTRL on <g, g'> and ||g||^2 (global scope)."""

    block: Literal["online-step-size"]
    input: Ref = "grad"
    second: Ref = "grad2"
    smoothness: scalar(gt=0.0) = 10.0
    alpha: scalar(ge=0.0) = 10.0

    PORTS: ClassVar[tuple[str, ...]] = ("input", "second")
    PRIMARY_STATE: ClassVar[str] = "eta"
    WITNESS_PORTS: ClassVar[tuple[str, ...]] = ("input", "second")

    def scope(self) -> Scope:
        return Scope.GLOBAL

    def state_specs(self) -> dict[str, StateSpec]:
        scalar_state = StateSpec(StateKind.SCALAR, dtype=torch.float64)
        return {"inner": scalar_state, "norm": scalar_state, "eta": scalar_state}

    def reduce(self, ctx, x, state):
        g, g2 = x["input"], x["second"]
        inner, norm = ctx.total(g * g2, dtype=torch.float64), ctx.total(g * g, dtype=torch.float64)
        # the finiteness check reads these sums instead of both gradients (see BlockContext.witness)
        ctx.witness("input", [norm], terms_dtype=g.dtype)
        ctx.witness("second", [inner], terms_dtype=g.dtype)
        return {"inner": inner, "norm": norm}

    def forward(self, ctx, x, state, totals=None):
        first = ctx.step == 1
        big_l, alpha = ctx.value(self.smoothness), ctx.value(self.alpha)
        eta = torch.where(first, 1.0 / big_l, state["eta"])
        start = torch.where(first, alpha, 0.0)
        inner = state["inner"] + start + totals["inner"]
        norm = state["norm"] + start + totals["norm"]
        upper = 2.0 / big_l
        next_eta = torch.clamp(inner / (big_l * norm), min=0.0)
        # clamp(max=<0-d tensor>) would make dynamo read the bound as a Python scalar: use minimum
        next_eta = torch.minimum(next_eta, upper) if isinstance(upper, torch.Tensor) else next_eta.clamp(max=upper)
        g = x["input"]
        return g * eta.to(g.dtype), {"inner": inner, "norm": norm, "eta": next_eta}
