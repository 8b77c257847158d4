"""The eager step on a CPU runs chunk by chunk (``compiled/chunking.py``): elementwise graphs and graphs
with global sums cut anywhere, graphs with per-tensor or per-subset work between parameters.

The oracle is the same eager step run over whole buckets, which the other test files prove against
torch.optim and float64 references: chunked, every parameter, state, step count and skip count must be
bit-for-bit the same, through missing gradients, a skipped non-finite step, an ascending group,
a second parameter dtype sharing the group's step count, and optimizers whose graph writes the parameter
(``output_is: param``), keeps one-value states or states per tensor, or sums per tensor, per row or per
subset. Graphs with global sums add those sums chunk by chunk, in another order: in float64 they agree to
that order's rounding, and their skip decisions exactly.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import opdsl
from opdsl.blocks import BLOCKS
from opdsl.blocks.base import StateKind
from opdsl.compiled import chunking, lowering
from opdsl.compiled.context import BlockContext
from opdsl.compiled.layout import plan_segments, shape_runs
from opdsl.compiled.lowering import BucketArgs, build_program, build_step
from opdsl.plan import float_env
from opdsl.scalars import evaluator_at

from conftest import make_model

# a chunk of 64 elements per thread cuts the test model's buckets into dozens of chunks, most of them
# across parameter edges, and its largest matrix into several
SMALL_CHUNK = 64
SPECS = ["adamw", "nadam", "radam", "asgd", "rprop", "adadelta", "lion", "sgd", "qhadamw"]
# per-tensor sums (lamb, coba, per-tensor norms in tiled buckets), per-subset sums in (count, *shape) buckets,
# per-tensor states and projections (the subspace specs)
PER_TENSOR_SPECS = ["lamb", "coba", "adamw-sn", "adagrad-sn", "adamw-sm", "adamw-snsm"]
# Newton-Schulz on the matrices, one chunk a bucket; AdamW on the vectors, chunked
MATRIX_SPECS = ["muon", "muadam", "muadam-sania"]


WHOLE = None  # chunking off: the oracle, the whole-bucket step (`build_step` run eagerly)


@contextlib.contextmanager
def _chunk_size(per_thread: int | None) -> Iterator[None]:
    """Eager steps built inside are cut every ``per_thread`` elements per thread; WHOLE: they are the
    whole-bucket step."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunking, "CHUNK_NUMEL_PER_THREAD", per_thread)
        yield


def _trained(spec: str, chunk: int | None, steps: int = 12, **options) -> tuple[list[torch.Tensor], dict, int]:
    """A transformer's parameters stepped eagerly at ``chunk`` elements per thread, on seeded gradients.

    Its vectors are float64, two of them in the matrices' group (two buckets of different dtypes sharing one
    step count), the rest in a group that ascends. Some steps miss gradients; one has a NaN (none where
    ``options`` let it through: ``on_nonfinite='propagate'``)."""
    model = make_model("transformer")
    vectors = [p for p in model.parameters() if p.ndim < 2]
    for p in vectors:
        p.data = p.data.double()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2] + vectors[:2]},
        {"params": vectors[2:], "maximize": True, "lr": 3e-3},
    ]
    with _chunk_size(chunk):
        opt = opdsl.Optimizer(groups, spec=spec, lr=1e-2, compile=False, **options)
        params = list(model.parameters())
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            for k, p in enumerate(params):
                if not (step in (2, 7) and k % 3 == 1) and not (step < 4 and k == 0):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 100 + k), dtype=p.dtype)
            if step == 5 and opt.on_nonfinite != "propagate":
                params[-2].grad.view(-1)[3] = float("nan")
            opt.step()
        chunked = opt._step_fn.__qualname__.startswith("build_eager_step")
        assert chunked == (chunk != WHOLE), "the small chunk must cut the model's buckets"
    return [p.detach().clone() for p in params], opt.state_dict(), opt.skipped_steps


