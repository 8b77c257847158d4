"""What torch.distributed users meet, in one process (a gloo group of one): DTensor parameters are refused
by name, torch.distributed.checkpoint's state_dict helpers save and load an opdsl optimizer, and empty
parameter groups (ZeroRedundancyOptimizer hands some ranks one) are kept, as in torch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import opdsl
from conftest import loss_of, make_model, max_rel_diff
from opdsl.errors import BindError


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss_of(model, "mlp", step).backward()
        opt.step()


def test_a_dtensor_parameter_is_refused_by_name(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    weight = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
    with pytest.raises(BindError, match=r"parameter w is a DTensor, a tensor subclass \(FSDP2's fully_shard.*use DDP"):
        opdsl.Optimizer([("w", weight)], compile=False)


def test_distributed_checkpoint_state_dict_helpers_resume_exactly(one_rank):
    """get_optimizer_state_dict keys state by parameter name and keeps only `state` and `param_groups`;
    set_optimizer_state_dict loads that back (it used to be refused for lacking opdsl's own entry)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make_model("mlp")
    opt = opdsl.Optimizer(model.named_parameters(), "adamw", lr=1e-2, compile=False)
    _train(model, opt, range(3))
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved) == {"state", "param_groups"} and "0.weight" in saved["state"]
    resumed = copy.deepcopy(model)
    resumed_opt = opdsl.Optimizer(resumed.named_parameters(), "adamw", lr=5.0, compile=False)
    set_optimizer_state_dict(resumed, resumed_opt, saved)
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    _train(model, opt, range(3, 6))
    _train(resumed, resumed_opt, range(3, 6))
    assert max_rel_diff(model, resumed) == 0.0


def test_a_state_dict_of_another_optimizer_is_still_refused():
    model = make_model("mlp")
    torch_opt = torch.optim.AdamW(model.parameters())
    _train(model, torch_opt, range(1))
    opt = opdsl.Optimizer(model.parameters(), compile=False)
    with pytest.raises(opdsl.errors.StateDictError, match="not written by opdsl"):
        opt.load_state_dict(torch_opt.state_dict())


def test_an_empty_parameter_group_is_kept_as_in_torch():
    ours, ref = make_model("mlp"), None
    ref = copy.deepcopy(ours)
    opt = opdsl.Optimizer([{"params": []}, {"params": list(ours.parameters()), "lr": 1e-2}], compile=False)
    ref_opt = torch.optim.AdamW([{"params": []}, {"params": list(ref.parameters()), "lr": 1e-2}], foreach=False)
    assert len(opt.param_groups) == len(ref_opt.param_groups) == 2 and opt.param_groups[0]["params"] == []
    for step in range(3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(model, "mlp", step).backward()
            o.step()
    assert max_rel_diff(ours, ref) < 1e-6
    nothing = opdsl.Optimizer([{"params": []}], compile=False)
    nothing.step()  # an optimizer of empty groups steps nothing, as torch's does
    assert nothing.state_dict()["state"] == {}


def _flattened(numel: int) -> nn.Parameter:
    """A stand-in for FSDP1's FlatParameter (use_orig_params=False): one 1-D shard, marked as FSDP marks it."""
    shard = nn.Parameter(torch.randn(numel))
    shard._is_flat_param = True
    return shard


def test_fsdp_flattened_shards_are_refused_where_the_graph_reduces_and_routing_is_warned():
    with pytest.raises(BindError, match=r"FSDP's flattened shard.*'d' \(direction-mixer, global\)"):
        opdsl.Optimizer([_flattened(40)], "scsadamw", compile=False)
    with pytest.warns(UserWarning, match="routes parameters by shape or name, but FSDP1"):
        opdsl.Optimizer([_flattened(40)], "muon", compile=False)  # a 1-D shard routes to the AdamW graph
    opdsl.Optimizer([_flattened(40)], "lion", compile=False)  # elementwise, no routing: nothing to say


def test_a_state_dict_without_opdsl_entry_of_another_spec_is_refused():
    model = make_model("mlp")
    adamw = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    _train(model, adamw, range(1))
    saved = {k: v for k, v in adamw.state_dict().items() if k != "opdsl"}  # as the checkpoint helpers keep it
    with pytest.raises(opdsl.errors.StateDictError, match="written by spec 'adamw', but this optimizer runs spec 'adam'"):
        opdsl.Optimizer(model.parameters(), "adam", compile=False).load_state_dict(saved)


def test_an_empty_group_of_a_spec_without_a_main_graph_takes_its_first_graph():
    spec = opdsl.load_spec("g.yaml", text="""\
opdsl: 1
name: g
hyper: {lr: 0.1}
graphs:
  a: {nodes: {s: {block: sign, input: grad}}, output: s}
groups:
  - match: {}
    graph: a
""")
    opt = opdsl.Optimizer([{"params": [nn.Parameter(torch.zeros(2))]}, {"params": []}], spec, compile=False)
    assert [g["graph"] for g in opt.param_groups] == ["a", "a"]
