"""Elementwise / global-scalar references: Adam(L2), AdamW, Lion, signSGD, Signum, Generalized SignSGD,
AdaGrad-Norm, SGDOL (algorithms.md sections 6 and 7)."""
from __future__ import annotations

import math

import torch

from ._base import Reference


class Adam(Reference):
    """torch.optim.Adam / AdamW, float64 and one tensor at a time (algorithms.md 6c, [TORCH]).

    decoupled=False (Adam, L2):  g <- g + wd*theta_{t-1}; m, v from this g.
    decoupled=True  (AdamW):     theta <- theta_{t-1} * (1 - lr*wd); m, v from the raw g.
    common: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; (amsgrad: vmax = max(vmax, v), used instead of v)
            theta <- theta - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, amsgrad False, decoupled False.
    (torch.optim.Adam's own default weight_decay is 0; the "adam-l2" registry entry keeps 1e-2 so the
    L2 term is on by default. No paper-vs-code choice: torch is the source.)"""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 decoupled=False):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.amsgrad, self.decoupled = amsgrad, decoupled
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params] if amsgrad else None

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        t, lr, wd, eps = self.t, self.lr, self.weight_decay, self.eps
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if wd != 0:
                if self.decoupled:
                    p.mul_(1 - lr * wd)
                else:
                    g = g + wd * p
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            v = self.v[i]
            if self.amsgrad:
                self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
                v = self.vmax[i]
            denom = v.sqrt() / math.sqrt(bc2) + eps
            p.sub_((lr / bc1) * self.m[i] / denom)


class AdamW(Adam):
    """torch.optim.AdamW (decoupled decay lr*wd on theta_{t-1}, before the moments). Defaults lr 1e-3,
    betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, amsgrad False."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         decoupled=True)


class Lion(Reference):
    """Lion (Chen et al. 2023), google/automl lion_pytorch.py [CODE] (algorithms.md 7):

        theta <- theta * (1 - lr*wd)                      # decay first, on theta_{t-1}
        c = b1 m + (1-b1) g;  theta <- theta - lr*sign(c)  # torch.sign(0) = 0
        m <- b2 m + (1-b2) g                              # momentum updated AFTER the step

    Defaults (code): lr 1e-4, betas (0.9, 0.99), weight_decay 0. No paper/code conflict."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        b1, b2 = self.betas
        for i, (p, g) in enumerate(zip(self.params, grads)):
            p.mul_(1 - self.lr * self.weight_decay)
            c = b1 * self.m[i] + (1 - b1) * g
            p.sub_(self.lr * torch.sign(c))
            self.m[i] = b2 * self.m[i] + (1 - b2) * g


class Signum(Reference):
    """Signum (Bernstein et al. 2018) [SUMMARY: optax/MXNet docs] (algorithms.md 7):

        g <- g + wd*theta            (coupled, MXNet's `wd`; off by default)
        m <- beta m + (1-beta) g     (dampened EMA, optax form; m_0 = 0)
        theta <- theta - lr*sign(m)  (sign(0) = 0)

    Defaults: lr 1e-3 (our pick; no canonical default), momentum 0.9 (optax), weight_decay 0.
    Choice: the decay, when on, is MXNet's coupled `wd` (MXNet's decoupled `wd_lh` is not modelled).
    momentum = 0 gives signSGD exactly."""

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0):
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        beta = self.momentum
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            self.m[i] = beta * self.m[i] + (1 - beta) * g
            p.sub_(self.lr * torch.sign(self.m[i]))


