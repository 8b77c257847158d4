"""The eager step on a CPU, run over cache-sized chunks of each bucket.

Run eagerly (``compile=False``), every node of a graph makes a full-size temporary and every write goes
through ``torch.where``. Over a whole bucket each of those passes streams through main memory, and on a
CPU every temporary above glibc's mmap threshold (32 MB) is mapped afresh and faulted in page by page on
every step: Adamax over 10M parameters took 614 ms a step, 150K page faults of it, against 37 ms for
torch's foreach step. A graph whose blocks are all elementwise needs nothing beyond an element's own
values, so here it runs chunk by chunk: each chunk's temporaries stay in the cache and come back from the
heap. The numbers are those of the whole-bucket step: the same operations on the same elements, with
chunk edges on whole vectors so that no element moves between a kernel's vector and scalar paths.

What a chunk cannot decide alone is decided first or last:

- a GLOBAL block's sums (AdaGrad-Norm's squared norm, the min-norm mixer's inner products, SGDOL's step
  size) run over every chunk first, in passes that write nothing: one pass per GLOBAL block, each
  running the graph up to that block with the sums before it known (``build_partial_sums``). The chunks
  then step with the sums given;
- the finiteness verdict (``on_nonfinite='skip'``) is taken over every gradient before the first chunk
  writes anything: through the sums the GLOBAL blocks offer, in their graph's last summing pass, as the
  whole step takes it (a NaN or an overflowing square in any chunk skips the step), and from each
  gradient's least and greatest element for graphs without such blocks. On a CPU the host reads it
  without waiting for a device, so a skipped step runs no chunk, and an applied one writes its values
  directly, not through ``torch.where`` (the compiled step decides on the device, with no host sync);
- the step counts and SCALAR states are read by every chunk as they were before the step, and written
  once, by one call that steps the last chunk of every bucket together (buckets of a group share a count).

The sums come out in another order than over whole buckets (chunk by chunk, then added), so a chunked step
with GLOBAL blocks agrees with the whole-bucket one to the rounding of those sums, not bit for bit.
Graphs with per-tensor or per-subset work, and buckets off the CPU, run whole, as compiled. On a GPU the
caching allocator already reuses memory and a chunk would only add kernel launches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from opdsl.blocks.base import Scope, StateKind
from opdsl.compiled.layout import Segment
from opdsl.compiled.lowering import BucketArgs, GlobalKey, Program, StepFn, build_partial_sums, build_step

__all__ = ["CHUNK_NUMEL_PER_THREAD", "chunkable", "global_nodes", "plan_chunks", "build_eager_step"]

# Elements per chunk and torch thread (512 KB of float32 per temporary). Adamax over 10M parameters on one
# thread of a 2-core Xeon, in one process: 173 ms a step at 32K, 138 at 64K, 133 at 128K, 132 at 256K, 552
# whole; smaller chunks pay the step's per-operation overhead more often. A multiple of every vector width,
# so chunk edges fall between vectors.
CHUNK_NUMEL_PER_THREAD = 1 << 17


def chunkable(program: Program) -> bool:
    """Whether every block of the program is elementwise or GLOBAL: then any slice of a bucket can be stepped
    alone, given the GLOBAL blocks' sums over the whole bucket (a sum over a slice is a partial sum)."""
    return not program.shaped_values and all(
        s.block.scope() in (Scope.ELEMENTWISE, Scope.GLOBAL) and all(spec.kind is not StateKind.TENSOR for _, spec in s.states)
        for s in program.steps
    )


def global_nodes(buckets: Sequence[BucketArgs]) -> list[GlobalKey]:
    """The GLOBAL blocks of the buckets' graphs, in the order the step runs them."""
    keys: list[GlobalKey] = []
    for b in buckets:
        for s in b.program.steps:
            key = (b.program.graph_name, s.name)
            if s.block.scope() is Scope.GLOBAL and key not in keys:
                keys.append(key)
    return keys


@dataclass(frozen=True)
class Chunk:
    """Elements ``start:end`` of a bucket, which hold segments ``first:last`` (the edge ones in part)."""

    start: int
    end: int
    first: int
    last: int
    args: BucketArgs


def plan_chunks(args: BucketArgs, size: int) -> tuple[Chunk, ...]:
    """The bucket cut every ``size`` elements. A chunk's segments are the parts of the parameters it holds,
    flat: elementwise blocks look at no shape, and the missing-gradient mask is broadcast over the parts."""
    if args.numel == 0:  # empty parameters only: one empty chunk
        return (Chunk(0, 0, 0, len(args.segments), args),)
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


