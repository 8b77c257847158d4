"""Orthogonalize each matrix with a quintic Newton-Schulz iteration (Muon; Jordan et al. 2024).

For each parameter viewed as a matrix G (rows x cols; ndim > 2 is flattened to (rows, -1)):

    X_0 = G / max(||G||_F, eps)          (normalize: clamp, torch.optim.Muon)  or  G / (||G||_F + eps)  (add, Keller's)
    X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,   A_k = X_k X_k^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)

with A_k = X_k^T X_k and X_{k+1} = a X_k + X_k (b A_k + c A_k^2) when rows > cols (the same iteration
on the transpose, as Muon writes it), in ``dtype`` (bfloat16 by default, as Muon does), and cast back.
The result approximates U V^T of G = U S V^T. Matrices of one shape are stacked and run as one batched
iteration, so a transformer's many same-shape weights cost a few large matmuls.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, FiniteFloat

from opdsl.blocks.base import Block, Ref, Scope

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(
    g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float, normalize: str
) -> torch.Tensor:
    """Batched NS over a stack of matrices ``g`` of shape [k, rows, cols] (already in compute dtype)."""
    norm = torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True)
    return newton_schulz_iterations(g / _denominator(norm, eps, normalize), steps, coefficients)


def _denominator(norm: torch.Tensor, eps: float, normalize: str) -> torch.Tensor:
    return norm.clamp(min=eps) if normalize == "clamp" else norm + eps


def newton_schulz_iterations(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """The iterations over a stack of normalized matrices ``x`` of shape [k, rows, cols].

    The Gram matrix is taken on the short side: for a tall X (rows > cols), A = X^T X and
    X <- a X + X (b A + c A^2), which is the iteration on X^T transposed back (B = b A + c A^2 is symmetric)
    with no transposed copy of X on the way in or out. Inductor turned those copies into a scalar gather
    per element, fused with the cast back to the parameters' dtype.
    """
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    # One matrix: addmm, as torch.optim.Muon calls it (for a wide matrix the same calls, so bf16 rounds alike).
    single = x.size(0) == 1
    if single:
        x = x[0]
    mm = torch.addmm if single else torch.baddbmm
    for _ in range(steps):
        if tall:
            gram = x.mT @ x
            x = mm(x, x, mm(gram, gram, gram, beta=b, alpha=c), beta=a)
        else:
            gram = x @ x.mT
            x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.unsqueeze(0) if single else x


# The iterations as the operator ``torch.ops.opdsl.newton_schulz``, opaque to torch.compile. Compiled, they
# are matmuls inductor hands to the BLAS anyway (``baddbmm`` takes the multiply-adds as its ``beta`` and
# ``alpha``), but it traced, planned and wrote wrapper code for each of them: three calls per iteration, per
# matrix shape and per step of the loop (630 for MuAdam on ResNet-50's 21 shapes), most of MuAdam's compile
# time. Behind the operator each shape is one call; the kernels that run are the same. Registered through
# torch.library.Library, as opdsl's other operators (a lower fixed cost per call than @custom_op's wrapper).
_LIBRARY = torch.library.Library("opdsl", "FRAGMENT")
_LIBRARY.define("newton_schulz(Tensor x, int steps, float[] coefficients) -> Tensor")
_LIBRARY.impl("newton_schulz", newton_schulz_iterations, "CompositeExplicitAutograd")
torch.library.register_fake(
    "opdsl::newton_schulz", lambda x, steps, coefficients: torch.empty_like(x, memory_format=torch.contiguous_format),
    lib=_LIBRARY,
)


class Orthogonalize(Block):
    """Newton-Schulz orthogonalization per matrix."""

    TILED_RUNS: ClassVar[bool] = True  # matmuls on run views: many shapes share one bucket

    block: Literal["orthogonalize"]
    input: Ref
    steps: int = Field(5, ge=0, description="Newton-Schulz iterations (0: the normalized input alone)")
    coefficients: tuple[FiniteFloat, FiniteFloat, FiniteFloat] = (3.4445, -4.7750, 2.0315)
    eps: float = Field(1e-7, ge=0.0, allow_inf_nan=False)
    normalize: Literal["clamp", "add"] = "clamp"
    dtype: Literal["bfloat16", "float16", "float32", "float64", "input"] = "bfloat16"

    def scope(self) -> Scope:
        return Scope.TENSOR

    def check_shape(self, shape: torch.Size) -> str | None:
        if len(shape) < 2:
            return "orthogonalize needs a matrix (ndim >= 2); route 1-D parameters to another graph with `groups`"
        return None

    def forward(self, ctx, x, state, totals=None):
        flat = x["input"]
        dtype = flat.dtype if self.dtype == "input" else _DTYPES[self.dtype]
        g = flat.to(dtype)
        # Each matrix's Frobenius norm, summed in at least float32 and rounded to the compute dtype as
        # torch's norm of a bfloat16 matrix is; then every matrix is normalized in one loop over the bucket.
        squares = g.to(torch.promote_types(dtype, torch.float32)).square()
        norm = ctx.segment_sum(squares).sqrt().to(dtype)
        normalized = ctx.per_parameter(torch.div, g, _denominator(norm, self.eps, self.normalize))
        out = []
        for run, batch in zip(ctx.runs, ctx.run_views(normalized)):  # equal shapes are one batched NS
            matrices = batch.reshape(run.count, run.shape[0], -1)
            # (an operator may not return its input: with no iteration the normalized matrices are the result)
            out.append(torch.ops.opdsl.newton_schulz(matrices, self.steps, self.coefficients) if self.steps else matrices)
        return ctx.concat(out).to(flat.dtype), {}
