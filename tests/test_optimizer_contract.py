"""The torch.optim.Optimizer contract, state_dict, recompiles, non-finite gradients, routing, describe."""
from __future__ import annotations

import copy
import io
import re
import textwrap

import pytest
import torch
from torch import nn

import opdsl
from conftest import loss_of, make_model, max_rel_diff, two_groups
from opdsl.errors import StateDictError


def train(model, opt, steps, kind="mlp", start=0, sched=None):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, kind, step).backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_state_dict_round_trip_resumes_bit_identically():
    model = make_model("mlp")
    opt = opdsl.Optimizer(two_groups(model, weight_decay=0.0), "adamw", compile=False)
    train(model, opt, 10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 10, start=10)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = make_model("mlp", seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = opdsl.Optimizer(two_groups(resumed, weight_decay=0.0), "adamw", compile=False)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 10, start=10)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["opdsl"]["digest"] == sd2["opdsl"]["digest"]
    for idx, entry in sd1["state"].items():
        assert set(entry) == {"step", "m.value", "adam.v"}
        for key, value in entry.items():
            assert torch.equal(value, sd2["state"][idx][key]), key


def test_state_dict_from_another_spec_is_refused_naming_both():
    model = make_model("mlp")
    adam = opdsl.Optimizer(model.parameters(), "adam", compile=False)
    sgd = opdsl.Optimizer(model.parameters(), "sgd", compile=False, momentum=0.9)
    with pytest.raises(StateDictError, match=r"spec 'adam'.*this optimizer runs spec 'sgd'"):
        sgd.load_state_dict(adam.state_dict())
    with pytest.raises(StateDictError, match="not written by opdsl"):
        sgd.load_state_dict(torch.optim.SGD(model.parameters()).state_dict())


def test_state_dict_with_wrong_shapes_is_refused():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    sd = opt.state_dict()
    sd["state"][0] = {**sd["state"][0], "m.value": torch.zeros(3)}
    with pytest.raises(StateDictError, match=r"state 'm.value' has shape \(3,\)"):
        opt.load_state_dict(sd)


def test_lr_schedule_and_hyper_changes_never_recompile():
    from torch._dynamo.utils import counters

    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    train(model, opt, 2, sched=sched)
    frames = counters["stats"]["unique_graphs"]
    train(model, opt, 10, start=2, sched=sched)
    opt.param_groups[0]["betas"] = (0.8, 0.99)
    opt.param_groups[0]["weight_decay"] = 0.3
    opt.param_groups[0]["eps"] = 1e-6
    train(model, opt, 5, start=12, sched=sched)
    assert counters["stats"]["unique_graphs"] == frames, dict(counters["recompiles"])
    assert frames >= 1


def test_refreshes_and_per_run_blocks_never_recompile():
    """Subspace momentum on runs of equal shapes (a bucket per matrix shape): refreshes decided on the host
    (t = 1, 5, 10). The step's inputs are fresh views every call, so a guard on an object's identity would
    recompile every step."""
    from torch._dynamo.utils import counters

    from conftest import with_node

    model = make_model("stack")
    opt = opdsl.Optimizer(model.parameters(), with_node(opdsl.load_spec("adamw-sm"), "sm", gap=5, rank=2))
    train(model, opt, 2, kind="stack")
    frames = counters["stats"]["unique_graphs"]
    train(model, opt, 10, kind="stack", start=2)
    assert counters["stats"]["unique_graphs"] == frames, dict(counters["recompiles"])


