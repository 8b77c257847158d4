"""Subset-Norm (SN) and Subspace-Momentum (SM) references (Nguyen & Nguyen, ICML 2025, arXiv 2411.07120;
algorithms.md section 3). Authors' code: timmytonga/sn-sm (GenericOptim.py, subset_norm.py,
subspace_momentum.py, projectors/svd_projector.py, adamw_sng.py), read @afec62a / a4c1a4a."""
from __future__ import annotations

import math

import torch

from ._base import Reference, largest_divisor_at_most


class SubsetLayout:
    """How one tensor is cut into subsets.

    subset "heuristic" (alias "heuristics"): 2-D tensors only - if m >= n every ROW is a subset
      (s[i] = sum_j g[i,j]^2, state shape (m, 1)), else every COLUMN (s[j] = sum_i g[i,j]^2, shape (1, n));
      every non-2-D tensor gets the ordinary elementwise g^2 (state = param shape).
    subset k > 0: flatten row-major to (numel/k', k'), k' = the largest divisor of numel that is <= k;
      each row of that view is a subset (state shape (numel/k', 1)). Applies to EVERY tensor.
    subset -c < 0: k = int(sqrt(numel)/c), then as k > 0 (k clamped to >= 1; the code would divide by
      zero for tiny tensors).
    subset None: elementwise g^2 everywhere (plain Adam second moment)."""

    def __init__(self, shape: torch.Size, subset):
        self.shape = tuple(shape)
        numel = math.prod(self.shape) if self.shape else 1
        self.kind, self.view = "elementwise", None
        if subset is None:
            return
        if isinstance(subset, str):
            if subset not in ("heuristic", "heuristics"):
                raise ValueError(f"subset must be 'heuristic', a non-zero int or None, not {subset!r}")
            if len(self.shape) == 2:
                m, n = self.shape
                self.kind = "rows" if m >= n else "cols"
            return
        subset = int(subset)
        if subset == 0:
            raise ValueError("subset must be non-zero")
        k = subset if subset > 0 else int(math.sqrt(numel) / abs(subset))
        k = largest_divisor_at_most(numel, k)
        self.kind, self.view = "flat", (numel // k, k)

    def reduce(self, g: torch.Tensor) -> torch.Tensor:
        """s_t: the per-subset SUM of squares (not a mean)."""
        if self.kind == "elementwise":
            return g * g
        if self.kind == "rows":
            return (g * g).sum(dim=1, keepdim=True)
        if self.kind == "cols":
            return (g * g).sum(dim=0, keepdim=True)
        return (g.reshape(self.view) ** 2).sum(dim=1, keepdim=True)

    def divide(self, num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """num / denom with denom broadcast back over each subset."""
        if self.kind == "flat":
            return (num.reshape(self.view) / denom).reshape(self.shape)
        return num / denom


class AdamWSN(Reference):
    """AdamW-SN (AdamSN of GenericOptim / AdamWSN of adamw_sng.py) [CODE]:

        m = b1 m + (1-b1) g                                   (full size)
        v = b2 v + (1-b2) s_t,   s_t = per-subset sum of g^2  (SubsetLayout; v has the subset shape)
        theta <- theta - lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)      (eps NOT bias-corrected; broadcast)
        theta <- theta - lr*wd*theta                                  # decay AFTER the step

    Choices (code followed): decoupled decay after the step, on the UPDATED theta, with the raw lr (not
    the bias-corrected step size). Heuristic subsets go to every 2-D tensor (the code applies SN to
    nn.Linear weights only; route by name in a spec if that matters); other tensors get elementwise
    g^2 with the very same step formula (GenericOptim's "regular" group). Integer subsets go to every
    tensor (adamw_sng.AdamWSN). betas[0] == 0 gives RMSprop-SN (numerator g; bc1 = 1).
    Defaults (GenericOptim): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0, subset "heuristic"
    (adamw_sng's own default is -2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, subset="heuristic"):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay, self.subset = lr, tuple(betas), eps, weight_decay, subset
        self.layouts = [SubsetLayout(p.shape, subset) for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(L.reduce(p)) for L, p in zip(self.layouts, self.params)]

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for i, (p, g, L) in enumerate(zip(self.params, grads, self.layouts)):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * L.reduce(g)
            p.sub_(step_size * L.divide(self.m[i], self.v[i].sqrt() + self.eps))
            if self.weight_decay > 0:
                p.sub_(self.lr * self.weight_decay * p)


class AdaGradSN(Reference):
    """AdaGrad-SN (the paper's theory form; GenericOptim with beta2 = 1, correct_bias False):

        v = v + s_t            (accumulate, v_0 = 0; s_t per SubsetLayout)
        theta <- theta - lr * g / (sqrt(v) + eps)     (numerator = g: no momentum; no bias correction)
        theta <- theta - lr*wd*theta                   (decay after the step, raw lr, as AdamW-SN)

    Choices: numerator g (the paper's x - eta g / b; the code's 'adagrad' config would keep its beta1 EMA
    momentum). Defaults (GenericOptim): lr 1e-3, eps 1e-6, weight_decay 0, subset "heuristic"."""

    def __init__(self, params, lr=1e-3, eps=1e-6, weight_decay=0.0, subset="heuristic"):
        super().__init__(params)
        self.lr, self.eps, self.weight_decay, self.subset = lr, eps, weight_decay, subset
        self.layouts = [SubsetLayout(p.shape, subset) for p in self.params]
        self.v = [torch.zeros_like(L.reduce(p)) for L, p in zip(self.layouts, self.params)]

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        for i, (p, g, L) in enumerate(zip(self.params, grads, self.layouts)):
            self.v[i] = self.v[i] + L.reduce(g)
            p.sub_(self.lr * L.divide(g, self.v[i].sqrt() + self.eps))
            if self.weight_decay > 0:
                p.sub_(self.lr * self.weight_decay * p)


class SVDProjector:
    """Rank-r projector from the SVD of one gradient G (m x n), float64, r = min(rank, m, n):
    m >= n: B = V_r^T (r x n), P(G) = G B^T (m x r), P*(X) = X B;
    m <  n: A = U_r (m x r),   P(G) = A^T G (r x n), P*(X) = A X.
    (P* P is a projection, so the update does not depend on the SVD's sign choices.)"""

    def __init__(self, G: torch.Tensor, rank: int):
        m, n = G.shape
        self.r = min(int(rank), m, n)
        self.right = m >= n
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        self.mat = Vh[: self.r, :] if self.right else U[:, : self.r]

    def project(self, G: torch.Tensor) -> torch.Tensor:
        return G @ self.mat.T if self.right else self.mat.T @ G

    def project_back(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.mat if self.right else self.mat @ X


class AdamWSM(Reference):
    """AdamW-SM (subset=None) and AdamW-SNSM (subset="heuristic" or an int) [CODE + project decision]:

    every 2-D tensor (rank r = min(rank, m, n), gap T = update_proj_gap):
        refresh at t == 1 or t % T == 0:  projector from the SVD of the CURRENT gradient g_t (float64),
                                          and the subspace momentum is reset: m = 0
        m   = b1 m + (1-b1) P(g_t)                       (r-dim momentum, in the current basis)
        num = P*(m) + (g_t - P*(P(g_t)))                 (momentum in the subspace, plain SGD outside)
    every other tensor: num = m = b1 m + (1-b1) g (ordinary full EMA momentum).
    v   = b2 v + (1-b2) s_t of the FULL g_t: elementwise g^2 (adamw-sm) or the SN sum (adamw-snsm,
          SubsetLayout: heuristic -> non-2-D tensors elementwise)
    theta <- theta - lr*sqrt(bc2)/bc1 * num / (sqrt(v) + eps)     (1/bc1 also scales the SGD residual)
    theta <- theta - lr*wd*theta                                   (decay after the step, raw lr)
    t is never reset.

    Choices:
    - PAPER INTENT, not the code's one-step lag: at a refresh step the momentum is zeroed BEFORE being
      updated with (1-b1) P_new(g_t), so m_t = (1-b1) P_new(g_t). (The code updates the OLD buffer, in the
      old basis, with P_new(g_t), projects it back with the new basis, and only zeroes it for the next
      step.)
    - SVD in float64 (the code: fp32 torch.linalg.svd); projector type "svd" only.
    - SM applies to every 2-D tensor (the code: nn.Linear weights only).
    Defaults (GenericOptim): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0, rank 128,
    update_proj_gap 200, subset None (adamw-sm) / "heuristic" (adamw-snsm)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=128,
                 update_proj_gap=200, subset=None):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.rank, self.update_proj_gap, self.subset = int(rank), int(update_proj_gap), subset
        self.layouts = [SubsetLayout(p.shape, subset) for p in self.params]
        self.m = [None if p.ndim == 2 else torch.zeros_like(p) for p in self.params]
        self.proj = [None] * len(self.params)
        self.v = [torch.zeros_like(L.reduce(p)) for L, p in zip(self.layouts, self.params)]

    def refreshes_at(self, t: int) -> bool:
        return t == 1 or t % self.update_proj_gap == 0

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        t = self.t
        b1, b2 = self.betas
        step_size = self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i, (p, g, L) in enumerate(zip(self.params, grads, self.layouts)):
            if p.ndim == 2:
                if self.refreshes_at(t):
                    self.proj[i] = SVDProjector(g, self.rank)
                    self.m[i] = torch.zeros_like(self.proj[i].project(g))
                P = self.proj[i]
                pg = P.project(g)
                self.m[i] = b1 * self.m[i] + (1 - b1) * pg
                num = P.project_back(self.m[i]) + (g - P.project_back(pg))
            else:
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                num = self.m[i]
            self.v[i] = b2 * self.v[i] + (1 - b2) * L.reduce(g)
            p.sub_(step_size * L.divide(num, self.v[i].sqrt() + self.eps))
            if self.weight_decay > 0:
                p.sub_(self.lr * self.weight_decay * p)
