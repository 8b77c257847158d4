"""Lowering: bound graphs become one step function over flat buffers.

A :class:`Program` is one graph as it runs for one bucket: build-time ``if:`` conditions are decided
(a disabled node passes its ``input`` through), references are resolved, and state keys are fixed as
``node.state``. :func:`build_step` turns all programs into a single function that

1. runs every graph node by node across its buckets (a GLOBAL block's partial sums are added over all
   buckets of its graph before its forward runs: one reduction the back end knows statically),
2. checks the gradients are finite (``on_nonfinite='skip'``: a bad step leaves everything untouched,
   decided on the device, with no host sync), through sums of the gradients the blocks offered where they can,
3. applies ``param <- param - lr * output`` (``param <- output`` for a graph with ``output_is: param``) and
   writes the new states in place.

The same function runs eagerly or under torch.compile (:mod:`opdsl.compiled.fusion`).

Step counts, SCALAR states and hyperparameters are stored with shape (1,) and handed to blocks as 0-d
views: torch 2.13's inductor drops in-place writes to 0-d float64 CPU inputs of a compiled function, and
dynamo traces a function with such inputs twice (see ``plan.scalar_slot``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from opdsl.blocks.base import Block, Scope, StateKind, StateSpec
from opdsl.compiled.context import BlockContext
from opdsl.compiled.layout import Segment
from opdsl.graph import Reference, execution_order, parse_ref
from opdsl.spec import GraphSpec

__all__ = ["NodeStep", "PlanError", "Program", "Source", "build_program", "build_step", "build_dry_pass", "dry_plan", "state_key",
           "due_key", "BucketArgs", "reads_source", "NodeKey"]


def state_key(node: str, name: str) -> str:
    return f"{node}.{name}"


def due_key(node: str) -> str:
    """The env entry holding a scheduled node's decision for this step (``Block.host_schedule``)."""
    return f"due:{node}"


@dataclass(frozen=True)
class Source:
    """Where an input comes from: a value computed this step, or a state as it was before the step."""

    key: str
    from_state: bool = False
    scalar: bool = False  # a SCALAR state, stored as (1,) and read as 0-d


@dataclass(frozen=True)
class NodeStep:
    name: str
    block: Block
    inputs: tuple[tuple[str, Source], ...]
    states: tuple[tuple[str, StateSpec], ...]


@dataclass(frozen=True)
class Program:
    """One graph, specialised for one bucket's build-time conditions."""

    graph_name: str
    steps: tuple[NodeStep, ...]
    output: Source
    disabled: tuple[str, ...] = ()
    output_is: str = "update"  # "param": the output is the parameter's next value, not an update lr scales

    @property
    def state_specs(self) -> dict[str, StateSpec]:
        return {state_key(s.name, k): spec for s in self.steps for k, spec in s.states}

    @property
    def shaped_values(self) -> bool:
        """Whether a one-shape bucket is stepped in its ``(count, *shape)`` layout rather than flat.

        Per-row and per-column values broadcast with plain strides there. Flat, a column statistic is read at
        ``n * (i // (m * n)) + i % n``, which inductor's CPU backend turns into a scalar gather per element
        (5x slower). Graphs without such blocks stay flat: there every node of a bucket has one loop range and
        inductor fuses them all, where a ``(count, rest)`` range beside a flat one would split the loops.
        """
        return any(s.block.scope() is Scope.SUBSET for s in self.steps)

    @property
    def tiles_shapes(self) -> bool:
        """Whether the graph has per-tensor work and all of it can run in a tiled bucket
        (``Block.SUMS_PER_TENSOR``, ``Block.TILED_RUNS``): then one bucket holds every shape
        (``layout.choose_tile``)."""
        return any(s.block.scope() is Scope.TENSOR for s in self.steps) and not any(
            s.block.splits_by_shape() for s in self.steps
        )


