"""The contract every primitive block follows.

A block is a pydantic model (its validated configuration, one per node of a spec) plus a pure function
from its inputs and state to its output and new state. Blocks never see layouts, devices or compile:
they receive flat tensors for one *bucket* (the parameters of one group that share a graph, device and
dtype, stored back to back) and a :class:`BlockContext` that knows how that flat tensor splits into
parameters. Anything that is not elementwise goes through the context (``segment_sum``, ``views``,
``expand``), so the back end decides how reductions and matrix work are scheduled.

Scalar fields (``beta``, ``eps``, ...) accept a number or an expression over the spec's hyperparameters,
e.g. ``$betas[1]`` or ``1 - $momentum``; :meth:`BlockContext.value` turns them into numbers or 0-d tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from opdsl.expr import Expr
from opdsl.scalars import Condition, Scalar, ScalarRange, condition_fields, scalar, scalar_ranges
from opdsl.schedule import Periodic

if TYPE_CHECKING:  # pragma: no cover
    from opdsl.compiled.context import BlockContext

__all__ = [
    "Block",
    "BlockContext",
    "Ref",
    "Condition",
    "Scalar",
    "scalar",
    "ScalarRange",
    "Scope",
    "StateKind",
    "StateSpec",
    "Tensors",
]

Tensors = dict[str, torch.Tensor]

#: A reference to a block input: ``grad``, ``param``, another node's name, or ``node@prev`` (that node's
#: primary state as it was *before* this step).
Ref = str


class Scope(str, Enum):
    """How far a block looks: the back end plans reductions from this."""

    ELEMENTWISE = "elementwise"
    SUBSET = "subset"  # reductions inside parts of one tensor (rows, columns, chunks)
    TENSOR = "tensor"  # one reduction (or one matrix operation) per parameter tensor
    GLOBAL = "global"  # one reduction over every parameter the graph owns, across buckets


# Steps at which a field that reads ``step`` is range-checked besides step 1: every step to 100, then eight
# per decade to 1e9 (a field's value at the steps between is not proven; these catch a drift out of range).
STEP_SAMPLES: tuple[int, ...] = (
    *range(2, 101), *sorted({round(10 ** (2 + k / 8)) for k in range(1, 57)})
)


class StateKind(str, Enum):
    ELEMENTWISE = "elementwise"  # one flat buffer shaped like the bucket's parameters
    TENSOR = "tensor"  # one tensor per parameter, shape given by ``StateSpec.shape``
    SCALAR = "scalar"  # one 0-d tensor per bucket (identical across buckets for global blocks)


@dataclass(frozen=True)
class StateSpec:
    """What a block keeps between steps.

    ``shape`` (TENSOR kind only) maps a parameter's shape to the state's shape; ``dtype`` None means the
    parameters' dtype. ``init`` is the constant the state starts from.
    """

    kind: StateKind
    init: float = 0.0
    # Not compared: it is a closure over the block's fields, made anew by each state_specs() call, and
    # plans (whose equality reuses a compiled step) compare the blocks themselves.
    shape: Callable[[torch.Size], tuple[int, ...]] | None = field(default=None, compare=False)
    dtype: torch.dtype | None = None


class Block(BaseModel):
    """Base class of every block. Subclasses declare ``block: Literal["name"]`` and their fields.

    Class attributes a subclass may set:
    - ``PORTS``: names of the fields that reference other nodes (inputs of the block).
    - ``PRIMARY_STATE``: the state that ``node@prev`` reads and that ``describe`` shows first.
    - ``CARRIES_NONFINITE``: a port whose inf and NaN elements surely reach the output at the same
      position when every other operand is finite (``x + wd * param``). A finiteness witness offered
      on the output (``BlockContext.witness``) then also vouches for what that port read.
    - ``SUMS_PER_TENSOR``: the block's per-tensor work (scope TENSOR) is only sums over each parameter and
      numbers per parameter broadcast back (``ctx.segment_sum``, ``ctx.expand``, ``ctx.per_parameter``),
      never a view in the parameter's shape. Such a block runs in one tiled bucket for all shapes instead
      of a bucket per shape (:meth:`splits_by_shape`).
    - ``TILED_RUNS``: the block's per-tensor work is batched matrix work on ``ctx.run_views`` whose result
      comes back through ``ctx.concat``, and takes far longer than one more pass over its result. It runs
      in a tiled bucket too: there the views step over the padding and ``concat`` is one copy into the
      tiles, so the elementwise work before and after it is one loop whatever the number of shapes.
    - ``WITNESS_PORTS``: the ports whose sums the block may hand to the finiteness check
      (``BlockContext.witness``); a block that offers others is an error. The eager step on a CPU takes
      the check before it steps any chunk, in a pass that runs each graph only as far as its last such block
      and only what their sums need: a GLOBAL block's ``reduce``, any other's :meth:`offer_witnesses`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, arbitrary_types_allowed=True)

    block: str
    when: Condition | None = Field(
        default=None,
        alias="if",
        description="Build-time condition over hyperparameters; when false the node passes `else` (default: `input`) through.",
    )
    otherwise: Ref | None = Field(
        default=None, alias="else", description="What the node outputs when its `if:` is false (default: its `input`)."
    )

    PORTS: ClassVar[tuple[str, ...]] = ("input",)
    PRIMARY_STATE: ClassVar[str | None] = None
    PREV_NEEDS: ClassVar[str | None] = None  # what makes a block keep its primary state, where it may not
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ()  # fields holding an expression over tensors, not a scalar
    CARRIES_NONFINITE: ClassVar[str | None] = None
    SUMS_PER_TENSOR: ClassVar[bool] = False
    TILED_RUNS: ClassVar[bool] = False
    WITNESS_PORTS: ClassVar[tuple[str, ...]] = ()

    # ---- declarations -------------------------------------------------------------------------------
    def scope(self) -> Scope:
        return Scope.ELEMENTWISE

    def splits_by_shape(self) -> bool:
        """Whether the block wants a bucket per parameter shape: true for per-subset work and for per-tensor
        work in the parameter's shape (a batched matrix product, a per-shape factor).

        In a bucket of several shapes such a block computes one piece per shape, and the pieces are
        concatenated into a full-size temporary before the next elementwise block reads them; inductor's CPU
        backend writes that concatenation out. In a one-shape bucket the piece is the value. Elementwise and
        global work share one bucket across shapes, and so do sums per tensor (``SUMS_PER_TENSOR``) and
        batched matrix work (``TILED_RUNS``), in a tiled bucket.
        """
        tiled = self.SUMS_PER_TENSOR or self.TILED_RUNS
        return self.scope() is Scope.SUBSET or (self.scope() is Scope.TENSOR and not tiled)

    def state_specs(self) -> dict[str, StateSpec]:
        return {}

    def host_schedule(self) -> Periodic | None:
        """The steps on which the block does work that the host launches or skips (subspace momentum's SVD
        refresh), or None. The optimizer decides it for each step without a device sync
        (:class:`opdsl.schedule.StepClock`) and hands the decision to ``forward`` as ``ctx.due``."""
        return None

    def check_shape(self, shape: torch.Size) -> str | None:
        """Return why a parameter of this shape cannot pass through this block, or None."""
        return None

    def conditions(self) -> list[tuple[str, Any]]:
        """(field, value) of every build-time condition, ``if`` first."""
        fields = [name for name in condition_fields(type(self)) if name != "when"]
        return [("when", self.when)] + [(name, getattr(self, name)) for name in fields]

    def decided(self, decide: Callable[[Any], bool]) -> "Block":
        """A copy with every build-time condition except ``if`` replaced by its decision."""
        updates = {name: decide(value) for name, value in self.conditions() if name != "when" and isinstance(value, Expr)}
        return self.model_copy(update=updates) if updates else self

    def inputs(self) -> dict[str, Ref]:
        """Port name -> reference, for every port that is set (``else`` included, for graph checks)."""
        out = {}
        for port in self.PORTS:
            ref = getattr(self, port)
            if ref is not None:
                out[port] = ref
        if self.otherwise is not None:
            out["else"] = self.otherwise
        return out

    def scalar_fields(self) -> Iterable[tuple[str, Scalar]]:
        for name in type(self).model_fields:
            if name == "when" or name in self.TENSOR_FIELDS:
                continue
            value = getattr(self, name)
            if isinstance(value, (Expr, float, int)) and not isinstance(value, bool):
                yield name, value
            elif isinstance(value, tuple) and any(isinstance(v, Expr) for v in value):
                for i, v in enumerate(value):
                    yield f"{name}[{i}]", v

    def problems_at(self, evaluate: Callable[[Scalar], Any]) -> list[tuple[str | None, str]]:
        """(field, message) for each condition or field that cannot be evaluated at these values (``if`` for
        the node's own condition); where all can, :meth:`check_values`' messages (field None)."""
        problems = []
        for field, value in [*self.conditions(), *self.scalar_fields()]:
            try:
                evaluate(value)
            except (ValueError, TypeError, ArithmeticError) as err:
                name = "if" if field == "when" else field
                text = str(err) if str(err).startswith("cannot evaluate") else f"cannot evaluate {name!r}: {err}"
                problems.append((name, text))
        return problems or [(None, message) for message in self.check_values(evaluate)]

    def tensor_expressions(self) -> list[tuple[str, Expr]]:
        """(field, expression) of expressions over tensors (``TENSOR_FIELDS``: the ``map`` block's ``expr``):
        their hyperparameters are checked and read like a scalar field's, but they have no value to
        range-check before the step."""
        return [(name, getattr(self, name)) for name in self.TENSOR_FIELDS]

    def expressions(self) -> list[tuple[str, Expr]]:
        """Every expression of the node: scalar fields, conditions (``when`` for ``if``), tensor expressions."""
        fields = [*self.scalar_fields(), *self.conditions(), *self.tensor_expressions()]
        return [(name, value) for name, value in fields if isinstance(value, Expr)]

    def scalar_output(self) -> bool:
        """Whether the node's output is one value per step rather than one per element (a scalar map)."""
        return False

    def scalar_ports(self) -> list[str]:
        """Ports that must read scalar values (a scalar map's inputs)."""
        return []

    def missing_state(self, name: str, own: Mapping[str, torch.Tensor], step: torch.Tensor | None) -> torch.Tensor | None:
        """The value of state ``name`` for a checkpoint written before the block kept it, from the node's
        other saved states ``own`` and the saved step count; None if it cannot be told (loading refuses)."""
        return None

    def read_from_outside(self) -> bool:
        """Whether the node's state is worth keeping even if it feeds nothing (read from ``optimizer.state``)."""
        return False

    def prev_kind(self) -> StateKind | None:
        """The kind of the state ``node@prev`` reads (the primary state), or None if the block keeps none in
        this configuration."""
        spec = self.state_specs().get(self.PRIMARY_STATE) if self.PRIMARY_STATE is not None else None
        return spec.kind if spec is not None else None

    def has_prev(self) -> bool:
        """Whether ``node@prev`` can read this node: it keeps its primary state in this configuration."""
        return self.prev_kind() is not None

    def step_field_hypers(self) -> frozenset[str] | None:
        """The hyperparameters read by the fields that also read ``step``; None if no field reads ``step``."""
        exprs = [v for _, v in self.scalar_fields() if isinstance(v, Expr) and v.uses_step]
        return frozenset().union(*(e.hypers for e in exprs)) if exprs else None

    def problems_over_steps(
        self, evaluate_at: Callable[[float], Callable[[Scalar], Any]], steps: Iterable[int] = ()
    ) -> list[tuple[str | None, str]]:
        """:meth:`problems_at` at step 1, then, if a field reads ``step``, at each of ``steps`` (default
        :data:`STEP_SAMPLES`) until one has a problem: ``step / 4`` as an EMA's beta is fine at step 1 and
        leaves [0, 1] at step 5."""
        problems = self.problems_at(evaluate_at(1.0))
        if problems or self.step_field_hypers() is None:
            return problems
        first = self._first_bad_step(evaluate_at, list(steps or STEP_SAMPLES))
        if first is None:
            return []
        return [(field, f"at step {first}: {message}") for field, message in self.problems_at(evaluate_at(float(first)))]

    def _first_bad_step(self, evaluate_at: Callable[[Any], Callable[[Scalar], Any]], steps: list[int]) -> int | None:
        """The first step at which a field that reads ``step`` leaves its range or is not finite, searched at
        ``steps`` all at once (one evaluation over a float64 tensor of them: it runs whenever a scheduler
        changes a value such a field reads), then bisected down to the exact step."""
        ranges = scalar_ranges(type(self))
        fields = [(name, v) for name, v in self.scalar_fields() if isinstance(v, Expr) and v.uses_step]

        def bad(name: str, expr: Expr, at: Any) -> Any:
            return ranges.get(name.split("[")[0], ScalarRange()).outside(evaluate_at(at)(expr))

        samples = torch.tensor(steps, dtype=torch.float64)
        first = None
        for name, expr in fields:
            try:
                flags = bad(name, expr, samples)
            except (ValueError, TypeError, ArithmeticError):
                flags = torch.tensor([bool(self.problems_at(evaluate_at(float(s)))) for s in steps])
            if not bool(flags.any()):
                continue
            k = int(flags.nonzero()[0])
            lo, hi = (steps[k - 1] if k else 1), steps[k]  # lo is fine (step 1 was checked), hi is not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                try:
                    fails = bool(bad(name, expr, float(mid)).any())
                except (ValueError, TypeError, ArithmeticError):
                    fails = True
                lo, hi = (lo, mid) if fails else (mid, hi)
            first = hi if first is None else min(first, hi)
        return first

    def check_values(self, evaluate: Callable[[Scalar], Any]) -> list[str]:
        """Check every scalar field at concrete hyperparameter values (a finite number, in its range).

        Literals were checked when the spec was read; an expression can only be checked here, once the
        hyperparameters it reads have values: ``1 - $dampening`` with dampening 5, ``1 / $k`` with k 0.
        """
        problems = []
        ranges, conditions = scalar_ranges(type(self)), set(condition_fields(type(self)))
        for name, raw in self.scalar_fields():
            if name in conditions:
                continue
            value = evaluate(raw)
            source = f" (= {raw})" if isinstance(raw, Expr) else ""
            if isinstance(value, bool):
                problems.append(f"field '{name}'{source} is a condition ({str(value).lower()}); expected a number")
                continue
            if isinstance(value, (tuple, list)):
                problems.append(f"field '{name}'{source} is the list {list(value)}; expected one number (index it: "
                                f"{raw}[0])")
                continue
            message = ranges.get(name.split("[")[0], ScalarRange()).violation(float(value))
            if message:
                problems.append(f"field '{name}'{source} is {float(value):g}; {message}")
        return problems

    # ---- the math -----------------------------------------------------------------------------------
    def reduce(self, ctx: "BlockContext", x: Tensors, state: Tensors) -> Tensors:
        """GLOBAL blocks only: partial sums over this bucket; the engine adds them over every bucket."""
        raise NotImplementedError

    def forward(
        self, ctx: "BlockContext", x: Tensors, state: Tensors, totals: Tensors | None = None
    ) -> tuple[torch.Tensor, Tensors]:
        """Return (output, new state). ``x`` maps port -> flat tensor; ``state`` maps name -> tensor."""
        raise NotImplementedError

    def offer_witnesses(self, ctx: "BlockContext", x: Tensors, state: Tensors) -> None:
        """Blocks with ``WITNESS_PORTS`` that are not GLOBAL: offer the finiteness check exactly the sums
        :meth:`forward` offers, computing nothing else. ``x`` holds the inputs on ``WITNESS_PORTS`` only."""
        raise NotImplementedError


def finite_or_zero(value: torch.Tensor) -> torch.Tensor:
    """Replace non-finite entries by zero (used where a 0/0 guard is part of the math)."""
    return torch.where(torch.isfinite(value), value, torch.zeros_like(value))


def power(x: torch.Tensor, p: int) -> torch.Tensor:
    return x if p == 1 else x * x if p == 2 else x.pow(p)
