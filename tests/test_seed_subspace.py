"""Subset-Norm, Subspace-Momentum and MuAdam specs against plain float64 references (algorithms.md §3, §4).

Every trajectory test runs 200 steps on a small real model in float64 and asserts a max relative parameter
difference below 1e-6. SM runs with gap 20 (refreshes at t = 1, 20, 40, ...) and ranks below min(m, n), so
the SVD refresh, the momentum reset and the orthogonal residual are all exercised. MuAdam runs its
Newton-Schulz in float64 on both sides (the spec's `ortho` node overridden as in test_torch_oracles).
Three configurations run compiled (SNSM with svd, SM with the random projector, MuAdam); the rest eagerly.
References: tests/references (written by another engineer from algorithms.md) where they cover the case,
and ``GenericOptimReference`` below (topk/random projectors, the code's lagged reset, AdaGrad-SN momentum).
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

import opdsl
from conftest import loss_of, make_model, run_against_reference, with_node
from references import REFERENCES

TOL = 1e-6
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def without_routes(spec: opdsl.Spec) -> opdsl.Spec:
    """Every parameter through the main graph (adamw_sng's 'SN on every tensor')."""
    return spec.model_copy(update={"groups": ()})


def run(kind, spec, ref_factory, compiled=False, set_lr=None, **hyper):
    diff = run_against_reference(
        kind, lambda m: opdsl.Optimizer(m.named_parameters(), spec, compile=compiled, **hyper), ref_factory, set_lr=set_lr
    )
    print(f"\n{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}: max relative difference {diff:.3g}")  # pytest -s
    return diff


# ---- an own reference for what tests/references does not cover -------------------------------------
def _mix32(x):
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def hashed_choice(n, r, seed, index, t):
    """The random projector's documented draw: the r largest of mix(mix(t ^ key) + G*i) * n + i, sorted."""
    golden = 0x9E3779B9
    key = _mix32(_mix32(seed) ^ _mix32((index + golden) & 0xFFFFFFFF))
    stream = _mix32(t ^ key)
    i = torch.arange(n, dtype=torch.int64)
    return sorted(torch.topk(_mix32((stream + i * golden) & 0xFFFFFFFF) * n + i, r).indices.tolist())


class GenericOptimReference:
    """timmytonga/sn-sm GenericOptim in float64, per parameter (algorithms.md §3 + project decisions).

    2-D tensors: numerator 'sm' (rank-r subspace momentum + residual) or 'ema'/'grad'; second moment 'sn'
    (heuristic rows/cols) or 'ema'; beta2 == 1 accumulates. Other tensors: ema numerator, elementwise v.
    step size lr*sqrt(bc2)/bc1 (correct_bias) or lr; decay after the step with the raw lr.
    reset 'refresh': momentum zeroed at a refresh before its update; 'lagged': the code's literal order."""

    def __init__(self, params, lr, betas, eps=1e-6, weight_decay=0.0, numerator="sm", second="ema",
                 correct_bias=True, rank=2, gap=20, projector="svd", reset="refresh", seed=0):
        self.params, self.t = params, 0
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.numerator, self.second, self.correct_bias = numerator, second, correct_bias
        self.rank, self.gap, self.projector, self.reset, self.seed = rank, gap, projector, reset, seed
        self.state = [{} for _ in params]
        self.matrix_index = {}
        for i, p in enumerate(params):
            if p.ndim == 2:
                self.matrix_index[i] = len(self.matrix_index)

    def _basis(self, g, i):
        m, n = g.shape
        r, right = min(self.rank, m, n), m >= n
        if self.projector == "svd":
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            return Vh[:r] if right else U[:, :r]
        size = n if right else m
        if self.projector == "topk":
            norms = [float(torch.linalg.vector_norm(g[:, j] if right else g[j])) for j in range(size)]
            idx = sorted(sorted(range(size), key=lambda j: -norms[j])[:r])
        else:
            idx = hashed_choice(size, r, self.seed, self.matrix_index[i], self.t)
        eye = torch.eye(size, dtype=g.dtype)[idx]
        return eye if right else eye.T

    def _sm(self, st, g, i):
        t, (b1, _) = self.t, self.betas
        right = g.shape[0] >= g.shape[1]
        if t == 1 or t % self.gap == 0:
            st["basis"] = self._basis(g, i)
        B = st["basis"]
        low = g @ B.T if right else B.T @ g
        back = (lambda X: X @ B) if right else (lambda X: B @ X)
        if "M" not in st:
            st["M"] = torch.zeros_like(low)
        M = st["M"]
        if t > 1 and t % self.gap == 0:
            if self.reset == "refresh":
                M = st["M"] = torch.zeros_like(low)
            elif self.reset == "lagged":
                st["M"] = torch.zeros_like(low)  # the update below still goes to the old buffer
        M.mul_(b1).add_(low, alpha=1 - b1)
        return back(M) + (g - back(low))

    def step(self, grads):
        self.t += 1
        t, (b1, b2) = self.t, self.betas
        for i, (p, g) in enumerate(zip(self.params, grads)):
            st, matrix = self.state[i], p.ndim == 2
            if matrix and self.numerator == "sm":
                num = self._sm(st, g, i)
            elif b1 == 0 or self.numerator == "grad":
                num = g
            else:
                st.setdefault("m", torch.zeros_like(g)).mul_(b1).add_(g, alpha=1 - b1)
                num = st["m"]
            if matrix and self.second == "sn":
                s = (g * g).sum(dim=1 if g.shape[0] >= g.shape[1] else 0, keepdim=True)
            else:
                s = g * g
            v = st.setdefault("v", torch.zeros_like(s))
            v.add_(s) if b2 == 1 else v.mul_(b2).add_(s, alpha=1 - b2)
            size = self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if self.correct_bias else self.lr
            p.sub_(size * num / (v.sqrt() + self.eps))
            if self.wd > 0:
                p.sub_(self.lr * self.wd * p)


# ---- Subset-Norm ---------------------------------------------------------------------------------------
def test_adamw_sn_heuristic_with_schedule_and_decay():
    hyper = dict(lr=1e-2, weight_decay=0.1)
    diff = run("transformer", "adamw-sn", lambda ps: REFERENCES["adamw-sn"](ps, **hyper),
               set_lr=lambda s: 1e-2 * (1 + math.cos(math.pi * s / 200)) / 2 + 1e-4, **hyper)
    assert diff < TOL, f"adamw-sn: {diff:.3g}"


@pytest.mark.parametrize("subset", [7, -2], ids=["chunks-k7", "sqrt-c2"])
def test_adamw_sn_chunked_subsets(subset):
    """k = 7 on 48x6 (288) gives chunks of 6; -2 gives int(sqrt(288)/2) = 8. Every tensor through SN."""
    spec = without_routes(with_node(opdsl.load_spec("adamw-sn"), "sn", subset=subset))
    hyper = dict(lr=1e-2, weight_decay=1e-2)
    diff = run("lstm", spec, lambda ps: REFERENCES["adamw-sn"](ps, subset=subset, **hyper), **hyper)
    assert diff < TOL, f"adamw-sn subset {subset}: {diff:.3g}"


def test_adagrad_sn():
    hyper = dict(lr=5e-2, weight_decay=1e-2)
    diff = run("mlp", "adagrad-sn", lambda ps: REFERENCES["adagrad-sn"](ps, **hyper), **hyper)
    assert diff < TOL, f"adagrad-sn: {diff:.3g}"


@pytest.mark.parametrize("name,compiled", [("adagrad-sn", True), ("adamw-sn", False)])
def test_subset_norm_on_runs_of_equal_shapes(name, compiled):
    """Equal shapes share a bucket stepped in its (count, rows, cols) layout: per-row and per-column
    denominators of every parameter in a run must broadcast onto that parameter only."""
    hyper = dict(lr=3e-2, weight_decay=1e-2)
    diff = run("stack", name, lambda ps: REFERENCES[name](ps, **hyper), compiled=compiled, **hyper)
    assert diff < TOL, f"{name} on runs of equal shapes: {diff:.3g}"
    opt = opdsl.Optimizer(make_model("stack").named_parameters(), name)
    assert sorted(b.value_shape for b in opt._buckets if len(b.value_shape) == 3) == [(1, 3, 8), (2, 8, 24), (2, 24, 8)]


def test_adagrad_sn_with_the_codes_momentum():
    diff = run("mlp", "adagrad-sn", lambda ps: GenericOptimReference(
        ps, lr=5e-2, betas=(0.9, 1.0), numerator="ema", second="sn", correct_bias=False), lr=5e-2, momentum=0.9)
    assert diff < TOL, f"adagrad-sn momentum: {diff:.3g}"


def test_subset_state_shapes():
    """Heuristic: rows (m x 1) if m >= n else columns (1 x n); chunks (numel/k', 1); non-2-D elementwise."""
    model = make_model("lstm", DT)
    w_ih, w_hh = model["lstm"].weight_ih_l0, model["lstm"].weight_hh_l0  # 48x6, 48x12
    head = model["head"].weight  # 3x12
    base = opdsl.load_spec("adamw-sn")
    expected = {
        "heuristic": {w_ih: (48, 1), w_hh: (48, 1), head: (1, 12), model["head"].bias: (3,)},
        7: {w_ih: (48, 1), w_hh: (96, 1), head: (6, 1)},  # 288 -> 6, 576 -> 6, 36 -> 6
        -2: {w_ih: (36, 1), w_hh: (48, 1), head: (12, 1)},  # k = int(sqrt(288)/2) = 8, 12, int(6/2) = 3
        100: {head: (1, 1)},  # k clamped to numel: one subset (AdaGrad-Norm per tensor)
    }
    for subset, shapes in expected.items():
        opt = opdsl.Optimizer(model.parameters(), without_routes(with_node(base, "sn", subset=subset)), compile=False)
        for p, shape in shapes.items():
            assert tuple(opt.state[p]["sn.v"].shape) == shape, (subset, tuple(p.shape))
    from opdsl.blocks.subset_norm import SubsetNorm

    with pytest.raises(ValueError, match="not 0"):
        SubsetNorm.model_validate({"block": "subset-norm", "input": "m", "subset": 0})


# ---- Subspace-Momentum -----------------------------------------------------------------------------------
def sm_spec(name, **update):
    return with_node(opdsl.load_spec(name), "sm", **{"gap": 20, **update})


def test_adamw_sm_svd():
    hyper = dict(lr=1e-2, weight_decay=1e-2)
    diff = run("transformer", sm_spec("adamw-sm", rank=4), lambda ps: REFERENCES["adamw-sm"](
        ps, rank=4, update_proj_gap=20, **hyper), **hyper)
    assert diff < TOL, f"adamw-sm: {diff:.3g}"


def test_adamw_snsm_svd_compiled():
    hyper = dict(lr=1e-2, weight_decay=1e-2)
    diff = run("mlp", sm_spec("adamw-snsm", rank=2), lambda ps: REFERENCES["adamw-snsm"](
        ps, rank=2, update_proj_gap=20, **hyper), compiled=True, **hyper)
    assert diff < TOL, f"adamw-snsm (compiled): {diff:.3g}"


@pytest.mark.parametrize(
    "projector,reset,second,compiled,refresh",
    [("topk", "refresh", "sn", False, "cond"), ("random", "refresh", "ema", True, "cond"),
     ("svd", "lagged", "sn", False, "cond"), ("svd", "refresh", "ema", False, "every-step")],
    ids=["topk-snsm", "random-sm-compiled", "svd-lagged-snsm", "svd-sm-every-step"],
)
def test_sm_projector_options(projector, reset, second, compiled, refresh):
    name = "adamw-snsm" if second == "sn" else "adamw-sm"
    spec = sm_spec(name, rank=2, projector=projector, reset=reset, seed=3, refresh=refresh)
    hyper = dict(lr=1e-2, weight_decay=1e-2)
    diff = run("mlp", spec, lambda ps: GenericOptimReference(
        ps, betas=(0.9, 0.999), second=second, rank=2, gap=20, projector=projector, reset=reset, seed=3, **hyper),
        compiled=compiled, **hyper)
    assert diff < TOL, f"{name} {projector}/{reset}/{refresh}: {diff:.3g}"


def test_random_projector_draws():
    from opdsl.blocks.subspace_projector import random_indices

    draw = lambda index, t: random_indices(50, 5, 0, index, torch.tensor(float(t), dtype=DT)).tolist()  # noqa: E731
    assert draw(0, 20) == draw(0, 20) == hashed_choice(50, 5, 0, 0, 20)
    assert len(set(draw(0, 20))) == 5 and draw(0, 20) != draw(0, 40) and draw(0, 20) != draw(1, 20)


def test_state_bytes():
    """SN keeps O(rows) per matrix; SM keeps rank-r momentum (m x r or r x n) plus an r-dim basis."""
    model = make_model("mlp", DT)
    w1, w2 = model[0].weight, model[3].weight  # 32x8 (m >= n), 16x32 (m < n)
    sn = opdsl.Optimizer(model.parameters(), "adamw-sn", compile=False)
    assert tuple(sn.state[w1]["sn.v"].shape) == (32, 1) and tuple(sn.state[w2]["sn.v"].shape) == (1, 32)
    snsm = opdsl.Optimizer(model.parameters(), sm_spec("adamw-snsm", rank=2), compile=False)
    st = snsm.state[w1]
    assert tuple(st["sm.momentum"].shape) == (32, 2) and tuple(st["sm.basis"].shape) == (2, 8)
    assert tuple(snsm.state[w2]["sm.momentum"].shape) == (2, 32) and tuple(snsm.state[w2]["sm.basis"].shape) == (16, 2)
    values = lambda opt, p: sum(v.numel() for k, v in opt.state[p].items() if k != "step")  # noqa: E731
    assert values(sn, w1) == 32 * 8 + 32  # full first moment + one accumulator per row
    assert values(snsm, w1) == 32 * 2 + 2 * 8 + 32  # no full-size state at all
    adamw = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    assert values(adamw, w1) == 2 * 32 * 8
    per_value = float(re.search(r"([\d.]+) bytes per parameter value", snsm.describe()).group(1))
    assert per_value < 0.5 * float(re.search(r"([\d.]+) bytes per parameter value", adamw.describe()).group(1))


def _train(model, opt, steps, start=0, kind="mlp"):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, kind, step, DT).backward()
        opt.step()


