"""What torch users do to an optimizer besides step(): state_dict hooks, deepcopy and pickle, tensor learning
rates changed in place, frozen parameters, resetting state through ``optimizer.state``, parameters that
overlap in memory. Each is checked against torch.optim doing the same, side by side on one model."""
from __future__ import annotations

import copy
import warnings
import pickle

import pytest
import torch
from torch import nn

import opdsl
from conftest import loss_of, make_model, max_rel_diff
from opdsl.errors import BindError, StateDictError

TOL = 1e-5  # float32 agreement with torch.optim, as in test_torch_oracles.py


def twin(kind: str = "mlp") -> tuple[nn.Module, nn.Module]:
    model = make_model(kind)
    return model, copy.deepcopy(model)


def lockstep(pairs, steps: int, start: int = 0, kind: str = "mlp") -> None:
    """Step every (model, optimizer) pair on the same batches."""
    for step in range(start, start + steps):
        for model, opt in pairs:
            opt.zero_grad()
            loss_of(model, kind, step).backward()
            opt.step()


def test_state_dict_hooks_run_as_in_torch():
    calls = {}
    for impl in ("torch", "opdsl"):
        model = make_model("mlp")
        opt = torch.optim.AdamW(model.parameters()) if impl == "torch" else opdsl.Optimizer(model.parameters(), compile=False)
        log = calls[impl] = []
        opt.register_state_dict_pre_hook(lambda o: log.append("save-pre"))
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1} if log.append("save-post") is None else None)
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: {k: v for k, v in sd.items() if k != "extra"} if log.append("load-pre") is None else None
        )
        opt.register_load_state_dict_post_hook(lambda o: log.append("load-post"))
        saved = opt.state_dict()
        assert saved["extra"] == 1  # a post hook's return value replaces the state_dict
        opt.load_state_dict(saved)  # the pre hook strips it again before loading
    assert calls["opdsl"] == calls["torch"] == ["save-pre", "save-post", "load-pre", "load-post"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_its_copied_model_exactly_as_the_original(how):
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.named_parameters(), "adamw", compile=False, lr=3e-3)
    lockstep([(model, opt)], 3)
    clone = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    model2, opt2 = clone
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    assert "0.weight" in opt2.describe()  # names survive the copy
    lockstep([(model, opt), (model2, opt2)], 4, start=3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    for key in ("step", "m.value", "adam.v"):
        assert torch.equal(opt.state_dict()["state"][0][key], opt2.state_dict()["state"][0][key]), key


def test_tensor_learning_rate_changed_in_place_is_followed():
    """torch's schedulers fill_ a tensor lr in place; opdsl sees it through the tensor's version counter."""
    ours, ref = twin()
    opt = opdsl.Optimizer(ours.parameters(), "adamw", compile=False, lr=torch.tensor(1e-2))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=torch.tensor(1e-2), foreach=False)
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5) for o in (opt, ref_opt)]
    for step in range(6):
        lockstep([(ours, opt), (ref, ref_opt)], 1, start=step)
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 / 64)
    assert max_rel_diff(ours, ref) < TOL
    opt.param_groups[0]["lr"].fill_(0.0)  # by hand, too
    before = [p.detach().clone() for p in ours.parameters()]
    lockstep([(ours, opt)], 1, start=6)
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))


