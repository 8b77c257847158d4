"""Flat buffers: the parameters of one bucket live back to back in one tensor, and so do their grads.

Each ``p.data`` becomes a view into the bucket's parameter buffer and each ``p.grad`` a view into its
gradient buffer, so an elementwise chain over a whole bucket is one kernel and autograd accumulates
straight into the buffer. When a user replaces or clears a ``.grad`` (``model.zero_grad()`` sets them
to None), :meth:`FlatBuffers.gather_grads` copies it back in before the step and re-installs the view.

A bucket that sums over each of its parameters is *tiled*: every parameter starts on a tile boundary and
its last tile is padded with elements no parameter views (:func:`choose_tile`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

__all__ = [
    "Segment", "Run", "FlatBuffers", "shape_runs", "group_by_shape", "run_of", "value_shape",
    "choose_tile", "tiles_of", "into_tiles", "from_tiles", "TILE_SIZES", "TILED_DEVICE_TYPES",
    "full_buffer", "STAGGER_BYTES", "STAGGERED_DEVICE_TYPES",
]

#: Tile lengths a bucket of many shapes may be laid out in, largest first (see :func:`choose_tile`).
TILE_SIZES: tuple[int, ...] = (1024, 512, 256, 128, 64, 32, 16)
#: Devices whose torch has the ``segment_reduce`` kernel a tiled bucket sums with; elsewhere a graph that
#: sums per tensor gets a bucket per shape, as a graph with other per-tensor work does.
TILED_DEVICE_TYPES = frozenset({"cpu", "cuda"})


#: Successive full-size buffers of a bucket start this many bytes apart within a 4 KiB page (0: all alike).
STAGGER_BYTES = 1024
#: Devices whose buffers are staggered: measured on CPUs; GPU buffers start where the allocator puts them.
STAGGERED_DEVICE_TYPES = frozenset({"cpu"})
_PAGE_BYTES = 4096


def full_buffer(numel: int, fill: float, slot: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements set to ``fill``, starting ``slot * STAGGER_BYTES`` bytes (modulo
    4 KiB) further into its page than a buffer of slot 0 does.

    The step's loops read and write a bucket's buffers (parameters 0, gradients 1, full-size states 2, 3,
    ...) at the same index together. Large allocations all start at the same place in a page, so those
    loads and stores share their low 12 address bits, which the CPU's store-to-load disambiguation takes
    for possible overlaps (4K aliasing). Measured on one core of the AMX Xeon, AdamW's compiled loop over
    four 10M-element buffers: 14.78 ms at equal offsets, 13.94 / 13.55 / 13.02 ms 64 / 256 / 1024 bytes apart.
    """
    shift = 0
    if torch.device(device).type in STAGGERED_DEVICE_TYPES:
        shift = slot * STAGGER_BYTES % _PAGE_BYTES // dtype.itemsize
    return torch.full((numel + shift,), fill, dtype=dtype, device=device)[shift:]


@dataclass(frozen=True)
class Segment:
    """Where one parameter sits inside its bucket's flat buffer."""

    offset: int
    numel: int
    shape: torch.Size

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Run:
    """Consecutive parameters of one shape: ``count`` segments from segment ``first``, back to back in the buffer.

    A run's slice of any flat tensor views as ``(count, *shape)``, so a per-tensor operation (a row norm, a
    matrix product, an SVD) runs batched over the run instead of once per parameter.
    """

    first: int
    count: int
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.count * self.shape.numel()

    @property
    def end(self) -> int:
        return self.offset + self.numel