def test_sm_state_dict_round_trip():
    """Basis and subspace momentum (per-tensor states) survive state_dict across a refresh boundary."""
    import copy

    spec = sm_spec("adamw-snsm", rank=2)
    model = make_model("mlp", DT)
    opt = opdsl.Optimizer(model.parameters(), spec, compile=False, lr=1e-2)
    _train(model, opt, 30)
    twin = copy.deepcopy(model)
    twin_opt = opdsl.Optimizer(twin.parameters(), spec, compile=False, lr=1e-2)
    twin_opt.load_state_dict(opt.state_dict())
    _train(model, opt, 15, start=30)
    _train(twin, twin_opt, 15, start=30)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sm_nonfinite_gradient_at_a_refresh_is_skipped(compiled):
    """A NaN gradient at a refresh step (t = 20) skips the step: no LAPACK error, state untouched. The next
    step is t = 20 again and refreshes then: the run matches a twin that never saw the bad gradient."""
    import copy

    spec = sm_spec("adamw-snsm", rank=2)
    model = make_model("mlp", DT)
    twin = copy.deepcopy(model)
    opt = opdsl.Optimizer(model.parameters(), spec, compile=compiled, lr=1e-2)
    twin_opt = opdsl.Optimizer(twin.parameters(), spec, compile=False, lr=1e-2)
    _train(model, opt, 19)
    _train(twin, twin_opt, 19)
    w = model[0].weight
    before = {k: v.clone() for k, v in opt.state[w].items()}
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, "mlp", 19, DT).backward()
    w.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in opt.state[w].items())
    _train(model, opt, 10, start=19)
    _train(twin, twin_opt, 10, start=19)
    assert not torch.equal(opt.state[w]["sm.basis"], before["sm.basis"])  # refreshed at the retried t = 20
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(model.parameters(), twin.parameters()))
    assert diff < 1e-9, f"after a skipped refresh step: {diff:.3g}"