@pytest.mark.parametrize("spec", SPECS + PER_TENSOR_SPECS + MATRIX_SPECS)
def test_chunked_eager_step_equals_the_whole_bucket_step(spec: str, one_thread) -> None:
    whole_params, whole_state, whole_skipped = _trained(spec, chunk=WHOLE)
    params, state, skipped = _trained(spec, chunk=SMALL_CHUNK)
    assert whole_skipped == skipped == 1
    _assert_equal(whole_params, whole_state, params, state, spec)


def _assert_equal(whole_params: list[torch.Tensor], whole_state: dict, params: list[torch.Tensor], state: dict,
                  spec: str) -> None:
    for a, b in zip(whole_params, params):
        assert torch.equal(a, b)
    assert whole_state["state"].keys() == state["state"].keys()
    for key, values in whole_state["state"].items():
        assert values.keys() == state["state"][key].keys()
        for name, value in values.items():
            assert torch.equal(value, state["state"][key][name]), (spec, key, name)
    assert all(p.isfinite().all() for p in params)


PROJECTED_STATS = """
opdsl: 1
name: projected-stats
hyper: {lr: 1.0e-3}
nodes:
  sm: {block: subspace-projector, input: grad, rank: 2, gap: 5}
  sn: {block: subset-norm, input: sm, stats: sm}
output: sn
"""


def test_what_runs_in_a_dry_pass_and_which_graphs_step_whole(one_thread) -> None:
    """A dry pass runs what its answer reads: the check's pass of adamw-snsm squares the gradient (its
    subset-norm's stats), not the projection. Graphs whose dry pass would repeat matrix work, or whose
    Newton-Schulz runs a chunk would split, step whole."""
    snsm = _args("adamw-snsm", [(4, 4)]).program
    assert lowering.dry_plan(snsm, "sn", check_finite=True) == {"sn": {"witness"}}
    assert not chunking.steps_whole(snsm, check_finite=True)
    scsadamw = _args("scsadamw", [(4, 4)]).program
    assert lowering.dry_plan(scsadamw, "d", check_finite=False) == {"d": {"reduce"}}
    spec = opdsl.load_spec("projected-stats", text=PROJECTED_STATS)
    projected = build_program("main", spec.graphs["main"], evaluator_at(float_env({"lr": 1e-3}, ["lr"])))
    assert lowering.dry_plan(projected, "sn", check_finite=True) == {"sm": {"forward"}, "sn": {"witness"}}
    assert chunking.steps_whole(projected, check_finite=True)
    assert not chunking.steps_whole(projected, check_finite=False)
    for name in ("lamb", "coba", "adamw-sn", "adamw-sm", "adagrad-norm", "muadam"):
        assert not chunking.steps_whole(_args(name, [(4, 4)]).program, check_finite=True)
    for name in ("muon", "muadam"):  # Newton-Schulz on runs of equal shapes: never split
        args = _args(name, [(4, 4), (4, 4), (8, 4)])
        assert chunking.keeps_runs_whole(args.program) and len(chunking.plan_chunks(args, 16)) == 1


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


def test_where_chunks_end_and_how_far_the_verdict_pass_runs() -> None:
    for name in ("adamw", "adagrad-norm", "scsadamw", "sgdol"):
        assert chunking.cuts_inside_parameters(_args(name, [(4, 4)]).program)
    for name in ("lamb", "adamw-sn", "coba", "adagrad-sn", "adamw-sm"):
        assert not chunking.cuts_inside_parameters(_args(name, [(4, 4)]).program)
    assert chunking.global_nodes([_args("scsadamw", [(4, 4)])]) == [("main", "d")]
    # the graph's last block that offers sums to the finiteness check (none: the check reads the gradients)
    verdicts = {"adamw": None, "lamb": None, "adamw-sm": None, "scsadamw": ("main", "d"), "coba": ("main", "d"),
                "adamw-sn": ("main", "sn"), "adagrad-norm": ("main", "scaled"), "sgdol": ("main", "sized")}
    for name, node in verdicts.items():
        assert chunking.verdict_node(_args(name, [(4, 4)]).program) == node, name


