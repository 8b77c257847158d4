"""Scale an update by one accumulated squared norm of ``stats`` (default: grad) over ALL parameters.

    accumulate: sum    b_t^2 = b_{t-1}^2 + ||s_t||^2,  b_0^2 = initial     AdaGrad-Norm (Ward, Wu & Bottou,
                                                                           ICML 2019 / JMLR 2020)
    accumulate: none   b_t^2 = ||s_t||^2 + initial                          normalized gradient descent
    out = x / (b_t + eps)

``span: global`` (the default) takes ||s_t||^2 over every parameter the graph owns, across parameter
groups, devices and dtypes (the engine adds each bucket's partial sum before ``forward``): one scalar
step size for the whole model, as in the paper. ``span: tensor`` keeps one b per parameter tensor
instead (a per-tensor AdaGrad-Norm: a variant, not the paper's method). The current gradient is included
in b_t. The accumulator is kept in float64 (SCALAR state, one copy per bucket, identical across buckets
when every group uses the same ``initial``). With ``span: global`` the squares are formed in float32 (or
the input's type, if wider) and summed into float64 256 at a time (``BlockContext.total``): ||s_t||^2
carries about 1e-8 of relative error, and a gradient whose squares overflow float32 (entries from about
1e18 in magnitude, where a partial sum of 256 squares can) skips the step under the default ``on_nonfinite``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from opdsl.blocks.base import Block, Ref, Scope, StateKind, StateSpec, scalar
from opdsl.blocks.scalar_ops import as_weight


class GlobalNorm(Block):
    """x / (sqrt(b_t^2) + eps), b_t^2 an accumulated squared norm of stats (global or per tensor)."""

    block: Literal["global-norm"]
    input: Ref
    stats: Ref = "grad"
    accumulate: Literal["sum", "none"] = "sum"
    span: Literal["global", "tensor"] = "global"
    initial: scalar(ge=0.0) = 0.0
    eps: scalar(ge=0.0) = 0.0

    PORTS: ClassVar[tuple[str, ...]] = ("input", "stats")
    PRIMARY_STATE: ClassVar[str] = "b2"
    SUMS_PER_TENSOR: ClassVar[bool] = True
    WITNESS_PORTS: ClassVar[tuple[str, ...]] = ("stats",)

    def scope(self) -> Scope:
        return Scope.GLOBAL if self.span == "global" else Scope.TENSOR

    def state_specs(self) -> dict[str, StateSpec]:
        if self.span == "global":
            return {"b2": StateSpec(StateKind.SCALAR, dtype=torch.float64)}
        # (1,) rather than (): see compiled.lowering on 0-d float64 CPU inputs of a compiled step
        return {"b2": StateSpec(StateKind.TENSOR, shape=lambda shape: (1,), dtype=torch.float64)}

    @staticmethod
    def _squares(s: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        s = s.to(torch.promote_types(s.dtype, dtype))
        return s * s

    def reduce(self, ctx, x, state):
        # float32 squares, summed into float64 by ctx.total (partial sums first: converting every square
        # to float64 made this pass arithmetic-bound on a CPU)
        squares = self._squares(x["stats"], torch.float32)
        sq = ctx.total(squares, dtype=torch.float64)
        ctx.witness("stats", [sq], terms_dtype=squares.dtype)  # the finiteness check reads this sum, not the gradient
        return {"sq": sq}

    def _accumulated(self, ctx, previous: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        initial = ctx.value(self.initial)
        if self.accumulate == "none":
            return sq if isinstance(initial, float) and initial == 0.0 else sq + initial
        start = torch.where(ctx.step == 1, as_weight(initial, previous), 0.0) if not (
            isinstance(initial, float) and initial == 0.0
        ) else 0.0
        return previous + start + sq

    def offer_witnesses(self, ctx, x, state):
        self._tensor_squares(ctx, x["stats"])

    def _tensor_squares(self, ctx, stats: torch.Tensor) -> torch.Tensor:
        """Per tensor: the sum of squares of ``stats``, offered to the finiteness check (it reads this, not stats)."""
        sq = ctx.segment_sum(self._squares(stats))
        ctx.witness("stats", [sq])
        return sq

    def forward(self, ctx, x, state, totals=None):
        u = x["input"]
        eps = ctx.value(self.eps)
        if self.span == "global":
            b2 = self._accumulated(ctx, state["b2"], totals["sq"])
            denom = b2.sqrt() if isinstance(eps, float) and eps == 0.0 else b2.sqrt() + eps
            return u / ctx.once(denom.to(u.dtype)), {"b2": b2}
        previous = torch.cat([b.reshape(-1) for b in state["b2"]])  # one (count, 1) tensor per run
        sq = self._tensor_squares(ctx, x["stats"])
        b2 = self._accumulated(ctx, previous, sq)
        denom = b2.sqrt() if isinstance(eps, float) and eps == 0.0 else b2.sqrt() + eps
        new = [b.reshape(-1, 1) for b in ctx.run_slices(b2)]
        return u / ctx.expand(denom.to(u.dtype)), {"b2": new}
