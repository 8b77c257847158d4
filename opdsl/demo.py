"""``opdsl demo``: the main job on a built-in default.

Validates every shipped spec, shows the chosen one (graph and routing plan), then trains a small MLP
on a synthetic teacher-student regression with it, compiled, and prints the loss as it falls.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from opdsl.errors import SpecError
from opdsl.graph import to_text
from opdsl.loader import load_spec, shipped_specs
from opdsl.optimizer import Optimizer

__all__ = ["run_demo", "demo_model", "demo_batches"]


def demo_model(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))


def demo_batches(steps: int, batch: int = 64, seed: int = 1):
    """A fixed random teacher network produces the targets; the student learns to match it."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 4, generator=generator)
    for _ in range(steps):
        x = torch.randn(batch, 16, generator=generator)
        yield x, torch.tanh(x @ teacher) + 0.01 * torch.randn(batch, 4, generator=generator)


def run_demo(spec: str = "adamw", steps: int = 200, compile: bool = True) -> int:
    print("validating shipped specs:")
    bad = 0
    for name in sorted(shipped_specs()):
        try:
            loaded = load_spec(name)
            print(f"  ok   {name:22s} {loaded.summary}")
        except SpecError as err:
            bad += 1
            print(f"  FAIL {name}\n{err}")
    chosen = load_spec(spec)
    print(f"\nspec {chosen.name!r}:")
    for gname, graph in chosen.graphs.items():
        print(f" graph {gname}:\n{to_text(graph)}")
    model = demo_model()
    opt = Optimizer(model.named_parameters(), chosen, compile=compile)
    print("\n" + opt.describe() + "\n")
    loss_fn = nn.MSELoss()
    start = time.perf_counter()
    first = last = None
    for i, (x, y) in enumerate(demo_batches(steps)):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        first = value if first is None else first
        last = value
        if i % max(1, steps // 8) == 0 or i == steps - 1:
            print(f"  step {i + 1:4d}  loss {value:.5f}")
    elapsed = time.perf_counter() - start
    print(f"\n{steps} steps in {elapsed:.1f} s ({'compiled' if compile else 'eager'}, first step includes compile); "
          f"loss {first:.4f} -> {last:.4f}")
    return 1 if bad or not (last < first) else 0
