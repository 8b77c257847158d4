"""The pass that realises a loop's scalar operands before the loop (compiled/loop_scalars.py)."""
from __future__ import annotations

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

import opdsl
from conftest import loss_of, make_model
from opdsl.compiled import passes
from opdsl.compiled.loop_scalars import ScalarsBeforeLoops

aten = torch.ops.aten
REALISED = (aten.amax.default, aten.any.dim)


def adamw_like(p, g, m, lr, beta, wd, small):
    """Scalar math of the kinds the blocks write: a lerp with a runtime weight, implicit promotion of a
    float64 0-d operand, a bool condition, a scalar used twice."""
    m2 = torch.lerp(m, g, (1 - beta).to(m.dtype))
    update = m2 / (m2.abs().sqrt() + 1e-8) + p * wd
    return torch.where(small, p - lr * update, p), m2


def scalars(device: str = "cpu", dtype: torch.dtype = torch.float32):
    d = lambda v: torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
    return (d(1e-3), d(0.9), d(1e-2), torch.tensor(True, device=device))


def vectors(dtype: torch.dtype, device: str = "cpu"):
    torch.manual_seed(0)
    return [torch.randn(64, dtype=dtype, device=device) for _ in range(3)]


def traced(dtype: torch.dtype, device: str = "cpu") -> fx.GraphModule:
    return make_fx(adamw_like, tracing_mode="fake")(*vectors(dtype, device), *scalars(device))


def scalar_operands(graph: fx.Graph):
    """(user, operand) for every one-element operand of a full-size op."""
    for node in graph.nodes:
        out = node.meta.get("val")
        if node.op != "call_function" or not isinstance(out, torch.Tensor) or out.numel() <= 1:
            continue
        for arg in node.args:
            value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                yield node, arg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_scalar_a_loop_reads_is_realised_in_the_loops_dtype(dtype):
    module = traced(dtype)
    assert any(a.op != "placeholder" for _, a in scalar_operands(module.graph)), "scalar math inside the loops"
    ScalarsBeforeLoops()(module.graph)
    for user, arg in scalar_operands(module.graph):
        if arg.op == "placeholder":  # read as it is: an input needs no computing
            continue
        assert arg.target in REALISED, f"{user.format_node()} reads {arg.format_node()} inside its loop"
        assert arg.meta["val"].dtype in (dtype, torch.bool)


def test_a_bfloat16_loop_reads_float32_scalars_unrounded_and_leaves_bfloat16_arithmetic_alone():
    """Inductor computes a bfloat16 loop in float32 and drops a scalar's conversion to bfloat16 there, so the
    realised value is the float32 conversion of what was converted; scalar math done in bfloat16 (torch.lerp's
    choice of formula, from its bfloat16 weight) is inductor's to round, and stays in the loop."""
    module = traced(torch.bfloat16)
    ScalarsBeforeLoops()(module.graph)
    realised = left = 0
    for user, arg in scalar_operands(module.graph):
        if arg.target in REALISED:
            realised += 1
            assert arg.meta["val"].dtype in (torch.float32, torch.bool)
            assert all(n.meta["val"].dtype != torch.bfloat16 for n in arg.args[0].args[0][0].all_input_nodes)
        elif arg.op != "placeholder":
            left += 1
            assert arg.meta["val"].dtype == torch.bfloat16 and arg.target is not torch.ops.prims.convert_element_type.default
    assert realised and left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rewritten_graph_computes_the_same_bits(dtype):
    module = traced(dtype)
    args = (*vectors(dtype), *scalars())
    expected = module(*args)
    ScalarsBeforeLoops()(module.graph)
    module.recompile()
    for got, want in zip(module(*args), expected):
        assert torch.equal(got, want)


def test_a_scalar_read_by_many_loops_is_realised_once():
    module = traced(torch.float32)
    ScalarsBeforeLoops()(module.graph)
    realised = [n for n in module.graph.nodes if n.op == "call_function" and n.target in REALISED]
    sources = [n.args[0].args[0][0].args[0] for n in realised]  # amax(cat([unsqueeze(x), ...])) -> x
    assert len(sources) == len(set(sources))


def test_loops_off_the_cpu_are_left_alone():
    module = traced(torch.float32, device="meta")
    before = [n.format_node() for n in module.graph.nodes]
    ScalarsBeforeLoops()(module.graph)
    assert [n.format_node() for n in module.graph.nodes] == before


def _trajectory(spec: str, dtype: torch.dtype, with_pass: bool, monkeypatch) -> list[torch.Tensor]:
    if not with_pass:
        monkeypatch.setattr(passes, "ENABLED", tuple(n for n in passes.ENABLED if n != "scalars-before-loops"))
    model = make_model("stack", dtype=dtype)
    opt = opdsl.Optimizer(model.parameters(), spec, betas=(0.6, 0.999))
    for i in range(3):
        opt.zero_grad()
        loss_of(model, "stack", i, dtype).backward()
        opt.step()
        for group in opt.param_groups:  # a hyperparameter changed between steps reaches the realised values
            group["lr"] *= 0.5
            group["betas"] = (0.3, 0.999)  # m's lerp weight 1 - 0.6 < 0.5, then 0.7: torch.lerp's other formula
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()] + [
        v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_adamw_steps_the_same_bits_with_the_pass_and_without(dtype, monkeypatch):
    with_pass = _trajectory("adamw", dtype, True, monkeypatch)
    without = _trajectory("adamw", dtype, False, monkeypatch)
    assert len(with_pass) == len(without)
    for a, b in zip(with_pass, without):
        assert torch.equal(a, b)


def test_a_float32_loop_keeps_a_bfloat16_scalar_as_inductor_reads_it():
    """Inductor is only known to drop a conversion to bfloat16 in a bfloat16 loop: elsewhere it stays."""
    as_prims = {aten._to_copy.default: lambda x, dtype=None, **_: torch.ops.prims.convert_element_type(x, dtype)}
    module = make_fx(lambda v, s: v * s.to(torch.bfloat16), as_prims, tracing_mode="fake")(  # as inductor sees it
        torch.randn(64), torch.tensor(0.3, dtype=torch.float64)
    )
    ScalarsBeforeLoops()(module.graph)
    ((_, operand),) = scalar_operands(module.graph)
    assert operand.target is torch.ops.prims.convert_element_type.default and operand.args[1] == torch.bfloat16