class PlanError(ValueError):
    """A graph cannot run at some values: ``node`` reads the state of a node its ``if:`` switches off, or is
    switched off with nothing to pass through."""

    def __init__(self, message: str, node: str | None):
        super().__init__(message)
        self.node = node


def build_program(graph_name: str, graph: GraphSpec, decide: Callable[[Any], bool]) -> Program:
    """Decide each node's build-time conditions with ``decide`` and resolve pass-throughs of disabled nodes."""
    alias: dict[str, Reference] = {}
    steps, disabled = [], []
    # decided before any node is visited: a node may read the @prev of one that comes later in the order
    off = {name for name, block in graph.nodes.items() if block.when is not None and not decide(block.when)}

    def resolve(ref: Reference) -> Reference:
        while not ref.prev and ref.node in alias:
            ref = alias[ref.node]
        return ref

    def source(ref: Reference, reader: str) -> Source:
        if not ref.prev:
            return Source(ref.node)
        if ref.node in off:
            raise PlanError(f"{reader!r} reads {ref}, but node {ref.node!r} is disabled by its `if:`", reader)
        owner = graph.nodes[ref.node]
        return Source(state_key(ref.node, owner.PRIMARY_STATE), from_state=True, scalar=owner.prev_kind() is StateKind.SCALAR)

    for name in execution_order(graph):
        block = graph.nodes[name]
        if name in off:
            passed = block.otherwise or block.inputs().get("input")
            if passed is None:
                raise PlanError(f"node {name!r} is disabled by its `if:` but has no `input` or `else` to pass through", name)
            alias[name] = resolve(parse_ref(passed))
            disabled.append(name)
            continue
        block = block.decided(decide)
        inputs = tuple(
            (port, source(resolve(parse_ref(ref)), name)) for port, ref in block.inputs().items() if port != "else"
        )
        steps.append(NodeStep(name, block, inputs, tuple(block.state_specs().items())))
    return Program(graph_name, tuple(steps), source(resolve(parse_ref(graph.output)), "output"), tuple(disabled), graph.output_is)


def reads_source(program: Program, name: str) -> bool:
    return any(src.key == name and not src.from_state for s in program.steps for _, src in s.inputs) or (
        program.output.key == name
    )


@dataclass(frozen=True)
class BucketArgs:
    """The static (non-tensor) facts about one bucket that the step function closes over.

    Hashable: two plans with equal facts lower to the same step, so a compiled one can be reused.
    """

    program: Program
    segments: tuple[Segment, ...]
    numel: int
    group_index: int
    positions: tuple[int, ...]  # each parameter's index in its param group
    maximize: bool = False  # the graph's sources are the negated gradients
    tile: int = 1  # > 1: a tiled bucket (every parameter starts on a tile, see layout.choose_tile)


@dataclass
class _Run:
    ctx: BlockContext
    values: dict[str, torch.Tensor]
    state: Mapping[str, Any]
    new_state: dict[str, Any] = field(default_factory=dict)
    # node output -> the source (grad, grad2) whose inf and NaN it carries (Block.CARRIES_NONFINITE)
    carried: dict[str, str] = field(default_factory=dict)


StepFn = Callable[..., Any]


NodeKey = tuple[str, str]  # (graph, node); a GLOBAL block's sums run over every bucket of its graph
Totals = Mapping[NodeKey, Mapping[str, torch.Tensor]]