def test_frozen_parameters_are_left_untouched_as_in_torch():
    ours, ref = twin()
    for model in (ours, ref):
        model[0].bias.requires_grad_(False)  # frozen from the start
    opt = opdsl.Optimizer(ours.parameters(), "adamw", compile=False, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert ours[0].bias.grad is None
    lockstep([(ours, opt), (ref, ref_opt)], 3)
    for model in (ours, ref):
        model[3].weight.requires_grad_(False)  # frozen mid-run, after it had gradients
    frozen_at = ours[3].weight.detach().clone()
    lockstep([(ours, opt), (ref, ref_opt)], 3, start=3)
    assert torch.equal(ours[0].bias, ref[0].bias) and ours[0].bias.grad is None
    assert torch.equal(ours[3].weight, frozen_at)
    assert max_rel_diff(ours, ref) < TOL


def _adam_pair():
    ours, ref = twin()
    opt = opdsl.Optimizer(ours.parameters(), "adam", compile=False, lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    return ours, opt, ref, ref_opt


def test_state_clear_restarts_as_in_torch_and_saves_a_loadable_checkpoint():
    ours, opt, ref, ref_opt = _adam_pair()
    lockstep([(ours, opt), (ref, ref_opt)], 4)
    opt.state.clear()
    ref_opt.state.clear()
    saved = opt.state_dict()  # taken after the reset: fresh state, step 0
    assert all(entry["step"].item() == 0 for entry in saved["state"].values())
    lockstep([(ours, opt), (ref, ref_opt)], 4, start=4)
    assert max_rel_diff(ours, ref) < TOL
    assert opt.state[next(ours.parameters())]["step"].item() == 4
    fresh = make_model("mlp")
    opdsl.Optimizer(fresh.parameters(), "adam", compile=False).load_state_dict(saved)


def test_state_tensor_put_in_place_is_copied_in_as_in_torch():
    ours, opt, ref, ref_opt = _adam_pair()
    lockstep([(ours, opt), (ref, ref_opt)], 3)
    p, q = next(ours.parameters()), next(ref.parameters())
    opt.state[p]["m.value"] = torch.zeros_like(p)
    ref_opt.state[q]["exp_avg"] = torch.zeros_like(q)
    opt.state = dict(opt.state)  # replacing the mapping itself is followed too
    lockstep([(ours, opt), (ref, ref_opt)], 3, start=3)
    assert max_rel_diff(ours, ref) < TOL
    assert opt.state[p]["m.value"].data_ptr() != p.data_ptr() and opt.state[p]["m.value"].abs().sum() > 0


def test_state_edits_opdsl_cannot_follow_are_refused_before_the_step():
    ours, opt, _, _ = _adam_pair()
    lockstep([(ours, opt)], 2)
    params = list(ours.parameters())
    before = [p.detach().clone() for p in params]
    del opt.state[params[0]]
    with pytest.raises(StateDictError, match=r"param_groups\[0\]: the state of 1 of its 8 parameters was removed"):
        lockstep([(ours, opt)], 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    opt.state.clear()  # the way out the message names
    lockstep([(ours, opt)], 1, start=2)
    del opt.state[params[1]]["adam.v"]
    with pytest.raises(StateDictError, match=r"state 'adam.v' was removed"):
        opt.step()
    opt.state[params[1]]["adam.v"] = torch.zeros_like(params[1])
    opt.state[params[1]]["exp_avg"] = torch.zeros_like(params[1])
    with pytest.raises(StateDictError, match=r"keeps no state 'exp_avg' \(its states: step, m.value, adam.v\)"):
        opt.step()


def test_overlapping_parameters_are_refused_naming_both():
    base = torch.zeros(6)
    a, b = nn.Parameter(base[:4]), nn.Parameter(base[2:])
    with pytest.raises(BindError, match=r"'a' \(param_groups\[0\]\['params'\]\[0\], shape \(4,\)\) and 'b' .* overlap"):
        opdsl.Optimizer([("a", a), ("b", b)], "sgd", compile=False)
    halves = torch.zeros(6)  # views that share a storage without overlapping are fine (a checkpoint's memory)
    opdsl.Optimizer([nn.Parameter(halves[:3]), nn.Parameter(halves[3:])], "sgd", compile=False)


def test_complex_parameter_is_refused_naming_its_place():
    with pytest.raises(BindError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(3,\)\) has dtype torch.complex64"):
        opdsl.Optimizer([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, dtype=torch.complex64))], compile=False)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_momentum_switched_off_and_on_keeps_its_buffer_and_compiles_each_plan_once():
    """torch keeps SGD's momentum_buffer through steps with momentum 0; opdsl keeps the switched-off node's
    state aside (and in state_dict). Flipping between two plans compiles each once, not once per flip."""
    ours, ref = twin()
    opt = opdsl.Optimizer(ours.parameters(), "sgd", lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for step, momentum in enumerate([0.9, 0.9, 0.0, 0.9, 0.0, 0.0, 0.9, 0.0, 0.9, 0.9]):
        for o in (opt, ref_opt):
            o.param_groups[0]["momentum"] = momentum
        if step == 5:  # a checkpoint taken while the buffer is switched off still holds it
            saved = opt.state_dict()
            assert "buf.value" in saved["state"][0]
            opt.load_state_dict(saved)
        lockstep([(ours, opt), (ref, ref_opt)], 1, start=step)
    assert max_rel_diff(ours, ref) < TOL
    assert _graphs() == 2, "one compiled step per plan (momentum on, momentum off)"


def test_replanning_keeps_parameters_in_place_and_reloading_does_not_recompile():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "sgd", lr=0.05, momentum=0.9)
    lockstep([(model, opt)], 1)
    graphs, checkpoint = _graphs(), copy.deepcopy(opt.state_dict())
    weight = model[0].weight
    alias, address = weight.detach(), weight.data_ptr()
    for _ in range(3):  # rolling back to a checkpoint, as after a loss spike
        opt.load_state_dict(checkpoint)
        lockstep([(model, opt)], 1, start=1)
    assert _graphs() == graphs
    opt.param_groups[0]["momentum"] = 0.0  # a condition flipped: another plan
    extra = nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [extra]})
    lockstep([(model, opt)], 1, start=2)
    assert weight.data_ptr() == address and torch.equal(alias, weight)  # the alias still sees every update


