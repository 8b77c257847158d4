"""Sign of the input (signSGD, Signum, Lion; Bernstein et al. 2018, Chen et al. 2023).

    out = sign(x)        with sign(0) = 0
"""
from __future__ import annotations

from typing import Literal

import torch

from opdsl.blocks.base import Block, Ref


class Sign(Block):
    """sign(x)."""

    block: Literal["sign"]
    input: Ref

    def forward(self, ctx, x, state, totals=None):
        return torch.sign(x["input"]), {}
