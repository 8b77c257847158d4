"""What a block sees of the back end while it runs on one bucket.

Blocks compute on full-size tensors in the bucket's value layout: flat ``(numel,)``, ``(count, *shape)``
for a one-shape bucket whose graph works on rows or columns (``Program.shaped_values``), or ``(tiles,
tile)`` for a tiled bucket of many shapes that sums over each parameter (``layout.choose_tile``). Elementwise
arithmetic does not care which; the context turns scalar fields into numbers or 0-d tensors and gives the
layout-aware operations (batched views per run of equal shapes, per-parameter sums, broadcasting
per-parameter values back over the layout). Everything here is traceable by torch.compile and free of host syncs.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch._inductor.config as inductor_config

from opdsl.compiled.layout import Run, Segment, shape_runs, tiles_of, value_shape
from opdsl.expr import Expr

__all__ = ["BlockContext", "widened_sum", "PARTIAL_SUM_LENGTH"]

_PLAIN_REFERENCE = re.compile(r"\s*\$\w+(\[\d+\])?\s*$")
_UNROLLED_REDUCTIONS: int = inductor_config.unroll_reductions_threshold
PARTIAL_SUM_LENGTH: int = 256  # terms per partial sum of widened_sum: 16 adds per lane of a 16-wide vector


def widened_sum(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value.sum(dtype=dtype)`` for a ``dtype`` wider than the value's, at the speed of a sum in the value's.

    The terms are summed :data:`PARTIAL_SUM_LENGTH` at a time in the value's type (float32 for narrower
    ones), then those partial sums in ``dtype``; a remainder shorter than one partial sum is summed in
    ``dtype`` directly.
    """
    flat = value.reshape(-1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    whole = flat.numel() - flat.numel() % PARTIAL_SUM_LENGTH
    total = flat[:whole].view(-1, PARTIAL_SUM_LENGTH).sum(1).sum(dtype=dtype)
    return total + flat[whole:].sum(dtype=dtype) if whole < flat.numel() else total


class BlockContext:
    """One bucket's view of the step: its segments, hyperparameters and the 1-based step count ``t``."""

    def __init__(
        self,
        segments: Sequence[Segment],
        env: Mapping[str, Any],
        step: torch.Tensor,
        param: torch.Tensor,
        numel: int,
        positions: Sequence[int],
        tile: int = 1,
    ):
        self.segments = tuple(segments)
        self.runs: tuple[Run, ...] = shape_runs(self.segments)
        self.env = env
        self.step = step  # 0-d float64 tensor: t, already incremented for this step
        self.param = param
        self.value_shape = tuple(param.shape)  # the layout of every full-size value: flat, (count, *shape) or tiled
        self.numel = numel
        self.tile = tile  # > 1: a tiled bucket, value layout (numel // tile, tile)
        if tile > 1:  # made from the static layout: constants of the compiled step
            self._owner = self._tile_owners()
            self._in_parameter = self._parameter_mask()
            self._tiles_per_parameter = self.table([tiles_of(s.numel, tile) for s in self.segments], torch.long)
        # Each segment's parameter index in its param group: a key that does not depend on how parameters
        # are bucketed.
        self.positions = tuple(positions)
        # Which step value each input port of the running block reads (None: a state); set by the lowering.
        self.reading: Mapping[str, str | None] = {}
        # A scheduled block's decision for this step (``Block.host_schedule``), set by the lowering: the same
        # 0-d bool on the host (for work the host launches or skips) and on the parameters' device.
        self.due: tuple[torch.Tensor, torch.Tensor] | None = None
        self.witnesses: dict[str, list[torch.Tensor]] = {}
        # the running block's Block.WITNESS_PORTS, set by the lowering (None: any port, for a context used alone)
        self.witness_ports: tuple[str, ...] | None = None

    # ---- scalars ------------------------------------------------------------------------------------
    def value(self, field: float | Expr | None) -> Any:
        """A literal stays a Python float (baked into the compiled step); an expression becomes a 0-d tensor."""
        if isinstance(field, Expr):
            result = field.evaluate(self.env)
            return result if _PLAIN_REFERENCE.match(field.source) else self.once(result)
        return field

    @staticmethod
    def once(value: Any) -> Any:
        """Compute a small value (0-d, or one per row/column/tensor) once per step, not once per vector of
        the elementwise kernel that reads it.

        Inductor inlines cheap pointwise producers into their consumer's loop without hoisting them: a bias
        correction ``1 - beta ** t`` became two ``pow`` calls per 8 elements (6x slower than the memory floor),
        and a subset-norm denominator ``sqrt(v) + eps`` a square root per element. A reduction is not
        inlined, so the value is realised as a small reduction over copies of itself:

        - a 0-d value over two copies;
        - a value per row or tensor over more copies than inductor unrolls into its consumer
          (``unroll_reductions_threshold``; two copies were unrolled, and LAMB's tiled trust ratio was two
          square roots and a division per vector), in a buffer one element longer than the value. A buffer
          with the consumer's row count would be fused into the consumer's outer loop as a local buffer,
          which inductor's CPU backend (torch 2.13) fails to generate when a state write follows (a KeyError
          in ``try_outer_loop_fusion_with_local_buf``).
        """
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() == 0:
            return torch.stack((value, value)).amax(0)
        flat = value.reshape(-1)
        longer = torch.cat((flat, flat[:1]))
        return torch.stack((longer,) * (_UNROLLED_REDUCTIONS + 1)).amax(0)[: flat.numel()].view(value.shape)

    def hyper(self, name: str) -> Any:
        return self.env[name]

    # ---- finiteness witnesses -----------------------------------------------------------------------
    def witness(self, port: str, sums: Sequence[torch.Tensor], *, terms_dtype: torch.dtype | None = None) -> None:
        """Offer sums over the input on ``port``, covering all of it, to the finiteness check.

        ``on_nonfinite='skip'`` reads every gradient once more to find inf or NaN. A block that already sums
        terms of a gradient over rows, columns, tensors or the model can hand those sums over instead, when
        every term is inf or NaN wherever its element of the input is, the other operands being finite
        states or inputs the check also covers: ``x*x``, ``(x - d)**2``, ``x*(x - p)``, ``y*x``. Such a sum
        is inf or NaN exactly when one of its terms is (``inf - inf`` is NaN) or when it overflows, and the
        check then reads a handful of sums rather than the whole gradient. It also skips a step whose terms
        overflow (the block's accumulator would turn infinite and freeze its step for good) and, for a
        difference with a state, a step on a state that is no longer finite. Terms formed in a type with
        less range than float32 and bfloat16 (float16 overflows at 256 squared) are not taken: they would
        skip ordinary steps. ``terms_dtype`` is the type the terms were formed in; the sums' own by default.
        """
        if self.witness_ports is not None and port not in self.witness_ports:
            raise RuntimeError(f"a block offered the finiteness check sums over port {port!r}, which is not in its "
                               "WITNESS_PORTS: declare it there, so that the chunked eager step's check reads them too")
        source = self.reading.get(port)
        if source is None or source in self.witnesses:
            return
        dtypes = [terms_dtype] if terms_dtype is not None else []
        if all(torch.finfo(d).max > 1e38 for d in dtypes + [t.dtype for t in sums]):  # an 8-bit exponent or wider
            self.witnesses[source] = list(sums)

    # ---- layout-aware operations --------------------------------------------------------------------
    def table(self, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """A small table of numbers from the static layout (one per parameter, say) on the bucket's device.

        Made on the host and sent without blocking: ``torch.tensor(values, device=...)`` copies with a
        stream sync, which the eager step would pay on a GPU every step (compiled, the table is a constant).
        """
        return torch.tensor(values, dtype=dtype).to(self.param.device, non_blocking=True)

    @property
    def shapes(self) -> list[torch.Size]:
        return [s.shape for s in self.segments]

    def concat(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`run_views`: one full-size value from per-run pieces in buffer order.

        Tiled, the pieces are copied into the tiles by one operator (``layout.into_tiles``), whatever the
        number of shapes; cast them after this, not before, so that the cast is not a loop per shape.
        """
        if self.tile > 1:
            return torch.ops.opdsl.into_tiles(list(pieces), self.tile)
        if len(pieces) == 1:
            return pieces[0].reshape(self.value_shape)
        return torch.cat([p.reshape(-1) for p in pieces])

    def run_views(self, value: torch.Tensor) -> list[torch.Tensor]:
        """One ``(count, *shape)`` view per run of equal-shaped parameters, to read: batched per-tensor work.

        Parameters of one shape sit back to back in a bucket (see ``layout.group_by_shape``), so a model's
        hundred tensors are a handful of runs: per-tensor operations compile to a few batched kernels.
        Tiled, a run's parameters are a tile multiple apart, and the pieces are copies without the padding
        (``layout.from_tiles``), so that the value is computed once for every shape.
        """
        if self.tile > 1:
            counts, numels = [r.count for r in self.runs], [r.shape.numel() for r in self.runs]
            pieces = torch.ops.opdsl.from_tiles(value, self.tile, counts, numels)
            return [piece.view(r.count, *r.shape) for piece, r in zip(pieces, self.runs)]
        if len(self.runs) == 1:
            return [value.view(value_shape(self.runs, self.numel))]
        return [value[r.offset : r.end].view(r.count, *r.shape) for r in self.runs]

    def run_slices(self, per_segment: Sequence[Any]) -> list[Any]:
        """A per-parameter sequence (or ``[n_params]`` tensor) cut into per-run pieces."""
        return [per_segment[r.first : r.first + r.count] for r in self.runs]

    def segment_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum of each parameter's slice: shape ``[n_params]``.

        Tiled, each tile is summed (its padding masked out) and the tiles of each parameter are added in
        order by ``segment_reduce``: one reduction for every shape, no atomics, the same sum on every run.
        """
        if self.tile > 1:
            per_tile = self._without_padding(flat).sum(1)
            # unsafe: no check of the lengths, which would read them on the host
            return torch.segment_reduce(per_tile, "sum", lengths=self._tiles_per_parameter, unsafe=True)
        return torch.cat([v.reshape(v.shape[0], -1).sum(1) for v in self.run_views(flat)])

    def total(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Sum of a full-size value over the bucket's parameters (a global block's partial sum): 0-d.

        With ``dtype`` wider than the value's (float64 for float32 terms), the sum runs in two levels: each
        run of :data:`PARTIAL_SUM_LENGTH` consecutive terms is summed in the value's type (float32 at least),
        and those partial sums in ``dtype``. Widening every term instead made the reduction arithmetic-bound
        on a CPU: float32 to float64 conversions and float64 adds ran at 2.5x the time of the pass's read.
        A float32 partial sum of 256 terms errs by a few units in its last place, and the total carries
        about 1e-8 of relative error where widening every term carried 1e-14, far under the float32
        rounding of any parameter it scales.
        """
        value = self._without_padding(value) if self.tile > 1 else value
        if dtype is None or not value.dtype.is_floating_point or dtype.itemsize <= value.dtype.itemsize:
            return value.sum(dtype=dtype)
        return widened_sum(value, dtype)

    def expand(self, per_segment: torch.Tensor) -> torch.Tensor:
        """Broadcast one value per parameter back over the value layout (a number is computed :meth:`once`)."""
        if per_segment.dtype.is_floating_point and self.tile == 1:
            per_segment = self.once(per_segment)
        if len(self.segments) == 1:
            return per_segment.reshape(())
        if self.tile > 1:  # one value per row (every tile lies inside one parameter), realised once per row
            rows = per_segment[self._owner]
            return (self.once(rows) if rows.dtype.is_floating_point else rows).reshape(-1, 1)
        if len(self.value_shape) > 1:  # (count, 1, ..., 1) broadcasts over the (count, *shape) layout
            return per_segment.reshape(-1, *([1] * (len(self.value_shape) - 1)))
        pieces = [
            values.reshape(r.count, 1).expand(r.count, r.shape.numel())
            for r, values in zip(self.runs, self.run_slices(per_segment))
        ]
        return self.concat(pieces)

    def per_parameter(self, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], value: torch.Tensor,
                      per_segment: torch.Tensor) -> torch.Tensor:
        """``op(slice, number)`` for each parameter's slice of a full-size value and that parameter's number
        (``per_segment``, one per parameter): ``value * factor``, ``value / norm``.

        One loop over the bucket in every layout: tiled or shaped, :meth:`expand` gives a number per row;
        flat with one shape, each parameter is a row of a ``(count, numel)`` view, where :meth:`expand` would
        index a table per element.
        """
        if self.tile == 1 and len(self.runs) == 1 and len(self.value_shape) == 1 and len(self.segments) > 1:
            count = self.runs[0].count
            return op(value.view(count, -1), self.once(per_segment).view(count, 1)).view(self.value_shape)
        return op(value, self.expand(per_segment))

    # ---- a tiled bucket's index -----------------------------------------------------------------------
    def _without_padding(self, value: torch.Tensor) -> torch.Tensor:
        """A full-size value with zeros in the padding, whatever the padding held (inf and NaN included)."""
        return torch.where(self._in_parameter, value, torch.zeros((), dtype=value.dtype, device=value.device))

    def _tile_owners(self) -> torch.Tensor:
        """Which parameter each tile belongs to: ``[tiles]`` indices."""
        starts = self.table([s.offset // self.tile for s in self.segments[1:]], torch.long)
        rows = torch.arange(self.numel // self.tile, device=self.param.device)
        return torch.bucketize(rows, starts, right=True)  # an empty parameter shares its start with the next

    def _parameter_mask(self) -> torch.Tensor:
        """``(tiles, tile)`` bool: which elements of the layout belong to a parameter (False: padding)."""
        device = self.param.device
        # int32 where the offsets fit: the comparison is then as wide as the float32 vectors it masks
        index = torch.int32 if self.numel < 2**31 else torch.int64
        ends = self.table([s.end for s in self.segments], index)
        row_start = torch.arange(0, self.numel, self.tile, dtype=index, device=device)
        limit = self.once(ends[self._owner] - row_start).reshape(-1, 1)  # a row's leading elements that are a parameter's
        return torch.arange(self.tile, dtype=index, device=device) < limit
