"""SGDOL: the two-gradient protocol and the trajectory against a plain float64 reference (algorithms.md §6b)."""
from __future__ import annotations

import copy

import pytest
import torch

import opdsl
from conftest import loss_of, make_model, max_rel_diff


class SGDOLReference:
    """Plain float64 SGDOL: global sums over all params; the update uses the step size from before
    this round's statistics (eta_1 = 1/L)."""

    def __init__(self, params, smoothness=10.0, alpha=10.0):
        self.params, self.L = params, smoothness
        self.inner = self.norm = alpha
        self.eta = 1.0 / smoothness

    def step(self, grads, grads2):
        self.inner += sum(float((g * h).sum()) for g, h in zip(grads, grads2))
        self.norm += sum(float((g * g).sum()) for g in grads)
        for p, g in zip(self.params, grads):
            p.sub_(self.eta * g)
        self.eta = min(max(self.inner / (self.L * self.norm), 0.0), 2.0 / self.L)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sgdol_matches_reference(compiled):
    model = make_model("mlp", torch.float64)
    ref_model = copy.deepcopy(model)
    groups = [{"params": [p for p in model.parameters() if p.ndim == 2]}, {"params": [p for p in model.parameters() if p.ndim < 2]}]
    opt = opdsl.Optimizer(groups, "sgdol", compile=compiled)
    ref_params = list(ref_model.parameters())
    ref = SGDOLReference([p.data for p in ref_params])
    draws = iter(range(10_000))

    last_grads = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, "mlp", next(draws), torch.float64)
        loss.backward()
        last_grads[:] = [p.grad.clone() for p in model.parameters()]
        return loss

    for step in range(200):
        opt.step(closure)
        grads = []
        for offset in (0, 1):
            for p in ref_params:
                p.grad = None
            loss_of(ref_model, "mlp", 2 * step + offset, torch.float64).backward()
            grads.append([p.grad.clone() for p in ref_params])
        with torch.no_grad():
            ref.step(*grads)
    assert max_rel_diff(model, ref_model) < 1e-6
    # as with torch.optim, .grad holds the last closure call's gradient (the buffers alternate each step)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), last_grads))
    assert abs(float(opt.state[next(model.parameters())]["sized.eta"]) - ref.eta) < 1e-9


def test_sgdol_requires_a_closure():
    opt = opdsl.Optimizer(make_model("mlp").parameters(), "sgdol", compile=False)
    with pytest.raises(ValueError, match="reads `grad2`"):
        opt.step()
