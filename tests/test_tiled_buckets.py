"""Tiled buckets: a graph whose per-tensor work is sums (LAMB's trust ratio, CoBA's inner products) or
batched matrix work (Newton-Schulz) steps every shape in one bucket laid out as ``(tiles, tile)``, each
parameter starting on a tile boundary.

What must hold: the padding after each parameter never reaches a parameter, a state or a sum (whatever
it holds); the numbers are those of a bucket per shape; a device without ``segment_reduce`` falls back to
a bucket per shape.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import opdsl
import opdsl.plan
from opdsl.blocks.base import StateKind
from opdsl.compiled.context import BlockContext
from opdsl.compiled.layout import TILE_SIZES, choose_tile, plan_segments

from conftest import loss_of, make_model, max_rel_diff, with_node

# A per-tensor mean and a global norm of `grad + 1`: both read 1 wherever the gradient is 0, so a sum that
# took in the padding would be off by the padding's length.
SHIFTED = opdsl.load_spec("tiled-global.yaml", text="""\
opdsl: 1
name: tiled-global
hyper: {lr: 1.0e-2}
nodes:
  shifted: {block: map, input: grad, expr: "x + 1"}
  scaled:  {block: global-norm, input: shifted, stats: shifted}
  centred: {block: map, input: scaled, expr: "x - tensor_mean(x)"}
