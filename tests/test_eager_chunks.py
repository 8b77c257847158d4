"""The eager step on a CPU runs elementwise graphs, and graphs with global sums, chunk by chunk
(``compiled/chunking.py``).

The oracle is the same eager step run over whole buckets, which the other test files prove against
torch.optim and float64 references: chunked, every parameter, state, step count and skip count must be
bit-for-bit the same, through missing gradients, a skipped non-finite step, an ascending group,
a second parameter dtype sharing the group's step count, and optimizers whose graph writes the parameter
(``output_is: param``) or keeps one-value states. Graphs with global sums add those sums chunk by chunk,
in another order: in float64 they agree to that order's rounding, and their skip decisions exactly.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import opdsl
from opdsl.compiled import chunking
from opdsl.compiled.layout import plan_segments
from opdsl.compiled.lowering import BucketArgs, build_program, build_step
from opdsl.plan import float_env
from opdsl.scalars import evaluator_at

from conftest import make_model

# a chunk of 64 elements per thread cuts the test model's buckets into dozens of chunks, most of them
# across parameter edges, and its largest matrix into several
SMALL_CHUNK = 64
SPECS = ["adamw", "nadam", "radam", "asgd", "rprop", "adadelta", "lion", "sgd", "qhadamw"]


@contextlib.contextmanager
def _chunk_size(per_thread: int) -> Iterator[None]:
    """Steps built inside are cut every ``per_thread`` elements per thread (1 << 30: whole buckets)."""
    before = chunking.CHUNK_NUMEL_PER_THREAD
    chunking.CHUNK_NUMEL_PER_THREAD = per_thread
    try:
        yield
    finally:
        chunking.CHUNK_NUMEL_PER_THREAD = before


def _trained(spec: str, chunk: int, steps: int = 12) -> tuple[list[torch.Tensor], dict, int]:
    """A transformer's parameters stepped eagerly at ``chunk`` elements per thread, on seeded gradients.

    Its vectors are float64, two of them in the matrices' group (two buckets of different dtypes sharing one
    step count), the rest in a group that ascends. Some steps miss gradients; one has a NaN."""
    model = make_model("transformer")
    vectors = [p for p in model.parameters() if p.ndim < 2]
    for p in vectors:
        p.data = p.data.double()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2] + vectors[:2]},
        {"params": vectors[2:], "maximize": True, "lr": 3e-3},
    ]
    with _chunk_size(chunk):
        opt = opdsl.Optimizer(groups, spec=spec, lr=1e-2, compile=False)
        params = list(model.parameters())
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            for k, p in enumerate(params):
                if not (step in (2, 7) and k % 3 == 1) and not (step < 4 and k == 0):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 100 + k), dtype=p.dtype)
            if step == 5:
                params[-2].grad.view(-1)[3] = float("nan")
            opt.step()
    return [p.detach().clone() for p in params], opt.state_dict(), opt.skipped_steps


@pytest.mark.parametrize("spec", SPECS)
def test_chunked_eager_step_equals_the_whole_bucket_step(spec: str, one_thread) -> None:
    whole_params, whole_state, whole_skipped = _trained(spec, chunk=1 << 30)
    params, state, skipped = _trained(spec, chunk=SMALL_CHUNK)
    assert whole_skipped == skipped == 1
    for a, b in zip(whole_params, params):
        assert torch.equal(a, b)
    assert whole_state["state"].keys() == state["state"].keys()
    for key, values in whole_state["state"].items():
        assert values.keys() == state["state"][key].keys()
        for name, value in values.items():
            assert torch.equal(value, state["state"][key][name]), (spec, key, name)
    assert all(p.isfinite().all() for p in params)


def _args(spec_name: str, shapes: list[tuple[int, ...]]) -> BucketArgs:
    spec = opdsl.load_spec(spec_name)
    graph = spec.graphs["main"]
    env = float_env({**spec.hyper, "lr": 1e-3}, list(spec.hyper) + ["lr"])
    program = build_program("main", graph, evaluator_at(env))
    segments = plan_segments([torch.Size(s) for s in shapes])
    return BucketArgs(program, segments, segments[-1].end, 0, tuple(range(len(shapes))))


def test_chunks_cover_every_element_once_and_know_their_parameters() -> None:
    shapes = [(100, 3), (5,), (7, 7), (1,), (200,)]
    args = _args("adamw", shapes)
    chunks = chunking.plan_chunks(args, 64)
    assert [c.start for c in chunks] == list(range(0, args.numel, 64))
    assert chunks[-1].end == args.numel
    for c in chunks:
        assert sum(seg.numel for seg in c.args.segments) == c.args.numel == c.end - c.start
        held = [k for k, s in enumerate(args.segments) if s.offset < c.end and s.end > c.start]
        assert (c.first, c.last) == (held[0], held[-1] + 1)
        assert c.args.positions == tuple(held)


def test_graphs_with_global_sums_chunk_and_those_with_per_tensor_sums_run_whole() -> None:
    for name in ("adamw", "adagrad-norm", "scsadamw", "sgdol"):
        assert chunking.chunkable(_args(name, [(4, 4)]).program)
    for name in ("lamb", "adamw-sn", "coba", "adagrad-sn"):
        assert not chunking.chunkable(_args(name, [(4, 4)]).program)
    assert chunking.global_nodes([_args("scsadamw", [(4, 4)])]) == [("main", "d")]


def test_buckets_within_one_chunk_take_the_whole_bucket_step() -> None:
    args = [_args("adamw", [(8, 8), (8,)])]
    assert chunking.build_eager_step(args, True, size=1000).__qualname__ == build_step(args, True).__qualname__
    assert chunking.build_eager_step(args, True, size=16).__qualname__ != build_step(args, True).__qualname__


def test_finiteness_verdict_reads_every_gradient_and_ignores_empty_ones() -> None:
    x = torch.randn(1000)
    assert chunking._all_finite([x, torch.empty(0)], x.device)
    assert chunking._all_finite([], x.device)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[517] = bad
        assert not chunking._all_finite([x, y], x.device)


def test_empty_parameters_beside_chunked_buckets(one_thread) -> None:
    """A bucket of empty parameters only (its own dtype) is one empty chunk; the others still chunk."""
    def trained(chunk: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        floats = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((300,), (0, 4), (70,))]
        doubles = [torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))]
        with _chunk_size(chunk):
            opt = opdsl.Optimizer([{"params": floats}, {"params": doubles}], spec="adamw", compile=False)
            for _ in range(3):
                for p in floats + doubles:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                opt.step()
        assert int(opt.state_dict()["state"][3]["step"]) == 3
        return [p.detach().clone() for p in floats]

    assert all(torch.equal(a, b) for a, b in zip(trained(1 << 30), trained(SMALL_CHUNK)))


GLOBAL_SPECS = ["adagrad-norm", "scsadamw", "scsadamw-sigmoid", "sgdol"]  # sums over the whole model


def _stepped_with_global_sums(spec: str, chunk: int, dtype: torch.dtype, poison: float = float("nan"),
                              steps: int = 10) -> tuple[list[torch.Tensor], dict, int]:
    """A transformer's parameters (all ``dtype``, two groups: one sum spans both) stepped eagerly at ``chunk``
    elements per thread, on seeded gradients from a closure (SGDOL calls it twice a step). Some steps miss
    gradients; at step 5 one entry of a late matrix is ``poison``."""
    model = make_model("transformer")
    params = list(model.parameters())
    for p in params:
        p.data = p.data.to(dtype)
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2], "lr": 3e-3}]
    with _chunk_size(chunk):
        opt = opdsl.Optimizer(groups, spec=spec, lr=1e-2, compile=False)
        for step in range(steps):
            calls = iter(range(2))

            def closure() -> None:
                call = next(calls)
                for k, p in enumerate(params):
                    seed = torch.Generator().manual_seed(1000 * call + 100 * step + k)
                    missing = step in (2, 7) and k % 3 == 1
                    p.grad = None if missing else torch.randn(p.shape, generator=seed, dtype=dtype)
                if step == 5:
                    params[-4].grad.view(-1)[-3] = poison

            opt.step(closure)
    return [p.detach().clone() for p in params], opt.state_dict(), opt.skipped_steps


@pytest.mark.parametrize("spec", GLOBAL_SPECS)
def test_chunked_global_sums_agree_with_the_whole_bucket_step(spec: str, one_thread) -> None:
    """float64, where the sums' order shows only in their last bits: parameters and states within 1e-12 of
    their scale (a float64 sum of n terms regrouped moves by about n * 1e-16 of its terms' sum)."""
    whole_params, whole_state, whole_skipped = _stepped_with_global_sums(spec, 1 << 30, torch.float64)
    params, state, skipped = _stepped_with_global_sums(spec, SMALL_CHUNK, torch.float64)
    assert whole_skipped == skipped == 1
    for a, b in zip(whole_params, params):
        assert (a - b).abs().max() <= 1e-12 * a.abs().max()
    for key, values in whole_state["state"].items():
        for name, value in values.items():
            other = state["state"][key][name]
            assert (value - other).abs().max() <= 1e-12 * max(value.abs().max(), 1e-300), (spec, key, name)
    assert all(p.isfinite().all() for p in params)


@pytest.mark.parametrize("chunk", [1 << 30, SMALL_CHUNK])
def test_chunked_global_sums_skip_an_overflowing_square_as_the_whole_step_does(chunk: int, one_thread) -> None:
    """AdaGrad-Norm in float32: |g| = 1e20 squares to inf, in a chunk far from the first; every chunk's
    sums are taken before any writes, so the step is skipped and nothing moves (as over whole buckets)."""
    before, _, _ = _stepped_with_global_sums("adagrad-norm", chunk, torch.float32, steps=5)
    after, _, skipped = _stepped_with_global_sums("adagrad-norm", chunk, torch.float32, poison=1e20, steps=6)
    assert skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, after))
