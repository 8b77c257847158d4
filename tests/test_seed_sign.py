"""Sign-family, AdaGrad-Norm, Adam-L2 and MT-DAO specs against independent float64 references.

Each shipped spec (lion, signsgd, signum, generalized-signsgd, adagrad-norm, adam-l2, qhadamw,
aggmo-adamw) runs 200 steps on a small real model in float64 beside a plain reference written from
shared/algorithms.md §6-§8a (or torch.optim.Adam for adam-l2); the max relative parameter difference must
stay under 1e-6. Four configurations run compiled (lion, adagrad-norm over two parameter groups,
generalized-signsgd, aggmo-adamw), the rest eagerly. The references below use per-tensor Python loops
and torch ops only (no opdsl imports), in the authors' order of operations.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import opdsl
from conftest import loss_of, make_model, max_rel_diff, run_against_reference, run_side_by_side, two_groups
from opdsl.loader import load_spec

TOL = 1e-6
SPECS = Path(__file__).resolve().parents[1] / "specs"


pytestmark = pytest.mark.usefixtures("one_thread")


def spec_variant(name: str, old: str, new: str):
    """A shipped spec with one text edit (an ablation), loaded from text."""
    text = (SPECS / f"{name}.yaml").read_text()
    assert old in text, f"{old!r} not in {name}.yaml"
    return load_spec(f"{name}-variant.yaml", text=text.replace(old, new))


def warmup_cosine(base: float, steps: int = 200, warm: int = 20):
    """lr(step): linear warm-up then cosine decay (exercises lr_t / lr_0 and lr-scaled decay)."""

    def lr(step: int) -> float:
        if step < warm:
            return base * (step + 1) / warm
        return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))

    return lr


# ---- references (float64, per tensor, straight from the papers' / authors' update rules) -------------


class LionRef:
    """google/automl lion_pytorch.py: decay, sign of interpolation, then the momentum update."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        self.params, self.lr, self.betas, self.wd = params, lr, betas, weight_decay
        self.m = [torch.zeros_like(p) for p in params]

    def step(self, grads):
        b1, b2 = self.betas
        for p, g, m in zip(self.params, grads, self.m):
            p.mul_(1 - self.lr * self.wd)
            c = b1 * m + (1 - b1) * g
            p.add_(torch.sign(c), alpha=-self.lr)
            m.mul_(b2).add_(g, alpha=1 - b2)


class SignumRef:
    """signSGD (beta None) or Signum: sign of the gradient or of its EMA; decoupled decay first."""

    def __init__(self, params, lr=1e-3, beta=None, weight_decay=0.0):
        self.params, self.lr, self.beta, self.wd = params, lr, beta, weight_decay
        self.m = [torch.zeros_like(p) for p in params]

    def step(self, grads):
        for p, g, m in zip(self.params, grads, self.m):
            p.mul_(1 - self.lr * self.wd)
            if self.beta is None:
                d = g
            else:
                m.mul_(self.beta).add_(g, alpha=1 - self.beta)
                d = m
            p.add_(torch.sign(d), alpha=-self.lr)


