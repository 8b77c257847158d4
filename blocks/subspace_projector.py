"""Subspace momentum: momentum kept in a rank-r subspace of each matrix, the rest passed through as SGD.

Per parameter G (m x n; ndim > 2 is viewed as (shape[0], -1)), r = min(rank, m, n):

    refresh at t = 1 and every t % gap == 0 (t the 1-based step count, never reset):
        svd     G = U S V^T of the CURRENT gradient;  m >= n: B = V_r^T (r x n),  else A = U_r (m x r)
        topk    the r columns (m >= n) or rows (m < n) of G with the largest l2 norm
        random  r distinct columns (m >= n) or rows (m < n), drawn from a counter-based hash of
                (seed, parameter index in its param group, t): reproducible and traceable (see
                ``random_indices``)
        (topk/random are written as 0/1 selection matrices B or A, so one code path serves all three)
    P(G)  = G B^T (m x r)  or  A^T G (r x n)        P*(X) = X B  or  A X
    M_t   = beta * M_{t-1} + weight * P_t(g_t)        weight defaults to 1 - beta
    out   = P_t*(M_t) + (g_t - P_t*(P_t(g_t)))        (the residual term only with ``residual: true``)

The SVD runs in float32 for float32, bfloat16 and float16 gradients (the authors' full fp32 SVD) and in
float64 for float64 ones. On CUDA, ``torch.linalg.svd`` reads its error code on the host, so a refresh
step waits for the device once (the steps between refreshes do not). When a gradient's rank is below r (a layer feeding a narrower one), its last
singular vectors are set by rounding alone: later gradients' components along them get momentum
instead of passing through, and two runs that differ by rounding diverge at the next refresh (the paper
and code leave this case open; keep r at or below the layer's rank where that matters).

``reset`` says what happens to M at a refresh (its coordinates belong to the old basis):
    refresh  (default, the paper's intent) M is zeroed before the update: M_t = weight * P_new(g_t)
    lagged   the authors' code: the refresh step still uses beta * M_old (old-basis coordinates) + weight *
             P_new(g_t); the zeroed buffer only takes effect at the next step (t > 1 only)
    none     never reset (the code's ``overlap_state``)

Scheduling: whether t is a refresh step is decided on the host with no device sync per step (the block's
``host_schedule``; see ``opdsl.schedule``) and reaches the step as one bool on the host and the same on the
device. ``refresh: cond`` (default): the new bases are computed only at refresh steps, by an operator of
opdsl's own (``opdsl::subspace_refresh``) that reads the host bool and is opaque to torch.compile, so eager
and compiled steps run the same code. ``refresh: every-step`` computes the fresh projector every step and
selects it with ``torch.where`` (one full SVD of every matrix per step; for comparison).

Paper: Nguyen & Nguyen, "Subset-Norm and Subspace-Momentum", ICML 2025 (arXiv:2411.07120); code
timmytonga/sn-sm (subspace_momentum.py, projectors/). State per matrix: the momentum (m x r or r x n) and
the projector (r x n or m x r).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from pydantic import Field

from opdsl.blocks.base import Block, Ref, Scope, StateKind, StateSpec, finite_or_zero, scalar
from opdsl.blocks.scalar_ops import as_weight
from opdsl.schedule import Periodic

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59, no int64 overflow


def _mix32(x):
    """A 32-bit integer hash (works on Python ints and int64 tensors holding values < 2**32)."""
    x = ((x ^ (x >> 16)) * _MUL) & _MASK32
    x = ((x ^ (x >> 16)) * _MUL) & _MASK32
    return x ^ (x >> 16)


def random_indices(n: int, r: int, seed: int, index: int, t: torch.Tensor) -> torch.Tensor:
    """r distinct indices in [0, n), sorted: the r largest of ``mix32(mix32(t ^ key) + 0x9E3779B9 * i) * n + i``.

    ``key = mix32(mix32(seed) ^ mix32(index + 0x9E3779B9))`` (Python ints, masked to 32 bits). Counter-based
    (no generator state): the same (seed, parameter index, step) gives the same draw, eagerly or compiled, on
    any device. Appending i makes the keys unique, so there are no ties.
    """
    key = _mix32(_mix32(seed & _MASK32) ^ _mix32((index + 0x9E3779B9) & _MASK32))
    stream = _mix32((t.to(torch.int64) & _MASK32) ^ key)  # 0-d: one value per (parameter, step)
    i = torch.arange(n, device=t.device, dtype=torch.int64)
    scores = _mix32((stream + i * 0x9E3779B9) & _MASK32) * n + i  # i * golden < 2**63 for n < 2**31
    return torch.sort(torch.topk(scores, r).indices).values


def _matrices(batch: torch.Tensor) -> torch.Tensor:
    """A run's (count, *shape) view as count matrices (count, shape[0], prod(shape[1:]))."""
    return batch.reshape(batch.shape[0], batch.shape[1], -1)


