"""The conjugate-gradient family (issue 3): scsadamw (+ -sigmoid, -restart), scgadam, scgamsgrad,
scgadam-diminishing and coba (HS, FR, PRP, DY, HZ, CD, LS), each against a plain float64 reference
written straight from /work/shared/algorithms.md §1-§2 (loops over parameters, torch ops only, no opdsl),
over 200 steps on small real models, with two parameter groups, eager and compiled.

The references live in this file because the specs' tests need per-group hyperparameters, SCSAdamW's
global sums across groups, and the CD/LS rules; the last tests check that they agree with the shared
registry (tests/references), an independent writing of the same algorithms.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import opdsl
from conftest import loss_of, make_model, max_rel_diff, two_groups
from opdsl.loader import load_spec, shipped_specs
from references import REFERENCES

TOL = 1e-6
STEPS = 200


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- float64 references ------------------------------------------------------------------------------


def _per_param(params, base: dict, second: dict) -> list[dict]:
    """Hyperparameters of each parameter: matrices take ``base``, vectors ``base | second`` (two_groups)."""
    return [dict(base, **(second if p.ndim < 2 else {})) for p in params]


class SCSAdamWReference:
    """algorithms.md §1 with the project decisions: lam = (c - b) / (a - 2b + c) weighs the OLD direction,
    clip to [0,1] (or sigmoid(clip(., -5, 5))), d_t = g_t at t = 1, at restarts and when a - 2b + c == 0;
    v from raw g^2, bias-corrected; no bias correction of d; decoupled decay on theta_{t-1}."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, scope="global",
                 smoothing="clip", restart_every=0, second=None):
        self.params = params
        self.hyper = _per_param(params, dict(lr=lr, weight_decay=weight_decay), second or {})
        self.beta2, self.eps = betas[1], eps
        self.scope, self.smoothing, self.restart_every = scope, smoothing, restart_every
        self.d = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def lam(self, a: float, b: float, c: float) -> float:
        restart = self.restart_every > 0 and (self.t - 1) % self.restart_every == 0
        q = a - 2 * b + c
        if self.t == 1 or restart or q == 0:
            return 0.0
        raw = (c - b) / q
        if self.smoothing == "clip":
            return min(max(raw, 0.0), 1.0)
        return 1.0 / (1.0 + math.exp(-min(max(raw, -5.0), 5.0)))

    def step(self, grads):
        self.t += 1
        abc = [(float((d * d).sum()), float((d * g).sum()), float((g * g).sum())) for d, g in zip(self.d, grads)]
        if self.scope == "global":
            total = self.lam(*(sum(x[i] for x in abc) for i in range(3)))
            lams = [total] * len(self.params)
        else:
            lams = [self.lam(*x) for x in abc]
        for i, (p, g) in enumerate(zip(self.params, grads)):
            h = self.hyper[i]
            self.d[i] = lams[i] * self.d[i] + (1 - lams[i]) * g
            self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * g * g
            vhat = self.v[i] / (1 - self.beta2**self.t)
            p.mul_(1 - h["lr"] * h["weight_decay"])
            p.sub_(h["lr"] * self.d[i] / (vhat.sqrt() + self.eps))


