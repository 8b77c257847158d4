"""Every shipped spec with a torch.optim counterpart follows torch's trajectory.

200 steps on small real models (an MLP, an LSTM, a transformer layer), two parameter groups with their
own hyperparameters, a OneCycle LR schedule; max relative parameter difference 1e-5 in float32
(1e-2 for Muon's bfloat16 Newton-Schulz). Each main configuration runs compiled; variants run eagerly
(the two paths share one step function, and test_eager_compiled checks they agree).
"""
from __future__ import annotations

import pytest
import torch

import opdsl
import copy

from conftest import loss_of, make_model, max_rel_diff, run_side_by_side, two_groups, with_node

TOL = 1e-5
TOL_MUON_FP32 = 1e-4

# (id, spec, model kind, opdsl kwargs, torch factory, torch kwargs, second-group overrides, compile)
CASES = [
    ("adamw", "adamw", "transformer", {}, torch.optim.AdamW, {}, {"weight_decay": 0.0, "lr": 3e-3}, True),
    ("adamw-amsgrad", "adamw", "mlp", {"amsgrad": True, "betas": (0.8, 0.99)}, torch.optim.AdamW, {"amsgrad": True, "betas": (0.8, 0.99)}, {"weight_decay": 0.0}, False),
    ("adam-l2", "adam", "lstm", {"weight_decay": 1e-2}, torch.optim.Adam, {"weight_decay": 1e-2}, {"weight_decay": 0.0}, True),
    ("adam-amsgrad", "adam", "mlp", {"amsgrad": True}, torch.optim.Adam, {"amsgrad": True}, {"eps": 1e-6}, False),
    ("sgd-nesterov", "sgd", "mlp", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, {"weight_decay": 0.0}, True),
    ("sgd-dampening", "sgd", "lstm", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}, torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}, {"lr": 0.01}, False),
    ("sgd-plain", "sgd", "mlp", {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}, {"weight_decay": 1e-2}, False),
    ("adagrad", "adagrad", "mlp", {"lr_decay": 1e-3, "weight_decay": 1e-3, "initial_accumulator_value": 0.1}, torch.optim.Adagrad, {"lr_decay": 1e-3, "weight_decay": 1e-3, "initial_accumulator_value": 0.1}, {"lr": 0.05}, True),
    ("adamax", "adamax", "mlp", {"lr": 2e-3, "weight_decay": 1e-2}, torch.optim.Adamax, {"lr": 2e-3, "weight_decay": 1e-2}, {"betas": (0.8, 0.99)}, True),
    ("nadam", "nadam", "mlp", {"lr": 2e-3, "weight_decay": 1e-2}, torch.optim.NAdam, {"lr": 2e-3, "weight_decay": 1e-2}, {"betas": (0.8, 0.99)}, True),
    ("nadam-decoupled", "nadam", "lstm", {"weight_decay": 0.1, "decoupled_weight_decay": True, "momentum_decay": 8e-3}, torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True, "momentum_decay": 8e-3}, {"lr": 1e-3}, False),
    ("radam", "radam", "transformer", {"lr": 1e-3, "weight_decay": 1e-2}, torch.optim.RAdam, {"lr": 1e-3, "weight_decay": 1e-2}, {"betas": (0.9, 0.99)}, True),
    ("radam-decoupled", "radam", "mlp", {"weight_decay": 0.1, "decoupled_weight_decay": True}, torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 3e-3}, False),
    ("rmsprop", "rmsprop", "transformer", {"lr": 1e-3}, torch.optim.RMSprop, {"lr": 1e-3}, {"weight_decay": 1e-2}, True),
    ("rmsprop-centered-momentum", "rmsprop", "mlp", {"lr": 1e-3, "centered": True, "momentum": 0.9}, torch.optim.RMSprop, {"lr": 1e-3, "centered": True, "momentum": 0.9}, {"alpha": 0.9}, False),
    ("adadelta", "adadelta", "transformer", {"lr": 0.5, "rho": 0.8, "weight_decay": 1e-2}, torch.optim.Adadelta, {"lr": 0.5, "rho": 0.8, "weight_decay": 1e-2}, {"weight_decay": 0.0, "eps": 1e-5}, True),
    ("adadelta-defaults", "adadelta", "lstm", {}, torch.optim.Adadelta, {}, {"rho": 0.95}, False),
    ("rprop", "rprop", "transformer", {"lr": 2e-2, "etas": (0.4, 1.3), "step_sizes": (1e-5, 0.1)}, torch.optim.Rprop, {"lr": 2e-2, "etas": (0.4, 1.3), "step_sizes": (1e-5, 0.1)}, {"lr": 5e-3}, True),
    # the second group's first step size (lr 5.0, 0.2 after OneCycle's warm start) is clamped to step_sizes[1] at step 1
    ("rprop-first-step-clamped", "rprop", "mlp", {"step_sizes": (1e-6, 0.05)}, torch.optim.Rprop, {"step_sizes": (1e-6, 0.05)}, {"lr": 5.0, "etas": (0.6, 1.1)}, False),
    # t0 = 50: the average starts at step 51 (mu < 1 from step 52)
    ("asgd", "asgd", "transformer", {"lr": 5e-2, "lambd": 1e-3, "alpha": 0.6, "t0": 50.0, "weight_decay": 1e-2}, torch.optim.ASGD, {"lr": 5e-2, "lambd": 1e-3, "alpha": 0.6, "t0": 50.0, "weight_decay": 1e-2}, {"weight_decay": 0.0, "lr": 2e-2}, True),
    ("asgd-defaults", "asgd", "lstm", {}, torch.optim.ASGD, {}, {"lambd": 1e-2, "t0": 10.0}, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(case):
    _, spec, kind, ours_kw, torch_cls, torch_kw, second, compiled = case
    diff = run_side_by_side(
        kind,
        lambda m: opdsl.Optimizer(two_groups(m, **second), spec, compile=compiled, **ours_kw),
        lambda m: torch_cls(two_groups(m, **second), foreach=False, **torch_kw),
    )
    assert diff < TOL, f"{spec}: max relative parameter difference {diff:.3g} >= {TOL}"


# (spec, kwargs for both, torch factory, compile): maximize=True climbing a reward (the negated loss)
MAXIMIZE_CASES = [
    ("adamw", {"weight_decay": 0.1}, torch.optim.AdamW, True),
    ("adam", {"weight_decay": 1e-2, "amsgrad": True}, torch.optim.Adam, False),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, torch.optim.SGD, False),
    ("adagrad", {"lr_decay": 1e-3, "weight_decay": 1e-3}, torch.optim.Adagrad, False),
    ("rmsprop", {"lr": 1e-3, "centered": True, "momentum": 0.9}, torch.optim.RMSprop, False),
    ("nadam", {"weight_decay": 1e-2}, torch.optim.NAdam, False),
    ("adadelta", {"weight_decay": 1e-2}, torch.optim.Adadelta, False),
    ("rprop", {"step_sizes": (1e-6, 0.05)}, torch.optim.Rprop, False),
    ("asgd", {"t0": 20.0, "weight_decay": 1e-2}, torch.optim.ASGD, False),
]


