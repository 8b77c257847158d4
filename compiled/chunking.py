"""The eager step on a CPU, run over cache-sized chunks of each bucket.

Run eagerly (``compile=False``), every node of a graph makes a full-size temporary and every write goes
through ``torch.where``. Over a whole bucket each of those passes streams through main memory, and on a
CPU every temporary above glibc's mmap threshold (32 MB) is mapped afresh and faulted in page by page on
every step: Adamax over 10M parameters took 614 ms a step, 150K page faults of it, against 37 ms for
torch's foreach step. So here each bucket runs chunk by chunk, and each chunk's temporaries stay in the
cache and come back from the heap. The numbers are those of the whole-bucket step: the same operations on
the same elements.

Where a chunk may end depends on the graph:

- a graph whose blocks are all elementwise or GLOBAL needs nothing beyond an element's own values (and the
  GLOBAL sums, below), so its chunks are cut every so many elements, inside parameters too, on whole vectors
  so that no element moves between a kernel's vector and scalar paths;
- any other graph (per-tensor sums, per-row statistics, per-tensor projections and states) is cut between
  parameters: a chunk holds whole parameters, and a parameter larger than a chunk is one alone. Its
  per-tensor values are then those of the whole bucket (they never depended on other parameters);
- a bucket whose Newton-Schulz runs a chunk would split is one chunk (``keeps_runs_whole``), and an
  optimizer whose dry passes would repeat matrix work (a projection the check's sums read) runs whole
  (``steps_whole``).

What a chunk cannot decide alone is decided first or last:

- a GLOBAL block's sums (AdaGrad-Norm's squared norm, the min-norm mixer's inner products, SGDOL's step
  size) run over every chunk first, in dry passes that write nothing: one pass per GLOBAL block, each
  running the graph up to that block with the sums before it known (``build_dry_pass``). The chunks then
  step with the sums given;
- the finiteness verdict (``on_nonfinite='skip'``) is taken over every gradient before the first chunk
  writes anything, as the whole step takes it: through the sums the blocks offer
  (``Block.WITNESS_PORTS``: a NaN or an overflowing square in any chunk skips the step), in a dry pass as
  far as the graph's last block that offers any (the last GLOBAL block's summing pass, where that comes
  later), and from each gradient's least and greatest element for graphs without such blocks. A dry pass
  runs only what its answer reads (``lowering.dry_plan``): subset-norm's check pass squares and sums the
  gradient, and neither forms the momentum nor divides. On a CPU the host reads the verdict without
  waiting for a device, so a skipped step runs no chunk, and an applied one writes its values directly,
  not through ``torch.where`` (the compiled step decides on the device, with no host sync);
- the step counts and SCALAR states are read by every chunk as they were before the step, and written
  once, by one call that steps the last chunk of every bucket together (buckets of a group share a count).

The GLOBAL sums come out in another order than over whole buckets (chunk by chunk, then added), so a chunked
step with GLOBAL blocks agrees with the whole-bucket one to the rounding of those sums, not bit for bit.
Buckets off the CPU run whole, as compiled: on a GPU the caching allocator already reuses memory and a chunk
would only add kernel launches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from opdsl.blocks.base import Scope, StateKind
from opdsl.compiled.layout import Segment, shape_runs
from opdsl.compiled.lowering import BucketArgs, NodeKey, Program, StepFn, build_dry_pass, build_step, dry_plan

__all__ = ["CHUNK_NUMEL_PER_THREAD", "cuts_inside_parameters", "global_nodes", "verdict_node", "keeps_runs_whole",
           "steps_whole", "plan_chunks", "build_eager_step"]

# Elements per chunk and torch thread (512 KB of float32 per temporary). Adamax over 10M parameters on one
# thread of a 2-core Xeon, in one process: 173 ms a step at 32K, 138 at 64K, 133 at 128K, 132 at 256K, 552
# whole; smaller chunks pay the step's per-operation overhead more often. A multiple of every vector width,
# so chunk edges fall between vectors. None turns chunking off: the eager step is the whole-bucket one
# (the oracle the tests and benchmarks/eager.py compare against).
CHUNK_NUMEL_PER_THREAD: int | None = 1 << 17


def cuts_inside_parameters(program: Program) -> bool:
    """Whether a chunk may end inside a parameter: every block is elementwise or GLOBAL, the values are flat
    and no state is per tensor. Then any slice of a bucket can be stepped alone, given the GLOBAL blocks'
    sums over the whole bucket (a sum over a slice is a partial sum)."""
    return not program.shaped_values and all(
        s.block.scope() in (Scope.ELEMENTWISE, Scope.GLOBAL) and all(spec.kind is not StateKind.TENSOR for _, spec in s.states)
        for s in program.steps
    )


def global_nodes(buckets: Sequence[BucketArgs]) -> list[NodeKey]:
    """The GLOBAL blocks of the buckets' graphs, in the order the step runs them."""
    keys: list[NodeKey] = []
    for b in buckets:
        for s in b.program.steps:
            key = (b.program.graph_name, s.name)
            if s.block.scope() is Scope.GLOBAL and key not in keys:
                keys.append(key)
    return keys