@pytest.mark.parametrize("spec", ["adagrad-sn", "adamw-sm", "scsadamw", "muon"])
def test_a_plan_built_twice_at_the_same_values_is_equal_so_its_compiled_step_is_reused(spec):
    """Plans are the compiled steps' cache key: per-tensor state shapes (closures made anew) must not make
    two equal plans differ, or each rollback to a checkpoint compiles the step again."""
    from opdsl.compiled.lowering import build_program
    from opdsl.plan import decider, float_env

    loaded = opdsl.load_spec(spec)
    for graph in loaded.graphs:
        env = float_env(loaded.hyper, list(loaded.hyper))
        assert build_program(graph, loaded.graphs[graph], decider(env)) == build_program(graph, loaded.graphs[graph], decider(env))


def test_gradients_missing_in_changing_buckets_compile_one_more_step_not_one_per_combination():
    """With zero_grad(set_to_none=True) the parameters without a gradient change from step to step (unused
    experts); each bucket passing a mask or not would be a graph per combination, past dynamo's limit."""
    ours = [nn.Parameter(torch.randn(4, 3, dtype=dtype)) for dtype in (torch.float32, torch.float64) for _ in range(2)]
    refs = [nn.Parameter(p.detach().clone()) for p in ours]  # two dtypes: two buckets
    opt = opdsl.Optimizer(ours, "sgd", lr=0.1, momentum=0.9)  # no step count: equal to torch's per-parameter state
    ref = torch.optim.SGD(refs, lr=0.1, momentum=0.9, foreach=False)
    missing_by_step = [(), (0,), (2,), (0, 3), (), (1, 2), (3,)]
    for step, missing in enumerate(missing_by_step):
        for params, o in ((ours, opt), (refs, ref)):
            o.zero_grad(set_to_none=True)
            for k, p in enumerate(params):
                if k not in missing:
                    p.grad = torch.full_like(p, 0.1 * (k + 1) * (-1) ** step)
            o.step()
        if step == 0:
            graphs = _graphs()
    assert _graphs() == graphs + 1
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(ours, refs))


def test_step_inside_a_compiled_training_step_does_not_recompile_on_a_schedule():
    """Dynamo does not trace the step's host-side bookkeeping (it would guard on each new lr value)."""
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw", lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=20)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    @torch.compile
    def train_step():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    losses = []
    for step in range(8):
        losses.append(train_step().item())
        sched.step()
        if step == 1:
            graphs = _graphs()
    assert _graphs() == graphs and losses[-1] < losses[0]


def test_reloading_a_two_gradient_spec_keeps_two_gradient_buffers():
    """SGDOL swaps between two gradient buffers; a re-plan that keeps the flat buffer keeps its spare too
    (a fresh spare per reload left one gradient-sized buffer behind in the view cache each time)."""
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "sgdol", compile=False)

    def closure(step=[0]):
        step[0] += 1
        opt.zero_grad()
        loss = loss_of(model, "mlp", step[0])
        loss.backward()
        return loss

    opt.step(closure)
    checkpoint = copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.load_state_dict(checkpoint)
        opt.step(closure)
    assert [len(b.flat._views_by_buffer) for b in opt._buckets] == [2] * len(opt._buckets)