class _Nodes:
    """The buckets' graphs, node by node: what :func:`build_step` and :func:`build_dry_pass` both run."""

    def __init__(self, buckets: Sequence[BucketArgs]):
        self.buckets = tuple(buckets)
        self.by_graph: dict[str, list[int]] = {}
        for i, b in enumerate(self.buckets):
            self.by_graph.setdefault(b.program.graph_name, []).append(i)
        self.order = {g: _merged_order([self.buckets[i].program for i in idx]) for g, idx in self.by_graph.items()}

    def runs(self, params, grads, states, steps, envs, extras) -> list[_Run]:
        runs = []
        for i, b in enumerate(self.buckets):
            t = steps[i].reshape(()) + 1
            env = {k: _as_scalars(v) for k, v in envs[i].items()}
            env["step"] = t
            ctx = BlockContext(b.segments, env, t, params[i], b.numel, b.positions, b.tile)
            gradients = {"grad": grads[i], **extras[i]}
            if b.maximize:  # ascend: every block sees -g, as torch's `maximize` negates before anything else
                gradients = {k: -g for k, g in gradients.items()}
            runs.append(_Run(ctx, {**gradients, "param": params[i]}, states[i]))
        return runs

    def run(self, runs: list[_Run], home: torch.device, given: Totals | None = None,
            until: NodeKey | None = None, dry: Mapping[str, frozenset[str]] | None = None) -> dict[str, torch.Tensor] | None:
        """Every node of every graph, in order. A GLOBAL block's sums are added over its graph's buckets
        before its forward runs, or taken from ``given``. ``dry`` (a dry pass, :func:`dry_plan`) names what
        to run of each node: ``reduce``, ``witness`` (``Block.offer_witnesses``), ``forward``; a node it
        leaves out is skipped. With ``until``, stop at that node: at a GLOBAL one after its reduce,
        returning its sums; at any other after the rest."""
        for graph_name, members in self.by_graph.items():
            for node in self.order[graph_name]:
                active = [(i, s) for i in members for s in self.buckets[i].program.steps if s.name == node]
                acts = frozenset({"forward"}) if dry is None else dry.get(node, frozenset())
                if not active or not acts:
                    continue
                block = active[0][1].block
                for i, _ in active:
                    runs[i].ctx.due = runs[i].ctx.env.get(due_key(node))
                    runs[i].ctx.witness_ports = block.WITNESS_PORTS
                totals = None
                if block.scope() is Scope.GLOBAL:
                    totals = (given or {}).get((graph_name, node))
                    if totals is None or "reduce" in acts:  # a dry pass sums for the node's sums or its witnesses
                        partials = [block.reduce(runs[i].ctx, _inputs(runs[i], s), _node_state(runs[i], s)) for i, s in active]
                        summed = {k: sum(p[k].to(home) for p in partials) for k in partials[0]}
                        if (graph_name, node) == until:
                            return summed
                        totals = summed if totals is None else totals
                if "witness" in acts:
                    for i, s in active:
                        s.block.offer_witnesses(runs[i].ctx, _inputs(runs[i], s, block.WITNESS_PORTS), _node_state(runs[i], s))
                if "forward" in acts:
                    for i, s in active:
                        run = runs[i]
                        here = None if totals is None else {k: v.to(run.ctx.param.device) for k, v in totals.items()}
                        out, new = s.block.forward(run.ctx, _inputs(run, s), _node_state(run, s), here)
                        run.values[s.name] = out
                        _note_carried(run, s)
                        for key, value in new.items():
                            run.new_state[state_key(s.name, key)] = value
                if (graph_name, node) == until:
                    return None
        return None


