"""Shared fixtures: small real models, deterministic data, and side-by-side trajectory runs."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, torch.get_num_threads()))


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm attention + MLP block, head: matrices, biases and norm gains.

    Attention is written out with a bias-free key projection: a key bias has an exactly-zero gradient
    (softmax ignores it), so with it an adaptive optimizer would amplify pure rounding noise.
    """

    def __init__(self, vocab: int = 32, width: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        h = self.norm1(x)
        b, n, w = h.shape
        split = lambda t: t.view(b, n, 2, w // 2).transpose(1, 2)  # noqa: E731
        att = nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(att.transpose(1, 2).reshape(b, n, w))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def make_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    elif kind == "stack":  # repeated shapes: runs of two row-reduced (24x8) and two column-reduced (8x24) matrices
        model = nn.Sequential(
            nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 8), nn.Tanh(),
            nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 8), nn.Tanh(), nn.Linear(8, 3),
        )
    elif kind == "lstm":
        model = nn.ModuleDict({"lstm": nn.LSTM(6, 12, batch_first=True), "head": nn.Linear(12, 3)})
    elif kind == "transformer":
        model = TinyTransformer()
    else:  # pragma: no cover
        raise ValueError(kind)
    return model.to(dtype)


def batch(kind: str, step: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    if kind in ("mlp", "stack"):
        x = torch.randn(16, 8, generator=g, dtype=dtype)
        return x, torch.randint(0, 3, (16,), generator=g)
    if kind == "lstm":
        return torch.randn(8, 5, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)
    return torch.randint(0, 32, (8, 6), generator=g), torch.randint(0, 5, (8,), generator=g)


def loss_of(model: nn.Module, kind: str, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, y = batch(kind, step, dtype)
    if kind == "lstm":
        out, _ = model["lstm"](x)
        logits = model["head"](out[:, -1])
    else:
        logits = model(x)
    return nn.functional.cross_entropy(logits, y)


def two_groups(model: nn.Module, named: bool = False, **second) -> list[dict]:
    """Matrices in one group, vectors (biases, gains) in another with its own hyperparameters."""
    items = list(model.named_parameters())
    pick = (lambda n, p: (n, p)) if named else (lambda n, p: p)
    return [
        {"params": [pick(n, p) for n, p in items if p.ndim >= 2]},
        {"params": [pick(n, p) for n, p in items if p.ndim < 2], **second},
    ]


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        scale = pb.detach().abs().max().clamp(min=1e-12)
        worst = max(worst, float((pa.detach() - pb.detach()).abs().max() / scale))
    return worst


def run_side_by_side(
    kind: str,
    make_ours: Callable[[nn.Module], torch.optim.Optimizer],
    make_ref: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int = 200,
    schedule: bool = True,
    dtype: torch.dtype = torch.float32,
    reward: bool = False,
) -> float:
    """Train two copies of one model, each with its optimizer, on the same data; return the max rel diff.

    ``reward``: the optimizers are given the negated loss, for optimizers built with ``maximize=True``."""
    ours_model = make_model(kind, dtype)
    ref_model = copy.deepcopy(ours_model)
    ours, ref = make_ours(ours_model), make_ref(ref_model)
    scheds = []
    if schedule:
        for opt in (ours, ref):
            scheds.append(torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, cycle_momentum=False))
    for step in range(steps):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            (-loss_of(model, kind, step, dtype) if reward else loss_of(model, kind, step, dtype)).backward()
            opt.step()
        for s in scheds:
            s.step()
    return max_rel_diff(ours_model, ref_model)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with clean dynamo counters (and no stale compiled frames of other tests)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() leaves them alone
    yield


def run_against_reference(
    kind: str,
    make_ours: Callable[[nn.Module], torch.optim.Optimizer],
    make_ref: Callable[[list[torch.Tensor]], object],
    steps: int = 200,
    dtype: torch.dtype = torch.float64,
    set_lr: Callable[[int], float] | None = None,
) -> float:
    """Train one model copy with an opdsl optimizer and another with a plain reference (``ref.step(grads)``
    updating the parameter tensors in place), each on its own gradients; return the max rel diff.

    ``set_lr(step)`` (optional) changes the learning rate of both before each step (the reference must
    expose ``lr`` as an attribute or ``param_groups``-free setter ``ref.lr``)."""
    ours_model = make_model(kind, dtype)
    ref_model = copy.deepcopy(ours_model)
    ours = make_ours(ours_model)
    ref_params = [p for p in ref_model.parameters()]
    ref = make_ref([p.data for p in ref_params])
    for step in range(steps):
        if set_lr is not None:
            lr = set_lr(step)
            for group in ours.param_groups:
                group["lr"] = lr
            ref.lr = lr
        ours.zero_grad()
        loss_of(ours_model, kind, step, dtype).backward()
        ours.step()
        for p in ref_params:
            p.grad = None
        loss_of(ref_model, kind, step, dtype).backward()
        with torch.no_grad():
            ref.step([p.grad for p in ref_params])
    return max_rel_diff(ours_model, ref_model)


@pytest.fixture
def one_thread():
    """Small models run faster on one intra-op thread, and are immune to a busy machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def with_node(spec, node: str, graph: str = "main", **update):
    """A copy of a spec with one node's fields replaced (a build-time edit, like an ablation would be)."""
    g = spec.graphs[graph]
    new = g.nodes[node].model_copy(update=update)
    return spec.model_copy(update={"graphs": {**spec.graphs, graph: g.model_copy(update={"nodes": {**g.nodes, node: new}})}})