def test_first_compile_traces_the_step_once():
    """Dynamo restarts its analysis once for 0-d float64 CPU inputs (hyperparameters were such): every spec's
    cold compile traced the step twice. With a cached graph the restart does not happen, so caches are off."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._dynamo.utils import counters

    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw")
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        train(model, opt, 2)
    assert counters["aot_autograd"]["total"] == 1


def test_eager_and_compiled_agree():
    a, b = make_model("transformer"), make_model("transformer")
    train(a, opdsl.Optimizer(a.parameters(), "adamw", compile=False), 30, kind="transformer")
    train(b, opdsl.Optimizer(b.parameters(), "adamw", compile=True), 30, kind="transformer")
    assert max_rel_diff(a, b) < 1e-6


@pytest.mark.parametrize("mode", ["skip", "error", "propagate"])
def test_nonfinite_gradient(mode):
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw", compile=False, on_nonfinite=mode)
    train(model, opt, 3)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    opt.zero_grad()
    loss_of(model, "mlp", 3).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    if mode == "error":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
    if mode == "propagate":
        assert torch.isnan(next(model.parameters())).any()
        return
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for key, value in opt.state[next(model.parameters())].items():
        assert torch.equal(value, state[key]), key
    assert opt.skipped_steps == 1
    train(model, opt, 1, start=4)  # recovers on the next finite gradient
    assert not any(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_none_grad_leaves_param_and_state_untouched_like_torch():
    model = make_model("mlp")
    ref = copy.deepcopy(model)
    ours = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    theirs = torch.optim.AdamW(ref.parameters(), foreach=False)
    frozen_ours, frozen_ref = model[0].weight, ref[0].weight
    for step in range(5):
        for m, opt, frozen in ((model, ours, frozen_ours), (ref, theirs, frozen_ref)):
            opt.zero_grad(set_to_none=True)
            loss_of(m, "mlp", step).backward()
            if step >= 2:
                frozen.grad = None
            opt.step()
    assert max_rel_diff(model, ref) < 1e-6
    m_ours, m_ref = ours.state[frozen_ours]["m.value"], theirs.state[frozen_ref]["exp_avg"]
    assert float((m_ours - m_ref).abs().max() / m_ref.abs().max()) < 1e-6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_none_grad_keeps_per_tensor_state_of_its_run(compiled):
    """Per-tensor state lives in one (count, ...) tensor per run of equal shapes: a None grad must leave
    its own slice (and parameter) untouched while the run's other parameters step."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (6, 4), (6, 4), (5,)]]
    opt = opdsl.Optimizer(params, "adamw-sn", lr=1e-2, compile=compiled)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for i in (0, 2):
        params[i].grad = torch.randn(params[i].shape, generator=gen)
    before = [({k: v.clone() for k, v in opt.state[p].items() if k != "step"}, p.detach().clone()) for p in params]
    opt.step()
    for i, (state, value) in enumerate(before):
        unchanged = torch.equal(value, params[i]) and all(torch.equal(v, opt.state[params[i]][k]) for k, v in state.items())
        assert unchanged == (i in (1, 3)), f"parameter {i}"
    assert opt.state[params[1]]["sn.v"].shape == (6, 1)


def test_module_zero_grad_and_replaced_grads_are_gathered():
    model = make_model("mlp")
    ref = copy.deepcopy(model)
    ours = opdsl.Optimizer(model.parameters(), "adam", compile=False)
    theirs = torch.optim.Adam(ref.parameters(), foreach=False)
    for step in range(5):
        for m, opt in ((model, ours), (ref, theirs)):
            m.zero_grad()  # nn.Module.zero_grad sets grads to None: backward allocates fresh tensors
            loss_of(m, "mlp", step).backward()
            if step == 3:  # a gradient assigned by hand, not contiguous
                m[3].weight.grad = m[3].weight.grad.t().contiguous().t()
            opt.step()
    assert max_rel_diff(model, ref) < 1e-6


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_reassigned_parameter_data_is_refused_before_the_step(named):
    """A parameter whose .data no longer lives in the flat buffer would silently stop being updated."""
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.named_parameters() if named else model.parameters(), "adamw", compile=False)
    train(model, opt, 1)
    weight = model[3].weight
    weight.data = weight.data.clone()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, "mlp", 1).backward()
    place = "param_groups[0]['params'][4]"
    where = f"'3.weight' ({place}, shape (16, 32))" if named else f"{place} (shape (16, 32))"
    with pytest.raises(RuntimeError, match=re.escape(f"parameter {where} no longer points into")):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_add_param_group_keeps_existing_state():
    model = make_model("mlp")
    first = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = opdsl.Optimizer(first, "adamw", compile=False)
    train(model, opt, 3)
    before = opt.state[first[0]]["m.value"].clone()
    opt.add_param_group({"params": rest, "lr": 1e-2})
    assert torch.equal(opt.state[first[0]]["m.value"], before)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 1e-2
    train(model, opt, 2, start=3)
    assert float(opt.state[rest[0]]["step"]) == 2.0