class SCGReference:
    """algorithms.md §2 (SCGAdam / SCGAdam2 code) in the code's descent form G = -D:
    G_1 = -g_1, G_n = -(1 + gamma_n) g_n + delta_n G_{n-1}; m of G with beta1_n; v of g^2; coupled L2.
    Adam: theta += lr_n (m / (1 - betas[0]^n)) / (sqrt(v)/sqrt(1 - b2^n) + eps) (constant betas[0], as the code);
    AMSGrad: theta += lr_n m / (sqrt(vmax) + eps)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma=0.1, delta=1e-3,
                 amsgrad=False, diminishing=False, second=None):
        self.params = params
        self.hyper = _per_param(params, dict(lr=lr, weight_decay=weight_decay), second or {})
        self.betas, self.eps, self.amsgrad = betas, eps, amsgrad
        if diminishing:  # 'D1' = 0.5^n for gamma, delta and beta1; 'D0' = 1/sqrt(n) on the step size
            self.gamma = self.delta = self.beta1 = lambda n: 0.5**n
            self.lr_seq = lambda n: 1 / math.sqrt(n)
        else:
            self.gamma, self.delta = (lambda n: gamma), (lambda n: delta)
            self.beta1, self.lr_seq = (lambda n: betas[0]), (lambda n: 1.0)
        self.G = [None] * len(params)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]
        self.n = 0

    def step(self, grads):
        self.n += 1
        n, b2 = self.n, self.betas[1]
        for i, (p, g) in enumerate(zip(self.params, grads)):
            h = self.hyper[i]
            if h["weight_decay"] != 0:
                g = g + h["weight_decay"] * p
            self.G[i] = -g if n == 1 else -(1 + self.gamma(n)) * g + self.delta(n) * self.G[i]
            b1 = self.beta1(n)
            self.m[i] = b1 * self.m[i] + (1 - b1) * self.G[i]
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            lr = h["lr"] * self.lr_seq(n)
            if self.amsgrad:
                self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
                p.add_(lr * self.m[i] / (self.vmax[i].sqrt() + self.eps))
            else:
                bc1, bc2 = 1 - self.betas[0] ** n, 1 - b2**n
                p.add_(lr / bc1 * self.m[i] / (self.v[i].sqrt() / math.sqrt(bc2) + self.eps))


class CoBAReference:
    """algorithms.md §2 (CoBA) in the paper's descent form: d_1 = -g_1, d_n = -g_n + (M/n^a) beta_n d_{n-1};
    signed denominators den + (eps if den >= 0 else -eps), FR/PRP den + eps; inner products per tensor or
    over the last axis (the authors' inner()); m of d, v of g^2, Adam or AMSGrad as SCGAdam; coupled L2."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, M=1e-3, a=1 + 1e-8,
                 lam=2.0, rule="HS", scope="tensor", amsgrad=False, second=None):
        self.params = params
        self.hyper = _per_param(params, dict(lr=lr, weight_decay=weight_decay), second or {})
        self.betas, self.eps, self.M, self.a, self.lam = betas, eps, M, a, lam
        self.rule, self.scope, self.amsgrad = rule, scope, amsgrad
        self.d = [None] * len(params)
        self.prev = [None] * len(params)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]
        self.n = 0

    def inner(self, x, y):
        return (x * y).sum() if self.scope == "tensor" else (x * y).sum(-1, keepdim=True)

    def signed(self, den):
        return den + torch.where(den >= 0, self.eps, -self.eps)

    def beta(self, g, gp, d):
        y, eps, ip = g - gp, self.eps, self.inner
        return {
            "HS": lambda: ip(g, y) / self.signed(ip(d, y)),
            "FR": lambda: ip(g, g) / (ip(gp, gp) + eps),
            "PRP": lambda: ip(g, y) / (ip(gp, gp) + eps),
            "DY": lambda: ip(g, g) / self.signed(ip(d, y)),
            "HZ": lambda: ip(g, y) / self.signed(ip(d, y)) - self.lam * ip(y, y) * ip(g, d) / (ip(d, y) ** 2 + eps),
            "CD": lambda: -ip(g, g) / self.signed(ip(d, gp)),
            "LS": lambda: -ip(g, y) / self.signed(ip(d, gp)),
        }[self.rule]()

    def step(self, grads):
        self.n += 1
        n, (b1, b2) = self.n, self.betas
        for i, (p, g) in enumerate(zip(self.params, grads)):
            h = self.hyper[i]
            if h["weight_decay"] != 0:
                g = g + h["weight_decay"] * p
            if n == 1:
                self.d[i] = -g
            else:
                self.d[i] = -g + self.M / n**self.a * self.beta(g, self.prev[i], self.d[i]) * self.d[i]
            self.prev[i] = g.clone()
            self.m[i] = b1 * self.m[i] + (1 - b1) * self.d[i]
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            if self.amsgrad:
                self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
                p.add_(h["lr"] * self.m[i] / (self.vmax[i].sqrt() + self.eps))
            else:
                bc1, bc2 = 1 - b1**n, 1 - b2**n
                p.add_(h["lr"] / bc1 * self.m[i] / (self.v[i].sqrt() / math.sqrt(bc2) + self.eps))