def test_a_second_optimizer_over_the_same_parameters_is_named_when_the_first_steps():
    model = make_model("mlp")
    first = opdsl.Optimizer(model.parameters(), "sgd", compile=False)
    opdsl.Optimizer(model.parameters(), "sgd", compile=False)  # moves every parameter into its own buffer
    loss_of(model, "mlp", 0).backward()
    with pytest.raises(RuntimeError, match="another opdsl optimizer was built over it and moved it"):
        first.step()


def test_momentum_first_switched_on_mid_run_starts_at_the_gradient_as_in_torch():
    """torch creates SGD's momentum_buffer as a copy of the gradient the first time momentum is non-zero,
    whatever the step; with dampening that differs from one dampened update of a zero buffer."""
    ours, ref = twin()
    opt = opdsl.Optimizer(ours.parameters(), "sgd", lr=0.05, momentum=0.0, dampening=0.5, compile=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.0, dampening=0.5, foreach=False)
    for step, momentum in enumerate([0.0, 0.0, 0.9, 0.9, 0.0, 0.9]):
        for o in (opt, ref_opt):
            o.param_groups[0]["momentum"] = momentum
        lockstep([(ours, opt), (ref, ref_opt)], 1, start=step)
    assert max_rel_diff(ours, ref) < TOL


def test_step_with_no_gradient_written_steps_nothing_as_in_torch():
    """Before any backward, and after zero_grad() with no backward since, torch sees every .grad None and
    steps nothing (no decay, no step count); opdsl's zeroed views must count as None there. Zeroing the
    views in place the torch way (set_to_none=False) gives zero gradients, which both step."""
    ours, ref = twin()
    opt = opdsl.Optimizer(ours.parameters(), "adamw", lr=1e-2, weight_decay=0.1, compile=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    with pytest.warns(UserWarning, match="no gradient written"):
        opt.step()  # a warm-up call before training
    ref_opt.step()
    lockstep([(ours, opt), (ref, ref_opt)], 3)
    for o in (opt, ref_opt):
        o.zero_grad()
        o.step()  # nothing written since the zeroing: warned once already, so silent now
    lockstep([(ours, opt), (ref, ref_opt)], 3, start=3)
    for model in (ours, ref):
        model.zero_grad(set_to_none=False)  # torch's gradients exist after a backward: zeroed in place
    for o in (opt, ref_opt):
        o.step()  # zero gradients are gradients: decay and momentum act
    lockstep([(ours, opt), (ref, ref_opt)], 3, start=6)
    assert max_rel_diff(ours, ref) < TOL
    assert opt.state_dict()["state"][0]["step"] == ref_opt.state_dict()["state"][0]["step"] == 10


def _opdsl_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "opdsl" in str(w.message) or "spec " in str(w.message)]