def test_describe_lists_every_parameter_graph_rule_and_state():
    model = make_model("transformer")
    opt = opdsl.Optimizer(model.named_parameters(), "muon", compile=False)
    text = opt.describe()
    for name, _ in model.named_parameters():
        assert name in text
    assert "groups[0] (adamw for biases and gains): ndim in [0, 1]" in text
    assert "state:" in text
    # the matrices' four shapes share one tiled buffer, the vectors one flat buffer
    assert re.search(r"group 0 graph main: 8 parameters of 4 shape\(s\), tiled by \d+ \([\d,]+ padding values", text), text
    assert "graph adamw" in text and "one flat buffer" in text


def test_adamw_keeps_eight_bytes_per_parameter():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    text = opt.describe()
    assert "8.00 bytes per parameter value" in text
    # parameters without names are labelled by their place in param_groups, one label each
    labels = [line.split()[0] for line in text.splitlines() if line.startswith("params[")]
    assert labels == [f"params[0][{k}]" for k in range(len(list(model.parameters())))]


def test_route_embeddings_and_head_by_name_to_adamw():
    text = textwrap.dedent(
        """\
        opdsl: 1
        name: muon-by-name
        hyper: {lr: 0.02, momentum: 0.95, nesterov: true, weight_decay: 0.0}
        nodes:
          buf:   {block: ema, input: grad, beta: $momentum}
          ortho: {block: orthogonalize, input: buf}
        output: ortho
        groups:
          - match: {name: ["embed.*", "head.*"]}
            use: adamw
            hyper: {lr: 3.0e-4}
          - match: {ndim: [0, 1]}
            use: adamw
            hyper: {lr: 3.0e-4}
        """
    )
    spec = opdsl.load_spec("byname.yaml", text=text)
    model = make_model("transformer")
    opt = opdsl.Optimizer(model.named_parameters(), spec, compile=False)
    graphs = {name: g["graph"] for g in opt.param_groups for name in g["param_names"]}
    assert graphs["embed.weight"] == "adamw" and graphs["head.weight"] == "adamw"
    assert graphs["q.weight"] == "main" and graphs["q.bias"] == "adamw"
    train(model, opt, 2, kind="transformer")


def test_structural_hyper_change_replans():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "rmsprop", compile=False)
    train(model, opt, 2)
    assert "buf.value" not in opt.state[next(model.parameters())]
    opt.param_groups[0]["momentum"] = 0.9
    train(model, opt, 1, start=2)
    assert "buf.value" in opt.state[next(model.parameters())]


def test_closure_is_called_and_its_loss_returned():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "sgd", compile=False, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, "mlp", 0)
        loss.backward()
        return loss

    first = opt.step(closure).detach()
    assert opt.step(closure).detach() < first


def test_is_a_torch_optimizer_and_works_with_grad_scaler_style_unscale():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    assert isinstance(opt, torch.optim.Optimizer)
    loss_of(model, "mlp", 0).backward()
    for group in opt.param_groups:  # what GradScaler.unscale_ does: in-place on p.grad
        for p in group["params"]:
            p.grad.mul_(0.5)
    opt.step()
