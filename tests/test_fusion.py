"""The compiled step's own inductor passes (common subexpressions; which passes run) and torch.compile's settings."""
from __future__ import annotations

import pytest
import torch
from torch import fx

import opdsl
from conftest import loss_of, make_model
from opdsl.compiled.cse import SharedScalars

aten = torch.ops.aten


def calls(graph: fx.Graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is target)


def test_repeated_scalar_math_is_computed_once_but_never_across_a_write():
    graph = fx.Graph()
    step, buffer = graph.placeholder("step"), graph.placeholder("buffer")
    per_bucket = [graph.call_function(aten.pow.Tensor_Scalar, (step, 2.0)) for _ in range(3)]  # one per bucket
    total = graph.call_function(aten.add.Tensor, (per_bucket[0], per_bucket[1]))
    total = graph.call_function(aten.add.Tensor, (total, per_bucket[2]))
    graph.call_function(aten.copy_.default, (step, total))  # an in-place write of the step counter
    after = graph.call_function(aten.pow.Tensor_Scalar, (step, 2.0))  # reads the written value
    graph.output((graph.call_function(aten.mul.Tensor, (after, buffer)),))

    SharedScalars()(graph)
    graph.lint()
    assert calls(graph, aten.pow.Tensor_Scalar) == 2  # the three repeats merged; the read after the write kept
    assert calls(graph, aten.copy_.default) == 1
    assert [n.target for n in graph.nodes if n.op == "placeholder"] == ["step", "buffer"]  # the signature


def test_compile_mode_is_merged_with_opdsl_pass_and_matches_eager():
    """torch.compile refuses a mode together with options: the mode's settings are merged into them."""
    models = [make_model("stack") for _ in range(2)]
    opts = [
        opdsl.Optimizer(models[0].parameters(), "adamw-sn", compile=False),
        opdsl.Optimizer(models[1].parameters(), "adamw-sn", compile={"mode": "reduce-overhead"}),
    ]
    for step in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss_of(model, "stack", step).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_guards_on_the_static_plan_are_dropped_and_those_on_inputs_kept():
    """The step closes over its plan, which never changes while the compiled step lives; dynamo's checks of
    it before every call are dropped. Guards on the step's arguments (tensors, the env dicts) stay."""
    from types import SimpleNamespace

    from opdsl.compiled.fusion import _static_guard_filter

    keep = _static_guard_filter(("buckets", "node_order", "check_finite"))
    names = ["buckets", "buckets[0].segments[3].shape[0]", "node_order['main'][0]", "check_finite",
             "grads[0]", "envs[0]['betas'][1]", "states[0]['adam.v']", "bucketsize"]
    kept = keep([SimpleNamespace(name=n) for n in names])
    assert [n for n, k in zip(names, kept) if k] == ["grads[0]", "envs[0]['betas'][1]", "states[0]['adam.v']", "bucketsize"]


def _bucket_shapes(spec: str) -> dict[str, list[list[tuple[int, ...]]]]:
    """Each graph's buckets, as the parameter shapes each one holds (the "stack" model: runs of equal shapes)."""
    opt = opdsl.Optimizer(make_model("stack").parameters(), spec, compile=False)
    out: dict[str, list[list[tuple[int, ...]]]] = {}
    for b in opt._buckets:
        out.setdefault(b.graph, []).append(sorted({tuple(p.shape) for p in b.flat.params}))
    return out


def test_per_tensor_work_gets_a_bucket_per_shape_and_elementwise_work_one_bucket():
    """A block that works per tensor in the tensor's shape (a subspace projection, a per-row sum) gets a
    bucket per shape, so that its per-shape results are never concatenated into a full-size temporary;
    elementwise work, global sums, per-tensor sums and Newton-Schulz keep every shape in one bucket, one
    loop over all of them (per-tensor sums and Newton-Schulz tiled: tests/test_tiled_buckets.py)."""
    matrices, everything = [(3, 8), (8, 24), (24, 8)], [(3,), (3, 8), (8,), (8, 24), (24,), (24, 8)]
    for spec in ("adamw-sm", "adamw-snsm"):  # projector, subset-norm
        per_tensor = next(buckets for graph, buckets in _bucket_shapes(spec).items() if graph != "adam")
        assert sorted(per_tensor) == [[s] for s in matrices], spec
    assert _bucket_shapes("muon")["main"] == [matrices]  # orthogonalize + lr-scale
    for spec in ("adamw", "scsadamw", "coba", "lamb"):  # elementwise; a global norm; per-tensor sums
        assert list(_bucket_shapes(spec).values()) == [[everything]], spec


def test_once_gives_the_value_itself_in_every_shape_and_realises_a_row_value_in_its_own_kernel():
    """`once` only changes where a small value is computed: the same numbers (NaN kept) for a 0-d value, a
    value per tensor or row, and an empty one. Compiled, a per-row square root is taken in a kernel of its
    own, not once per vector of the loop that reads it."""
    from torch._inductor.utils import run_and_get_code

    from opdsl.compiled.context import BlockContext

    for shape in [(), (5,), (2, 3, 1), (0,)]:
        value = torch.randn(shape, dtype=torch.float64)
        if value.numel():
            value.view(-1)[0] = float("nan")
        assert torch.equal(BlockContext.once(value).nan_to_num(7.0), value.nan_to_num(7.0)) and BlockContext.once(value).shape == value.shape

    def scaled(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x * BlockContext.once(rows.sqrt() + 1).reshape(-1, 1)

    x, rows = torch.randn(64, 256), torch.rand(64)
    out, (code,) = run_and_get_code(torch.compile(scaled), x, rows)
    assert torch.equal(out, scaled(x, rows))
    consumer = code[code.index("x1<static_cast<int64_t>(256L)") : code.index("def call")]  # the loop over x's rows
    assert "sqrt" in code and "sqrt" not in consumer, code


def test_the_enabled_graph_passes_are_known_and_key_inductors_cache(monkeypatch):
    from opdsl.compiled import passes

    both = passes.StepPasses()
    assert [type(p) for p in both.passes] == list(passes.PASSES.values())  # PASSES order
    monkeypatch.setattr(passes, "ENABLED", ("shared-scalars",))
    one = passes.StepPasses()
    assert one.uuid() != both.uuid()  # a step compiled with other passes is not taken from the cache
    monkeypatch.setattr(passes, "ENABLED", ("shared-scalars", "hoisting"))
    with pytest.raises(ValueError, match=r"unknown graph passes \['hoisting'\].*scalars-before-loops"):
        passes.StepPasses()