def test_a_scheduler_changing_a_value_the_graph_does_not_read_is_warned_once():
    """torch's schedulers cycle betas[0] whenever the optimizer has `betas`. Muon's matrix graph reads
    `momentum`, so OneCycleLR's default momentum cycling would silently do nothing there."""
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 4))
    opt = opdsl.Optimizer(model.named_parameters(), "muon", lr=0.02, compile=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    unread = [m for m in _opdsl_warnings(record) if "does not read" in m]
    assert len(unread) == 1 and "param_groups[0]['betas']" in unread[0] and "cycle_momentum=False" in unread[0]
    assert unread and record[0].filename == __file__  # at the user's line, not inside opdsl or torch


def test_a_learning_rate_a_graph_computing_the_next_parameter_does_not_read_is_warned_about():
    """With `output_is: param` lr scales nothing: a scheduler over a graph that never reads $lr does nothing."""
    spec = opdsl.load_spec("s.yaml", text="""\
opdsl: 1
name: halving
hyper: {lr: 0.1, rate: 0.5}
nodes:
  new: {block: map, input: param, with: {g: grad}, expr: "x - $rate * g"}
output: new
output_is: param
""")
    p = nn.Parameter(torch.ones(3))
    opt = opdsl.Optimizer([p], spec, compile=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            p.grad = torch.ones(3)
            opt.step()
            sched.step()
    unread = [m for m in _opdsl_warnings(record) if "does not read" in m]
    assert len(unread) == 1 and "param_groups[0]['lr']" in unread[0] and "(it reads: rate)" in unread[0]
    assert torch.equal(p.detach(), torch.full((3,), 1 - 3 * 0.5))


def test_a_scheduler_changing_what_the_graph_reads_is_not_warned():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw", compile=False)  # reads betas[0]: cycled as intended
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lockstep([(model, opt)], 2)
        sched.step()
        lockstep([(model, opt)], 1)
    assert not _opdsl_warnings(record)


def test_a_mistyped_group_key_is_warned_and_a_duplicate_parameter_named():
    model = make_model("mlp")
    with pytest.warns(UserWarning, match="'weight_dacay'.*did you mean 'weight_decay'"):
        opdsl.Optimizer([{"params": model.parameters(), "weight_dacay": 0.1, "name": "body"}], compile=False)
    opt = opdsl.Optimizer(model.parameters(), compile=False)
    opt.param_groups[0]["amsgrd"] = True  # mid-run, as a user edits a group
    with pytest.warns(UserWarning, match="'amsgrd'.*did you mean 'amsgrad'"):
        lockstep([(model, opt)], 1)
    for spelling in ("maximise", "Maximize"):  # an engine option, not a spec hyperparameter
        with pytest.warns(UserWarning, match=f"'{spelling}'.*did you mean 'maximize'"):
            opdsl.Optimizer([{"params": [torch.nn.Parameter(torch.ones(2))], spelling: True}], compile=False)
    weight = model[0].weight
    with pytest.raises(ValueError, match="appears twice in one parameter group"):
        opdsl.Optimizer([weight, weight], compile=False)


def test_zero_grad_set_to_none_false_gives_zero_gradients_as_in_torch():
    ours, ref = twin()
    opt = opdsl.Optimizer(ours.parameters(), "adamw", lr=1e-2, weight_decay=0.1, compile=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    lockstep([(ours, opt), (ref, ref_opt)], 2)
    for o in (opt, ref_opt):
        o.zero_grad(set_to_none=False)  # said explicitly: zero gradients, which decay and momentum act on
        o.step()
    assert max_rel_diff(ours, ref) < TOL
    assert opt.state_dict()["state"][0]["step"] == ref_opt.state_dict()["state"][0]["step"] == 3


def test_a_refused_group_value_leaves_another_groups_switch_pending():
    """Every changed group is checked before any is applied: group 0's momentum, switched on in the same
    step() that group 1's bad value refused, still takes effect once group 1 is fixed."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    ref_a = nn.Parameter(torch.zeros(2))
    opt = opdsl.Optimizer([{"params": [a]}, {"params": [b]}], "sgd", lr=0.1, compile=False)
    ref_opt = torch.optim.SGD([ref_a], lr=0.1)
    for step in range(3):
        if step == 1:
            opt.param_groups[0]["momentum"] = ref_opt.param_groups[0]["momentum"] = 0.9
            opt.param_groups[1]["nesterov"] = True  # refused: no momentum in group 1
            a.grad, b.grad = torch.ones(2), torch.ones(2)
            with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
                opt.step()
            opt.param_groups[1]["nesterov"] = False
        a.grad, b.grad, ref_a.grad = torch.ones(2), torch.ones(2), torch.ones(2)
        opt.step()
        ref_opt.step()
    assert torch.allclose(a.detach(), ref_a.detach())


def test_an_sgd_checkpoint_from_before_the_started_flag_loads():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "sgd", lr=0.05, momentum=0.9, compile=False)
    lockstep([(model, opt)], 2)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        del entry["buf.started"]  # as written before the flag existed
    fresh = opdsl.Optimizer(model.parameters(), "sgd", lr=0.05, momentum=0.9, compile=False)
    fresh.load_state_dict(saved)
    assert all(float(fresh.state[p]["buf.started"]) == 1.0 for p in model.parameters())