# ---- helpers -----------------------------------------------------------------------------------------


def variant(name: str, *edits: tuple[str, str]):
    """A shipped spec with textual edits (each must apply), loaded and validated like any spec file."""
    text = shipped_specs()[name].read_text()
    for old, new in edits:
        assert old in text, f"{old!r} not in {name}.yaml"
        text = text.replace(old, new)
    return load_spec(f"{name}-test", text=text)


def trajectory(kind, spec, make_ref, *, compiled=False, second=None, steps=STEPS, **hyper):
    """Train one model with the spec (two groups when ``second`` is given) and a copy with the reference;
    return (max rel diff, our model, our optimizer, reference)."""
    model = make_model(kind, torch.float64)
    ref_model = copy.deepcopy(model)
    params = two_groups(model, **second) if second is not None else model.parameters()
    opt = opdsl.Optimizer(params, spec, compile=compiled, **hyper)
    ref_params = list(ref_model.parameters())
    ref = make_ref([p.data for p in ref_params])
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, kind, step, torch.float64).backward()
        opt.step()
        for p in ref_params:
            p.grad = None
        loss_of(ref_model, kind, step, torch.float64).backward()
        with torch.no_grad():
            ref.step([p.grad for p in ref_params])
    for p in model.parameters():
        assert torch.isfinite(p).all()
    return max_rel_diff(model, ref_model), model, opt, ref


# ---- SCSAdamW ----------------------------------------------------------------------------------------

SECOND = {"weight_decay": 0.0, "lr": 2e-3}


@pytest.mark.parametrize(
    "name, kind, compiled, ref_kw",
    [
        ("scsadamw", "transformer", True, {}),
        ("scsadamw-sigmoid", "lstm", False, {"smoothing": "sigmoid"}),
        ("scsadamw-restart", "mlp", False, {"restart_every": 100}),
    ],
    ids=["scsadamw-transformer-compiled", "sigmoid-lstm-eager", "restart-mlp-eager"],
)
def test_scsadamw_matches_reference(name, kind, compiled, ref_kw):
    diff, *_ = trajectory(
        kind, name, lambda ps: SCSAdamWReference(ps, second=SECOND, **ref_kw), compiled=compiled, second=SECOND
    )
    assert diff < TOL, diff


def test_scsadamw_global_scope_differs_from_tensor_scope():
    """Each scope equals its own reference; the two trajectories are far apart (the scope is real)."""
    per_tensor = variant("scsadamw", ("scope: global", "scope: tensor"))
    runs = {}
    for scope, spec in (("global", "scsadamw"), ("tensor", per_tensor)):
        diff, model, _, _ = trajectory(
            "mlp", spec, lambda ps: SCSAdamWReference(ps, scope=scope, second=SECOND), second=SECOND
        )
        assert diff < TOL, (scope, diff)
        runs[scope] = model
    assert max_rel_diff(runs["global"], runs["tensor"]) > 1e-3


def test_scsadamw_restart_sets_direction_to_gradient():
    """With restart_every K = 100 the stored direction is the gradient at t = 101, and not at t = 100."""
    model = make_model("mlp", torch.float64)
    opt = opdsl.Optimizer(model.parameters(), "scsadamw-restart", compile=False)
    for step in range(101):
        opt.zero_grad()
        loss_of(model, "mlp", step, torch.float64).backward()
        opt.step()
        if step + 1 in (100, 101):
            same = all(torch.equal(opt.state[p]["d.d"], p.grad) for p in model.parameters())
            assert same == (step + 1 == 101)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("smoothing", ["clip", "sigmoid"])
