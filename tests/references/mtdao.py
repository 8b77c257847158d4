"""QHAdamW / AggMoAdamW reference (MT-DAO inner optimizer, arXiv 2510.05361; algorithms.md 8a).
Authors' code: Iacob-Alexandru-Andrei/torchtitan, torchtitan/experiments/fl/optimizers/{qhadamw,aggmo_adamw}.py."""
from __future__ import annotations

import math

import torch

from ._base import Reference


class AggMoAdamW(Reference):
    """AggMoAdamW; with one momentum (betas = (b1, b2), vs = (w1,)) it is QHAdamW.

        betas = (b_1, ..., b_J, beta2);  vs = (w_1, ..., w_J), sum(vs) <= 1;  w_0 = 1 - sum(vs)
        decouple=True : theta <- theta * (1 - (lr_t / lr_0) * wd)     (before the moments; lr_0 = initial lr)
        decouple=False: g <- g + wd * theta
        m_j = b_j m_j + (1-b_j) g          (each buffer its own beta)
        v   = beta2 v + (1-beta2) g^2;      (amsgrad: vmax = max(vmax, v), used instead of v)
        denom = sqrt(v)/sqrt(1-beta2^t) + eps
        u = w_0 g + sum_j w_j m_j / (1 - b_j^t)
        theta <- theta - lr_t * u / denom

    lr_0 is the lr passed to the constructor (the code's group "initial_lr", set at construction);
    lr_t is the current ``self.lr`` (a test may change it). If lr_0 == 0 the factor is 1, as the code.
    The decay multiplier is the schedule ratio lr_t/lr_0, NOT lr (differs from torch AdamW by lr_0).
    Choices: J momenta with their OWN betas (algorithms.md 8a; the project decision). The stored code
    versions read here (aggmo_adamw.py @04fb07e and @c09b32f) apply the single betas[0] to every buffer
    and its bias correction; for J = 1 (QHAdamW) the two are identical. Zero weights are kept (their
    buffers contribute nothing, so dropping them as the code does changes nothing).
    Defaults (code): lr 1e-3, betas (0.9, 0.95), vs (0.7,), eps 1e-8, weight_decay 1e-5, amsgrad False,
    decouple True. The "aggmo-adamw" registry entry uses betas (0.9, 0.99, 0.999), vs (0.35, 0.35) (our
    pick: two momenta, the same total weight 0.7 as QHAdamW)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), vs=(0.7,), eps=1e-8, weight_decay=1e-5,
                 amsgrad=False, decouple=True):
        super().__init__(params)
        betas, vs = tuple(betas), tuple(vs)
        if len(betas) < 2 or len(vs) != len(betas) - 1:
            raise ValueError(f"need len(vs) == len(betas) - 1 >= 1, got betas={betas}, vs={vs}")
        if any(not 0.0 <= w <= 1.0 for w in vs) or sum(vs) > 1.0 + 1e-8:
            raise ValueError(f"vs must lie in [0, 1] and sum to <= 1, got {vs}")
        self.lr, self.initial_lr, self.betas, self.vs = lr, lr, betas, vs
        self.eps, self.weight_decay, self.amsgrad, self.decouple = eps, weight_decay, amsgrad, decouple
        J = len(vs)
        self.m = [[torch.zeros_like(p) for _ in range(J)] for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params] if amsgrad else None

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        t, lr, wd = self.t, self.lr, self.weight_decay
        *mbetas, beta2 = self.betas
        w0 = 1.0 - sum(self.vs)
        factor = 1.0 if not self.initial_lr else lr / self.initial_lr
        bc2 = 1 - beta2 ** t
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if wd != 0 and not self.decouple:
                g = g + wd * p
            if wd != 0 and self.decouple:
                p.mul_(1 - factor * wd)
            for j, bj in enumerate(mbetas):
                self.m[i][j] = bj * self.m[i][j] + (1 - bj) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            v = self.v[i]
            if self.amsgrad:
                self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
                v = self.vmax[i]
            denom = v.sqrt() / math.sqrt(bc2) + self.eps
            u = w0 * g
            for j, (bj, wj) in enumerate(zip(mbetas, self.vs)):
                u = u + wj * self.m[i][j] / (1 - bj ** t)
            p.sub_(lr * u / denom)