def build_step(buckets: Sequence[BucketArgs], check_finite: bool, write_shared: bool = True) -> StepFn:
    """The whole optimizer step as one function of tensors (all static structure is closed over).

    Arguments of the returned function: ``params, grads, states, steps, envs, actives, extras`` (lists
    aligned with ``buckets``); ``actives[i]`` is None or a bool tensor [n_params] (False = grad was None);
    ``extras[i]`` maps extra sources (``grad2``) to flat tensors; ``skipped`` (with ``check_finite``) a 0-d
    integer counter, incremented in the step when it is skipped (no separate kernel launches after it).
    Returns a 0-d bool tensor: whether the step was applied.

    ``write_shared=False`` leaves the step counts and SCALAR states as they are, for a caller that steps a
    bucket in pieces (:mod:`opdsl.compiled.chunking`): every piece must read them as they were before the step.
    Such a caller also passes ``totals``, every GLOBAL block's sums over the whole buckets
    (:func:`build_dry_pass`), which a piece could not form alone.
    """
    nodes = _Nodes(buckets)

    def step(params, grads, states, steps, envs, actives, extras, skipped=None, totals=None):
        # Values every bucket shares (a global sum, the finiteness verdict) are formed on one device and
        # copied to each bucket's; `.to` is free when all buckets share a device.
        home = skipped.device if skipped is not None else params[0].device
        runs = nodes.runs(params, grads, states, steps, envs, extras)
        nodes.run(runs, home, totals)
        ok_home = _all_finite(grads, extras, runs, home) if check_finite else None
        for i, (b, run) in enumerate(zip(buckets, runs)):
            ok = None if ok_home is None else ok_home.to(params[i].device)
            update = _read(run, b.program.output)
            if b.program.output_is == "param":
                new_param = update
            else:
                new_param = params[i] - run.ctx.env["lr"] * update
            keep = _keep_mask(ok, actives[i], run.ctx)
            _write(params[i], new_param, keep)
            for key, new in run.new_state.items():
                kind = b.program.state_specs[key].kind
                if write_shared or kind is not StateKind.SCALAR:
                    _write_state(states[i][key], new, keep, ok, actives[i], kind, run.ctx)
            if not write_shared:
                continue
            advanced = run.ctx.step if ok is None else torch.where(ok, run.ctx.step, steps[i].reshape(()))
            steps[i].copy_(advanced.reshape(steps[i].shape))
        if ok_home is None:
            return torch.ones((), dtype=torch.bool, device=params[0].device)
        if skipped is not None:
            skipped.add_((~ok_home).to(dtype=skipped.dtype))
        return ok_home

    return step


def build_dry_pass(bucket: BucketArgs, node: NodeKey, check_finite: bool) -> Callable[..., Any]:
    """For a caller that steps a bucket in pieces: the graph run up to ``node`` over one piece, written nowhere,
    and only as far as the answer needs (:func:`dry_plan`).

    The returned function takes :func:`build_step`'s arguments (lists of one) and ``totals`` (the sums of the
    GLOBAL blocks before ``node``, over the whole buckets) and returns ``(sums, ok)``: the piece's share of
    ``node``'s sums if it is a GLOBAL block (else None), and with ``check_finite`` the finiteness check of the
    piece's gradients as the whole step takes it, through the sums every block up to ``node`` offers (the
    caller asks at its graph's last block with ``Block.WITNESS_PORTS``).
    """
    nodes = _Nodes([bucket])
    plan = dry_plan(bucket.program, node[1], check_finite)

    def dry(params, grads, states, steps, envs, actives, extras, totals):
        home = params[0].device
        runs = nodes.runs(params, grads, states, steps, envs, extras)
        sums = nodes.run(runs, home, totals, until=node, dry=plan)
        return sums, _all_finite(grads, extras, runs, home) if check_finite else None

    return dry


def dry_plan(program: Program, until: str, check_finite: bool) -> dict[str, frozenset[str]]:
    """What a dry pass up to node ``until`` runs of each node: ``reduce`` for the GLOBAL ``until`` (its sums)
    and, with the check, for every GLOBAL block that offers sums to it; ``witness`` for any other block that
    offers them (``Block.offer_witnesses``); ``forward`` for a node whose output one of those reads. The
    rest is skipped: a pass for the check alone reads what the check's sums read and nothing else."""
    steps = program.steps[: next(k for k, s in enumerate(program.steps) if s.name == until) + 1]
    needed: set[str] = set()
    plan: dict[str, frozenset[str]] = {}
    for s in reversed(steps):
        is_global = s.block.scope() is Scope.GLOBAL
        offers = check_finite and bool(s.block.WITNESS_PORTS)
        acts = set()
        if s.name in needed:
            acts.add("forward")
        if is_global and (s.name == until or offers):
            acts.add("reduce")
        elif offers and not acts:
            acts.add("witness")
        if not acts:
            continue
        plan[s.name] = frozenset(acts)
        ports = s.block.WITNESS_PORTS if acts == {"witness"} else [port for port, _ in s.inputs]
        needed.update(src.key for port, src in s.inputs if port in ports and not src.from_state)
    return plan