@pytest.mark.parametrize("repeated", ["random", "zero"])
def test_min_norm_is_nan_free_when_direction_equals_gradient(scope, smoothing, repeated):
    """||d - g||^2 == 0 (the same gradient again; an all-zero gradient) gives d_t = g_t, not 0/0."""
    spec = variant("scsadamw", ("scope: global", f"scope: {scope}"), ("smoothing: clip", f"smoothing: {smoothing}"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    opt = opdsl.Optimizer(model.parameters(), spec, compile=False)
    params = list(model.parameters())
    fixed = [torch.randn_like(p) if repeated == "random" else torch.zeros_like(p) for p in params]
    for _ in range(3):
        for p, g in zip(params, fixed):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, fixed):
            assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["d.d"]).all()
            assert torch.equal(opt.state[p]["d.d"], g)
    assert opt.skipped_steps == 0


# ---- SCGAdam ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind, compiled, ref_kw",
    [
        ("scgadam", "lstm", True, {}),
        ("scgamsgrad", "transformer", False, {"amsgrad": True}),
        ("scgadam-diminishing", "mlp", False, {"diminishing": True}),
    ],
    ids=["scgadam-lstm-compiled", "scgamsgrad-transformer-eager", "diminishing-mlp-eager"],
)
def test_scg_matches_reference(name, kind, compiled, ref_kw):
    hyper = {"weight_decay": 1e-2}  # coupled L2 on the matrices, none on the vectors
    second = {"weight_decay": 0.0, "lr": 2e-3}
    diff, *_ = trajectory(
        kind, name, lambda ps: SCGReference(ps, second=second, **hyper, **ref_kw), compiled=compiled,
        second=second, **hyper,
    )
    assert diff < TOL, diff


# ---- CoBA ---------------------------------------------------------------------------------------------

RULES = ["HS", "FR", "PRP", "DY", "HZ", "CD", "LS"]
# A larger conjugate term than the default M = 1e-3, so every rule shows, yet well conditioned: at M = a = 1
# the DY and HZ trajectories amplify rounding (1e-16 -> 1e-5 over 200 steps) and no reference can match.
RULE_HYPER = {"M": 0.05, "a": 1.0001}


def coba_spec(rule: str = "HS", scope: str = "tensor"):
    return variant("coba", ("coefficient: HS", f"coefficient: {rule}"), ("scope: tensor", f"scope: {scope}"))


_RULE_FINALS: dict[str, torch.nn.Module] = {}  # rule -> model trained by it (filled by the rule tests)


@pytest.mark.parametrize("rule", RULES)
def test_coba_rule_matches_reference(rule):
    second = {"lr": 2e-3}
    diff, model, _, _ = trajectory(
        "mlp", coba_spec(rule), lambda ps: CoBAReference(ps, rule=rule, second=second, **RULE_HYPER),
        second=second, **RULE_HYPER,
    )
    assert diff < TOL, diff
    _RULE_FINALS[rule] = model


def test_coba_rules_give_distinct_trajectories():
    """The rules' trajectories (the rule tests' models, or reference runs when those did not run) differ by
    several TOL, so each rule test pins its own formula, not a neighbour's."""
    finals = {}
    for rule in RULES:
        if rule in _RULE_FINALS:
            finals[rule] = _RULE_FINALS[rule]
            continue
        model = make_model("mlp", torch.float64)
        ref = CoBAReference([p.data for p in model.parameters()], rule=rule, second={"lr": 2e-3}, **RULE_HYPER)
        for step in range(STEPS):
            model.zero_grad()
            loss_of(model, "mlp", step, torch.float64).backward()
            with torch.no_grad():
                ref.step([p.grad for p in model.parameters()])
        finals[rule] = model
    for i, a in enumerate(RULES):
        for b in RULES[i + 1 :]:
            # closest pairs: PRP/LS and FR/CD (their denominators differ by <d, g_{n-1}> vs -||g_{n-1}||^2)
            assert max_rel_diff(finals[a], finals[b]) > 5 * TOL, (a, b)


