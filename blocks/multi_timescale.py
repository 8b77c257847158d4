"""Quasi-hyperbolic / multi-timescale mixing of the gradient with several momenta (QHM, AggMo, MT-DAO).

    u = w_0 * x + sum_j w_j * m_j          w_0 = 1 - sum_j w_j   unless `input_weight` is given

``x`` is the input (usually the gradient), ``m_j`` the ``momenta`` (any nodes: typically bias-corrected
EMAs of the gradient with different betas, i.e. different timescales / half-lives ln 0.5 / ln beta).
With one momentum this is the quasi-hyperbolic numerator of QHM / QHAdam (Ma & Yarats, ICLR 2019:
``(1 - nu) g + nu mhat``); with J momenta of distinct betas it is the aggregated, multi-timescale numerator
of MT-DAO's AggMoAdamW (Iacob et al., arXiv 2510.05361). Weights are hyperparameter expressions
(``$vs[0]``); each must lie in [0, 1] and, when ``w_0`` is derived, their sum must not exceed 1 (as in the
authors' code). A weight that is the literal 0 drops its term.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, model_validator

from opdsl.blocks.base import Block, Ref, Scalar, scalar
from opdsl.blocks.scalar_ops import as_weight
from opdsl.expr import Expr

#: Slack on ``sum_j w_j <= 1`` (the authors' code uses the same tolerance).
WEIGHT_SUM_TOL = 1e-8


class MultiTimescaleMixer(Block):
    """w_0 * input + sum_j weights[j] * momenta[j] (w_0 = 1 - sum of weights by default)."""

    block: Literal["direction-mixer"]
    rule: Literal["multi-timescale"]
    input: Ref = "grad"
    momenta: tuple[Ref, ...] = Field(min_length=1, description="the nodes mixed in (one per timescale)")
    weights: tuple[Scalar, ...] = Field(min_length=1, description="w_j, one per momentum, each in [0, 1]")
    input_weight: scalar() | None = Field(None, description="w_0; default 1 - sum(weights)")

    PORTS: ClassVar[tuple[str, ...]] = ("input", "momenta")

    @model_validator(mode="after")
    def _aligned(self) -> "MultiTimescaleMixer":
        if len(self.weights) != len(self.momenta):
            raise ValueError(
                f"`weights` has {len(self.weights)} entries but `momenta` has {len(self.momenta)}; give one weight per momentum"
            )
        for ref in self.momenta:
            if not isinstance(ref, str):
                raise ValueError(f"`momenta` entries must be node names, got {ref!r}")
        return self

    def inputs(self) -> dict[str, Ref]:
        out = {"input": self.input}
        for j, ref in enumerate(self.momenta):
            out[f"momenta[{j}]"] = ref
        if self.otherwise is not None:
            out["else"] = self.otherwise
        return out

    def check_values(self, evaluate: Callable[[Scalar], Any]) -> list[str]:
        problems = super().check_values(evaluate)
        values = [float(evaluate(w)) for w in self.weights]
        for j, (raw, value) in enumerate(zip(self.weights, values)):
            if not 0.0 <= value <= 1.0:
                source = f" (= {raw})" if isinstance(raw, Expr) else ""
                problems.append(f"field 'weights[{j}]'{source} is {value:g}; must be 0 <= value <= 1")
        if self.input_weight is None and sum(values) > 1.0 + WEIGHT_SUM_TOL:
            problems.append(
                f"field 'weights' sums to {sum(values):g}; the weights must sum to at most 1 "
                "(the gradient's weight is 1 - their sum)"
            )
        return problems

    def forward(self, ctx, x, state, totals=None):
        g = x["input"]
        ws = [ctx.value(w) for w in self.weights]
        if self.input_weight is not None:
            w0 = ctx.value(self.input_weight)
        elif all(isinstance(w, float) for w in ws):
            w0 = 1.0 - sum(ws)
        else:
            total = ws[0]
            for w in ws[1:]:
                total = total + w
            w0 = ctx.once(1 - total)
        terms = [(g, w0)] + [(x[f"momenta[{j}]"], w) for j, w in enumerate(ws)]
        out = None
        for value, weight in terms:
            if isinstance(weight, float) and weight == 0.0:
                continue
            term = value * as_weight(weight, g)
            out = term if out is None else out + term
        return (g * 0.0 if out is None else out), {}