output: centred
""")

SHAPES = [torch.Size(s) for s in [(3, 5), (0,), (40,), (1,), (7, 3, 2), (3, 5)]]


def test_every_parameter_starts_on_a_tile_and_padding_stays_small():
    numel = sum(s.numel() for s in SHAPES)
    for tile in TILE_SIZES:
        segments = plan_segments(SHAPES, tile)
        assert all(s.offset % tile == 0 for s in segments)
        assert all(a.end <= b.offset for a, b in zip(segments, segments[1:]))
        assert [s.numel for s in segments] == [s.numel() for s in SHAPES]
    tile = choose_tile(SHAPES)
    padded = plan_segments(SHAPES, tile)[-1].end
    assert tile == TILE_SIZES[-1] or (padded - numel) * 64 <= numel
    big = [torch.Size((1000, 1000)), torch.Size((1000,)), torch.Size((3, 1000))]
    assert choose_tile(big) == TILE_SIZES[0]  # padding of 1.6K elements beside 1M


def _context(tile: int) -> tuple[BlockContext, torch.Tensor]:
    segments = plan_segments(SHAPES, tile)
    numel = -(-segments[-1].end // tile) * tile
    param = torch.zeros(numel // tile, tile, dtype=torch.float64)
    return BlockContext(segments, {}, torch.ones((), dtype=torch.float64), param, numel, range(len(SHAPES)), tile), param


def test_sums_and_broadcasts_of_a_tiled_bucket_read_no_padding():
    """Integer values: every order of summation gives the exact sums, and NaN in the padding must stay out."""
    ctx, _ = _context(16)
    values = torch.full((ctx.numel,), float("nan"), dtype=torch.float64)
    expected = []
    for k, seg in enumerate(ctx.segments):
        part = torch.arange(seg.numel, dtype=torch.float64) % 7 - 3 + k
        values[seg.offset : seg.end] = part
        expected.append(part.sum())
    values = values.view(-1, 16)
    assert torch.equal(ctx.segment_sum(values), torch.stack(expected))
    assert torch.equal(ctx.total(values), torch.stack(expected).sum())
    spread = ctx.expand(torch.arange(len(SHAPES), dtype=torch.float64)).expand(values.shape).reshape(-1)
    for k, seg in enumerate(ctx.segments):
        assert torch.equal(spread[seg.offset : seg.end], torch.full((seg.numel,), float(k), dtype=torch.float64))
    views = ctx.run_views(values)
    assert [v.shape[1:] for v in views] == [r.shape for r in ctx.runs]
    pieces = [v[i] for v in views for i in range(v.shape[0])]
    for piece, seg in zip(pieces, ctx.segments):
        assert torch.equal(piece.reshape(-1), values.view(-1)[seg.offset : seg.end])
    back = ctx.concat([v.clone() for v in views])  # the inverse, zeros in the padding
    assert back.shape == values.shape
    assert torch.equal(back, values.nan_to_num(0.0)) and not back.isnan().any()


@pytest.mark.parametrize("spec", ["lamb", "coba", SHIFTED], ids=["lamb", "coba", "tiled-global"])
def test_graphs_that_sum_per_tensor_step_every_shape_in_one_tiled_bucket(spec):
    model = make_model("transformer")
    opt = opdsl.Optimizer(model.parameters(), spec, compile=False)
    (bucket,) = opt._buckets
    flat = bucket.flat
    assert flat.tile > 1 and len(flat.runs) > 1
    for p in model.parameters():
        assert (p.data_ptr() - flat.param.data_ptr()) // p.element_size() % flat.tile == 0
    assert bucket.shaped_param.shape == (flat.numel // flat.tile, flat.tile)


class SmallCNN(nn.Module):
    """Convolution kernels and a classifier: matrices of four shapes (wide, square, tall), most of them
    not a whole number of tiles, so the run views of a tiled bucket step over padding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 20, 1), nn.Tanh(), nn.Conv2d(20, 6, 1))
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def _cnn_loss(model: nn.Module, step: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(4, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (4,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def _padding(bucket) -> torch.Tensor:
    covered = torch.zeros(bucket.flat.numel, dtype=torch.bool)
    for seg in bucket.flat.segments:
        covered[seg.offset : seg.end] = True
    return ~covered


def _poison_padding(opt) -> None:
    """NaN in every padding element the step writes: the parameters' and the full-size states'."""
    for bucket in opt._buckets:
        pad = _padding(bucket)
        buffers = [bucket.flat.param] + [
            bucket.state[k] for k, s in bucket.program.state_specs.items() if s.kind is StateKind.ELEMENTWISE
        ]
        for buffer in buffers:
            buffer[pad] = float("nan")


@pytest.mark.parametrize(
    "spec, compiled, kind",
    [("lamb", False, "transformer"), ("coba", False, "transformer"), (SHIFTED, False, "transformer"),
     (SHIFTED, True, "transformer"), ("muadam", False, "cnn")],
    ids=["lamb", "coba", "tiled-global", "tiled-global-compiled", "muadam"],
)
def test_whatever_the_padding_holds_never_reaches_a_parameter_or_state(spec, compiled, kind):
    clean_model = SmallCNN() if kind == "cnn" else make_model(kind)
    poisoned_model = copy.deepcopy(clean_model)
    clean = opdsl.Optimizer(clean_model.parameters(), spec, compile=compiled)
    poisoned = opdsl.Optimizer(poisoned_model.parameters(), spec, compile=compiled)
    for step in range(8):
        _poison_padding(poisoned)
        for model, opt in ((clean_model, clean), (poisoned_model, poisoned)):
            opt.zero_grad()
            (_cnn_loss(model, step, torch.float32) if kind == "cnn" else loss_of(model, kind, step)).backward()
            opt.step()
    assert clean.skipped_steps == poisoned.skipped_steps == 0
    for a, b in zip(clean_model.parameters(), poisoned_model.parameters()):
        assert torch.equal(a, b)
        for key, value in clean.state[a].items():
            assert torch.equal(value, poisoned.state[b][key]), key
    # the gradient buffer's padding is zeroed with it and no view covers it: it is never written
    (bucket,) = [b for b in poisoned._buckets if b.flat.tile > 1]
    assert not bucket.flat.grad[_padding(bucket)].any()


@pytest.mark.parametrize("spec", ["lamb", "coba", SHIFTED], ids=["lamb", "coba", "tiled-global"])
def test_a_tiled_bucket_steps_as_a_bucket_per_shape_does(spec, monkeypatch):
    """In float64 over 30 steps the two layouts differ only by the order of each sum's additions."""
    tiled_model = make_model("transformer", torch.float64)
    split_model = copy.deepcopy(tiled_model)
    tiled = opdsl.Optimizer(tiled_model.parameters(), spec, compile=False)
    monkeypatch.setattr(opdsl.plan, "TILED_DEVICE_TYPES", frozenset())  # as on a device without segment_reduce
    split = opdsl.Optimizer(split_model.parameters(), spec, compile=False)
    assert len(split._buckets) == len({p.shape for p in split_model.parameters()})
    assert all(b.flat.tile == 1 for b in split._buckets)
    for step in range(30):
        for model, opt in ((tiled_model, tiled), (split_model, split)):
            opt.zero_grad()
            loss_of(model, "transformer", step, torch.float64).backward()
            opt.step()
    assert max_rel_diff(tiled_model, split_model) < 1e-13


SWITCHED = opdsl.load_spec("lamb-switched.yaml", text="""\
opdsl: 1
name: lamb-switched
hyper: {lr: 1.0e-2, betas: [0.9, 0.999], eps: 1.0e-6, weight_decay: 1.0e-2, trust: 1}
nodes:
  m:     {block: ema, input: grad, beta: "$betas[0]"}
  mhat:  {block: bias-correction, input: m, beta: "$betas[0]"}
  adam:  {block: preconditioned-norm, rule: adam, input: mhat, stats: grad, beta: "$betas[1]", eps: $eps}
  u:     {block: decoupled-decay, input: adam, weight_decay: $weight_decay}
  ratio: {block: map, input: u, with: {p: param}, if: "$trust != 0",
          expr: "x * where(tensor_norm(p) > 0 and tensor_norm(x) > 0, tensor_norm(p) / tensor_norm(x), 1)"}
output: ratio
""")


def test_a_replan_between_tiled_and_flat_buckets_keeps_parameters_and_state(monkeypatch):
    """Switching the trust ratio off re-plans the group into a flat bucket and back into a tiled one: the
    parameters move between buffers with their Adam state, as they do between buckets per shape."""
    tiled_model = make_model("transformer", torch.float64)
    split_model = copy.deepcopy(tiled_model)
    tiled = opdsl.Optimizer(tiled_model.parameters(), SWITCHED, compile=False)
    with monkeypatch.context() as patch:
        patch.setattr(opdsl.plan, "TILED_DEVICE_TYPES", frozenset())
        split = opdsl.Optimizer(split_model.parameters(), SWITCHED, compile=False)
    layouts = []
    for step in range(12):
        for model, opt in ((tiled_model, tiled), (split_model, split)):
            opt.param_groups[0]["trust"] = 0 if 4 <= step < 8 else 1
            opt.zero_grad()
            loss_of(model, "transformer", step, torch.float64).backward()
            with monkeypatch.context() as patch:  # the split optimizer re-plans into buckets per shape
                if opt is split:
                    patch.setattr(opdsl.plan, "TILED_DEVICE_TYPES", frozenset())
                opt.step()
        layouts.append(tuple(b.flat.tile > 1 for b in tiled._buckets))
    assert all(b.flat.tile == 1 for b in split._buckets) and len(split._buckets) > 1
    assert layouts[3] == (True,) and layouts[4] == (False,) and layouts[8] == (True,)
    assert max_rel_diff(tiled_model, split_model) < 1e-13
    for a, b in zip(tiled_model.parameters(), split_model.parameters()):
        assert set(tiled.state[a]) == set(split.state[b]) == {"step", "m.value", "adam.v"}
        assert torch.allclose(tiled.state[a]["adam.v"], split.state[b]["adam.v"], rtol=1e-13, atol=0)


def _newton_schulz_in(spec: str, dtype: str) -> opdsl.Spec:
    return with_node(opdsl.load_spec(spec), "ortho", dtype=dtype)


@pytest.mark.parametrize("spec", ["muon", "muadam"])
def test_newton_schulz_steps_the_matrices_of_every_shape_in_one_tiled_bucket(spec, monkeypatch):
    """The matrices share one tiled bucket, and step as they do in a bucket per shape: Newton-Schulz in
    float64 over 20 steps, where the two layouts differ only by the order of each norm's additions."""
    model = SmallCNN().double()
    split_model = copy.deepcopy(model)
    ns64 = _newton_schulz_in(spec, "input")
    tiled = opdsl.Optimizer(model.parameters(), ns64, compile=False)
    matrices = [b for b in tiled._buckets if b.graph == "main"]
    assert len(matrices) == 1 and matrices[0].flat.tile > 1 and len(matrices[0].flat.runs) == 4
    monkeypatch.setattr(opdsl.plan, "TILED_DEVICE_TYPES", frozenset())
    split = opdsl.Optimizer(split_model.parameters(), ns64, compile=False)
    assert len([b for b in split._buckets if b.graph == "main"]) == 4
    for step in range(20):
        for m, opt in ((model, tiled), (split_model, split)):
            opt.zero_grad()
            _cnn_loss(m, step, torch.float64).backward()
            opt.step()
    assert max_rel_diff(model, split_model) < 1e-13


def test_newton_schulz_over_eight_shapes_compiles_a_few_kernels_not_one_per_shape():
    """The elementwise work before and after the matmuls is one loop each over the tiled bucket, whatever the
    number of shapes: the scalars and the finiteness check, the vectors' AdamW, the matrices' momentum and
    normalization, and their update (a bucket per shape built a C++ kernel per shape, 1-1.5 s of g++ each).
    Five, not four, since the scalars the vectors' AdamW loop reads are realised before it
    (compiled/loop_scalars.py): inductor then groups that work into one C++ kernel more (about 1 s)."""
    from torch._inductor.utils import run_and_get_code

    model = nn.Sequential(*[nn.Linear(3 + i, 4 + i) for i in range(8)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = opdsl.Optimizer(model.parameters(), "muon")
    (matrices,) = [b for b in opt._buckets if b.graph == "main"]
    assert matrices.flat.tile > 1 and len(matrices.flat.runs) == 8
    _, (code,) = run_and_get_code(opt.step)
    assert code.count("async_compile.cpp_pybinding") <= 5, code
    # each shape's iterations are one call of the opaque operator, not three traced matmuls per iteration
    assert code.count("torch.ops.opdsl.newton_schulz.default(") == 8, code
    assert "addmm" not in code and "bmm" not in code, code
