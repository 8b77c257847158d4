"""Subset-Norm: one adaptive step size per *subset* of a tensor's coordinates (Nguyen & Nguyen, ICML 2025).

For each parameter, the coordinates are split into subsets S_i; the block keeps one accumulator per subset

    s_i  = sum_{j in S_i} stats_j^2                  (a SUM of squares, not a mean)
    v_i <- beta * v_i + weight * s_i                 weight defaults to 1 - beta (an EMA);
                                                     beta = weight = 1 accumulates (AdaGrad-SN)
    out_j = input_j / (sqrt(v_{i(j)}) + eps)         (broadcast back over each subset)

``subset`` says how the subsets are formed:
    heuristic  2-D W (m x n): each ROW is a subset if m >= n (state m x 1), else each COLUMN (state 1 x n):
               the reduction runs along the shorter side, max(m, n) accumulators. Parameters that are not
               2-D fall back to subsets of size one (elementwise stats^2: plain Adam/AdaGrad).
    k > 0      flatten row-major to (numel/k', k'), k' the largest divisor of numel that is <= k; each row
               (k' consecutive elements in memory) is a subset. State (numel/k', 1).
    -c < 0     k = int(sqrt(numel) / c), then as above (the authors' default is -2: subsets of ~sqrt(d)/2).
    k is clamped into [1, numel] (the authors' code fails on k = 0; we take subsets of size one).

Paper: Nguyen & Nguyen, "Subset-Norm and Subspace-Momentum: Faster Memory-Efficient Adaptive Optimization
with Convergence Guarantees", ICML 2025 (arXiv:2411.07120); code timmytonga/sn-sm (subset_norm.py).
State is O(number of subsets) per parameter, e.g. O(rows) for the heuristic.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal, Union

import torch
from pydantic import field_validator

from opdsl.blocks.base import Block, Ref, Scope, StateKind, StateSpec, scalar
from opdsl.blocks.scalar_ops import as_weight


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is <= ``k`` (k clamped into [1, n])."""
    k = max(1, min(int(k), n))
    for d in range(k, 0, -1):
        if n % d == 0:
            return d
    return 1  # pragma: no cover (1 divides everything)


def subset_layout(shape: torch.Size, subset: Union[str, int]) -> tuple[tuple[int, ...], int | None, tuple[int, ...]]:
    """(view shape, reduced dim or None for elementwise, state shape) of one parameter.

    The input is viewed as ``view shape``; the sum of squares runs over ``reduced dim`` (keepdim), which
    gives the state's shape; the division broadcasts the state back over the view.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if subset == "heuristic":
        if len(shape) != 2:
            return shape, None, shape
        m, n = shape
        return (shape, 1, (m, 1)) if m >= n else (shape, 0, (1, n))
    k = int(subset) if int(subset) > 0 else int(math.sqrt(numel) / -int(subset))
    size = largest_divisor_at_most(numel, k)
    return (numel // size, size), 1, (numel // size, 1)


class SubsetNorm(Block):
    """input / (sqrt(v) + eps), v an EMA (or sum) of per-subset sums of stats^2, broadcast over each subset."""

    block: Literal["subset-norm"]
    input: Ref
    stats: Ref = "grad"
    subset: Union[Literal["heuristic"], int] = "heuristic"
    beta: scalar(ge=0.0, le=1.0) = 0.999
    weight: scalar(ge=0.0) | None = None
    eps: scalar(ge=0.0) = 1e-6

    PORTS: ClassVar[tuple[str, ...]] = ("input", "stats")
    WITNESS_PORTS: ClassVar[tuple[str, ...]] = ("stats",)

    @field_validator("subset")
    @classmethod
    def _nonzero(cls, value):
        if value == 0:
            raise ValueError("subset must be 'heuristic', a subset size k > 0, or -c < 0 (k = int(sqrt(numel)/c)); not 0")
        return value

    def scope(self) -> Scope:
        return Scope.SUBSET

    def state_specs(self) -> dict[str, StateSpec]:
        subset = self.subset
        return {"v": StateSpec(StateKind.TENSOR, shape=lambda shape: subset_layout(shape, subset)[2])}

    def forward(self, ctx, x, state, totals=None):
        beta = ctx.value(self.beta)
        weight = ctx.once(1 - beta) if self.weight is None else ctx.value(self.weight)
        eps = ctx.value(self.eps)
        denoms, news, sums = [], [], []
        # Batched over each run of equal-shaped parameters: v is one (count, *state shape) tensor per run.
        for run, s, v in zip(ctx.runs, ctx.run_views(x["stats"]), state["v"]):
            view, dim, sq = self._squares(run, s)
            sums.append(sq)
            v = v * as_weight(beta, v) + sq * as_weight(weight, v)
            denom = v.sqrt() + as_weight(eps, v)
            if dim is not None:  # one square root per subset, not one per element
                denom = ctx.once(denom)
            denoms.append(denom.expand(run.count, *view))
            news.append(v)
        if self._sums_cover(ctx):  # the finiteness check reads these instead of the whole of `stats`
            ctx.witness("stats", sums)
        # One flat division: the broadcast denominators fuse into it, no full-size output per run is kept.
        return x["input"] / ctx.concat(denoms), {"v": news}

    def offer_witnesses(self, ctx, x, state):
        if self._sums_cover(ctx):
            ctx.witness("stats", [self._squares(run, s)[2] for run, s in zip(ctx.runs, ctx.run_views(x["stats"]))])

    def _squares(self, run, stats: torch.Tensor) -> tuple[tuple[int, ...], int | None, torch.Tensor]:
        """(view shape, reduced dim, stats^2 summed over each subset) of a run's ``(count, *shape)`` stats;
        stats^2 itself where its parameters have no subsets (dim None)."""
        view, dim, _ = subset_layout(run.shape, self.subset)
        s = stats.reshape(run.count, *view)
        return view, dim, s * s if dim is None else (s * s).sum(dim=dim + 1, keepdim=True)

    def _sums_cover(self, ctx) -> bool:
        """Whether every parameter has subsets: then their sums cover all of ``stats``."""
        return all(subset_layout(run.shape, self.subset)[1] is not None for run in ctx.runs)