def verdict_node(program: Program) -> NodeKey | None:
    """How far a dry pass runs the program to take the finiteness check as the whole step takes it: to its
    last block that offers sums to the check (``Block.WITNESS_PORTS``), or to its last GLOBAL block where
    that comes later (that block's summing pass runs anyway). None: no block offers any, and the check reads
    the gradients themselves. A GLOBAL block offers its sums in ``reduce``, where such a pass stops."""
    offering = [k for k, s in enumerate(program.steps) if s.block.WITNESS_PORTS]
    if not offering:
        return None
    summed = [k for k, s in enumerate(program.steps) if s.block.scope() is Scope.GLOBAL]
    return program.graph_name, program.steps[max([offering[-1], *summed])].name


def keeps_runs_whole(program: Program) -> bool:
    """Whether the program's buckets are one chunk each: batched matrix work on runs of equal shapes
    (``Block.TILED_RUNS``: Newton-Schulz) takes their step's time, and a chunk that split a run would batch
    it otherwise (a lone matrix takes ``addmm``, as torch.optim.Muon does, where a batch takes ``baddbmm``),
    which changes the bits. The optimizer's other graphs (MuAdam's AdamW on vectors) still chunk."""
    return any(s.block.TILED_RUNS for s in program.steps)


def steps_whole(program: Program, check_finite: bool) -> bool:
    """Whether an optimizer with this program is better stepped whole, every bucket: when a dry pass (a
    GLOBAL block's sums, the finiteness verdict) would repeat matrix work (per-tensor work in the
    parameter's shape: scope TENSOR, not ``Block.SUMS_PER_TENSOR``; a subspace projection, its basis
    refresh), which costs more than chunking saves. While the check's pass ran the graph up to
    subset-norm, projection included, adamw-snsm at 10M parameters took 219 ms a step chunked against 191
    whole (132 chunked without the check). Its pass squares the gradient alone now; a graph whose checked
    sums read a projection (subset-norm with ``stats`` projected) would still repeat it.
    """
    verdict = verdict_node(program) if check_finite else None
    stops = [s.name for s in program.steps if s.block.scope() is Scope.GLOBAL] + ([verdict[1]] if verdict else [])
    dry = {name for stop in stops for name in dry_plan(program, stop, check_finite)}
    return any(s.block.scope() is Scope.TENSOR and not s.block.SUMS_PER_TENSOR for s in program.steps if s.name in dry)


@dataclass(frozen=True)
class Chunk:
    """Elements ``start:end`` of a bucket's buffer, which hold segments ``first:last`` (the edge ones in part
    where the chunk may end inside a parameter). ``tensor_rows`` are the ``(run, lo, hi)`` rows of the
    per-tensor states (one ``(count, ...)`` tensor per run of equal shapes) that belong to the chunk."""

    start: int
    end: int
    first: int
    last: int
    args: BucketArgs
    tensor_rows: tuple[tuple[int, int, int], ...] = ()


def plan_chunks(args: BucketArgs, size: int) -> tuple[Chunk, ...]:
    """The bucket cut into chunks of at most ``size`` elements: anywhere where the graph allows
    (:func:`cuts_inside_parameters`), else between parameters."""
    if args.numel == 0 or keeps_runs_whole(args.program):  # one chunk: empty parameters only, or Newton-Schulz
        return (Chunk(0, args.numel, 0, len(args.segments), args),)
    if cuts_inside_parameters(args.program):
        return _slices(args, size)
    return _whole_parameters(args, size)