@pytest.mark.parametrize("tile", [1, 16])
def test_chunks_of_whole_parameters(tile: int) -> None:
    """Between parameters, as many as fit (one larger than a chunk alone), tiles and padding whole; each
    chunk knows its parameters' rows of the per-tensor states (one tensor per run of equal shapes)."""
    shapes = [(10, 3), (10, 3), (5,), (7, 7), (0, 4), (1,), (200,), (5,), (5,)]
    args = _args("lamb", shapes)
    segments = plan_segments([torch.Size(s) for s in shapes], tile)
    end = segments[-1].offset + -(-segments[-1].numel // tile) * tile
    args = BucketArgs(args.program, segments, end, 0, tuple(range(len(shapes))), tile=tile)
    chunks = chunking.plan_chunks(args, 64)
    assert [(c.first, c.last) for c in chunks][0] == (0, 2)  # 30 + 30 elements (tiled: 32 + 32)
    assert (6, 7) in [(c.first, c.last) for c in chunks]  # 200 elements: alone
    assert chunks[0].start == 0 and chunks[-1].end == args.numel
    for c, following in zip(chunks, chunks[1:]):
        assert c.end == following.start == args.segments[following.first].offset and c.last == following.first
    runs = [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (7, 2)]  # (first, count) of each run of equal shapes
    for c in chunks:
        assert c.end - c.start <= 64 or c.last - c.first == 1
        assert c.args.numel == c.end - c.start and c.args.numel % tile == 0
        assert c.args.positions == tuple(range(c.first, c.last))
        assert [s.shape for s in c.args.segments] == [torch.Size(s) for s in shapes[c.first : c.last]]
        assert [s.offset + c.start for s in c.args.segments] == [s.offset for s in args.segments[c.first : c.last]]
        rows = [(k, max(c.first, f) - f, min(c.last, f + n) - f) for k, (f, n) in enumerate(runs) if f < c.last and f + n > c.first]
        assert c.tensor_rows == tuple(rows)


def test_buckets_of_one_chunk_take_the_whole_bucket_step_unless_a_check_reads_the_gradients() -> None:
    """One chunk a bucket gains nothing from chunking, but a check read from the gradients (adamw; not
    adamw-sn, which reads its subset sums) is cheaper taken on the host first: aminmax, no torch.where."""
    whole = build_step([_args("adamw", [(8, 8)])], True).__qualname__
    for name, check, size, chunked in [("adamw", True, 1000, True), ("adamw", False, 1000, False),
                                       ("adamw", False, 16, True), ("adamw-sn", True, 1000, False)]:
        args = [_args(name, [(8, 8), (8,)])]
        assert (chunking.build_eager_step(args, check, size=size).__qualname__ != whole) == chunked, (name, check, size)


def test_finiteness_verdict_reads_every_gradient_and_ignores_empty_ones() -> None:
    x = torch.randn(1000)
    assert chunking._extremes_finite([x, torch.empty(0)], x.device)
    assert chunking._extremes_finite([], x.device)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[517] = bad
        assert not chunking._extremes_finite([x, y], x.device)


def test_empty_parameters_beside_chunked_buckets(one_thread) -> None:
    """A bucket of empty parameters only (its own dtype) is one empty chunk; the others still chunk."""
    def trained(chunk: int | None) -> list[torch.Tensor]:
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

    assert all(torch.equal(a, b) for a, b in zip(trained(WHOLE), trained(SMALL_CHUNK)))


GLOBAL_SPECS = ["adagrad-norm", "scsadamw", "scsadamw-sigmoid", "sgdol"]  # sums over the whole model


def _stepped(spec: str, chunk: int | None, dtype: torch.dtype, poison: float = float("nan"),
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
    whole_params, whole_state, whole_skipped = _stepped(spec, WHOLE, torch.float64)
    params, state, skipped = _stepped(spec, SMALL_CHUNK, torch.float64)
    assert whole_skipped == skipped == 1
    for a, b in zip(whole_params, params):
        assert (a - b).abs().max() <= 1e-12 * a.abs().max()
    for key, values in whole_state["state"].items():
        for name, value in values.items():
            other = state["state"][key][name]
            assert (value - other).abs().max() <= 1e-12 * max(value.abs().max(), 1e-300), (spec, key, name)
    assert all(p.isfinite().all() for p in params)


@pytest.mark.parametrize("chunk", [WHOLE, SMALL_CHUNK])
@pytest.mark.parametrize("spec", ["adagrad-norm", "adamw-sn", "coba"])
def test_chunked_step_skips_an_overflowing_square_as_the_whole_step_does(spec: str, chunk: int | None, one_thread) -> None:
    """float32, |g| = 1e20 in a chunk far from the first: its square overflows the sum a block offers the
    finiteness check (global, per subset, per tensor). Every chunk's sums are taken before any writes, so
    the step is skipped and nothing moves, as over whole buckets."""
    before, _, _ = _stepped(spec, chunk, torch.float32, steps=5)
    after, _, skipped = _stepped(spec, chunk, torch.float32, poison=1e20, steps=6)
    assert skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_block_must_declare_the_sums_it_offers_the_check() -> None:
    """The dry pass runs a graph only as far as its last block with ``WITNESS_PORTS``, and only what their
    sums read: an undeclared offer would go unread there, so it is refused wherever it is made."""
    param = torch.zeros(4)
    ctx = BlockContext(plan_segments([torch.Size([4])]), {}, torch.ones((), dtype=torch.float64), param, 4, (0,))
    ctx.reading = {"stats": "grad"}
    ctx.witness("stats", [torch.ones(())])
    assert "grad" in ctx.witnesses
    ctx.witness_ports = ("input",)
    with pytest.raises(RuntimeError, match="WITNESS_PORTS"):
        ctx.witness("stats", [torch.ones(())])


WITNESS_CONFIGS = [
    {"block": "subset-norm", "input": "grad"},
    {"block": "subset-norm", "input": "grad", "subset": 3},
    {"block": "global-norm", "input": "grad", "span": "tensor"},
    {"block": "direction-mixer", "rule": "min-norm", "input": "grad", "scope": "tensor"},
    *({"block": "direction-mixer", "rule": "conjugate", "input": "grad", "coefficient": c, "scope": s}
      for c in ("HS", "FR", "PRP", "DY", "HZ", "CD", "LS") for s in ("tensor", "row")),
]


def test_offer_witnesses_offers_what_forward_offers() -> None:
    """The check's dry pass calls ``offer_witnesses`` where the step calls ``forward``: the same sums, bit for
    bit, for every block that offers any outside a GLOBAL scope, in every variant."""
    shapes = [torch.Size(s) for s in ((6, 4), (6, 4), (3, 5))]
    segments = plan_segments(shapes)
    numel = segments[-1].end
    gen = torch.Generator().manual_seed(0)
    covered = set()
    for config in WITNESS_CONFIGS:
        cls = BLOCKS[config["block"]][config.get("rule")]
        block = cls.model_validate(config)
        covered.add(cls)
        grad = torch.randn(numel, generator=gen)
        state = {}
        for name, spec in block.state_specs().items():
            if spec.kind is StateKind.TENSOR:
                state[name] = [torch.rand(r.count, *spec.shape(r.shape), generator=gen) for r in shape_runs(segments)]
            else:
                state[name] = torch.randn(numel, generator=gen)
        offered = []
        for run_forward in (True, False):
            ctx = BlockContext(segments, {}, torch.tensor(3.0, dtype=torch.float64), torch.zeros(numel), numel,
                               range(len(shapes)))
            ctx.witness_ports = block.WITNESS_PORTS
            ports = block.PORTS if run_forward else block.WITNESS_PORTS
            ctx.reading = {port: "grad" for port in ports}
            x = {port: grad for port in ports}
            block.forward(ctx, x, state) if run_forward else block.offer_witnesses(ctx, x, state)
            offered.append(ctx.witnesses)
        assert offered[0].keys() == offered[1].keys() and offered[0], config
        for key in offered[0]:
            assert all(torch.equal(a, b) for a, b in zip(offered[0][key], offered[1][key], strict=True)), config
    # every block that can offer sums outside a GLOBAL scope is covered (online-step-size is GLOBAL only)
    offering = {cls for family in BLOCKS.values() for cls in family.values() if cls.WITNESS_PORTS}
    assert offering - covered == {BLOCKS["online-step-size"][None]}
