"""On a CUDA device: the compiled step matches the CPU's numbers and never waits for the device.

Skipped where no CUDA device is present (CI has none). Run on a GPU with ``python -m pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import opdsl
from conftest import batch, make_model, with_node

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DT = torch.float64
# One of each kind of step: elementwise, global reduction, per-shape buckets with a per-tensor reduction,
# subset-norm with subspace momentum (SVD refresh every 20 steps), Newton-Schulz.
SPECS = ["adamw", "scsadamw", "coba", "adamw-snsm", "muadam"]


def spec_of(name: str) -> opdsl.Spec:
    spec = opdsl.load_spec(name)
    if name == "adamw-snsm":
        spec = with_node(spec, "sm", gap=20, rank=2)
    if name == "muadam":
        spec = with_node(spec, "ortho", dtype="float64")  # the same arithmetic on both devices
    return spec


def train(model: nn.Module, opt: opdsl.Optimizer, steps: range, no_sync: bool = False) -> None:
    """``no_sync``: each ``opt.step()`` runs under ``set_sync_debug_mode("error")`` (the batch's copy to the
    device, a synchronous copy from pageable memory, stays outside)."""
    device = next(model.parameters()).device
    for step in steps:
        x, y = batch("mlp", step, DT)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        with syncs_raise() if no_sync else contextlib.nullcontext():
            opt.step()


@contextlib.contextmanager
def syncs_raise():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", SPECS)
def test_cuda_matches_cpu_and_steps_without_a_sync(name):
    cpu_model = make_model("mlp", DT)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    cpu_opt = opdsl.Optimizer(cpu_model.parameters(), spec_of(name), compile=False, lr=1e-2)
    cuda_opt = opdsl.Optimizer(cuda_model.parameters(), spec_of(name), lr=1e-2)
    train(cpu_model, cpu_opt, range(30))
    train(cuda_model, cuda_opt, range(3))  # compiles; the step count is read at t = 2 (was t = 1 applied?)
    # t = 4 .. 19: no refresh is due (gap 20), so the host decides every step without reading the device.
    train(cuda_model, cuda_opt, range(3, 19), no_sync=True)
    train(cuda_model, cuda_opt, range(19, 30))
    diff = max(
        ((a.cpu() - b).abs().max() / b.abs().max()).item() for a, b in zip(cuda_model.parameters(), cpu_model.parameters())
    )
    assert diff < 1e-9, f"{name}: CUDA against CPU after 30 steps, max relative difference {diff:.3g}"
    assert cuda_opt.skipped_steps == 0



def _closure(model: nn.Module, opt: opdsl.Optimizer, step: int, first: str, second: str):
    """Loss on fresh batches, one per call (SGDOL calls twice per step): layers 0-2 on ``first``, the rest on
    ``second``."""
    calls = iter(range(2))

    def closure():
        x, y = batch("mlp", 2 * step + next(calls), DT)
        opt.zero_grad()
        hidden = model[:3](x.to(first))
        loss = nn.functional.cross_entropy(model[3:](hidden.to(second)).cpu(), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", ["adamw", "scsadamw", "sgdol"])
def test_parameters_on_two_devices_step_as_on_one(name):
    """Half the model on CUDA, half on the CPU (or on a second GPU): the global sums and the finiteness
    verdict are formed on one device and copied to each bucket's. Same numbers as all on the CPU."""
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    ref_model = make_model("mlp", DT)
    model = copy.deepcopy(ref_model)
    for i, layer in enumerate(model):
        layer.to("cuda:0" if i < 3 else second)
    ref_opt = opdsl.Optimizer(ref_model.parameters(), name, compile=False, lr=1e-2)
    opt = opdsl.Optimizer(model.parameters(), name, lr=1e-2)
    for step in range(5):
        ref_opt.step(_closure(ref_model, ref_opt, step, "cpu", "cpu"))
        opt.step(_closure(model, opt, step, "cuda:0", second))
    diff = max(((a.cpu() - b).abs().max() / b.abs().max()).item() for a, b in zip(model.parameters(), ref_model.parameters()))
    assert diff < 1e-9, f"{name} on two devices against one: max relative difference {diff:.3g}"
    assert opt.skipped_steps == 0