class GeneralizedSignSGDRef:
    """zhenxun-zhuang/Generalized-SignSGD generalized_signsgd.py (use_bias_correction=False)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, v_of_momentum=True):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.v_of_momentum = v_of_momentum
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, grads):
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.wd:
                g = g + self.wd * p
            m.mul_(b1).add_(g, alpha=1 - b1)
            s = m if self.v_of_momentum else g
            v.mul_(b2).addcmul_(s, s, value=1 - b2)
            p.addcdiv_(m, v.sqrt() + self.eps, value=-self.lr)


class AdaGradNormRef:
    """b_t^2 = b_{t-1}^2 + ||g_t||^2 over every parameter (or per tensor); theta -= lr_i * g / b_t."""

    def __init__(self, params, lrs, b0_sq=1e-20, per_tensor=False, accumulate="sum"):
        self.params, self.lrs, self.per_tensor, self.accumulate = params, lrs, per_tensor, accumulate
        self.b0_sq = b0_sq
        self.b2 = [b0_sq] * len(params) if per_tensor else b0_sq

    def step(self, grads):
        squares = [float((g * g).sum()) for g in grads]
        if self.per_tensor:
            if self.accumulate == "sum":
                self.b2 = [b + s for b, s in zip(self.b2, squares)]
            else:
                self.b2 = [self.b0_sq + s for s in squares]
            bs = [math.sqrt(b) for b in self.b2]
        else:
            self.b2 = (self.b2 if self.accumulate == "sum" else self.b0_sq) + sum(squares)
            bs = [math.sqrt(self.b2)] * len(grads)
        for p, g, lr, b in zip(self.params, grads, self.lrs, bs):
            p.add_(g, alpha=-lr / b)


class AggMoAdamWRef:
    """MT-DAO AggMoAdamW (torchtitan experiments/fl/optimizers/aggmo_adamw.py @e9d29d4f); J=1 is QHAdamW.

    betas = (b_1, ..., b_J, beta2); vs = (w_1, ..., w_J); the decoupled decay factor is lr_t / initial_lr."""

    def __init__(self, params, lr, initial_lr, betas, vs, eps=1e-8, weight_decay=1e-5, decouple=True, amsgrad=False):
        self.params, self.lr, self.initial_lr = params, lr, initial_lr
        self.beta1s, self.beta2, self.vs = betas[:-1], betas[-1], vs
        assert len(self.beta1s) == len(vs)
        self.eps, self.wd, self.decouple, self.amsgrad = eps, weight_decay, decouple, amsgrad
        self.m = [[torch.zeros_like(p) for _ in vs] for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        t = self.t
        grad_coeff = 1.0 - sum(self.vs)
        for p, g, ms, v, vmax in zip(self.params, grads, self.m, self.v, self.vmax):
            if self.wd != 0 and not self.decouple:
                g = g.add(p, alpha=self.wd)
            if self.wd != 0 and self.decouple:
                p.mul_(1.0 - (self.lr / self.initial_lr) * self.wd)
            for m, b in zip(ms, self.beta1s):
                m.mul_(b).add_(g, alpha=1 - b)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            bc2_sqrt = math.sqrt(1.0 - self.beta2**t)
            if self.amsgrad:
                torch.maximum(vmax, v, out=vmax)
                denom = (vmax.sqrt() / bc2_sqrt).add_(self.eps)
            else:
                denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            numerator = g.mul(grad_coeff)
            for m, b, w in zip(ms, self.beta1s, self.vs):
                numerator.add_(m / (1.0 - b**t), alpha=w)
            p.addcdiv_(numerator, denom, value=-self.lr)


# ---- lion, signSGD, Signum ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, hyper, compiled",
    [("transformer", {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}, True),
     ("lstm", {"lr": 3e-4, "betas": (0.95, 0.98)}, False)],
    ids=["transformer-wd-compiled", "lstm-eager"],
)
def test_lion_matches_reference(kind, hyper, compiled):
    diff = run_against_reference(
        kind,
        lambda m: opdsl.Optimizer(m.parameters(), "lion", compile=compiled, **hyper),
        lambda ps: LionRef(ps, **hyper),
        set_lr=warmup_cosine(hyper["lr"]),
    )
    assert diff < TOL, f"lion: {diff:.3g}"


def test_signsgd_matches_reference():
    diff = run_against_reference(
        "mlp", lambda m: opdsl.Optimizer(m.parameters(), "signsgd", compile=False, lr=1e-3), lambda ps: SignumRef(ps, lr=1e-3)
    )
    assert diff < TOL, f"signsgd: {diff:.3g}"


def test_signum_matches_reference_with_decay():
    hyper = {"lr": 1e-3, "beta": 0.9, "weight_decay": 0.05}
    diff = run_against_reference(
        "lstm",
        lambda m: opdsl.Optimizer(m.parameters(), "signum", compile=False, **hyper),
        lambda ps: SignumRef(ps, **hyper),
        set_lr=warmup_cosine(1e-3),
    )
    assert diff < TOL, f"signum: {diff:.3g}"


def test_sign_specs_drop_the_decay_node_when_it_is_off():
    model = make_model("mlp", torch.float64)
    for name in ("signsgd", "signum", "lion"):
        opt = opdsl.Optimizer(model.parameters(), name, compile=False)
        assert "update" in opt._buckets[0].program.disabled, name


# ---- generalized signSGD ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, hyper, compiled",
    [("transformer", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4}, True),
     ("mlp", {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "v_of_momentum": False}, False),
     ("lstm", {"lr": 1e-3, "betas": (0.9, 0.0), "eps": 1e-12}, False)],
    ids=["transformer-l2-compiled", "mlp-v-of-grad", "lstm-beta2-0"],
)
def test_generalized_signsgd_matches_reference(kind, hyper, compiled):
    diff = run_against_reference(
        kind,
        lambda m: opdsl.Optimizer(m.parameters(), "generalized-signsgd", compile=compiled, **hyper),
        lambda ps: GeneralizedSignSGDRef(ps, **hyper),
    )
    assert diff < TOL, f"generalized-signsgd {hyper}: {diff:.3g}"


def test_generalized_signsgd_with_beta2_zero_is_signum():
    """beta2 = 0: m / (|m| + eps) -> sign(m) as eps -> 0; per-coordinate steps never exceed lr / sqrt(1-beta2)."""
    model = make_model("mlp", torch.float64)
    ref_model = copy.deepcopy(model)
    ours = opdsl.Optimizer(model.parameters(), "generalized-signsgd", compile=False, lr=1e-3, betas=(0.9, 0.0), eps=1e-30)
    ref = SignumRef([p.data for p in ref_model.parameters()], lr=1e-3, beta=0.9)
    for step in range(50):
        ours.zero_grad()
        loss_of(model, "mlp", step, torch.float64).backward()
        ours.step()
        ref_params = list(ref_model.parameters())
        for p in ref_params:
            p.grad = None
        loss_of(ref_model, "mlp", step, torch.float64).backward()
        with torch.no_grad():
            ref.step([p.grad for p in ref_params])
    assert max_rel_diff(model, ref_model) < TOL


# ---- AdaGrad-Norm (global) ------------------------------------------------------------------------------


def test_adagrad_norm_global_across_two_groups_compiled():
    """One b_t over both parameter groups (two buckets): the global reduction spans them."""
    lrs = {"matrices": 0.3, "vectors": 0.1}
    seen = {}

    def make_ours(model):
        groups = two_groups(model, lr=lrs["vectors"])
        opt = opdsl.Optimizer(groups, "adagrad-norm", compile=True, lr=lrs["matrices"], initial_accumulator_value=0.5)
        seen["opt"] = opt
        return opt

    def make_ref(ps):
        seen["ref"] = ref = AdaGradNormRef(ps, [lrs["matrices"] if p.ndim >= 2 else lrs["vectors"] for p in ps], b0_sq=0.5)
        return ref

    diff = run_against_reference("mlp", make_ours, make_ref)
    assert diff < TOL, f"adagrad-norm: {diff:.3g}"
    opt, ref = seen["opt"], seen["ref"]
    assert len(opt._buckets) == 2
    b2 = [float(b.state["scaled.b2"]) for b in opt._buckets]
    assert b2[0] == b2[1] and abs(b2[0] - ref.b2) / ref.b2 < 1e-12


@pytest.mark.parametrize("variant", ["default", "per-tensor", "normalized"])
def test_adagrad_norm_variants_eager(variant):
    spec, ref_kw = "adagrad-norm", {}
    if variant == "per-tensor":
        spec, ref_kw = spec_variant("adagrad-norm", "span: global", "span: tensor"), {"per_tensor": True}
    elif variant == "normalized":
        spec, ref_kw = spec_variant("adagrad-norm", "accumulate: sum", "accumulate: none"), {"accumulate": "none"}
    diff = run_against_reference(
        "transformer",
        lambda m: opdsl.Optimizer(m.parameters(), spec, compile=False, lr=0.05 if variant != "normalized" else 0.01),
        lambda ps: AdaGradNormRef(ps, [0.05 if variant != "normalized" else 0.01] * len(ps), **ref_kw),
    )
    assert diff < TOL, f"adagrad-norm {variant}: {diff:.3g}"


# ---- Adam with L2 (the adamw graph with the decay node moved onto the gradient) ---------------------


def test_adam_l2_matches_torch_adam_float64():
    diff = run_side_by_side(
        "transformer",
        lambda m: opdsl.Optimizer(two_groups(m, weight_decay=0.0, lr=3e-3), "adam-l2", compile=False),
        lambda m: torch.optim.Adam(two_groups(m, weight_decay=0.0, lr=3e-3), weight_decay=1e-2, foreach=False),
        dtype=torch.float64,
    )
    assert diff < TOL, f"adam-l2: {diff:.3g}"


def test_adam_l2_and_adamw_differ_only_by_the_decay_placement():
    l2, w = load_spec("adam-l2").main.nodes, load_spec("adamw").main.nodes
    assert {n: b.block for n, b in l2.items()}.keys() - {"g"} == {n: b.block for n, b in w.items()}.keys() - {"update"}
    assert l2["g"].block == "weight-decay" and l2["g"].input == "grad"
    assert w["update"].block == "decoupled-decay" and w["update"].input == "adam"
    assert load_spec("adam-l2").hyper == load_spec("adamw").hyper


# ---- MT-DAO: QHAdamW and AggMoAdamW ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, hyper",
    [("mlp", {"lr": 3e-3, "initial_lr": 3e-3, "weight_decay": 1e-3}),
     ("lstm", {"lr": 1e-3, "initial_lr": 1e-3, "betas": (0.8, 0.99), "vs": (0.5,), "weight_decay": 0.01, "decouple": False}),
     ("mlp", {"lr": 1e-3, "initial_lr": 1e-3, "vs": (1.0,), "weight_decay": 5e-3, "amsgrad": True})],
    ids=["decoupled", "coupled", "amsgrad-nu1"],
)
def test_qhadamw_matches_reference(kind, hyper):
    ref_kw = {"betas": (0.9, 0.95), "vs": (0.7,), **hyper}
    diff = run_against_reference(
        kind,
        lambda m: opdsl.Optimizer(m.parameters(), "qhadamw", compile=False, **hyper),
        lambda ps: AggMoAdamWRef(ps, **ref_kw),
        set_lr=warmup_cosine(hyper["lr"]),
    )
    assert diff < TOL, f"qhadamw {hyper}: {diff:.3g}"


def test_aggmo_adamw_matches_reference_compiled():
    hyper = {"lr": 2e-3, "initial_lr": 2e-3, "weight_decay": 1e-3}
    diff = run_against_reference(
        "transformer",
        lambda m: opdsl.Optimizer(m.parameters(), "aggmo-adamw", compile=True, **hyper),
        lambda ps: AggMoAdamWRef(ps, betas=(0.9, 0.99, 0.95), vs=(0.7, 0.2), **hyper),
        set_lr=warmup_cosine(hyper["lr"]),
    )
    assert diff < TOL, f"aggmo-adamw: {diff:.3g}"


def test_aggmo_adamw_with_a_torch_scheduler_keeps_initial_lr():
    """LR schedulers setdefault `initial_lr`: the value passed (= lr) stays, and is their base lr."""
    model = make_model("mlp", torch.float64)
    ref_model = copy.deepcopy(model)
    hyper = {"lr": 3e-3, "initial_lr": 3e-3, "weight_decay": 2e-3, "betas": (0.8, 0.9, 0.99), "vs": (0.4, 0.4)}
    opt = opdsl.Optimizer(model.parameters(), "aggmo-adamw", compile=False, **hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.97**s)
    assert sched.base_lrs == [3e-3] and opt.param_groups[0]["initial_lr"] == 3e-3
    ref_params = list(ref_model.parameters())
    ref = AggMoAdamWRef([p.data for p in ref_params], **hyper)
    for step in range(200):
        ref.lr = 3e-3 * 0.97**step
        assert abs(opt.param_groups[0]["lr"] - ref.lr) < 1e-15
        opt.zero_grad()
        loss_of(model, "mlp", step, torch.float64).backward()
        opt.step()
        sched.step()
        for p in ref_params:
            p.grad = None
        loss_of(ref_model, "mlp", step, torch.float64).backward()
        with torch.no_grad():
            ref.step([p.grad for p in ref_params])
    assert opt.param_groups[0]["initial_lr"] == 3e-3
    assert max_rel_diff(model, ref_model) < TOL


def test_initial_lr_follows_lr_when_not_given():
    opt = opdsl.Optimizer(make_model("mlp").parameters(), "qhadamw", compile=False, lr=3e-4)
    assert opt.param_groups[0]["initial_lr"] == 3e-4


# ---- the multi-timescale mixer's validation ------------------------------------------------------------


def test_multi_timescale_mixer_checks_its_weights():
    text = (SPECS / "aggmo-adamw.yaml").read_text()
    with pytest.raises(opdsl.SpecError, match="`weights` has 1 entries but `momenta` has 2"):
        load_spec("bad.yaml", text=text.replace('weights: ["$vs[0]", "$vs[1]"]', 'weights: ["$vs[0]"]'))
    with pytest.raises(opdsl.SpecError, match="unknown hyperparameter '\\$ws'"):
        load_spec("bad.yaml", text=text.replace('"$vs[1]"]', '"$ws[1]"]'))
    model = make_model("mlp")
    with pytest.raises(ValueError, match="sums to 1.2; the weights must sum to at most 1"):
        opdsl.Optimizer(model.parameters(), "aggmo-adamw", compile=False, vs=(0.7, 0.5))
    with pytest.raises(ValueError, match="weights\\[0\\]' \\(= \\$vs\\[0\\]\\) is -0.1"):
        opdsl.Optimizer(model.parameters(), "aggmo-adamw", compile=False, vs=(-0.1, 0.5))
