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
