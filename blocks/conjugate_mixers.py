"""Conjugate-direction rules of the ``direction-mixer`` family. Each keeps its own direction ``D`` (state
``d``, the block's output; gradient-like, as the engine steps ``param <- param - lr * out``) and mixes
it with the input ``g``. ``d = -D`` below is the papers' descent direction.

    min-norm          D_1 = g_1;  D_t = lam D_{t-1} + (1 - lam) g_t, the min-norm point of the segment
                      [D_{t-1}, g_t]: lam_raw = <g, g - D> / ||g - D||^2 = (c - b) / (a - 2b + c) with
                      a = ||D||^2, b = <D,g>, c = ||g||^2; lam = clip(lam_raw, 0, 1) or, with
                      smoothing: sigmoid, sigmoid(clip(lam_raw, -5, 5)). lam = 0 (D_t = g_t) when
                      ||g - D||^2 = 0, at t = 1 and at restarts (t > 1 and (t-1) % restart_every = 0).
                      scope: global (sums over every parameter of the graph) or tensor (per parameter).
                      SCSAdamW (Zhang & Zhang 2025, arXiv:2507.01241).
    scaled-conjugate  D_1 = g_1;  D_n = (1 + gamma_n) g_n + delta_n D_{n-1}           (elementwise)
                      SCGAdam (Sato, Izumi & Iiduka, JMLR 2024, arXiv:2412.11400); gamma and delta may
                      be expressions over ``step`` (e.g. "0.5 ** step").
    conjugate         D_1 = g_1;  D_n = g_n + scale_n beta_n D_{n-1}  (i.e. d_n = -g_n + scale_n beta_n d_{n-1}),
                      beta_n a nonlinear-CG coefficient, written on d = -D as in the papers, with
                      y = g_n - g_{n-1} and den~ = den + eps if den >= 0 else den - eps:
                        HS  <g,y> / <d,y>~                  FR  ||g||^2 / (||g_{n-1}||^2 + eps)
                        PRP <g,y> / (||g_{n-1}||^2 + eps)   DY  ||g||^2 / <d,y>~
                        HZ  HS - lam ||y||^2 <g,d> / (<d,y>^2 + eps)
                        CD  -||g||^2 / <d,g_{n-1}>~         LS  -<g,y> / <d,g_{n-1}>~
                      scope: tensor (inner products per parameter: the paper) or row (sums over the
                      last axis, one coefficient per row: the authors' code). CoBA (Kobayashi & Iiduka
                      2020) uses scale_n = M / n^a.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field

from opdsl.blocks.base import Block, Ref, Scope, StateKind, StateSpec, scalar
from opdsl.blocks.scalar_ops import as_weight


def _signed(den: torch.Tensor, eps) -> torch.Tensor:
    """den + eps*sign(den), with sign(0) = +1 (the authors' ``where(den >= 0, eps, -eps)``)."""
    return torch.where(den >= 0, den + eps, den - eps)


class _DirectionState(Block):
    """Shared base: a direction-mixer rule that keeps its own direction (state ``d``, the primary state)."""

    block: Literal["direction-mixer"]
    input: Ref = "grad"

    PORTS: ClassVar[tuple[str, ...]] = ("input",)
    PRIMARY_STATE: ClassVar[str] = "d"
    SUMS_PER_TENSOR: ClassVar[bool] = True

    def state_specs(self) -> dict[str, StateSpec]:
        return {"d": StateSpec(StateKind.ELEMENTWISE)}


class MinNormMixer(_DirectionState):
    """D = lam*D_prev + (1-lam)*g, lam the min-norm point of [D_prev, g] (clip or sigmoid), global or per tensor."""

    rule: Literal["min-norm"]
    reduction: Literal["global", "tensor"] = Field(
        "global",
        alias="scope",
        description="global: a, b, c summed over every parameter of the graph (the theory); tensor: per parameter",
    )
    smoothing: Literal["clip", "sigmoid"] = Field(
        "clip", description="clip: clip(lam, 0, 1); sigmoid: sigmoid(clip(lam, -5, 5))"
    )
    restart_every: scalar(ge=0.0) = Field(
        0.0, description="K (an integer): D_t = g_t at steps t > 1 with (t-1) % K == 0; 0 = never"
    )

    WITNESS_PORTS: ClassVar[tuple[str, ...]] = ("input",)

    def scope(self) -> Scope:
        return Scope.GLOBAL if self.reduction == "global" else Scope.TENSOR

    @staticmethod
    def _terms(g: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = g - d
        return g * diff, diff * diff  # summed: <g, g-d> = c - b and ||g-d||^2 = a - 2b + c

    def reduce(self, ctx, x, state):
        g = x["input"]
        num, den = self._terms(g, state["d"])
        acc = ctx.step.dtype  # float64 where the device has it
        den = ctx.total(den, dtype=acc)
        ctx.witness("input", [den], terms_dtype=g.dtype)  # ||g - D||^2: the finiteness check reads it, not g
        return {"num": ctx.total(num, dtype=acc), "den": den}

    def weight(self, ctx, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """lam from the summed terms (0-d or one per parameter); 0 where D_t must be g_t."""
        usable = den > 0
        raw = num / torch.where(usable, den, torch.ones_like(den))
        lam = raw.clamp(0.0, 1.0) if self.smoothing == "clip" else torch.sigmoid(raw.clamp(-5.0, 5.0))
        fresh = ctx.step == 1
        every = ctx.value(self.restart_every)
        if not (isinstance(every, float) and every == 0.0):
            # remainder by 0 is NaN and NaN == 0 is false: a restart_every expression at 0 never restarts
            fresh = fresh | (torch.remainder(ctx.step - 1, every) == 0)
        return torch.where(usable & ~fresh, lam, torch.zeros_like(lam))

    def forward(self, ctx, x, state, totals=None):
        g, d = x["input"], state["d"]
        if self.reduction == "global":
            lam = ctx.once(self.weight(ctx, totals["num"], totals["den"]).to(g.dtype))
        else:
            num, den = self._terms(g, d)
            acc = ctx.step.dtype
            den = self._offer_distance(ctx, den)
            lam = self.weight(ctx, ctx.segment_sum(num).to(acc), den.to(acc))
            lam = ctx.expand(lam.to(g.dtype))
        new = torch.lerp(g, d, lam)  # g + lam*(d - g): exactly g where lam == 0
        return new, {"d": new}

    def offer_witnesses(self, ctx, x, state):
        diff = x["input"] - state["d"]  # _terms' distance alone: its other product is for the weight
        self._offer_distance(ctx, diff * diff)

    @staticmethod
    def _offer_distance(ctx, terms: torch.Tensor) -> torch.Tensor:
        """||g - D||^2 per tensor, offered to the finiteness check (it reads this, not g)."""
        den = ctx.segment_sum(terms)
        ctx.witness("input", [den])
        return den


class ScaledConjugateMixer(_DirectionState):
    """D = (1+gamma)*g + delta*D_prev, D_1 = g_1 (scaled conjugate gradient, gradient-like form)."""

    rule: Literal["scaled-conjugate"]
    gamma: scalar() = Field(0.1, description="gamma_n: weight 1 + gamma_n on the current input")
    delta: scalar() = Field(0.1, description="delta_n: weight on the previous direction")

    def forward(self, ctx, x, state, totals=None):
        g, d = x["input"], state["d"]
        new = g * as_weight(1 + ctx.value(self.gamma), g) + d * as_weight(ctx.value(self.delta), g)
        new = torch.where(ctx.step == 1, g, new)
        return new, {"d": new}


_NEEDS: dict[str, tuple[str, ...]] = {
    # sums each coefficient reads; D is the stored (gradient-like) direction, p the previous input
    "HS": ("gy", "Dy"),
    "FR": ("gg", "pp"),
    "PRP": ("gy", "pp"),
    "DY": ("gg", "Dy"),
    "HZ": ("gy", "Dy", "yy", "gD"),
    "CD": ("gg", "Dp"),
    "LS": ("gy", "Dp"),
}


class ConjugateMixer(_DirectionState):
    """D = g + scale*beta*D_prev, beta a nonlinear-CG coefficient (HS, FR, PRP, DY, HZ, CD, LS) per tensor or row."""

    rule: Literal["conjugate"]
    coefficient: Literal["HS", "FR", "PRP", "DY", "HZ", "CD", "LS"] = Field(
        "HS", description="the CG coefficient beta_n (Hestenes-Stiefel, Fletcher-Reeves, Polak-Ribiere-Polyak, "
        "Dai-Yuan, Hager-Zhang, conjugate descent, Liu-Storey)"
    )
    scale: scalar() = Field(1.0, description="multiplier of beta_n, e.g. CoBA's '$M / step ** $a'")
    eps: scalar(ge=0.0) = Field(1e-8, description="denominator guard: den + sign(den)*eps (FR, PRP: den + eps)")
    lam: scalar() = Field(2.0, description="HZ only: weight of the Hager-Zhang correction")
    reduction: Literal["tensor", "row"] = Field(
        "tensor", alias="scope", description="tensor: inner products per parameter; row: over the last axis"
    )

    WITNESS_PORTS: ClassVar[tuple[str, ...]] = ("input",)

    def scope(self) -> Scope:
        return Scope.TENSOR if self.reduction == "tensor" else Scope.SUBSET

    def state_specs(self) -> dict[str, StateSpec]:
        return {"d": StateSpec(StateKind.ELEMENTWISE), "previous_input": StateSpec(StateKind.ELEMENTWISE)}

    # ---- per-unit (parameter or row) sums and their broadcast back over the flat layout ----------------
    def _sum(self, ctx, flat: torch.Tensor) -> torch.Tensor:
        if self.reduction == "tensor":
            return ctx.segment_sum(flat)
        return torch.cat([v.reshape(-1, _last(r.shape)).sum(-1) for r, v in zip(ctx.runs, ctx.run_views(flat))])

    def _expand(self, ctx, per_unit: torch.Tensor) -> torch.Tensor:
        if self.reduction == "tensor":
            return ctx.expand(per_unit)
        pieces, start = [], 0
        for r in ctx.runs:
            width = _last(r.shape)
            rows = r.numel // width if width else 0
            pieces.append(per_unit[start : start + rows].reshape(-1, 1).expand(rows, width))
            start += rows
        return ctx.concat(pieces)

    def _witnessed(self) -> str:
        """The sum the finiteness check reads: every rule sums g*g or g*y = g*(g - p), inf or NaN wherever g is."""
        return "gg" if "gg" in _NEEDS[self.coefficient] else "gy"

    def offer_witnesses(self, ctx, x, state):
        g = x["input"]
        term = self._products(g, state["d"], state["previous_input"])[self._witnessed()]()
        ctx.witness("input", [self._sum(ctx, term).to(ctx.step.dtype)], terms_dtype=g.dtype)

    @staticmethod
    def _products(g: torch.Tensor, big_d: torch.Tensor, p: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        """The products a rule may sum, each computed only when called (y = g - p)."""
        y = g - p
        return {"gy": lambda: g * y, "Dy": lambda: big_d * y, "gg": lambda: g * g, "pp": lambda: p * p,
                "yy": lambda: y * y, "gD": lambda: g * big_d, "Dp": lambda: big_d * p}

    def coefficient_of(self, ctx, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """beta_n from the summed products, with the descent direction -D in the papers' formulas."""
        eps = ctx.value(self.eps)
        rule = self.coefficient
        if rule == "FR":
            return sums["gg"] / (sums["pp"] + eps)
        if rule == "PRP":
            return sums["gy"] / (sums["pp"] + eps)
        if rule in ("CD", "LS"):
            top = sums["gg"] if rule == "CD" else sums["gy"]
            return -top / _signed(-sums["Dp"], eps)
        dy = -sums["Dy"]  # <d, y> with d = -D the descent direction
        top = sums["gg"] if rule == "DY" else sums["gy"]
        beta = top / _signed(dy, eps)
        if rule == "HZ":
            beta = beta - ctx.value(self.lam) * sums["yy"] * (-sums["gD"]) / (dy * dy + eps)
        return beta

    def forward(self, ctx, x, state, totals=None):
        g, big_d, p = x["input"], state["d"], state["previous_input"]
        products = self._products(g, big_d, p)
        acc = ctx.step.dtype  # coefficients in float64 where the device has it (one value per unit)
        sums = {k: self._sum(ctx, products[k]()).to(acc) for k in _NEEDS[self.coefficient]}
        ctx.witness("input", [sums[self._witnessed()]], terms_dtype=g.dtype)
        beta = self.coefficient_of(ctx, sums) * ctx.value(self.scale)
        beta = torch.where(ctx.step == 1, torch.zeros_like(beta), beta)  # d_1 = g_1
        new = g + self._expand(ctx, beta.to(g.dtype)) * big_d
        return new, {"d": new, "previous_input": g}


def _last(shape: torch.Size) -> int:
    return shape[-1] if len(shape) else 1
