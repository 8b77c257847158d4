"""Binding: a spec x real parameters -> buckets with programs, flat buffers and state.

A bucket is the parameters of one param_group that share a device and dtype (a param_group already
has exactly one graph: routing splits user groups by graph). Each bucket owns a :class:`FlatBuffers`,
its program (the graph with build-time conditions decided), its state tensors and its step count.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import torch

from opdsl.blocks.base import StateKind, StateSpec
from opdsl.compiled.layout import (
    TILED_DEVICE_TYPES, FlatBuffers, choose_tile, full_buffer, group_by_shape, run_of, value_shape,
)
from opdsl.compiled.lowering import BucketArgs, Program, build_program, state_key
from opdsl.errors import BindError
from opdsl.expr import Expr
from opdsl.scalars import evaluator_at
from opdsl.spec import Spec, hyper_value, lr_problem, requirement_problems

__all__ = [
    "Bucket", "build_buckets", "scalar_dtype", "scalar_slot", "conditions_of", "condition_hypers", "GroupValueCheck",
    "float_env", "float_value",
]


def scalar_dtype(device: torch.device) -> torch.dtype:
    """Hyperparameters and step counts are float64 where the device has it (bias corrections in double)."""
    return torch.float32 if device.type == "mps" else torch.float64


def scalar_slot(value: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar the step reads (a step count, a SCALAR state, a hyperparameter): shape (1,), viewed as 0-d
    inside the step.

    A 0-d float64 CPU input would lose in-place writes under torch 2.13's inductor, and dynamo gives each
    one a symbolic float that, unused by the graph, makes it restart its analysis: every first compile
    traced the step twice (about 4 of coba's 16 s). See ``compiled.lowering``.
    """
    return torch.full((1,), float(value), device=device, dtype=dtype)


def float_env(group: Mapping[str, Any], hyper_names: list[str]) -> dict[str, Any]:
    """A group's hyperparameters as plain values (tensors read once), each checked as a spec's would be."""
    env = {name: float_value(name, group[name]) for name in hyper_names}
    env["step"] = 1.0
    return env