@pytest.mark.parametrize("case", MAXIMIZE_CASES, ids=[c[0] for c in MAXIMIZE_CASES])
def test_maximize_matches_torch(case):
    """torch negates the gradient before anything else (L2 decay included); opdsl's graphs see -g."""
    spec, kwargs, torch_cls, compiled = case
    diff = run_side_by_side(
        "mlp",
        lambda m: opdsl.Optimizer(two_groups(m), spec, compile=compiled, maximize=True, **kwargs),
        lambda m: torch_cls(two_groups(m), foreach=False, maximize=True, **kwargs),
        reward=True,
    )
    assert diff < TOL, f"{spec}: max relative parameter difference {diff:.3g} >= {TOL}"


def test_maximize_set_in_one_group_mid_run_follows_torch():
    """A group option as in torch: one group switched to ascent after 30 steps (opdsl re-plans once)."""
    ours_model = make_model("mlp")
    ref_model = copy.deepcopy(ours_model)
    ours = opdsl.Optimizer(two_groups(ours_model), "adamw", compile=False)
    ref = torch.optim.AdamW(two_groups(ref_model), foreach=False)
    for step in range(60):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            if step == 30:
                opt.param_groups[1]["maximize"] = True
            opt.zero_grad()
            loss_of(model, "mlp", step).backward()
            opt.step()
    assert max_rel_diff(ours_model, ref_model) < TOL
    saved = ours.state_dict()
    assert saved["param_groups"][1]["maximize"] is True
    del saved["param_groups"][1]["maximize"]  # a checkpoint from before the option: it descended, as torch reads it
    ours.load_state_dict(saved)
    assert ours.param_groups[1]["maximize"] is False and "maximize=True" not in ours.describe()
    ours.param_groups[0]["maximize"] = True
    assert "param_groups[0] graph=main: lr=" in ours.describe() and "maximize=True" in ours.describe()


