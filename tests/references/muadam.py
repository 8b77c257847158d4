"""MuAdam / MuAdam-SANIA reference (Veprikov et al., arXiv 2510.10777; algorithms.md section 4).
Authors' code: Vepricov/LIB branch quasi_descent @2724dde, src/optimizers/taia.py (class TAIA)."""
from __future__ import annotations

import math

import torch

from ._base import Reference, newton_schulz


class MuAdam(Reference):
    """MuAdam (sania=False) and MuAdam-SANIA (sania=True): the INTENDED algorithm.

    Matrices (ndim >= 2 and size(0) < 10000; ndim > 2 viewed as (out, -1)), t advancing normally:
        m = mu m + (1-mu) g;  mhat = m / (1 - mu^t)                (mu = `momentum`)
        v = b2 v + (1-b2) g^2                                      (b2 = betas[1])
        MuAdam: D = (sqrt(v) + eps) / sqrt(1 - b2^t)       SANIA: D = (v + eps) / (1 - b2^t)
        X = mhat / sqrt(D)                                          # PRE-conditioning
        O = NS_K(X) * sqrt(max(1, rows/cols))                       # Newton-Schulz, K = ns_steps
        U = O / sqrt(D)                                             # POST-conditioning (same D)
        theta <- theta - lr * U                                     # no decay, no Nesterov on matrices
      NS: X / (||X||_F + eps) with eps = the Adam eps, transpose if rows > cols, coefficients
      (3.4445, -4.7750, 2.0315), run in float64 here (the code: bfloat16).
    Everything else (ndim < 2, or size(0) >= 10000): AdamW with lr_a = lr * (adamw_lr / lr at construction):
        theta <- theta * (1 - lr_a*wd);  m, v with betas;  theta <- theta - lr_a/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
      (aux_eps "torch", default: torch AdamW's eps placement; aux_eps "code": taia.py's
       theta <- theta - lr_a*sqrt(bc2)/bc1 * m/(sqrt(v) + eps), eps not bias-corrected.)

    Choices (code quirks NOT copied, per algorithms.md's recommendation and the project decision):
    - Quirk A: taia.py's counter never advances on the MuAdam branch (a misspelled state key), so every
      bias correction is evaluated at t = 1; here t advances (1, 2, 3, ...).
    - Quirk B: SANIA's in-place mutation of the stored v (v <- (v + eps)/bc2 each step, overflowing to inf)
      is not copied; D is computed out of place, v stays a plain EMA.
    - D keeps the step box's eps placement: MuAdam (sqrt(v)+eps)/sqrt(bc2), i.e. sqrt(vhat) + eps/sqrt(bc2);
      SANIA (v+eps)/bc2, i.e. vhat + eps/bc2.
    - NS in float64 with ns_steps = 5 by default (the experiment config uses 10, the class 6).
    - Aux AdamW eps placement: torch-style by default (see aux_eps).
    Defaults (src/config.py experiment config): lr 1e-4, momentum 0.9, betas (0.9, 0.999), eps 1e-8,
    weight_decay 1e-5 (aux AdamW only), ns_steps 5, adamw_lr None (= lr), sania False, aux_eps "torch"."""

    def __init__(self, params, lr=1e-4, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-5,
                 ns_steps=5, adamw_lr=None, sania=False, aux_eps="torch"):
        super().__init__(params)
        if aux_eps not in ("torch", "code"):
            raise ValueError(aux_eps)
        self.lr, self.momentum, self.betas, self.eps = lr, momentum, tuple(betas), eps
        self.weight_decay, self.ns_steps, self.sania, self.aux_eps = weight_decay, int(ns_steps), sania, aux_eps
        self.adamw_ratio = 1.0 if adamw_lr is None else adamw_lr / lr
        self.is_matrix = [p.ndim >= 2 and p.shape[0] < 10000 for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def _matrix_update(self, i, g2d):
        t, mu, b2, eps = self.t, self.momentum, self.betas[1], self.eps
        m = self.m[i] = mu * self.m[i] + (1 - mu) * g2d
        v = self.v[i] = b2 * self.v[i] + (1 - b2) * g2d * g2d
        mhat = m / (1 - mu ** t)
        bc2 = 1 - b2 ** t
        D = (v + eps) / bc2 if self.sania else (v.sqrt() + eps) / math.sqrt(bc2)
        sqrtD = D.sqrt()
        X = mhat / sqrtD
        rows, cols = X.shape
        O = newton_schulz(X, self.ns_steps, eps) * math.sqrt(max(1.0, rows / cols))
        return O / sqrtD

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        t = self.t
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.is_matrix[i]:
                g2d = g.reshape(p.shape[0], -1)
                if self.m[i].shape != g2d.shape:
                    self.m[i], self.v[i] = self.m[i].reshape(g2d.shape), self.v[i].reshape(g2d.shape)
                U = self._matrix_update(i, g2d)
                p.sub_(self.lr * U.reshape(p.shape))
            else:
                lr_a = self.lr * self.adamw_ratio
                b1, b2 = self.betas
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                p.mul_(1 - lr_a * self.weight_decay)
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                if self.aux_eps == "torch":
                    p.sub_((lr_a / bc1) * self.m[i] / (self.v[i].sqrt() / math.sqrt(bc2) + self.eps))
                else:
                    p.sub_(lr_a * math.sqrt(bc2) / bc1 * self.m[i] / (self.v[i].sqrt() + self.eps))