def float_value(name: str, value: Any) -> Any:
    """One hyperparameter's value as :func:`float_env` holds it (a one-element tensor read once), checked."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, (tuple, list)):
        value = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in value]
    try:
        return hyper_value(value)
    except ValueError as err:
        raise ValueError(f"hyperparameter {name!r}: {err}") from None


@dataclass
class Bucket:
    group_index: int
    graph: str
    flat: FlatBuffers
    names: list[str]
    program: Program
    state: dict[str, Any]
    step: torch.Tensor
    positions: tuple[int, ...]  # each parameter's index in its param group (stable across bucketing)
    maximize: bool = False

    @property
    def args(self) -> BucketArgs:
        return BucketArgs(
            self.program, self.flat.segments, self.flat.numel, self.group_index, self.positions, self.maximize,
            self.flat.tile,
        )

    @cached_property
    def value_shape(self) -> tuple[int, ...]:
        """The layout the step computes this bucket's full-size values in (see ``Program.shaped_values`` and
        ``layout.choose_tile``).

        Fixed for the bucket's life (its program and buffers are), so worked out once, not on every step."""
        if self.flat.tile > 1:
            return (self.flat.numel // self.flat.tile, self.flat.tile)
        return value_shape(self.flat.runs, self.flat.numel) if self.program.shaped_values else (self.flat.numel,)

    def shaped(self, flat: torch.Tensor) -> torch.Tensor:
        """A full-size buffer in the step's value layout: a view, no copy."""
        return flat.view(self.value_shape)

    # The parameter buffer and the state tensors live as long as the bucket (they are written in place,
    # never replaced), so their views are made once: making them on every step cost CoBA 70 of its
    # 260 us per step on a small model, time a GPU would sit idle for.
    @cached_property
    def all_active(self) -> torch.Tensor:
        """The mask of parameters with a gradient when every one has it: one True per parameter."""
        return torch.ones(len(self.flat.params), dtype=torch.bool, device=self.flat.device)

    @cached_property
    def shaped_param(self) -> torch.Tensor:
        """The parameter buffer in the step's value layout."""
        return self.shaped(self.flat.param)

    @cached_property
    def shaped_state(self) -> dict[str, Any]:
        """The state as the step takes it: full-size (elementwise) states in the value layout."""
        elementwise = {k for k, spec in self.program.state_specs.items() if spec.kind is StateKind.ELEMENTWISE}
        return {k: self.shaped(v) if k in elementwise else v for k, v in self.state.items()}

    def state_bytes(self, index: int) -> int:
        """Bytes of optimizer state held for the bucket's ``index``-th parameter."""
        total = 0
        seg = self.flat.segments[index]
        for key, spec in self.program.state_specs.items():
            value = self.state[key]
            if spec.kind is StateKind.ELEMENTWISE:
                total += seg.numel * value.element_size()
            elif spec.kind is StateKind.TENSOR:
                run, j = run_of(self.flat.runs, index)
                total += value[run][j].numel() * value[run].element_size()
            elif index == 0:  # a scalar shared by the bucket: counted once, with its first parameter
                total += value.numel() * value.element_size()
        return total


def maximizes(group: Mapping[str, Any], where: str) -> bool:
    """A group's ``maximize`` (torch.optim's option, in every spec): True steps along the gradient."""
    value = group.get("maximize", False)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        value = bool(value.item())
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be True or False, got {value!r}")
    return value


def decider(env: Mapping[str, Any]):
    """Decides build-time conditions (``if:``, ``amsgrad: $amsgrad``) at a group's values."""
    return lambda value: bool(value.evaluate(env)) if isinstance(value, Expr) else bool(value)


def conditions_of(spec: Spec, graph: str, env: Mapping[str, Any]) -> tuple[bool, ...]:
    """Every build-time decision of a graph at concrete hyperparameter values (to detect flips)."""
    decide = decider(env)
    return tuple(
        decide(value)
        for block in spec.graphs[graph].nodes.values()
        for _, value in block.conditions()
        if value is not None
    )


def condition_hypers(spec: Spec, graph: str) -> frozenset[str]:
    """The hyperparameters a graph's build-time conditions read: a change to any other cannot flip one."""
    return frozenset().union(
        *(value.hypers for block in spec.graphs[graph].nodes.values() for _, value in block.conditions() if isinstance(value, Expr))
    )


def graph_reads(spec: Spec, graph: str) -> frozenset[tuple[str, int | None]]:
    """What a graph reads of the hyperparameters, in any plan: ``lr`` (the step size of its output, unless
    the output is the next parameter value) and what its nodes' fields and conditions name, as
    ``(name, index)`` (index None: the whole value)."""
    reads = {("lr", None)} if spec.graphs[graph].output_is == "update" else set()
    for block in spec.graphs[graph].nodes.values():
        for _, value in block.expressions():
            reads |= value.reads
    return frozenset(reads)


class GroupValueCheck:
    """Range checks of one graph's fields at a group's hyperparameter values.

    Built once per graph: a later check re-runs only the nodes whose fields read a changed value, so a
    scheduler changing ``lr`` every step (read by no node) costs the lr check alone. Fields that read
    ``step`` are checked at later steps too (:meth:`Block.problems_over_steps`) when a value they read
    changed.
    """

    def __init__(self, spec: Spec, graph: str):
        self.spec_name = spec.name
        self.requirements = (*spec.require, *spec.used_require.get(graph, ()))
        self.nodes = [
            (name, block, _field_hypers(block), block.step_field_hypers())
            for name, block in spec.graphs[graph].nodes.items()
        ]

    def __call__(self, env: Mapping[str, Any], where: str, changed: Iterable[str] | None = None) -> None:
        """Raise a ValueError naming every problem; ``changed`` None checks every node."""
        changed = None if changed is None else frozenset(changed)
        problems = []
        if "lr" in env and (changed is None or "lr" in changed) and (problem := lr_problem(env["lr"])):
            problems.append(problem)
        evaluate_at = evaluator_at(env)
        problems += requirement_problems(self.requirements, env, changed)
        for name, block, reads, step_reads in self.nodes:
            if changed is not None and not reads & changed:
                continue  # its values are those checked before
            if step_reads is not None and (changed is None or step_reads & changed):
                found = block.problems_over_steps(evaluate_at)
            else:
                found = block.problems_at(evaluate_at(1.0))
            problems += [f"node {name!r}: {message}" for _, message in found]
        if problems:
            raise ValueError(f"{where} of spec {self.spec_name!r} has invalid hyperparameters:\n  " + "\n  ".join(problems))


def _field_hypers(block: Any) -> frozenset[str]:
    """Every hyperparameter a node's fields and conditions read."""
    return frozenset().union(*(e.hypers for _, e in block.expressions()))


def _init_state(spec: StateSpec, flat: FlatBuffers, slot: int) -> Any:
    """A state's initial value; a full-size one in buffer ``slot`` of the bucket (``layout.full_buffer``;
    other kinds ignore ``slot``)."""
    dtype = spec.dtype or flat.dtype
    if spec.kind is StateKind.ELEMENTWISE:
        return full_buffer(flat.numel, spec.init, slot, dtype=dtype, device=flat.device)
    if spec.kind is StateKind.TENSOR:  # one (count, *state shape) tensor per run of equal parameter shapes
        assert spec.shape is not None, "TENSOR state needs a shape rule"
        return [
            torch.full((r.count, *spec.shape(r.shape)), spec.init, device=flat.device, dtype=dtype) for r in flat.runs
        ]
    return scalar_slot(spec.init, flat.device, dtype)


def _label(p: torch.Tensor, names: Mapping[int, str], group: int, k: int) -> str:
    place = f"param_groups[{group}]['params'][{k}]"
    shape = f"shape {tuple(p.shape)}"
    return f"{names[id(p)]!r} ({place}, {shape})" if id(p) in names else f"{place} ({shape})"


def _memory_span(p: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of the memory a tensor's elements may occupy."""
    size = p.element_size()
    first = p.storage_offset() * size
    last = sum((n - 1) * stride for n, stride in zip(p.shape, p.stride())) * size
    return p.untyped_storage().data_ptr(), first, first + last + size


def _overlaps(param_groups: list[dict[str, Any]], names: Mapping[int, str]) -> list[str]:
    """Problems for parameters whose memory overlaps another's (``Parameter(base[:4])``, ``Parameter(base[2:])``).

    Each parameter is moved into a flat buffer of its own, so two parameters that share elements would
    silently stop sharing them. Parameters that share a storage without overlapping (views of one
    checkpoint's memory, or of an earlier flat buffer) are fine.
    """
    spans = sorted(
        (*_memory_span(p), _label(p, names, gi, k))
        for gi, group in enumerate(param_groups)
        for k, p in enumerate(group["params"])
        if p.numel() > 0 and p.device.type != "meta"
    )
    problems, reach = [], None  # reach: (storage, end byte, label) of the furthest-reaching span so far
    for storage, start, end, label in spans:
        if reach is not None and reach[0] == storage and start < reach[1]:
            problems.append(
                f"parameters {reach[2]} and {label} overlap in memory; opdsl copies each parameter into a "
                "flat buffer, which would separate them: make them one parameter, or tie them by passing the "
                "same Parameter object"
            )
        if reach is None or reach[0] != storage or end > reach[1]:
            reach = (storage, end, label)
    return problems


def build_buckets(
    spec: Spec,
    param_groups: list[dict[str, Any]],
    names: Mapping[int, str],
    hyper_names: list[str],
    previous: Sequence[FlatBuffers] = (),
) -> list[Bucket]:
    """Split groups into buckets, check shapes against the blocks, allocate fresh state.

    A bucket whose parameters are exactly those of one of the ``previous`` flat buffers keeps that
    buffer: re-planning (a condition flipped, a group added, a state_dict loaded) then leaves the
    parameters where they are, and anything holding their memory (``p.detach()``, a CUDA graph) still
    sees them.
    """
    shape_problems: list[str] = []
    programs: list[Program] = []
    ascending: list[bool] = []
    for gi, group in enumerate(param_groups):
        graph = group["graph"]
        env = float_env(group, hyper_names)
        GroupValueCheck(spec, graph)(env, f"param_groups[{gi}]")
        ascending.append(maximizes(group, f"param_groups[{gi}]['maximize']"))
        program = build_program(graph, spec.graphs[graph], decider(env))
        programs.append(program)
        for k, p in enumerate(group["params"]):
            label = _label(p, names, gi, k)
            if not p.dtype.is_floating_point:
                shape_problems.append(
                    f"parameter {label} has dtype {p.dtype}; opdsl steps real floating-point parameters only"
                )
            for step in program.steps:
                reason = step.block.check_shape(p.shape)
                if reason:
                    shape_problems.append(
                        f"parameter {label} (graph {graph!r}) cannot pass node {step.name!r} "
                        f"({step.block.block}): {reason}"
                    )
    shape_problems += _overlaps(param_groups, names)
    if shape_problems:
        raise BindError("the spec cannot take these parameters:\n  " + "\n  ".join(shape_problems))
    reusable = {(tuple(map(id, flat.params)), flat.tile): flat for flat in previous if not flat.moved_params()}
    buckets: list[Bucket] = []
    for gi, (group, program) in enumerate(zip(param_groups, programs)):
        # A program with per-subset work or per-tensor work in the parameter's shape (Block.splits_by_shape)
        # gets one bucket per shape: its batched operations then read plain (count, *shape) views of whole
        # buffers, and no per-shape result is concatenated into a full-size temporary. A program whose
        # per-tensor work is sums or batched matrix work keeps every shape in one tiled buffer, where the
        # device can sum it; other programs keep every shape in one flat buffer.
        per_shape = any(s.block.splits_by_shape() for s in program.steps)
        tiles = program.tiles_shapes
        by_key: dict[tuple, list[torch.nn.Parameter]] = {}
        position = {id(p): k for k, p in enumerate(group["params"])}
        counters: dict[torch.device, torch.Tensor] = {}
        for p in group["params"]:
            split = per_shape or (tiles and p.device.type not in TILED_DEVICE_TYPES)
            by_key.setdefault((p.device, p.dtype, p.shape if split else None), []).append(p)
        for (device, _dtype, _shape), params in by_key.items():
            params = group_by_shape(params)
            tiled = tiles and len({p.shape for p in params}) > 1  # one shape: its (count, *shape) views serve
            tile = choose_tile([p.shape for p in params]) if tiled else 1
            flat = reusable.get((tuple(map(id, params)), tile)) or FlatBuffers(params, tile)
            slots = itertools.count(2)  # after the parameters' 0 and gradients' 1
            state = {key: _init_state(s, flat, next(slots) if s.kind is StateKind.ELEMENTWISE else 0)
                     for key, s in program.state_specs.items()}
            # One counter per group and device, shared by its buckets (they always step together): the scalar
            # math over it (bias corrections, schedules) is then the same expression for every bucket and is
            # traced once, not once per shape.
            if device not in counters:
                counters[device] = scalar_slot(0.0, device, scalar_dtype(device))
            step = counters[device]
            positions = tuple(position[id(p)] for p in params)
            buckets.append(
                Bucket(
                    gi, group["graph"], flat, [names.get(id(p), "?") for p in params], program, state, step, positions,
                    ascending[gi],
                )
            )
    return buckets


def per_param_state(bucket: Bucket, index: int) -> dict[str, torch.Tensor]:
    """The bucket's state for one parameter: views of flat state, its tensor states, shared scalars."""
    seg = bucket.flat.segments[index]
    out: dict[str, torch.Tensor] = {"step": bucket.step.view(())}
    for key, spec in bucket.program.state_specs.items():
        value = bucket.state[key]
        if spec.kind is StateKind.ELEMENTWISE:
            out[key] = value[seg.offset : seg.end].view(seg.shape)
        elif spec.kind is StateKind.TENSOR:
            run, j = run_of(bucket.flat.runs, index)
            out[key] = value[run][j]
        else:
            out[key] = value.view(())
    return out


def shared_state_keys(bucket: Bucket) -> frozenset[str]:
    """Keys of :func:`per_param_state` whose tensor is one for the whole bucket: the step count, SCALAR states."""
    scalars = {key for key, spec in bucket.program.state_specs.items() if spec.kind is StateKind.SCALAR}
    return frozenset({"step", *scalars})


def reset_state(bucket: Bucket) -> None:
    """Every state of the bucket back to its initial value and its step count to 0, in place."""
    for key, spec in bucket.program.state_specs.items():
        value = bucket.state[key]
        for tensor in value if isinstance(value, list) else [value]:
            tensor.fill_(spec.init)
    bucket.step.zero_()


__all__ += ["per_param_state", "state_key", "shared_state_keys", "reset_state"]