# ---- MuAdam ----------------------------------------------------------------------------------------------
def muadam_spec(name):
    return with_node(opdsl.load_spec(name), "ortho", dtype="float64")


@pytest.mark.parametrize(
    "name,kind,lr,compiled",
    [("muadam", "transformer", 1e-3, False), ("muadam-sania", "lstm", 1e-5, False), ("muadam", "mlp", 1e-3, True)],
    ids=["muadam", "muadam-sania", "muadam-compiled"],
)
def test_muadam(name, kind, lr, compiled):
    hyper = dict(lr=lr, weight_decay=1e-2, momentum=0.9, betas=(0.9, 0.99))
    diff = run(kind, muadam_spec(name), lambda ps: REFERENCES[name](ps, ns_steps=10, **hyper), compiled=compiled, **hyper)
    assert diff < TOL, f"{name}: {diff:.3g}"


def test_muadam_moves_the_model():
    """Guard against a vacuous match: MuAdam actually trains (loss falls) at the tested settings."""
    model = make_model("transformer", DT)
    opt = opdsl.Optimizer(model.named_parameters(), muadam_spec("muadam"), compile=False, lr=1e-3)
    losses = []
    for step in range(60):
        opt.zero_grad()
        loss = loss_of(model, "transformer", step % 4, DT)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])
