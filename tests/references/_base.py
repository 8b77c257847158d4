"""Shared plumbing for the float64 reference optimizers (no opdsl imports, ever).

Every reference follows one contract:

    ref = Reference(params, **hyper)   # params: list of float64 tensors, updated IN PLACE
    ref.step(grads)                    # grads: list aligned with params (SGDOL: step(grads, grads2))

Conventions shared by all references (algorithms.md section 0):
- ``self.t`` is the 1-based step counter, incremented at the start of ``step`` before anything reads it.
- Every hyperparameter is a plain attribute read at each step, so a test may change it between steps
  (``ref.lr = ...``; ``conftest.run_against_reference`` does exactly that).
- Scalars are Python floats (float64); tensor math is plain torch, one parameter at a time.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


class Reference:
    """Base class: stores the parameter list and the step counter."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        for p in self.params:
            if not isinstance(p, torch.Tensor):
                raise TypeError("params must be tensors")
        self.t = 0

    def _check(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"{len(grads)} grads for {len(self.params)} params")
        for p, g in zip(self.params, grads):
            if g is None:
                raise ValueError("every parameter needs a gradient (None is not supported by the references)")
            if g.shape != p.shape:
                raise ValueError(f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
        return [g.detach() for g in grads]

    def step(self, grads):  # pragma: no cover - abstract
        raise NotImplementedError


def newton_schulz(G: torch.Tensor, steps: int, eps: float, coeffs=NS_COEFFS) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalization of a 2-D matrix, in G's dtype (float64 here).

    X = G / (||G||_F + eps); transpose if rows > cols; repeat ``steps`` times
    A = X X^T, B = b A + c A A, X = a X + B X; transpose back. (Frobenius norm is transpose-invariant,
    so normalizing before or after the transpose is the same.)"""
    a, b, c = coeffs
    X = G / (torch.linalg.matrix_norm(G) + eps)
    transposed = G.shape[0] > G.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X


def largest_divisor_at_most(n: int, k: int) -> int:
    """Largest divisor of n that is <= k (k clamped to [1, n])."""
    k = max(1, min(int(k), n))
    for i in range(k, 0, -1):
        if n % i == 0:
            return i
    return 1  # unreachable


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)