def _all_finite(tensors: Sequence[torch.Tensor], home: torch.device) -> torch.Tensor:
    """One 0-d bool: no element of ``tensors`` is inf or NaN.

    From each tensor's least and greatest element (NaN propagates through both, an infinity reaches one): a
    reduction with no full-size temporary, 5 ms over 10M float32 values where ``isfinite(t).all()`` took 47.
    """
    flags = [torch.isfinite(torch.stack(torch.aminmax(t))).all().to(home) for t in tensors if t.numel()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=home)


def build_eager_step(buckets: Sequence[BucketArgs], check_finite: bool, size: int | None = None) -> StepFn:
    """The eager step: :func:`build_step`'s, run chunk by chunk where the buckets are on a CPU.

    ``size`` is the chunk length in elements (default: ``CHUNK_NUMEL_PER_THREAD`` per torch thread, as
    the step is built). An optimizer with any graph that is not all elementwise or GLOBAL runs whole: the
    finiteness check reads the per-tensor and per-subset sums its blocks form (``BlockContext.witness``),
    which exist only once a whole tensor has run.
    """
    whole = build_step(buckets, check_finite)
    size = size or CHUNK_NUMEL_PER_THREAD * max(1, torch.get_num_threads())
    if not all(chunkable(b.program) for b in buckets) or all(b.numel <= size for b in buckets):
        return whole
    plans = [plan_chunks(b, size) for b in buckets]
    # every chunk but the last writes its elements only; the last ones together also write the shared scalars
    inner = [[build_step([c.args], False, write_shared=False) for c in chunks[:-1]] for chunks in plans]
    last = build_step([chunks[-1].args for chunks in plans], False)
    # the states cut with the bucket (the others, SCALAR, are whole in every chunk)
    elementwise = [{k for k, spec in b.program.state_specs.items() if spec.kind is StateKind.ELEMENTWISE} for b in buckets]
    # one summing pass per GLOBAL block, over the chunks of its graph's buckets; the graph's last one also checks
    passes = global_nodes(buckets)
    closing = {key[0]: key for key in passes}  # each graph's last GLOBAL block
    summing = {  # key -> (bucket, chunk, its partial-sums function) for every chunk of the key's graph
        key: [(i, c, build_partial_sums([c.args], key, check_finite and closing[key[0]] == key))
              for i, chunks in enumerate(plans) if buckets[i].program.graph_name == key[0] for c in chunks]
        for key in passes
    }
    read_directly = [b.program.graph_name not in closing for b in buckets]  # checked from the gradients themselves

    def step(params, grads, states, steps, envs, actives, extras, skipped=None):
        if any(p.device.type != "cpu" for p in params):
            return whole(params, grads, states, steps, envs, actives, extras, skipped)

        def cut(i: int, chunk: Chunk) -> tuple[Any, ...]:
            """Bucket ``i``'s arguments, cut to ``chunk``."""
            part = slice(chunk.start, chunk.end)
            state = {k: v[part] if k in elementwise[i] else v for k, v in states[i].items()}
            active = None if actives[i] is None else actives[i][chunk.first : chunk.last]
            extra = {k: v[part] for k, v in extras[i].items()}
            return params[i][part], grads[i][part], state, steps[i], envs[i], active, extra

        def call(fn: StepFn, pieces: list[tuple[Any, ...]], **kwargs: Any) -> Any:
            return fn(*(list(column) for column in zip(*pieces)), **kwargs)

        home = skipped.device if skipped is not None else params[0].device
        totals: dict[GlobalKey, dict[str, torch.Tensor]] = {}
        verdicts = []
        for key in passes:
            sums = None
            for i, chunk, fn in summing[key]:
                piece, ok = call(fn, [cut(i, chunk)], totals=totals)
                sums = piece if sums is None else {k: sums[k] + piece[k] for k in sums}
                if ok is not None:
                    verdicts.append(ok)
            totals[key] = sums
        if check_finite:
            checked = [g for i in range(len(buckets)) if read_directly[i] for g in (grads[i], *extras[i].values())]
            verdict = torch.stack([_all_finite(checked, home), *(ok.to(home) for ok in verdicts)]).all()
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
