"""Sanity tests of the float64 reference optimizers themselves (tests/references; no opdsl involved)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import loss_of, make_model
from references import (
    REFERENCES, SGDOL, AdaGradNorm, Adam, AdamW, AdamWSM, AdamWSN, AggMoAdamW, CoBA, GeneralizedSignSGD, Lion,
    MuAdam, SCGAdam, SCSAdamW, SignSGD, Signum, SubsetLayout, SVDProjector, newton_schulz,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _grads_of(model, step):
    model.zero_grad(set_to_none=True)
    loss_of(model, "mlp", step, DT).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _run_ref(model, ref, steps):
    for s in range(steps):
        g = _grads_of(model, s)
        with torch.no_grad():
            ref.step(g)


def _run_torch(model, opt, steps):
    for s in range(steps):
        opt.zero_grad()
        loss_of(model, "mlp", s, DT).backward()
        opt.step()


def _max_rel(a, b):
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        scale = pb.detach().abs().max().clamp(min=1e-12)
        worst = max(worst, float((pa.detach() - pb.detach()).abs().max() / scale))
    return worst


def _pair(seed=0):
    model = make_model("mlp", DT, seed=seed)
    return model, copy.deepcopy(model)


def _random_grads(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=DT) for s in shapes]


# ---- torch oracles -------------------------------------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_l2_equals_torch_adam(amsgrad):
    ours, theirs = _pair()
    ref = REFERENCES["adam-l2"]([p.data for p in ours.parameters()], lr=3e-3, weight_decay=1e-2, amsgrad=amsgrad)
    opt = torch.optim.Adam(theirs.parameters(), lr=3e-3, weight_decay=1e-2, amsgrad=amsgrad, foreach=False)
    _run_ref(ours, ref, 50)
    _run_torch(theirs, opt, 50)
    assert _max_rel(ours, theirs) < 1e-12


def test_adamw_equals_torch_adamw():
    ours, theirs = _pair()
    ref = AdamW([p.data for p in ours.parameters()], lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    _run_ref(ours, ref, 50)
    _run_torch(theirs, opt, 50)
    assert _max_rel(ours, theirs) < 1e-12


def test_scgadam_without_conjugacy_is_adam():
    ours, theirs = _pair()
    ref = SCGAdam([p.data for p in ours.parameters()], lr=3e-3, gamma=0.0, delta=0.0, weight_decay=1e-3)
    opt = torch.optim.Adam(theirs.parameters(), lr=3e-3, weight_decay=1e-3, foreach=False)
    _run_ref(ours, ref, 30)
    _run_torch(theirs, opt, 30)
    assert _max_rel(ours, theirs) < 1e-12


@pytest.mark.parametrize("rule", CoBA.RULES)
def test_coba_with_zero_M_is_adam(rule):
    ours, theirs = _pair()
    ref = CoBA([p.data for p in ours.parameters()], lr=3e-3, M=0.0, rule=rule)
    opt = torch.optim.Adam(theirs.parameters(), lr=3e-3, foreach=False)
    _run_ref(ours, ref, 20)
    _run_torch(theirs, opt, 20)
    assert _max_rel(ours, theirs) < 1e-12


def test_qhadamw_full_weight_on_momentum_is_adam():
    ours, theirs = _pair()
    ref = AggMoAdamW([p.data for p in ours.parameters()], lr=3e-3, betas=(0.9, 0.999), vs=(1.0,), weight_decay=0.0)
    opt = torch.optim.Adam(theirs.parameters(), lr=3e-3, foreach=False)
    _run_ref(ours, ref, 30)
    _run_torch(theirs, opt, 30)
    assert _max_rel(ours, theirs) < 1e-12


def test_muadam_vectors_follow_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(7, dtype=DT)
    w_ref, w_torch = w.clone(), w.clone().requires_grad_(True)
    ref = MuAdam([w_ref], lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW([w_torch], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for g in _random_grads([(7,)] * 20, 3):
        ref.step([g])
        w_torch.grad = g.clone()
        opt.step()
    assert torch.allclose(w_ref, w_torch.detach(), rtol=1e-12, atol=0)


# ---- sign family ---------------------------------------------------------------------------------

def test_lion_with_equal_betas_is_signum():
    shapes = [(4, 3), (5,)]
    a = [torch.randn(*s, dtype=DT) for s in shapes]
    b = [x.clone() for x in a]
    lion, signum = Lion(a, lr=1e-2, betas=(0.8, 0.8)), Signum(b, lr=1e-2, momentum=0.8)
    for s in range(25):
        g = _random_grads(shapes, s)
        lion.step(g)
        signum.step(g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_generalized_signsgd_degenerates_to_signsgd():
    shapes = [(4, 3), (5,)]
    a = [torch.randn(*s, dtype=DT) for s in shapes]
    b = [x.clone() for x in a]
    gen, sign = GeneralizedSignSGD(a, lr=1e-2, betas=(0.0, 0.0), eps=0.0), SignSGD(b, lr=1e-2)
    for s in range(10):
        g = _random_grads(shapes, s)
        gen.step(g)
        sign.step(g)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-14, atol=1e-15)


def test_generalized_signsgd_tracks_momentum_squared():
    p = [torch.zeros(3, dtype=DT)]
    ref = GeneralizedSignSGD(p, lr=1.0, betas=(0.5, 0.5), eps=0.0)
    g1, g2 = torch.tensor([1.0, -2.0, 4.0], dtype=DT), torch.tensor([3.0, 2.0, -4.0], dtype=DT)
    ref.step([g1])
    ref.step([g2])
    m1, m2 = 0.5 * g1, 0.25 * g1 + 0.5 * g2
    v2 = 0.5 * (0.5 * m1 * m1) + 0.5 * m2 * m2
    expected = -(m1 / (0.5 * m1 * m1).sqrt()) - m2 / v2.sqrt()
    assert torch.allclose(p[0], expected, rtol=1e-14)


# ---- SCSAdamW ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_scsadamw_clip_mix_is_min_norm(scope):
    shapes = [(6, 4), (4,), (3, 6)]
    params = [torch.randn(*s, dtype=DT) for s in shapes]
    ref = SCSAdamW(params, scope=scope)
    ref.step(_random_grads(shapes, 0))
    for s in range(1, 40):
        g = _random_grads(shapes, s)
        if s % 3 == 0:  # a gradient nearly parallel to d exercises lam at the clip bounds
            g = [0.5 * d + 0.01 * x for d, x in zip(ref.d, g)]
        d_old = [d.clone() for d in ref.d]
        ref.step(g)
        groups = [list(range(len(shapes)))] if scope == "global" else [[i] for i in range(len(shapes))]
        lams = [ref.last_lam] if scope == "global" else ref.last_lam
        for idx, lam in zip(groups, lams):
            assert lam is not None and 0.0 <= lam <= 1.0
            norm = lambda ts: math.sqrt(sum(float((x * x).sum()) for x in ts))  # noqa: E731
            new, old, grad = norm([ref.d[i] for i in idx]), norm([d_old[i] for i in idx]), norm([g[i] for i in idx])
            assert new <= min(old, grad) * (1 + 1e-12)
            mixed = [lam * d_old[i] + (1 - lam) * g[i] for i in idx]
            assert all(torch.allclose(ref.d[i], x, rtol=1e-14, atol=1e-15) for i, x in zip(idx, mixed))


def test_scsadamw_sigmoid_bounds_and_restart_steps():
    shapes = [(5, 3)]
    ref = SCSAdamW([torch.randn(5, 3, dtype=DT)], smoothing="sigmoid", restart_every=4)
    restarts = []
    for s in range(1, 14):
        g = _random_grads(shapes, s)
        ref.step(g)
        if ref.last_lam is None:
            restarts.append(s)
            assert torch.equal(ref.d[0], g[0])
        else:
            assert 1 / (1 + math.exp(5)) - 1e-15 <= ref.last_lam <= 1 / (1 + math.exp(-5)) + 1e-15
    assert restarts == [1, 5, 9, 13]


def test_scsadamw_first_step_by_hand():
    p = torch.tensor([1.0, -1.0], dtype=DT)
    g = torch.tensor([0.5, 2.0], dtype=DT)
    ref = SCSAdamW([p], lr=0.1, weight_decay=0.01, eps=1e-8)
    ref.step([g.clone()])
    vhat = (1 - 0.999) * g * g / (1 - 0.999)
    expected = torch.tensor([1.0, -1.0], dtype=DT) * (1 - 0.1 * 0.01) - 0.1 * g / (vhat.sqrt() + 1e-8)
    assert torch.allclose(p, expected, rtol=1e-14)


# ---- SN / SM -------------------------------------------------------------------------------------

def test_sn_heuristic_state_shapes():
    shapes = [(8, 3), (3, 8), (4, 4), (5,), (2, 3, 4)]
    params = [torch.randn(*s, dtype=DT) for s in shapes]
    ref = AdamWSN(params)
    assert [tuple(v.shape) for v in ref.v] == [(8, 1), (1, 8), (4, 1), (5,), (2, 3, 4)]
    g = _random_grads(shapes, 0)
    ref.step(g)
    assert torch.allclose(ref.v[0], 0.001 * (g[0] ** 2).sum(1, keepdim=True), rtol=1e-14)
    assert torch.allclose(ref.v[1], 0.001 * (g[1] ** 2).sum(0, keepdim=True), rtol=1e-14)
    assert all(tuple(m.shape) == s for m, s in zip(ref.m, shapes))


def test_sn_integer_and_negative_subsets():
    assert SubsetLayout((6, 5), 7).view == (5, 6)          # largest divisor of 30 that is <= 7
    assert SubsetLayout((6, 5), 4).view == (10, 3)
    assert SubsetLayout((64, 16), -2).view == (64, 16)      # k = int(sqrt(1024)/2) = 16
    assert SubsetLayout((3,), -2).view == (3, 1)            # k = int(1.73/2) = 0 -> clamped to 1
    L = SubsetLayout((6, 5), 7)
    g = torch.arange(30, dtype=DT).reshape(6, 5)
    assert torch.equal(L.reduce(g), (g.reshape(5, 6) ** 2).sum(1, keepdim=True))
    denom = torch.arange(1, 6, dtype=DT).reshape(5, 1)
    assert torch.equal(L.divide(g, denom), (g.reshape(5, 6) / denom).reshape(6, 5))


def test_adagrad_sn_accumulates_sums():
    p = [torch.zeros(4, 2, dtype=DT)]
    ref = REFERENCES["adagrad-sn"](p, lr=1.0, eps=0.0)
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [6.0, 8.0]], dtype=DT)
    ref.step([g])
    ref.step([g])
    row = (g * g).sum(1, keepdim=True).sqrt()
    assert torch.allclose(p[0], -(g / row) - g / (math.sqrt(2) * row), rtol=1e-14)


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (5, 5)])
def test_sm_full_rank_projector_reconstructs(shape):
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(*shape, generator=gen, dtype=DT)
    P = SVDProjector(G, rank=128)
    assert P.r == min(shape)
    H = torch.randn(*shape, generator=gen, dtype=DT)
    assert torch.allclose(P.project_back(P.project(H)), H, rtol=0, atol=1e-12)
    low = SVDProjector(G, rank=2)
    low_shape = (shape[0], 2) if shape[0] >= shape[1] else (2, shape[1])
    assert tuple(low.project(G).shape) == low_shape
    R = G - low.project_back(low.project(G))
    assert abs(float((R * low.project_back(low.project(G))).sum())) < 1e-10  # orthogonal residual


def test_sm_full_rank_without_refresh_is_generic_adam():
    ours, theirs = _pair()
    sm = AdamWSM([p.data for p in ours.parameters()], lr=3e-3, rank=1000, update_proj_gap=10_000)
    plain = AdamWSN([p.data for p in theirs.parameters()], lr=3e-3, subset=None)
    _run_ref(ours, sm, 30)
    _run_ref(theirs, plain, 30)
    assert _max_rel(ours, theirs) < 1e-10


def test_sm_refresh_resets_momentum_before_update():
    shapes = [(6, 4)]
    ref = AdamWSM([torch.randn(6, 4, dtype=DT)], rank=2, update_proj_gap=3)
    for s in range(1, 7):
        g = _random_grads(shapes, s)
        ref.step(g)
        if s in (1, 3, 6):
            assert ref.refreshes_at(s)
            assert torch.allclose(ref.m[0], 0.1 * ref.proj[0].project(g[0]), rtol=1e-14)
        else:
            assert not ref.refreshes_at(s)


# ---- MuAdam --------------------------------------------------------------------------------------

def test_newton_schulz_float64_orthogonalizes():
    gen = torch.Generator().manual_seed(2)
    for shape in [(8, 5), (5, 8)]:
        X = torch.randn(*shape, generator=gen, dtype=DT)
        O = newton_schulz(X, steps=5, eps=1e-8)
        s = torch.linalg.svdvals(O)
        assert O.shape == X.shape and float(s.min()) > 0.5 and float(s.max()) < 1.3
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        assert torch.allclose(newton_schulz(X, 30, 1e-8), U @ Vh, atol=0.35)  # ~ polar factor


def test_muadam_matrix_step_by_hand_and_sania():
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(3, 5, generator=gen, dtype=DT)
    g = torch.randn(3, 5, generator=gen, dtype=DT)
    for sania in (False, True):
        W = W0.clone()
        MuAdam([W], lr=0.1, ns_steps=5, sania=sania).step([g])
        v = 0.001 * g * g
        D = (v + 1e-8) / 0.001 if sania else (v.sqrt() + 1e-8) / math.sqrt(0.001)
        X = g / D.sqrt()  # mhat = g at t = 1
        expected = W0 - 0.1 * newton_schulz(X, 5, 1e-8) / D.sqrt()
        assert torch.allclose(W, expected, rtol=1e-13)


# ---- global scalars: AdaGrad-Norm, SGDOL, MT-DAO decay ----------------------------------------------

def test_adagrad_norm_single_tensor_by_hand():
    p = torch.tensor([1.0, 2.0], dtype=DT)
    ref = AdaGradNorm([p], lr=0.5, b0=1.0)
    g1, g2 = torch.tensor([3.0, 4.0], dtype=DT), torch.tensor([0.0, 5.0], dtype=DT)
    ref.step([g1])
    assert torch.allclose(p, torch.tensor([1.0 - 0.5 * 3 / math.sqrt(26), 2.0 - 0.5 * 4 / math.sqrt(26)], dtype=DT))
    ref.step([g2])
    assert torch.allclose(p, torch.tensor([1.0 - 1.5 / math.sqrt(26), 2.0 - 2 / math.sqrt(26) - 2.5 / math.sqrt(51)], dtype=DT))


def test_adagrad_norm_is_global():
    a, b = torch.zeros(2, dtype=DT), torch.zeros(1, dtype=DT)
    AdaGradNorm([a, b], lr=1.0, b0=0.0).step([torch.tensor([3.0, 0.0], dtype=DT), torch.tensor([4.0], dtype=DT)])
    assert torch.allclose(a, torch.tensor([-0.6, 0.0], dtype=DT)) and torch.allclose(b, torch.tensor([-0.8], dtype=DT))


def test_sgdol_first_step_uses_one_over_L():
    p = torch.tensor([1.0, -1.0], dtype=DT)
    ref = SGDOL([p], smoothness=4.0, alpha=2.0)
    g, h = torch.tensor([1.0, 2.0], dtype=DT), torch.tensor([0.5, 1.0], dtype=DT)
    ref.step([g], [h])
    assert torch.allclose(p, torch.tensor([1.0 - 0.25, -1.0 - 0.5], dtype=DT))  # eta_1 = 1/L
    eta2 = (2.0 + 2.5) / (4.0 * (2.0 + 5.0))  # clip(S_ip / (L S_norm), 0, 2/L) after round 1
    assert ref.eta == pytest.approx(eta2)
    ref.step([g], [h])  # the second update uses the step size learned from round 1
    assert torch.allclose(p, torch.tensor([1.0 - 0.25 - eta2, -1.0 - 0.5 - 2 * eta2], dtype=DT))


def test_aggmo_equal_betas_is_qhadamw_and_decay_uses_lr_ratio():
    shapes = [(4, 3), (3,)]
    a = [torch.randn(*s, dtype=DT) for s in shapes]
    b = [x.clone() for x in a]
    agg = AggMoAdamW(a, lr=1e-2, betas=(0.9, 0.9, 0.99), vs=(0.3, 0.4), weight_decay=0.1)
    qh = REFERENCES["qhadamw"](b, lr=1e-2, betas=(0.9, 0.99), vs=(0.7,), weight_decay=0.1)
    for s in range(15):
        g = _random_grads(shapes, s)
        for r in (agg, qh):
            r.lr = 1e-2 * (1 - s / 20)
            r.step(g)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-13)
    # decay multiplier: lr_t / lr_0, not lr
    p = [torch.ones(2, dtype=DT)]
    r = AggMoAdamW(p, lr=0.5, weight_decay=0.1, vs=(0.0,))
    r.lr = 0.25
    r.step([torch.zeros(2, dtype=DT)])
    assert torch.allclose(p[0], torch.full((2,), 1 - 0.5 * 0.1, dtype=DT))


def test_scgadam_diminishing_coefficients():
    ref = REFERENCES["scgadam-diminishing"]([torch.zeros(2, dtype=DT)], lr=0.2)
    assert ref.coefficients(3) == (0.125, 0.125, 0.125, 0.2 / math.sqrt(3))
    p = torch.zeros(2, dtype=DT)
    r = SCGAdam([p], lr=1.0, diminishing=True, amsgrad=True, eps=0.0)
    g = torch.tensor([1.0, -2.0], dtype=DT)
    r.step([g])  # m = 0.5 g, vmax = 0.001 g^2
    assert torch.allclose(p, -0.5 * g / (0.001 * g * g).sqrt())


# ---- every registered reference runs ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_registry_entry_trains(name):
    model = make_model("mlp", DT)
    params = [p.data for p in model.parameters()]
    before = [p.clone() for p in params]
    ref = REFERENCES[name](params)
    for s in range(12):
        ref.lr = ref.lr * 0.95  # the lr attribute is live
        g = _grads_of(model, s)
        g2 = _grads_of(model, 1000 + s) if name == "sgdol" else None
        with torch.no_grad():
            ref.step(g, g2) if name == "sgdol" else ref.step(g)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    assert ref.t == 12