def _slices(args: BucketArgs, size: int) -> tuple[Chunk, ...]:
    """The bucket cut every ``size`` elements. A chunk's segments are the parts of the parameters it holds,
    flat: elementwise blocks look at no shape, and the missing-gradient mask is broadcast over the parts."""
    chunks, first = [], 0
    for start in range(0, args.numel, size):
        end = min(start + size, args.numel)
        while args.segments[first].end <= start:
            first += 1
        last = first
        while last < len(args.segments) and args.segments[last].offset < end:
            last += 1
        parts = []
        for seg in args.segments[first:last]:
            lo, hi = max(seg.offset, start), min(seg.end, end)
            parts.append(Segment(lo - start, hi - lo, torch.Size([hi - lo])))
        part_args = replace(args, segments=tuple(parts), numel=end - start, positions=args.positions[first:last])
        chunks.append(Chunk(start, end, first, last, part_args))
    return tuple(chunks)


def _whole_parameters(args: BucketArgs, size: int) -> tuple[Chunk, ...]:
    """Consecutive parameters, as many as fit in ``size`` elements (one at least). A parameter spans its
    buffer up to the next one's offset: in a tiled bucket its padding too, so a chunk is whole tiles."""
    segments, runs = args.segments, shape_runs(args.segments)
    spans = [s.offset for s in segments[1:]] + [args.numel]  # where each parameter's span ends
    chunks, first = [], 0
    while first < len(segments):
        start, last = segments[first].offset, first + 1
        while last < len(segments) and spans[last] - start <= size:
            last += 1
        end = spans[last - 1]
        parts = tuple(Segment(s.offset - start, s.numel, s.shape) for s in segments[first:last])
        rows = tuple(
            (k, max(first, r.first) - r.first, min(last, r.first + r.count) - r.first)
            for k, r in enumerate(runs) if r.first < last and r.first + r.count > first
        )
        part_args = replace(args, segments=parts, numel=end - start, positions=args.positions[first:last])
        chunks.append(Chunk(start, end, first, last, part_args, rows))
        first = last
    return tuple(chunks)


def _extremes_finite(tensors: Sequence[torch.Tensor], home: torch.device) -> torch.Tensor:
    """One 0-d bool: no element of ``tensors`` is inf or NaN.

    From each tensor's least and greatest element (NaN propagates through both, an infinity reaches one): a
    reduction with no full-size temporary, 5 ms over 10M float32 values where ``isfinite(t).all()`` took 47.
    """
    flags = [torch.isfinite(torch.stack(torch.aminmax(t))).all().to(home) for t in tensors if t.numel()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=home)