def _as_scalars(value: Any) -> Any:
    """A hyperparameter stored with shape (1,) (or a tuple of them), as the 0-d value blocks read."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    if isinstance(value, tuple):
        return tuple(_as_scalars(v) for v in value)
    return value


def _merged_order(programs: Sequence[Program]) -> list[str]:
    order: list[str] = []
    for program in programs:
        for s in program.steps:
            if s.name not in order:
                order.append(s.name)
    return order


def _read(run: _Run, src: "Source") -> torch.Tensor:
    if not src.from_state:
        return run.values[src.key]
    value = run.state[src.key]
    return value.reshape(()) if src.scalar else value


def _inputs(run: _Run, s: NodeStep, ports: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The node's inputs (on ``ports`` only, where given), noting which source each port reads."""
    inputs = [(port, ref) for port, ref in s.inputs if ports is None or port in ports]
    run.ctx.reading = {port: None if ref.from_state else run.carried.get(ref.key, ref.key) for port, ref in inputs}
    return {port: _read(run, ref) for port, ref in inputs}


def _note_carried(run: _Run, s: NodeStep) -> None:
    """A witness on this node's output also vouches for the source its carrying port read."""
    port = s.block.CARRIES_NONFINITE
    source = run.ctx.reading.get(port) if port is not None else None
    if source is not None:
        run.carried[s.name] = source


def _all_finite(grads: Sequence[torch.Tensor], extras: Sequence[Mapping[str, torch.Tensor]], runs: Sequence[_Run],
                home: torch.device) -> torch.Tensor:
    """One 0-d bool on ``home``: no gradient (``grad``, ``grad2``) holds inf or NaN.

    Runs after the blocks, so that a gradient whose squares or products a block summed anyway
    (:meth:`BlockContext.witness`) is checked through those sums instead of another pass over it.
    """
    flags = []
    for grad, extra, run in zip(grads, extras, runs):
        for key, value in {"grad": grad, **extra}.items():
            flags += [torch.isfinite(t).all().to(home) for t in run.ctx.witnesses.get(key, [value])]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _node_state(run: _Run, s: NodeStep) -> dict[str, Any]:
    out = {}
    for name, spec in s.states:
        value = run.state[state_key(s.name, name)]
        out[name] = value.reshape(()) if spec.kind is StateKind.SCALAR else value
    return out


def _keep_mask(ok, active, ctx: BlockContext):
    """Where the new values apply: everywhere if the step is ok and every grad was present."""
    mask = None
    if active is not None:
        mask = ctx.expand(active)
    if ok is not None:
        mask = ok if mask is None else mask & ok
    return mask


def _write(target: torch.Tensor, new: torch.Tensor, keep) -> None:
    if keep is None:
        target.copy_(new)
    else:
        target.copy_(torch.where(keep, new, target))


def _write_state(target, new, keep_flat, ok, active, kind: StateKind, ctx: BlockContext) -> None:
    if kind is StateKind.ELEMENTWISE:
        _write(target, new, keep_flat)
    elif kind is StateKind.TENSOR:  # one (count, ...) tensor per run; a missing grad keeps its parameter's slice
        actives = ctx.run_slices(active) if active is not None else [None] * len(target)
        for t, n, act in zip(target, new, actives):
            keep = ok
            if act is not None:
                act = act.reshape(-1, *([1] * (t.ndim - 1)))
                keep = act if keep is None else keep & act
            _write(t, n, keep)
    else:
        _write(target, new.reshape(target.shape), ok)