@pytest.mark.parametrize("spec, torch_cls", [("rprop", torch.optim.Rprop), ("adadelta", torch.optim.Adadelta)])
def test_a_parameter_whose_first_gradient_comes_late_starts_as_in_torch(spec, torch_cls):
    """torch creates a parameter's state at its first gradient: Rprop's step size starts at lr there, not at
    the group's first step (its state starts at -1, a value no step leaves)."""
    ours_model = make_model("mlp")
    ref_model = copy.deepcopy(ours_model)
    ours = opdsl.Optimizer(ours_model.parameters(), spec, compile=False)
    ref = torch_cls(ref_model.parameters(), foreach=False)
    for step in range(12):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            loss_of(model, "mlp", step).backward()
            if step < 5:
                model[0].weight.grad = None  # the first layer is unfrozen at step 5
            opt.step()
    assert max_rel_diff(ours_model, ref_model) < TOL


TOL_FLOAT64 = 1e-14
# The specs written with `map` nodes, in float64, against torch in float64: (id, spec, model kind, kwargs for
# both, torch factory, second-group overrides, {opdsl state key: torch state key} compared after the run).
FLOAT64_CASES = [
    ("adamax", "adamax", "mlp", {"weight_decay": 1e-2}, torch.optim.Adamax, {"betas": (0.8, 0.99)},
     {"m.value": "exp_avg", "u.value": "exp_inf"}),
    ("nadam", "nadam", "mlp", {"weight_decay": 1e-2}, torch.optim.NAdam, {"betas": (0.8, 0.99)},
     {"m.value": "exp_avg", "v.value": "exp_avg_sq", "prod.value": "mu_product"}),
    ("radam", "radam", "mlp", {"weight_decay": 1e-2}, torch.optim.RAdam, {"betas": (0.9, 0.99)},
     {"m.value": "exp_avg", "v.value": "exp_avg_sq"}),
    ("adadelta", "adadelta", "mlp", {"lr": 0.5, "rho": 0.8, "weight_decay": 1e-2}, torch.optim.Adadelta, {"eps": 1e-5},
     {"square_avg.value": "square_avg", "acc_delta.value": "acc_delta"}),
    ("rprop", "rprop", "mlp", {"lr": 2e-2, "etas": (0.4, 1.3), "step_sizes": (1e-5, 0.1)}, torch.optim.Rprop, {"lr": 5.0},
     {"prev.value": "prev", "step_size.value": "step_size"}),
    ("asgd", "asgd", "mlp", {"lr": 5e-2, "lambd": 1e-3, "alpha": 0.6, "t0": 50.0, "weight_decay": 1e-2}, torch.optim.ASGD,
     {"lr": 2e-2, "weight_decay": 0.0}, {"ax.value": "ax", "eta.value": "eta", "mu.value": "mu"}),
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", FLOAT64_CASES, ids=[c[0] for c in FLOAT64_CASES])
def test_matches_torch_float64(case, compiled):
    """In float64 the agreement is rounding's (1e-15), not float32's; and the state opdsl keeps (ASGD's
    averaged iterate ax, Rprop's step sizes, ...) is torch's, read from ``optimizer.state[p]``.

    torch keeps its per-step scalars (NAdam's mu_product, ASGD's eta and mu, the step) in the default dtype,
    so torch runs with float64 as its default here; opdsl keeps them in float64 always."""
    _, spec, kind, kwargs, torch_cls, second, states = case
    made = {}

    def make(key, build):
        return lambda m: made.setdefault(key, build(two_groups(m, **second)))

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        diff = run_side_by_side(
            kind,
            make("ours", lambda groups: opdsl.Optimizer(groups, spec, compile=compiled, **kwargs)),
            make("ref", lambda groups: torch_cls(groups, foreach=False, **kwargs)),
            dtype=torch.float64,
        )
    finally:
        torch.set_default_dtype(before)
    assert diff < TOL_FLOAT64, f"{spec}: max relative parameter difference {diff:.3g} >= {TOL_FLOAT64}"
    ours, ref = made["ours"], made["ref"]
    for ours_group, ref_group in zip(ours.param_groups, ref.param_groups):
        for p, q in zip(ours_group["params"], ref_group["params"]):
            for key, ref_key in states.items():
                have, want = ours.state[p][key], ref.state[q][ref_key]
                assert have.dtype == want.dtype == torch.float64, (key, have.dtype, want.dtype)
                scale = want.abs().max().clamp(min=1e-300)
                rel = float((have.reshape(want.shape) - want).abs().max() / scale)
                assert rel < TOL_FLOAT64, f"{spec}: state {key} differs from torch's {ref_key} by {rel:.3g} (relative)"


def _muon_reference(model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch.optim.Muon on the matrices, torch AdamW on the rest, stepped as one optimizer."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    muon = torch.optim.Muon(matrices, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    adamw = torch.optim.AdamW(vectors, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

    class Both(torch.optim.Optimizer):
        def __init__(self):
            self.parts = (muon, adamw)
            self.param_groups = muon.param_groups + adamw.param_groups
            self.defaults, self.state = {}, {}
            self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

        def step(self, closure=None):
            for part in self.parts:
                part.step()

        def zero_grad(self, set_to_none=True):
            for part in self.parts:
                part.zero_grad(set_to_none)

    return Both()


def _muon_fp32_spec() -> opdsl.Spec:
    return with_node(opdsl.load_spec("muon"), "ortho", dtype="float32")


def _ns_fp32(grad, coefficients, steps, eps):
    """torch.optim.Muon's Newton-Schulz with float32 in place of bfloat16 (same operations)."""
    a, b, c = coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_muon_trajectory_float32_newton_schulz(compiled, monkeypatch):
    """The full hybrid over 200 steps with a schedule, NS in float32 on both sides: float32 agreement."""
    import torch.optim._muon as torch_muon

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _ns_fp32)
    diff = run_side_by_side(
        "transformer", lambda m: opdsl.Optimizer(m.parameters(), _muon_fp32_spec(), compile=compiled), _muon_reference
    )
    assert diff < TOL_MUON_FP32, f"muon (fp32 NS): max relative parameter difference {diff:.3g}"


def test_muon_bfloat16_every_step():
    """The shipped bf16 spec against torch.optim.Muon + AdamW, one step at a time for 200 steps.

    bfloat16 Newton-Schulz turns a 1-ulp float32 difference into a 1-ulp bf16 one (4e-3), which a
    chaotic trajectory then amplifies; so the bf16 path is checked per step from synchronised parameters
    (momentum buffers evolve on their own), and the trajectory test above covers the accumulation.
    Eager: under inductor the bf16 matmul chain keeps fp32 between fused ops (fewer roundings than eager
    torch), so compiled bf16 is not bit-comparable; the compiled math is proven by the fp32 trajectory.
    """
    ours_model = make_model("transformer")
    ref_model = copy.deepcopy(ours_model)
    ours, ref = opdsl.Optimizer(ours_model.parameters(), "muon", compile=False), _muon_reference(ref_model)
    worst = 0.0
    for step in range(200):
        with torch.no_grad():
            for a, b in zip(ours_model.parameters(), ref_model.parameters()):
                b.copy_(a)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss_of(model, "transformer", step).backward()
            opt.step()
        worst = max(worst, max_rel_diff(ours_model, ref_model))
    assert worst < 1e-2, f"muon (bf16): worst one-step relative difference {worst:.3g}"


@pytest.mark.parametrize(("spec", "torch_cls"), [("adamw", torch.optim.AdamW), ("nadam", torch.optim.NAdam)])
def test_a_scheduler_cycling_lr_and_momentum_every_step_follows_torch(spec, torch_cls):
    """OneCycleLR's default cycles `betas[0]` beside lr on every step; opdsl converts and checks only the values
    that changed and re-decides no `if:` they cannot flip (NAdam's step-dependent fields read betas[0])."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = make_model("mlp", torch.float64)
        ref_model = copy.deepcopy(model)
        ours = opdsl.Optimizer(two_groups(model, lr=3e-3), spec, compile=False)
        ref = torch_cls(two_groups(ref_model, lr=3e-3), foreach=False)
        scheds = [
            torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[2e-3, 5e-3], total_steps=60, base_momentum=0.8, max_momentum=0.95)
            for o in (ours, ref)
        ]
        for step in range(60):
            for m, o in ((model, ours), (ref_model, ref)):
                o.zero_grad()
                loss_of(m, "mlp", step, torch.float64).backward()
                o.step()
            for s in scheds:
                s.step()
        assert ours.param_groups[0]["betas"] == ref.param_groups[0]["betas"] != (0.9, 0.999)
    finally:
        torch.set_default_dtype(before)
    diff = max_rel_diff(model, ref_model)
    assert diff < TOL_FLOAT64, f"{spec}: {diff:.3g}"
