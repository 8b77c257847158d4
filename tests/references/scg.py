"""SCGAdam / SCGAMSGrad (Sato, Izumi, Iiduka, JMLR 2024) and CoBA (Iiduka & Kobayashi 2020) references
(algorithms.md section 2)."""
from __future__ import annotations

import math

import torch

from ._base import Reference


def _adam_or_amsgrad(ref, i, p, D, g, lr_t, beta1_t, bc1):
    """Shared tail: m of the gradient-like direction D, v of the raw (L2-augmented) g^2, then
    theta <- theta - lr_t * (Adam: (m/bc1) / (sqrt(v)/sqrt(bc2) + eps);  AMSGrad: m / (sqrt(vmax) + eps))."""
    beta2 = ref.betas[1]
    ref.m[i] = beta1_t * ref.m[i] + (1 - beta1_t) * D
    ref.v[i] = beta2 * ref.v[i] + (1 - beta2) * g * g
    if ref.amsgrad:
        ref.vmax[i] = torch.maximum(ref.vmax[i], ref.v[i])
        p.sub_(lr_t * ref.m[i] / (ref.vmax[i].sqrt() + ref.eps))
    else:
        bc2 = 1 - beta2 ** ref.t
        p.sub_((lr_t / bc1) * ref.m[i] / (ref.v[i].sqrt() / math.sqrt(bc2) + ref.eps))