@pytest.mark.parametrize(
    "kind, scope, amsgrad, compiled",
    [
        ("transformer", "tensor", False, True),
        ("lstm", "row", False, True),
        ("mlp", "tensor", True, False),
    ],
    ids=["hs-transformer-compiled", "hs-row-lstm-compiled", "hs-amsgrad-mlp-eager"],
)
def test_coba_matches_reference(kind, scope, amsgrad, compiled):
    """The shipped defaults (HS, M = 1e-3): per tensor, per row (the authors' inner()), AMSGrad branch."""
    second = {"lr": 2e-3, "weight_decay": 0.0}
    hyper = {"weight_decay": 1e-2, "amsgrad": amsgrad}
    diff, *_ = trajectory(
        kind, coba_spec("HS", scope), lambda ps: CoBAReference(ps, scope=scope, second=second, **hyper),
        compiled=compiled, second=second, **hyper,
    )
    assert diff < TOL, diff


def test_coba_row_scope_differs_from_tensor_scope():
    runs = {}
    for scope in ("tensor", "row"):
        _, model, _, _ = trajectory(
            "lstm", coba_spec("HS", scope), lambda ps: CoBAReference(ps, scope=scope, **RULE_HYPER), steps=50,
            **RULE_HYPER,
        )
        runs[scope] = model
    assert max_rel_diff(runs["tensor"], runs["row"]) > 1e-4


# ---- the in-file references against the shared registry (tests/references) ---------------------------

CROSS_CHECKS = [
    ("scsadamw", {}, SCSAdamWReference, {}),
    ("scsadamw", {"scope": "tensor"}, SCSAdamWReference, {"scope": "tensor"}),
    ("scsadamw-sigmoid", {}, SCSAdamWReference, {"smoothing": "sigmoid"}),
    ("scsadamw-restart", {}, SCSAdamWReference, {"restart_every": 100}),
    ("scgadam", {"weight_decay": 1e-2}, SCGReference, {"weight_decay": 1e-2}),
    ("scgamsgrad", {"weight_decay": 1e-2}, SCGReference, {"weight_decay": 1e-2, "amsgrad": True}),
    ("scgadam-diminishing", {"weight_decay": 1e-2}, SCGReference, {"weight_decay": 1e-2, "diminishing": True}),
    *[("coba", {"rule": r, **RULE_HYPER}, CoBAReference, {"rule": r, **RULE_HYPER}) for r in RULES[:5]],
    ("coba", {"scope": "row", "weight_decay": 1e-2}, CoBAReference, {"scope": "row", "weight_decay": 1e-2}),
    ("coba", {"amsgrad": True}, CoBAReference, {"amsgrad": True}),
]


@pytest.mark.parametrize(
    "name, shared_kw, ours, ours_kw", CROSS_CHECKS,
    ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items() if k not in RULE_HYPER)}" for c in CROSS_CHECKS],
)
def test_in_file_reference_agrees_with_shared_registry(name, shared_kw, ours, ours_kw):
    """Two independent float64 writings of each algorithm (this file's, needed for per-group hyperparameters,
    global sums across groups and the CD/LS rules; and tests/references') give the same trajectory, so
    the spec tests above hold against the shared registry too."""
    kind = "lstm" if shared_kw.get("scope") == "row" else "mlp"
    models = [make_model(kind, torch.float64) for _ in range(2)]
    refs = [REFERENCES[name]([p.data for p in models[0].parameters()], **shared_kw),
            ours([p.data for p in models[1].parameters()], **ours_kw)]
    for step in range(STEPS // 2):  # formulas that differ part within a few steps; 100 keeps the file fast
        for model, ref in zip(models, refs):
            model.zero_grad()
            loss_of(model, kind, step, torch.float64).backward()
            with torch.no_grad():
                ref.step([p.grad for p in model.parameters()])
    assert max_rel_diff(models[1], models[0]) < TOL / 100