def build_eager_step(buckets: Sequence[BucketArgs], check_finite: bool, size: int | None = None) -> StepFn:
    """The eager step: :func:`build_step`'s, run chunk by chunk where the buckets are on a CPU.

    ``size`` is the chunk length in elements (default: ``CHUNK_NUMEL_PER_THREAD`` per torch thread, as
    the step is built). It is the whole-bucket step where chunking is off (``CHUNK_NUMEL_PER_THREAD`` None), where one graph is better stepped whole
    (:func:`steps_whole`: every bucket's verdict must be known before any writes), and where no bucket has
    more than one chunk, unless the check reads the gradients themselves: taken first on the host (an
    ``aminmax`` per gradient, writes without ``torch.where``), it made AdamW's eager step over 100K
    parameters 1.16 ms against 1.45 (torch's foreach step 1.57).
    """
    whole = build_step(buckets, check_finite)
    if size is None and CHUNK_NUMEL_PER_THREAD is None:
        return whole
    size = size or CHUNK_NUMEL_PER_THREAD * max(1, torch.get_num_threads())
    plans = [plan_chunks(b, size) for b in buckets]
    verdict_at = [verdict_node(b.program) if check_finite else None for b in buckets]
    # Buckets of one chunk each gain nothing from chunks, but a check read from the gradients is still
    # cheaper taken first on the host: an `aminmax` per gradient, and writes without `torch.where`.
    one_chunk = all(len(chunks) == 1 for chunks in plans)
    sums_checked = any(at is not None for at in verdict_at)
    if (one_chunk and (not check_finite or sums_checked)) or any(steps_whole(b.program, check_finite) for b in buckets):
        return whole
    # every chunk but the last writes its elements only; the last ones together also write the shared scalars
    inner = [[build_step([c.args], False, write_shared=False) for c in chunks[:-1]] for chunks in plans]
    last = build_step([chunks[-1].args for chunks in plans], False)
    kinds = [{k: spec.kind for k, spec in b.program.state_specs.items()} for b in buckets]
    # one summing pass per GLOBAL block, over the chunks of the buckets that run it; a bucket's verdict is
    # taken in the pass that reaches its verdict node: a summing pass, or a pass of its own after them
    def runs_node(i: int, key: NodeKey) -> bool:
        return buckets[i].program.graph_name == key[0] and any(s.name == key[1] for s in buckets[i].program.steps)

    summing = {
        key: [(i, c, build_dry_pass(c.args, key, verdict_at[i] == key)) for i, chunks in enumerate(plans) if runs_node(i, key)
              for c in chunks]
        for key in global_nodes(buckets)
    }
    checking = [(i, c, build_dry_pass(c.args, verdict_at[i], True))
                for i, chunks in enumerate(plans) if verdict_at[i] is not None and verdict_at[i] not in summing
                for c in chunks]
    read_directly = [at is None for at in verdict_at]  # checked from the gradients themselves

    def step(params, grads, states, steps, envs, actives, extras, skipped=None):
        if any(p.device.type != "cpu" for p in params):
            return whole(params, grads, states, steps, envs, actives, extras, skipped)

        def cut(i: int, chunk: Chunk) -> tuple[Any, ...]:
            """Bucket ``i``'s arguments, cut to ``chunk``: full-size values along their first axis (elements,
            parameters or tiles, whichever the layout has), per-tensor states by their runs' rows."""
            if chunk.start == 0 and chunk.end == buckets[i].numel:  # the whole bucket (an empty one included)
                return params[i], grads[i], states[i], steps[i], envs[i], actives[i], extras[i]

            def rows(value: torch.Tensor) -> torch.Tensor:
                per_row = buckets[i].numel // value.shape[0]
                return value[chunk.start // per_row : chunk.end // per_row]

            state = {}
            for k, v in states[i].items():
                kind = kinds[i][k]
                if kind is StateKind.ELEMENTWISE:
                    v = rows(v)
                elif kind is StateKind.TENSOR:
                    v = [v[run][lo:hi] for run, lo, hi in chunk.tensor_rows]
                state[k] = v
            active = None if actives[i] is None else actives[i][chunk.first : chunk.last]
            extra = {k: rows(v) for k, v in extras[i].items()}
            return rows(params[i]), rows(grads[i]), state, steps[i], envs[i], active, extra

        def call(fn: StepFn, pieces: list[tuple[Any, ...]], **kwargs: Any) -> Any:
            return fn(*(list(column) for column in zip(*pieces)), **kwargs)

        home = skipped.device if skipped is not None else params[0].device
        totals: dict[NodeKey, dict[str, torch.Tensor]] = {}
        verdicts = []
        for key, passes in summing.items():
            sums = None
            for i, chunk, fn in passes:
                piece, ok = call(fn, [cut(i, chunk)], totals=totals)
                sums = piece if sums is None else {k: sums[k] + piece[k] for k in sums}
                if ok is not None:
                    verdicts.append(ok)
            totals[key] = sums
        for i, chunk, fn in checking:
            verdicts.append(call(fn, [cut(i, chunk)], totals=totals)[1])
        if check_finite:
            checked = [g for i in range(len(buckets)) if read_directly[i] for g in (grads[i], *extras[i].values())]
            verdict = torch.stack([_extremes_finite(checked, home), *(ok.to(home) for ok in verdicts)]).all()
            if not bool(verdict):  # a CPU tensor: reading it waits for nothing
                if skipped is not None:
                    skipped.add_(1)
                return verdict
        for i, chunks in enumerate(plans):
            for fn, chunk in zip(inner[i], chunks):
                call(fn, [cut(i, chunk)], totals=totals)
        call(last, [cut(i, chunks[-1]) for i, chunks in enumerate(plans)], totals=totals)
        return torch.ones((), dtype=torch.bool, device=params[0].device)

    return step