def project(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P(G): batched matrices into their subspace, G B^T (m >= n) or A^T G (m < n)."""
    return g @ basis.mT if g.shape[-2] >= g.shape[-1] else basis.mT @ g


def lift(coords: torch.Tensor, basis: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """P*(X): subspace coordinates back to the shape of ``like`` (the projected matrices), X B or A X."""
    return coords @ basis if like.shape[-2] >= like.shape[-1] else basis @ coords


def _dims(shape: torch.Size, rank: int) -> tuple[int, int, int, bool]:
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    return m, n, min(rank, m, n), m >= n


def fresh_bases(g: torch.Tensor, t: torch.Tensor, keys: Sequence[int], rank: int, projector: str, seed: int) -> torch.Tensor:
    """New bases for a batch g of k equal-shaped matrices (k x m x n): B (k x r x n) if m >= n, else A (k x m x r).

    ``keys``: each matrix's index in its param group (the random projector's per-parameter key). The result is
    contiguous and views no input (``refresh_bases`` returns it as an operator's output).
    """
    k, (m, n) = g.shape[0], g.shape[1:]
    _, _, r, right = _dims(g.shape[1:], rank)
    if projector == "svd":
        work = g if g.dtype in (torch.float32, torch.float64) else g.float()
        # LAPACK raises on NaN input; a non-finite gradient's step is discarded (on_nonfinite='skip'), so
        # only make the SVD finite here.
        u, _, vh = torch.linalg.svd(finite_or_zero(work), full_matrices=False)
        out = vh[:, :r] if right else u[:, :, :r]
        return out.to(g.dtype).contiguous()
    size = n if right else m
    if projector == "topk":
        norms = torch.linalg.vector_norm(g, dim=-2 if right else -1)
        idx = torch.sort(torch.topk(norms, r).indices).values
    else:
        idx = torch.stack([random_indices(size, r, seed, key, t) for key in keys])
    select = (idx.unsqueeze(-1) == torch.arange(size, device=g.device)).to(g.dtype)  # k x r x size, one 1 per row
    return select if right else select.mT.contiguous()


def refresh_bases(
    need: torch.Tensor, t: torch.Tensor, g: torch.Tensor, old: torch.Tensor, rank: int, projector: str, seed: int, keys: list[int]
) -> torch.Tensor:
    """``fresh_bases`` when the 0-d bool ``need`` holds, else an uninitialised tensor like ``old`` (the caller
    selects ``old`` then). Called as the operator ``torch.ops.opdsl.subspace_refresh``.

    ``need`` is the host's copy of the step's decision (a CPU tensor): reading it costs no device sync.
    An operator of its own, opaque to torch.compile. A ``torch.cond`` also runs its branch only when the
    predicate holds, but inductor traces, lowers and builds kernels for the branch (two C++ kernels per
    matrix shape: the SVD's input made finite, its slice made contiguous): adamw-snsm's first compile took
    13.4 s with one, 10 s without, on 8 shapes.
    """
    if not bool(need):
        return torch.empty_like(old)
    return fresh_bases(g, t, keys, rank, projector, seed)


# Registered through torch.library.Library, not the @custom_op decorator: the decorator's Python wrapper
# costs about 37 us per call against 9 us, and the step calls the operator once per matrix shape.
_LIBRARY = torch.library.Library("opdsl", "FRAGMENT")
_LIBRARY.define(
    "subspace_refresh(Tensor need, Tensor t, Tensor g, Tensor old, int rank, str projector, int seed, int[] keys) -> Tensor"
)
_LIBRARY.impl("subspace_refresh", refresh_bases, "CompositeExplicitAutograd")
torch.library.register_fake(
    "opdsl::subspace_refresh", lambda need, t, g, old, *config: torch.empty_like(old), lib=_LIBRARY
)


class SubspaceProjector(Block):
    """Rank-r subspace momentum of each matrix plus the orthogonal residual of the gradient."""

    block: Literal["subspace-projector"]
    input: Ref = "grad"
    beta: scalar(ge=0.0, le=1.0) = 0.9
    weight: scalar(ge=0.0) | None = None
    rank: int = Field(128, ge=1, description="subspace rank r (capped at min(m, n) per matrix)")
    gap: int = Field(200, ge=1, description="refresh the basis at t = 1 and every t % gap == 0")
    projector: Literal["svd", "topk", "random"] = "svd"
    reset: Literal["refresh", "lagged", "none"] = "refresh"
    residual: bool = True
    seed: int = Field(0, ge=0, description="seed of the random projector's counter-based draw")
    refresh: Literal["cond", "every-step"] = Field(
        "cond", description="cond: new bases only at refresh steps; every-step: computed every step and selected "
        "(one SVD per matrix per step, for comparison)"
    )

    PORTS: ClassVar[tuple[str, ...]] = ("input",)

    def scope(self) -> Scope:
        return Scope.TENSOR

    def check_shape(self, shape: torch.Size) -> str | None:
        if len(shape) < 2:
            return "subspace-projector needs a matrix (ndim >= 2); route other parameters to another graph with `groups`"
        return None

    def state_specs(self) -> dict[str, StateSpec]:
        rank = self.rank

        def momentum(shape):
            m, n, r, right = _dims(shape, rank)
            return (m, r) if right else (r, n)

        def basis(shape):
            m, n, r, right = _dims(shape, rank)
            return (r, n) if right else (m, r)

        return {"momentum": StateSpec(StateKind.TENSOR, shape=momentum), "basis": StateSpec(StateKind.TENSOR, shape=basis)}

    def host_schedule(self) -> Periodic:
        return Periodic(self.gap)

    # ---- projectors ---------------------------------------------------------------------------------
    def _bases(self, ctx, host_need: torch.Tensor, need: torch.Tensor, t: torch.Tensor, flat: torch.Tensor, old: list[torch.Tensor]):
        batches = [(list(ctx.positions[r.first : r.first + r.count]), _matrices(v)) for r, v in zip(ctx.runs, ctx.run_views(flat))]
        if self.refresh == "every-step":
            fresh = [fresh_bases(g, t, keys, self.rank, self.projector, self.seed) for keys, g in batches]
        else:
            refresh = torch.ops.opdsl.subspace_refresh
            fresh = [refresh(host_need, t, g, b, self.rank, self.projector, self.seed, keys) for (keys, g), b in zip(batches, old)]
        return [torch.where(need, new, b) for new, b in zip(fresh, old)]

    # ---- the step -----------------------------------------------------------------------------------
    def forward(self, ctx, x, state, totals=None):
        t = ctx.step
        host_need, need = ctx.due  # t == 1 or t % gap == 0, decided by the host (on the host and the device)
        if self.reset == "refresh":
            zero = need
        elif self.reset == "lagged":
            zero = (t > 2) & (torch.remainder(t - 1, self.gap) == 0)
        else:
            zero = None
        flat = x["input"]
        bases = self._bases(ctx, host_need, need, t, flat, list(state["basis"]))
        beta = ctx.value(self.beta)
        weight = 1 - beta if self.weight is None else ctx.value(self.weight)
        outs, moms = [], []
        # One batch per run of equal-shaped matrices; the states are (count, ...) tensors per run.
        for view, b, mom in zip(ctx.run_views(flat), bases, state["momentum"]):
            g = _matrices(view)
            low = project(g, b)
            kept = mom * as_weight(beta, mom)
            if zero is not None:
                kept = torch.where(zero, torch.zeros_like(kept), kept)
            mom = kept + low * as_weight(weight, low)
            # P*(M) + (g - P*(P(g))) = g + P*(M - P(g)): two matmuls per step instead of three
            coords = mom - low if self.residual else mom
            out = lift(coords, b, g)
            if self.residual:
                out = g + out
            outs.append(out)
            moms.append(mom)
        return ctx.concat(outs), {"momentum": moms, "basis": bases}