def group_by_shape(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters reordered so that equal shapes are adjacent (shapes in order of first appearance)."""
    first_seen: dict[torch.Size, int] = {}
    for p in params:
        first_seen.setdefault(p.shape, len(first_seen))
    return sorted(params, key=lambda p: first_seen[p.shape])


def shape_runs(segments: tuple[Segment, ...]) -> tuple[Run, ...]:
    """Maximal runs of consecutive segments with the same shape."""
    runs: list[Run] = []
    for i, seg in enumerate(segments):
        if runs and runs[-1].shape == seg.shape:
            last = runs[-1]
            runs[-1] = Run(last.first, last.count + 1, last.offset, last.shape)
        else:
            runs.append(Run(i, 1, seg.offset, seg.shape))
    return tuple(runs)


def run_of(runs: tuple[Run, ...], index: int) -> tuple[int, int]:
    """(which run, position inside it) of segment ``index``."""
    for k, run in enumerate(runs):
        if run.first <= index < run.first + run.count:
            return k, index - run.first
    raise IndexError(f"segment {index} is in no run")


def value_shape(runs: tuple[Run, ...], numel: int) -> tuple[int, ...]:
    """A bucket's natural shape: ``(count, *shape)`` when all its parameters have one shape, else flat."""
    if len(runs) == 1:
        return (runs[0].count, *runs[0].shape)
    return (numel,)


def tiles_of(numel: int, tile: int) -> int:
    """How many tiles of ``tile`` elements a parameter of ``numel`` elements spans (0 for an empty one)."""
    return -(-numel // tile)


def plan_segments(shapes: Sequence[torch.Size], tile: int = 1) -> tuple[Segment, ...]:
    """The parameters back to back; with ``tile`` > 1 each starts on a tile boundary, its last tile padded."""
    segments, offset = [], 0
    for shape in shapes:
        numel = torch.Size(shape).numel()
        segments.append(Segment(offset, numel, torch.Size(shape)))
        offset += tiles_of(numel, tile) * tile
    return tuple(segments)


def choose_tile(shapes: Sequence[torch.Size]) -> int:
    """The tile length of a bucket whose per-tensor work runs tiled (``Program.tiles_shapes``).

    Such a bucket is stepped as a ``(tiles, tile)`` matrix whose every row lies inside one parameter: a
    per-parameter value then broadcasts over whole rows, a vector loop with one value per row, and all
    shapes share one loop nest (a bucket per shape compiled a nest per shape: LAMB over ResNet-50's 28
    shapes took 43 s). The largest tile whose padding adds at most 1/64 to the bucket; the step time hardly
    depends on it (a prototype of LAMB's arithmetic over ResNet-50, one thread of a 2-core Xeon: 44, 39 and
    44 ms at 128, 1024 and 8192).
    """
    numel = sum(torch.Size(s).numel() for s in shapes)
    for tile in TILE_SIZES:
        padded = sum(tiles_of(torch.Size(s).numel(), tile) * tile for s in shapes)
        if (padded - numel) * 64 <= numel:
            return tile
    return TILE_SIZES[-1]


def into_tiles(pieces: Sequence[torch.Tensor], tile: int) -> torch.Tensor:
    """Per-run pieces ``(count, *shape)`` laid out as a ``(tiles, tile)`` bucket: each parameter from a tile
    boundary, its last tile padded with zeros. The inverse of a tiled bucket's run views.

    Called as ``torch.ops.opdsl.into_tiles``, an operator opaque to torch.compile: written out by inductor,
    the copies were a loop per shape, and every loop a C++ kernel to build (a g++ call of about 1.4 s on
    the 2-core Xeon), where this is one call whatever the number of shapes.
    """
    counts, numels = _runs_of_pieces(pieces)
    out = pieces[0].new_empty(_tiles_of_runs(counts, numels, tile), tile)
    for (block, numel), piece in zip(_run_blocks(out, tile, counts, numels), pieces):
        block[:, :numel].copy_(piece.reshape(block.shape[0], numel))
        block[:, numel:].zero_()
    return out


def from_tiles(tiles: torch.Tensor, tile: int, counts: Sequence[int], numels: Sequence[int]) -> list[torch.Tensor]:
    """The runs of a ``(tiles, tile)`` bucket as contiguous ``(count, numel)`` copies, padding left out: the
    inverse of :func:`into_tiles` (runs back to back from the first tile, ``count`` parameters of
    ``numel`` elements each).

    Called as ``torch.ops.opdsl.from_tiles``, opaque to torch.compile, so that ``tiles`` is computed once
    as one loop over the bucket: a strided view per run let inductor compute every run's slice in a loop
    of its own, a C++ kernel per shape again.
    """
    return [
        block[:, :numel].clone(memory_format=torch.contiguous_format)
        for block, numel in _run_blocks(tiles, tile, counts, numels)
    ]


def _run_blocks(
    tiles: torch.Tensor, tile: int, counts: Sequence[int], numels: Sequence[int]
) -> Iterator[tuple[torch.Tensor, int]]:
    """Each run's rows of a ``(tiles, tile)`` tensor as ``(count, padded numel)``, with the run's numel (a
    view where ``tiles`` is contiguous, as a buffer written through it is)."""
    row = 0
    for count, numel in zip(counts, numels):
        span = tiles_of(numel, tile)
        yield tiles[row : row + count * span].reshape(count, span * tile), numel
        row += count * span


def _runs_of_pieces(pieces: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    return [p.shape[0] for p in pieces], [math.prod(p.shape[1:]) for p in pieces]


def _tiles_of_runs(counts: Sequence[int], numels: Sequence[int], tile: int) -> int:
    return sum(count * tiles_of(numel, tile) for count, numel in zip(counts, numels))


_LIBRARY = torch.library.Library("opdsl", "FRAGMENT")
_LIBRARY.define("into_tiles(Tensor[] pieces, int tile) -> Tensor")
_LIBRARY.impl("into_tiles", into_tiles, "CompositeExplicitAutograd")
_LIBRARY.define("from_tiles(Tensor tiles, int tile, int[] counts, int[] numels) -> Tensor[]")
_LIBRARY.impl("from_tiles", from_tiles, "CompositeExplicitAutograd")
torch.library.register_fake(
    "opdsl::into_tiles",
    lambda pieces, tile: pieces[0].new_empty(_tiles_of_runs(*_runs_of_pieces(pieces), tile), tile),
    lib=_LIBRARY,
)
torch.library.register_fake(
    "opdsl::from_tiles",
    lambda tiles, tile, counts, numels: [tiles.new_empty(c, n) for c, n in zip(counts, numels)],
    lib=_LIBRARY,
)


class FlatBuffers:
    """Owns one bucket's parameter and gradient buffers and keeps every parameter a view of them."""

    @staticmethod
    def holds(tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the parameter buffer of some opdsl optimizer (this one or another).

        The buffer's storage is marked: torch keeps one Python object per storage for as long as the storage
        lives, so the mark outlives the optimizer that made it, as the parameters viewing it do."""
        return getattr(tensor.untyped_storage(), "_opdsl_parameters", False)

    def __init__(self, params: list[torch.nn.Parameter], tile: int = 1):
        if not params:
            raise ValueError("a bucket needs at least one parameter")
        first = params[0]
        self.params = params
        self.tile = tile
        self.segments = plan_segments([p.shape for p in params], tile)
        self.runs = shape_runs(self.segments)
        self.numel = self.segments[-1].offset + tiles_of(self.segments[-1].numel, tile) * tile
        self.device, self.dtype = first.device, first.dtype
        with torch.no_grad():
            # zeros: a tiled bucket's padding is stepped with the rest and must start finite
            self.param = full_buffer(self.numel, 0.0, 0, dtype=self.dtype, device=self.device)
            self.grad = full_buffer(self.numel, 0.0, 1, dtype=self.dtype, device=self.device)
            for p, seg in zip(params, self.segments):
                self.param[seg.offset : seg.end].copy_(p.detach().reshape(-1))
        self._zeroed_at = self.grad._version  # gradients the parameters already hold are copied in below
        self._grad_views = self._segment_views(self.grad)
        self._views_by_buffer: dict[int, list[torch.Tensor]] = {}
        for p, seg in zip(params, self.segments):
            p.data = self.param[seg.offset : seg.end].view(seg.shape)
        self._param_ptrs = [p.data_ptr() for p in params]
        self.param.untyped_storage()._opdsl_parameters = True
        self.install_grad_views(keep_values=True)

    def _segment_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's slice of a flat buffer, in the parameter's shape."""
        return [flat[s.offset : s.end].view(s.shape) for s in self.segments]

    def install_grad_views(self, keep_values: bool) -> None:
        """Point every ``p.grad`` at its slice of the gradient buffer (copying a foreign grad in first).

        A frozen parameter (``requires_grad=False``) without a gradient keeps ``.grad`` None, as in torch:
        backward never writes one, and a zero view would have it stepped (decayed) every step.
        """
        with torch.no_grad():
            for p, view in zip(self.params, self._grad_views):
                if not p.requires_grad and (p.grad is None or p.grad is view):
                    p.grad = None
                    continue
                if p.grad is not None and p.grad is not view and keep_values:
                    view.copy_(p.grad.reshape(view.shape))
                p.grad = view

    def written(self) -> bool:
        """Whether a gradient was written into the buffer since it was last zeroed.

        Autograd accumulates into the views in place, and any in-place write to a view bumps the version
        counter it shares with the buffer: one host-side read, no look at the values. A write through
        ``p.grad.data`` is not counted (``.data`` has a counter of its own).
        """
        return self._zeroed_at is None or self.grad._version != self._zeroed_at

    def gather_grads(self) -> list[int] | None:
        """Make the gradient buffer hold every ``p.grad``; return indices of params whose grad is None.

        The common case (autograd accumulated into our views) costs one identity check per parameter.
        """
        clean = not self.written()
        missing: list[int] = []
        zeroed: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for i, (p, view) in enumerate(zip(self.params, self._grad_views)):
            g = p.grad
            if g is view and p.requires_grad:
                continue
            if g is None or g is view:  # no gradient, or frozen since its view was installed
                zeroed.append(view)
                missing.append(i)
                if not p.requires_grad:
                    p.grad = None
                    continue
            elif g.is_sparse:
                raise RuntimeError(
                    f"parameter {i} of a bucket has a sparse gradient; opdsl supports dense gradients only"
                )
            else:
                targets.append(view)
                sources.append(g.reshape(view.shape))
            p.grad = view
        with torch.no_grad():  # one launch each on a GPU, not one per parameter (model.zero_grad() clears all)
            if zeroed:
                torch._foreach_zero_(zeroed)
            if targets:
                torch._foreach_copy_(targets, sources)
        if clean and not targets:  # zeroing slices of a zeroed buffer writes no gradient
            self._zeroed_at = self.grad._version
        return missing or None

    def swap_grad(self, spare: torch.Tensor) -> torch.Tensor:
        """Continue with ``spare`` as the (zeroed) gradient buffer and return the current one, gradients in it.

        For a second gradient at the same point (``grad2``): the first stays where backward wrote it, with
        no copy. Each buffer's views are made once and kept.
        """
        previous, self.grad = self.grad, spare
        self._views_by_buffer[previous.data_ptr()] = self._grad_views
        self._grad_views = self._views_by_buffer.get(spare.data_ptr()) or self._segment_views(spare)
        self.zero_grad(set_to_none=False)
        return previous

    def zero_grad(self, set_to_none: bool, zeros_are_gradients: bool = False) -> None:
        """Clear the gradients: to None, or to zero views, which count as no gradient yet (the next step
        steps nothing unless one is written) or, with ``zeros_are_gradients``, as zero gradients."""
        if set_to_none:
            for p in self.params:
                p.grad = None
        else:
            self.grad.zero_()
            self.install_grad_views(keep_values=False)
            self._zeroed_at = None if zeros_are_gradients else self.grad._version

    def moved_params(self) -> list[int]:
        """Indices of parameters whose ``.data`` no longer lives in the flat buffer (re-assigned, or the module
        moved to another device or dtype): the buffer would silently stop updating them.

        Runs every step, so it compares one list of addresses (17 us for 101 parameters; comparing every
        shape too took 48 us). A re-assignment that keeps the address (a reshaped view of the same memory)
        passes: the buffer still updates that memory.
        """
        if [p.data_ptr() for p in self.params] == self._param_ptrs:
            return []
        return [i for i, (p, ptr) in enumerate(zip(self.params, self._param_ptrs)) if p.data_ptr() != ptr]
