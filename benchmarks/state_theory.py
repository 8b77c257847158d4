"""Theoretical optimizer-state size, in elements, for one parameter tensor under each shipped spec.

This table is an oracle for the memory opdsl keeps per parameter. Each entry counts the tensors an
algorithm has to carry from one step to the next for one parameter of a given shape, under the spec's
default hyperparameters. It was written from the update rules in ``/work/shared/algorithms.md`` (and the
paper summaries in ``/work/shared/seeds/``), not from opdsl's blocks. Two facts come from the spec files
themselves (``specs/<name>.yaml``): which parameters take which route (``groups:``) and the default values
(``hyper:`` and fixed node fields such as the subspace rank). Every entry lists the defaults it relies on
in ``hyper`` (overridable) and ``fields`` (fixed in the spec file), so a test can check them against the
spec, and the ``why`` line says so.

Counting rules:

* A full-size state (a moment, an accumulator, a previous direction or gradient) counts ``numel``.
* A per-tensor or global scalar (AdaGrad-Norm's accumulator, SGDOL's two sums) counts 1 element for the
  parameter: a parameter optimized alone would need it once.
* The step counter is not counted. Neither is anything that is a pure function of other state, of the
  step count and of the hyperparameters (bias corrections, Nesterov look-aheads, a step size recomputed
  from stored sums, a conjugate coefficient recomputed every step).
* "Matrix" means a 2-D tensor of shape ``(m, n)``.

Pure Python: no torch import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["SPECS", "UnknownSpecError", "Theory", "THEORY", "theory_elements", "theory_note"]

Shape = tuple[int, ...]
Counter = Callable[[Shape, Mapping[str, Any]], int]


class UnknownSpecError(KeyError):
    """Raised for a spec name the table does not cover."""

    def __str__(self) -> str:  # KeyError would show the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class Theory:
    """One spec's entry: how many state elements a parameter of a given shape needs, and why.

    ``hyper``: defaults of the hyperparameters the count depends on (as in the spec's ``hyper:``); a caller
    may override them. ``fields``: fixed node fields the count depends on, ``"node.field": value`` (as in
    the spec's ``nodes:``), for checking only.
    """

    why: str
    count: Counter
    hyper: Mapping[str, Any] = field(default_factory=dict)
    fields: Mapping[str, Any] = field(default_factory=dict)


# ---- shape helpers ----------------------------------------------------------------------------------

def numel(shape: Shape) -> int:
    """Elements of a tensor of this shape (1 for a 0-d tensor)."""
    return math.prod(shape)


def is_matrix(shape: Shape) -> bool:
    return len(shape) == 2


def subset_norm_heuristic(shape: Shape) -> int:
    """SN "heuristic" subsets of an (m, n) matrix: one accumulator per row if m >= n, else per column,
    so max(m, n) accumulators (algorithms.md §3a)."""
    rows, cols = shape
    return max(rows, cols)


def subspace_momentum(shape: Shape, rank: int) -> int:
    """SM on an (m, n) matrix with r = min(rank, m, n): the momentum lives in the projected space,
    r x max(m, n), and the basis (V_r^T, r x n if m >= n, else U_r, m x r) is r x min(m, n) (algorithms.md §3c)."""
    rows, cols = shape
    r = min(rank, rows, cols)
    return r * max(rows, cols) + r * min(rows, cols)


# ---- counters ---------------------------------------------------------------------------------------

def full(k: int) -> Counter:
    """k full-size tensors."""
    return lambda shape, hyper: k * numel(shape)


def scalars(k: int) -> Counter:
    """k scalars, whatever the shape."""
    return lambda shape, hyper: k


def adam_like(extra_full: int = 0) -> Counter:
    """m and v (and vmax when amsgrad), plus ``extra_full`` full-size tensors (a stored direction, ...)."""
    return lambda shape, hyper: (2 + int(bool(hyper["amsgrad"])) + extra_full) * numel(shape)


def adamw_fallback(shape: Shape) -> int:
    """The shipped adamw graph at its defaults (amsgrad false): m and v."""
    return 2 * numel(shape)


def muon(shape: Shape, hyper: Mapping[str, Any]) -> int:
    return numel(shape) if len(shape) >= 2 else adamw_fallback(shape)


def muadam(shape: Shape, hyper: Mapping[str, Any]) -> int:
    return 2 * numel(shape) if len(shape) >= 2 else adamw_fallback(shape)


def sn_adam_fallback(matrix: Counter) -> Counter:
    """The SN/SM specs: ``matrix`` on 2-D tensors, the Adam graph (m, v) on every other ndim."""
    return lambda shape, hyper: matrix(shape, hyper) if is_matrix(shape) else 2 * numel(shape)


def adagrad_sn(shape: Shape, hyper: Mapping[str, Any]) -> int:
    momentum = numel(shape) if hyper["momentum"] > 0 else 0
    accumulator = subset_norm_heuristic(shape) if is_matrix(shape) else numel(shape)
    return momentum + accumulator


def aggmo_adamw(shape: Shape, hyper: Mapping[str, Any]) -> int:
    """betas = (b_1, ..., b_J, beta2): J momenta and v, plus vmax when amsgrad."""
    momenta = len(hyper["betas"]) - 1
    return (momenta + 1 + int(bool(hyper["amsgrad"]))) * numel(shape)


def rmsprop(shape: Shape, hyper: Mapping[str, Any]) -> int:
    k = 1 + int(bool(hyper["centered"])) + int(hyper["momentum"] > 0)
    return k * numel(shape)


def sgd(shape: Shape, hyper: Mapping[str, Any]) -> int:
    # the buffer, and a flag shared by the bucket marking its first step (torch marks it by the buffer's absence)
    return numel(shape) + 1 if hyper["momentum"] != 0 else 0


# ---- the table --------------------------------------------------------------------------------------

SM_RANK = {"sm.rank": 128, "sm.projector": "svd"}
SN_HEURISTIC = {"sn.subset": "heuristic"}
AMSGRAD_OFF = {"amsgrad": False}

THEORY: dict[str, Theory] = {
    "adagrad": Theory(
        "S = sum of g^2, full-size; lr_decay and the initial value need no state (algorithms.md §7: AdaGrad)",
        full(1)),
    "adadelta": Theory(
        "the running means of g^2 and of the squared updates, both full-size (Zeiler 2012, Algorithm 1; "
        "torch.optim.Adadelta's square_avg and acc_delta)",
        full(2)),
    "adamax": Theory(
        "m and the running maximum u = max(b2 u, |g| + eps), both full-size (torch.optim.Adamax's update rule)",
        full(2)),
    "lamb": Theory(
        "m and v, full-size; the trust ratio is recomputed from the parameter and the update every step "
        "(You et al. 2020, Algorithm 2)",
        full(2)),
    "nadam": Theory(
        "m and v, full-size, and the product of the momentum schedule mu_1...mu_t, one shared scalar "
        "(torch.optim.NAdam's mu_product)",
        lambda shape, hyper: 2 * numel(shape) + 1),
    "asgd": Theory(
        "the averaged iterate ax, full-size, and the step size eta and averaging weight mu of the next step, one "
        "shared scalar each: eta is computed from the lr (lambd, alpha) of the step before, which a schedule "
        "changes, and mu from its t0, so neither is a function of this step's values (torch.optim.ASGD's state)",
        lambda shape, hyper: numel(shape) + 2),
    "radam": Theory(
        "m and v, full-size; the rectification is a function of the step (torch.optim.RAdam's update rule)",
        full(2)),
    "adagrad-norm": Theory(
        "one global scalar b^2 = b_0^2 + sum ||g||^2 (algorithms.md §7: AdaGrad-Norm)",
        scalars(1)),
    "adagrad-sn": Theory(
        "matrices: SN accumulator, max(m, n) (per row if m >= n, else per column); other ndims: AdaGrad's "
        "full-size S; no momentum at the default momentum 0 (algorithms.md §3a, §7; routing and defaults: "
        "specs/adagrad-sn.yaml)",
        adagrad_sn, {"momentum": 0.0}, SN_HEURISTIC),
    "adam": Theory(
        "m, v full-size; vmax too only with amsgrad (default false) (algorithms.md §6c: Adam)",
        adam_like(), AMSGRAD_OFF),
    "adam-l2": Theory(
        "m, v full-size; vmax too only with amsgrad (default false) (algorithms.md §6c: Adam, coupled L2)",
        adam_like(), AMSGRAD_OFF),
    "adamw": Theory(
        "m, v full-size; vmax too only with amsgrad (default false) (algorithms.md §6c: AdamW)",
        adam_like(), AMSGRAD_OFF),
    "adamw-sm": Theory(
        "matrices: subspace momentum r*max(m,n) + basis r*min(m,n), r = min(128, m, n), plus Adam's full-size v; "
        "other ndims: m, v (algorithms.md §3c; rank 128 and routing: specs/adamw-sm.yaml)",
        sn_adam_fallback(lambda s, h: subspace_momentum(s, 128) + numel(s)), {}, SM_RANK),
    "adamw-sn": Theory(
        "matrices: m full-size + SN accumulator max(m, n); other ndims: m, v (algorithms.md §3a-b; routing: "
        "specs/adamw-sn.yaml)",
        sn_adam_fallback(lambda s, h: numel(s) + subset_norm_heuristic(s)), {}, SN_HEURISTIC),
    "adamw-snsm": Theory(
        "matrices: subspace momentum r*max(m,n) + basis r*min(m,n), r = min(128, m, n), + SN accumulator "
        "max(m, n); other ndims: m, v (algorithms.md §3a, §3c; rank 128 and routing: specs/adamw-snsm.yaml)",
        sn_adam_fallback(lambda s, h: subspace_momentum(s, 128) + subset_norm_heuristic(s)), {},
        {**SM_RANK, **SN_HEURISTIC}),
    "aggmo-adamw": Theory(
        "J = 2 momenta (betas[0], betas[1]) + v, full-size; vmax too only with amsgrad (default false) "
        "(algorithms.md §8a: AggMoAdamW; J = len(betas) - 1 from the defaults in specs/aggmo-adamw.yaml)",
        aggmo_adamw, {"betas": (0.9, 0.99, 0.95), **AMSGRAD_OFF}),
    "coba": Theory(
        "previous direction d and previous gradient g (the HS coefficient needs <g_n, g_n - g_{n-1}>), m, v, "
        "full-size; vmax too with amsgrad (default false) (algorithms.md §2: CoBA; coefficient HS: specs/coba.yaml)",
        adam_like(extra_full=2), AMSGRAD_OFF, {"d.coefficient": "HS"}),
    "generalized-signsgd": Theory(
        "m and v (EMA of m^2), full-size (algorithms.md §6a: Generalized SignSGD)",
        full(2)),
    "lion": Theory(
        "one momentum m, full-size (algorithms.md §7: Lion)",
        full(1)),
    "muadam": Theory(
        "ndim >= 2: m and v, full-size; ndim 0-1: the adamw graph, m and v (algorithms.md §4: MuAdam; routing: "
        "specs/muadam.yaml)",
        muadam),
    "muadam-sania": Theory(
        "ndim >= 2: m and v, full-size; ndim 0-1: the adamw graph, m and v (algorithms.md §4: MuAdam-SANIA; "
        "routing: specs/muadam-sania.yaml)",
        muadam),
    "muon": Theory(
        "ndim >= 2: momentum B, full-size (Nesterov look-ahead is recomputed); ndim 0-1: the adamw graph, m and v "
        "(algorithms.md §5: Muon; routing: specs/muon.yaml)",
        muon),
    "qhadamw": Theory(
        "m and v, full-size; vmax too only with amsgrad (default false) (algorithms.md §8a: AggMoAdamW with J = 1)",
        adam_like(), AMSGRAD_OFF),
    "rprop": Theory(
        "the previous gradient (zeroed where its sign flipped) and the per-weight step size, both full-size "
        "(Riedmiller & Braun 1993; torch.optim.Rprop's prev and step_size)",
        full(2)),
    "rmsprop": Theory(
        "v full-size; + mean of g if centered, + momentum buffer if momentum > 0 (defaults: centered false, "
        "momentum 0, specs/rmsprop.yaml) (torch.optim.RMSprop's update rule)",
        rmsprop, {"momentum": 0.0, "centered": False}),
    "scgadam": Theory(
        "previous CG direction G, m, v, full-size; vmax too with amsgrad (default false) (algorithms.md §2: SCGAdam)",
        adam_like(extra_full=1), AMSGRAD_OFF),
    "scgadam-diminishing": Theory(
        "previous CG direction G, m, v, full-size (algorithms.md §2: SCGAdam2, diminishing coefficients)",
        full(3)),
    "scgamsgrad": Theory(
        "previous CG direction G, m, v, vmax, full-size (algorithms.md §2: SCGAdam, AMSGrad branch; amsgrad true "
        "by default in specs/scgamsgrad.yaml)",
        adam_like(extra_full=1), {"amsgrad": True}),
    "scsadamw": Theory(
        "direction d and v, full-size; the min-norm weight is recomputed every step (algorithms.md §1: SCSAdamW)",
        full(2)),
    "scsadamw-restart": Theory(
        "direction d and v, full-size; the restart needs only the step count (algorithms.md §1: SCSAdamW)",
        full(2)),
    "scsadamw-sigmoid": Theory(
        "direction d and v, full-size; the smoothed weight is recomputed every step (algorithms.md §1: SCSAdamW)",
        full(2)),
    "sgd": Theory(
        "momentum buffer, full-size, and a shared scalar marking its first step, only if momentum != 0: none "
        "at the default momentum 0 (specs/sgd.yaml) (torch.optim.SGD's update rule)",
        sgd, {"momentum": 0.0}),
    "sgdol": Theory(
        "three global scalars: S_ip, S_norm and the step size eta_t for the next step, as the authors' code "
        "keeps it (algorithms.md §6b: SGDOL; eta is a function of the sums under a fixed L, but stored it keeps "
        "the step size decided before a change of L and is what `sized@prev` reads)",
        scalars(3)),
    "signsgd": Theory(
        "no state (algorithms.md §7: signSGD)",
        scalars(0)),
    "signum": Theory(
        "one momentum m, full-size (algorithms.md §7: Signum)",
        full(1)),
}

SPECS: tuple[str, ...] = tuple(sorted(THEORY))


# ---- public API -------------------------------------------------------------------------------------

def theory_of(spec: str) -> Theory:
    """The table entry of a spec, or :class:`UnknownSpecError`."""
    try:
        return THEORY[spec]
    except KeyError:
        raise UnknownSpecError(f"no state theory for spec {spec!r}; known specs: {', '.join(SPECS)}") from None


def theory_elements(spec: str, shape: tuple[int, ...], hyper: Mapping[str, Any] | None = None) -> int:
    """Optimizer-state elements one parameter of ``shape`` needs under ``spec``, step counter excluded.

    ``hyper`` overrides defaults the count depends on (only the keys of the entry's ``hyper``).
    """
    theory = theory_of(spec)
    overrides = dict(hyper or {})
    unknown = set(overrides) - set(theory.hyper)
    if unknown:
        raise ValueError(f"spec {spec!r}: the state theory does not model hyperparameters {sorted(unknown)}")
    shape = tuple(int(d) for d in shape)
    return theory.count(shape, {**theory.hyper, **overrides})


def theory_note(spec: str) -> str:
    """One line: what the state is and where the rule comes from."""
    return theory_of(spec).why


if __name__ == "__main__":  # print the table for a few shapes
    shapes = [(1024, 256), (256, 1024), (64, 32), (256,), ()]
    print("spec".ljust(22) + "".join(str(s).ljust(14) for s in shapes))
    for name in SPECS:
        print(name.ljust(22) + "".join(str(theory_elements(name, s)).ljust(14) for s in shapes))
