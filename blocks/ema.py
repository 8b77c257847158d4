"""Exponential moving average (momentum) of an input or of its square.

    m_t = beta * m_{t-1} + w * x_t^p          w defaults to (1 - beta): an EMA (torch Adam's ``lerp``)
    m_1 = x_1^p            when init = first  (torch SGD's momentum buffer starts at the gradient)

With ``init: first`` the first step is the node's own first step, kept as a SCALAR state ``started``
(0, then 1), not the group's step 1: a node switched on by ``if:`` mid-run (SGD's momentum raised from
0) starts at the gradient, as torch's buffer does when it is first created.

``w = 1`` with ``init: first`` is torch.optim.SGD's momentum with dampening 0 (``w = 1 - dampening``);
``p = 2`` gives second moments (RMSprop, Adam's v). The state ``value`` is what ``node@prev`` reads.
"""
from __future__ import annotations

from typing import Literal

import torch

from opdsl.blocks.base import Block, Ref, StateKind, StateSpec, power, scalar
from opdsl.blocks.scalar_ops import as_weight


class EMA(Block):
    """m <- beta*m + weight*input^power (weight defaults to 1 - beta)."""

    block: Literal["ema"]
    input: Ref = "grad"
    beta: scalar(ge=0.0, le=1.0)
    weight: scalar(ge=0.0) | None = None
    power: Literal[1, 2] = 1
    init: Literal["zero", "first"] = "zero"

    PRIMARY_STATE = "value"

    def state_specs(self) -> dict[str, StateSpec]:
        specs = {"value": StateSpec(StateKind.ELEMENTWISE)}
        if self.init == "first":
            specs["started"] = StateSpec(StateKind.SCALAR)
        return specs

    def missing_state(self, name, own, step):
        """Checkpoints written before ``started`` existed: the buffer had started if any step was taken."""
        if name == "started" and "value" in own and step is not None:
            return (step.reshape(()) > 0).to(torch.float64)
        return None

    def forward(self, ctx, x, state, totals=None):
        m, g = state["value"], power(x["input"], self.power)
        beta = ctx.value(self.beta)
        if self.weight is None:
            new = torch.lerp(m, g, as_weight(1 - beta, m))
        else:
            new = m * as_weight(beta, m) + g * as_weight(ctx.value(self.weight), m)
        if self.init == "first":
            started = state["started"]
            new = torch.where(started == 0, g, new)
            return new, {"value": new, "started": torch.ones_like(started)}
        return new, {"value": new}