class SCGAdam(Reference):
    """SCGAdam / SCGAMSGrad, iiduka-researches/202210-izumi [CODE]: optimizer/SCGAdam.py (constant) and
    optimizer/SCGAdam2.py (diminishing), read @2b2a5aa; coefficient tables in optimizer/scg_param.py.

    Written with the gradient-like direction D = -G (G = the code's descent direction), so the update is an
    obvious descent step theta <- theta - lr * (...D...):

        g_n = grad + wd * theta_n                 (COUPLED L2; default wd 0)
        n = 1:  D_1 = g_1
        n > 1:  D_n = (1 + gamma_n) g_n + delta_n D_{n-1}          ("+" convention; D = -G)
        m_n = beta1_n m_{n-1} + (1 - beta1_n) D_n                  (m of the CG direction)
        v_n = beta2 v_{n-1} + (1 - beta2) g_n^2                    (v of the RAW gradient)
        Adam branch (amsgrad False):  theta <- theta - lr_n * (m_n / bc1) / (sqrt(v_n)/sqrt(bc2) + eps)
        AMSGrad branch (amsgrad True): vmax = max(vmax, v_n); theta <- theta - lr_n * m_n / (sqrt(vmax)+eps)
                                       (NO bias correction at all, as the code)

    Constant mode (default): gamma_n = gamma, delta_n = delta, beta1_n = betas[0], lr_n = lr.
    Diminishing mode (diminishing=True; SCGAdam2 with 'D1'/'D0'/'D1'): gamma_n = delta_n = 0.5^n,
    lr_n = lr / sqrt(n), beta1_n = 0.5^n (the EMA coefficient of m itself decays); gamma/delta ignored.
    Choices:
    - Bias correction when beta1 varies: follow the code - the Adam branch still uses the CONSTANT
      betas[0] (0.9): bc1 = 1 - betas[0]^n, bc2 = 1 - betas[1]^n, even though m is built with 0.5^n.
      (The "exact" correction 1 - prod_k beta1_k is NOT used.)
    - lr_n = lr/sqrt(n): the code's 'D0' is 1/sqrt(n) with no base lr, i.e. our lr = 1.0.
    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, amsgrad False, gamma 0.1 ('C1'),
    delta 1e-3 ('C3', main.py's constant runs), diminishing False."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 gamma=0.1, delta=1e-3, diminishing=False):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.amsgrad, self.gamma, self.delta, self.diminishing = amsgrad, gamma, delta, diminishing
        self.D = [None] * len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params] if amsgrad else None

    def coefficients(self, n: int):
        """(gamma_n, delta_n, beta1_n, lr_n) at step n."""
        if self.diminishing:
            return 0.5 ** n, 0.5 ** n, 0.5 ** n, self.lr / math.sqrt(n)
        return self.gamma, self.delta, self.betas[0], self.lr

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        n = self.t
        gamma, delta, beta1_n, lr_n = self.coefficients(n)
        bc1 = 1 - self.betas[0] ** n
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            if n == 1:
                self.D[i] = g.clone()
            else:
                self.D[i] = (1 + gamma) * g + delta * self.D[i]
            _adam_or_amsgrad(self, i, p, self.D[i], g, lr_n, beta1_n, bc1)


class CoBA(Reference):
    """CoBA (conjugate-gradient Adam/AMSGrad), iiduka-researches/202009-coba [CODE]
    (optimizer/conjugate/coba.py, conjugate_param.py), with the PAPER formula as canonical:

        g_n = grad + wd * theta_n                 (coupled L2; default 0)
        d_1 = -g_1;   d_n = -g_n + (M / n^a) * beta_n * d_{n-1}     (d = DESCENT direction, n = step count)
        y = g_n - g_{n-1};  <.,.> per `scope`;  sgn(x)eps := +eps if x >= 0 else -eps
          HS : <g_n,y> / (<d_{n-1},y> + sgn eps)
          FR : ||g_n||^2 / (||g_{n-1}||^2 + eps)
          PRP: <g_n,y> / (||g_{n-1}||^2 + eps)
          DY : ||g_n||^2 / (<d_{n-1},y> + sgn eps)
          HZ : HS - lam * ||y||^2 * <g_n,d_{n-1}> / (<d_{n-1},y>^2 + eps)      (lam = 2)
        m, v and the update as SCGAdam with D = -d (m of D, v of g^2, Adam branch bias-corrected,
        AMSGrad branch not):  theta <- theta - lr * (m_D/bc1) / (sqrt(v)/sqrt(bc2) + eps)

    Choices (code vs paper):
    - scope "tensor" (default): inner products over the whole tensor (the paper's formula).
      scope "row": sums over the LAST axis only (keepdim), one beta per row of a matrix / per last-axis
      slice, as the authors' `inner` does; 1-D tensors get one scalar either way.
    - HZ: the HS term uses the signed eps (algorithms.md: "signed denominators"); the code adds an
      unsigned +eps there and also truncates beta at -1/(||d||^2 * min(||g_{n-1}||^2, eps)) - neither is
      copied.
    - The code at HEAD keeps d_n = -g_n until its first once-per-`period` "deterministic" update (its
      `deterministic_cg is None` test) and imports the v2 coefficient signature; both are bugs of the
      repository, not the paper, and are not copied. CoBA2 (epoch-averaged coefficients) is not modelled.
    - eps in the denominators is the Adam eps (1e-8), as the code.
    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, amsgrad False, rule "HS", M 1e-3,
    a 1+1e-8, lam 2.0, scope "tensor"."""

    RULES = ("HS", "FR", "PRP", "DY", "HZ")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 rule="HS", M=1e-3, a=1 + 1e-8, lam=2.0, scope="tensor"):
        super().__init__(params)
        rule = rule.upper()
        if rule not in self.RULES:
            raise ValueError(f"rule must be one of {self.RULES}, not {rule!r}")
        if scope not in ("tensor", "row"):
            raise ValueError(f"scope must be 'tensor' or 'row', not {scope!r}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.amsgrad, self.rule, self.M, self.a, self.lam, self.scope = amsgrad, rule, M, a, lam, scope
        self.d = [None] * len(self.params)
        self.g_prev = [None] * len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params] if amsgrad else None

    def inner(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scope == "tensor" or x.ndim == 0:
            return (x * y).sum()
        return (x * y).sum(-1, keepdim=True)

    def _signed(self, den: torch.Tensor) -> torch.Tensor:
        return den + torch.where(den >= 0, torch.full_like(den, self.eps), torch.full_like(den, -self.eps))

    def beta(self, g: torch.Tensor, g_prev: torch.Tensor, d_prev: torch.Tensor) -> torch.Tensor:
        y = g - g_prev
        inner, eps = self.inner, self.eps
        if self.rule == "HS":
            return inner(g, y) / self._signed(inner(d_prev, y))
        if self.rule == "FR":
            return inner(g, g) / (inner(g_prev, g_prev) + eps)
        if self.rule == "PRP":
            return inner(g, y) / (inner(g_prev, g_prev) + eps)
        if self.rule == "DY":
            return inner(g, g) / self._signed(inner(d_prev, y))
        dy = inner(d_prev, y)  # HZ
        hs = inner(g, y) / self._signed(dy)
        return hs - self.lam * inner(y, y) * inner(g, d_prev) / (dy * dy + eps)

    def step(self, grads):
        grads = self._check(grads)
        self.t += 1
        n = self.t
        bc1 = 1 - self.betas[0] ** n
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            if n == 1:
                self.d[i] = -g
            else:
                beta = self.beta(g, self.g_prev[i], self.d[i])
                self.d[i] = -g + (self.M / n ** self.a) * beta * self.d[i]
            self.g_prev[i] = g.clone()
            _adam_or_amsgrad(self, i, p, -self.d[i], g, self.lr, self.betas[0], bc1)