class SignSGD(Signum):
    """signSGD: theta <- theta - lr*sign(g + wd*theta). Defaults lr 1e-3, weight_decay 0 (= Signum with
    momentum 0)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay)


class GeneralizedSignSGD(Reference):
    """Generalized SignSGD (Crawshaw, Liu, Orabona, Zhang, Zhuang, NeurIPS 2022, arXiv 2208.11195).

    VERIFIED against the authors' code, zhenxun-zhuang/Generalized-SignSGD @e966dae,
    cifar10/generalized_signsgd.py (class GeneralizedSignSGD, "Adapted from torch 1.6 adam.py"); the
    paper body itself could not be opened here. The code confirms algorithms.md 6a's recollection:

        g <- g + wd*theta                         (coupled L2, code's weight_decay; default 0)
        m <- b1 m + (1-b1) g
        v <- b2 v + (1-b2) m^2                    # EMA of the squared UPDATED MOMENTUM, not of g^2
        theta <- theta - lr * (m/bc1) / (sqrt(v/bc2) + eps)
        with bc1 = bc2 = 1 unless bias_correction=True (code: use_bias_correction=False by default);
        when on, v accumulates the raw m^2 and only the read-out is divided by bc2.

    betas = (0, 0), eps = 0 gives sign(g) (signSGD); b2 = 0, eps = 0 gives sign(m) (Signum).
    Option second_moment = "momentum" (default, the code and Algorithm 1 as recalled) or "grad"
    (v of g^2: Adam without bias correction) - kept only as an ablation.
    Defaults (code): lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, bias_correction False."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=False,
                 second_moment="momentum"):
        super().__init__(params)
        if second_moment not in ("momentum", "grad"):
            raise ValueError(second_moment)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.bias_correction, self.second_moment = bias_correction, second_moment
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.t if self.bias_correction else 1.0
        bc2 = 1 - b2 ** self.t if self.bias_correction else 1.0
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            src = self.m[i] if self.second_moment == "momentum" else g
            self.v[i] = b2 * self.v[i] + (1 - b2) * src * src
            denom = (self.v[i] / bc2).sqrt() + self.eps
            p.sub_(self.lr * (self.m[i] / bc1) / denom)


class AdaGradNorm(Reference):
    """AdaGrad-Norm (Ward, Wu, Bottou) [UNVERIFIED-MEMORY, standard form] (algorithms.md 7):

        b_t^2 = b_{t-1}^2 + ||g_t||^2   (||.|| GLOBAL over all parameters; includes the current gradient)
        x_t = x_{t-1} - lr * g_t / b_t

    Defaults: lr 1e-2 (torch Adagrad's), b0 1e-8 (our pick: the paper leaves b_0 > 0 to the user and the
    analysis is robust to it; 1e-8 acts like an eps). The state is the scalar b^2, starting at b0**2."""

    def __init__(self, params, lr=1e-2, b0=1e-8):
        super().__init__(params)
        self.lr, self.b0 = lr, b0
        self.b2 = b0 * b0

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        self.b2 += sum(float((g * g).sum()) for g in grads)
        b = math.sqrt(self.b2)
        for p, g in zip(self.params, grads):
            p.sub_(self.lr * g / b)


class SGDOL(Reference):
    """SGDOL (Zhuang, Cutkosky, Orabona, ICML 2019), zhenxun-zhuang/SGDOL @4b2494f sgdol.py [CODE]
    (algorithms.md 6b). Two independent gradients at the same point per step: ``step(grads, grads2)``.

        S_ip   += <g, g'>   (GLOBAL over all params),   S_norm += ||g||^2 (GLOBAL); both start at alpha
        theta  <- theta - lr * eta * g      # eta from BEFORE this round's statistics; eta_1 = 1/L
        eta    <- clip(S_ip / (L * S_norm), 0, 2/L)

    Hyper names follow specs/sgdol.yaml: lr 1.0 (an extra multiplier; 1 = the paper), smoothness (L) 10,
    alpha 10. Paper vs code: same maths; the code's two-calls-per-iteration protocol is replaced by
    passing both gradient lists to one step."""

    def __init__(self, params, lr=1.0, smoothness=10.0, alpha=10.0):
        super().__init__(params)
        self.lr, self.smoothness, self.alpha = lr, smoothness, alpha
        self.inner = float(alpha)
        self.norm = float(alpha)
        self.eta = 1.0 / smoothness

    def step(self, grads, grads2):
        grads = self._check(grads)
        grads2 = self._check(grads2)
        self.t += 1
        self.inner += sum(float((g * h).sum()) for g, h in zip(grads, grads2))
        self.norm += sum(float((g * g).sum()) for g in grads)
        for p, g in zip(self.params, grads):
            p.sub_(self.lr * self.eta * g)
        L = self.smoothness
        self.eta = min(max(self.inner / (L * self.norm), 0.0), 2.0 / L)
