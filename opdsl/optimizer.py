"""``opdsl.Optimizer``: a spec compiled to one fused step, behind the torch.optim.Optimizer contract.

    opt = opdsl.Optimizer(model.parameters(), "adamw", lr=3e-4, weight_decay=0.1)

Hyperparameter keywords are the spec's ``hyper`` names (torch.optim's names for torch's optimizers).
``param_groups`` hold plain Python values, so every torch LR scheduler works; before each step changed
values are copied into (1,)-shaped device tensors the compiled step reads as 0-d views, so changing a
numeric hyperparameter never recompiles. Flipping a build-time condition (``amsgrad``, ``nesterov``,
``momentum`` to or from 0) re-plans and compiles once per plan. A tensor-valued hyperparameter (``lr=
torch.tensor(1e-3)``) is read on the host whenever it changes, to be range-checked: keep it on the CPU
(torch's schedulers update it there) rather than on the GPU, where each change would wait for the device.
Routing rules of the spec split each user group into one group per target graph (``describe()`` lists
them). A scheduler that sets absolute values sets them on every group, routes included:
``OneCycleLR(opt, max_lr=0.02)`` over the ``muon`` spec gives its AdamW route lr 0.02 too, where the
route's own lr is 3e-4. Give such a scheduler one value per param_group, or use a multiplicative one
(``LambdaLR``, ``CosineAnnealingLR``, ...), which keeps each route's ratio. A value changed in a group
whose graph does not read it (``cycle_momentum`` cycles ``betas[0]``, but Muon's graph reads
``momentum``) and a group key that looks like a mistyped hyperparameter are each warned about once.

Semantics that differ from torch.optim, on purpose:
- ``zero_grad()`` zeroes the flat gradient buffer by default: gradients stay views, so backward
  accumulates into the buffer and the step reads it with no gather (``set_to_none=False`` zeroes them
  the same way, as torch does, and counts them as zero gradients). A parameter that
  receives no gradient is then stepped with a zero gradient. ``zero_grad(set_to_none=True)`` restores
  torch's behaviour (a parameter whose ``.grad`` is None is left untouched, state included), at the cost
  of one gather per step (and one more compiled step, the first time a gradient is missing). A
  ``step()`` that finds no gradient written at all since the optimizer was built or last zeroed them
  (no backward yet) steps nothing and warns once, as torch's step does when every ``.grad`` is None.
  A frozen parameter (``requires_grad=False``) is never given a view and is left untouched, as in torch.
- The step count is one per parameter group and device, not per parameter: a parameter that receives
  its first gradient at step 10 is bias-corrected as at step 10 (torch counts 1).
- ``on_nonfinite="skip"`` (default): if any gradient holds inf or NaN the whole step is skipped on the
  device (parameters, state and step counts unchanged) and ``skipped_steps`` counts it; ``"error"``
  also raises (one host sync); ``"propagate"`` does what torch.optim does. Graphs that sum squares or
  products of the gradients anyway (subset-norm, global-norm, the min-norm and conjugate mixers, SGDOL)
  are checked through those sums, so they also skip a step whose terms overflow (|g| > 1.8e19 in
  float32, or from about 1e18 for the global sums, which add 256 float32 terms before widening to
  float64) instead of making their accumulator infinite.
- ``state`` holds views of the flat state. Editing it the torch way is followed before the next step:
  ``state.clear()`` (or deleting every entry of a group) restarts that state at step 0, and a tensor put
  in place of a state is copied in; deleting the entries of only some parameters of a group is refused
  (see :mod:`opdsl.state_view`).
- Parameters are views of flat buffers, and ``torch.save`` writes a tensor's whole storage: saving some
  parameters (or one parameter's state) writes the whole buffer; clone what you save of a subset.
  Saving the whole model or optimizer writes each buffer once, the same bytes as torch.
- Distributed: under DDP every rank holds every parameter and steps as torch does. Under optimizer
  sharding (ZeroRedundancyOptimizer, FSDP1 with ``use_orig_params=False``) each rank's optimizer sees
  its shard only: elementwise specs step exactly, but a model-wide sum (scsadamw, coba, adagrad-norm,
  sgdol, the scg family) and the ``on_nonfinite="skip"`` verdict then cover one shard, so a step can be
  skipped on one rank and taken on another (use DDP, or ``"propagate"`` with torch's
  ShardedGradScaler). FSDP1's flattened shards are refused by graphs with per-tensor or model-wide work,
  DTensor parameters (FSDP2, tensor parallelism) always. ZeRO partitions the groups it is given and
  expects as many back, so give a routing spec (muon, muadam) groups already split by route.
  torch.distributed.checkpoint's state_dict helpers save and load the state (without the skip count).
- Parameters whose memory overlaps another's are refused: each is moved into a flat buffer. For the
  same reason one parameter can belong to one opdsl optimizer at a time: building a second over it
  moves it into the second's buffer, and the first refuses to step (torch allows two).
- Decoupled weight decay is part of the one update ``param - lr * (update + wd * param)``, written to
  the parameter once; torch's AdamW first writes the decayed parameter, then the updated one. In
  float32 the two agree to rounding; in bfloat16 torch's extra rounding shows: over 50 steps (eager)
  opdsl's result was 2.8x closer to a float64 run (mean error 1.3e-2 against 3.8e-2), so bfloat16
  trajectories agree with torch's to a few ulp, not exactly. Compiled, inductor evaluates the whole
  expression in float32 and rounds once.

Specs that read ``grad2`` (SGDOL) need two independent gradients at the same point: ``step(closure)``
calls the closure twice, and the closure must draw a fresh minibatch on each call. The first call's
gradient is ``grad``, the second's ``grad2``; the returned loss is the first call's.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from opdsl.advice import Advice, flattened_refusal, moved_cause, warn_user
from opdsl.compiled.chunking import build_eager_step
from opdsl.compiled.fusion import fuse
from opdsl.compiled.lowering import build_step, due_key, reads_source
from opdsl.compiled.layout import FlatBuffers, full_buffer
from opdsl.errors import BindError, StateDictError
from opdsl.loader import load_spec
from opdsl.plan import (
    Bucket,
    build_buckets,
    GroupValueCheck,
    condition_hypers,
    conditions_of,
    float_env,
    float_value,
    graph_reads,
    maximizes,
    per_param_state,
    reset_state,
    scalar_dtype,
    scalar_slot,
    shared_state_keys,
)
from opdsl.schedule import DueFlag, StepClock
from opdsl.spec import MAIN_GRAPH, Spec
from opdsl.state_view import InstalledState

__all__ = ["Optimizer"]

NONFINITE_MODES = ("skip", "error", "propagate")
STATE_DICT_FORMAT = 1


class Optimizer(torch.optim.Optimizer):
    """A torch optimizer whose update rule is an opdsl spec.

    Args:
        params: parameters, ``named_parameters()`` (names enable routing by name), or param-group dicts.
        spec: a shipped spec name (``"adamw"``), a path to a YAML file, or a loaded :class:`Spec`.
        compile: ``True`` (default) runs the step under torch.compile; ``False`` runs the same function
            eagerly (on a CPU over cache-sized chunks of each bucket, with the same numbers, see
            ``compiled/chunking.py``); a dict passes options to torch.compile.
        on_nonfinite: ``"skip"`` (default), ``"error"`` or ``"propagate"`` (see the module docs).
        maximize: step along the gradient instead of against it, as torch.optim's ``maximize``: every
            block sees the negated gradient. A group option like the hyperparameters (a group dict may set
            it; changing it re-plans).
        **hyper: overrides of the spec's hyperparameters (``lr``, ``betas``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        params: Iterable[Any],
        spec: str | Spec = "adamw",
        *,
        compile: bool | dict[str, Any] = True,
        on_nonfinite: str = "skip",
        maximize: bool = False,
        **hyper: Any,
    ):
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
        self._set_up(load_spec(spec), compile, on_nonfinite, frozenset(hyper), names={})
        unknown = sorted(set(hyper) - set(self._hyper_names))
        if unknown:
            raise TypeError(
                f"spec {self.spec.name!r} has no hyperparameter(s) {', '.join(unknown)}; "
                f"valid: {', '.join(self._hyper_names)}; and the options compile, on_nonfinite, maximize"
            )
        defaults = {k: _normalize(k, v) for k, v in {**self.spec.hyper, **hyper}.items()}
        defaults["maximize"] = maximizes({"maximize": maximize}, "maximize")
        self._building = True
        super().__init__(_with_names(params, self._names), defaults)
        self._building = False
        self._rebuild()

    def _set_up(
        self, spec: Spec, compile: bool | dict[str, Any], on_nonfinite: str, explicit: frozenset[str], names: dict[int, str]
    ) -> None:
        """The fields of an optimizer with no buckets yet (``__init__`` and ``__setstate__``)."""
        self.spec = spec
        self.on_nonfinite = on_nonfinite
        self._compile = compile
        self._hyper_names = list(spec.hyper)
        self._explicit_hyper = explicit
        self._names = names
        self._buckets: list[Bucket] = []
        self._step_fn: Callable[..., Any] | None = None
        self._step_fns: dict[tuple, Callable[..., Any]] = {}  # compiled steps by plan, oldest first
        self._dormant: dict[int, dict[str, torch.Tensor]] = {}  # state of switched-off nodes, by id(param)
        self._first_grads: list[torch.Tensor] = []  # grad2 specs: the buffer holding the first gradient
        self._envs: dict[tuple[int, torch.device], dict[str, Any]] = {}
        self._seen: list[dict[str, Any]] = []
        self._skipped: torch.Tensor | None = None
        self._clocks: list[StepClock] = []
        self._advice = Advice(spec)
        self._value_checks: dict[str, GroupValueCheck] = {}  # by graph name
        self._reads: list[frozenset[tuple[str, int | None]]] = []  # per group: what its graph reads
        self._condition_reads: list[frozenset[str]] = []  # per group: what its graph's `if:` conditions read
        self._key_counts: list[int] = []  # per group: len(group) when its keys were last looked at
        self._first_written = False  # grad2 specs: whether the closure's first call wrote a gradient
        self._masking = False  # whether a step has found a parameter without a gradient (see step())
        self._building = False

    # ---- copy and pickle ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and pickle keep: the groups (parameters included), spec, options and state.

        Parameters are kept as tensors; the flat buffers are not: they are made anew around the copied
        parameters, as when an optimizer is built. ``copy.deepcopy((model, optimizer))`` gives a copy that
        steps the copied model.
        """
        self._adopt_state_edits()
        return {
            "defaults": self.defaults,
            "param_groups": self.param_groups,
            "spec": self.spec,
            "compile": self._compile,
            "on_nonfinite": self.on_nonfinite,
            "explicit_hyper": self._explicit_hyper,
            "names": [(p, self._names[id(p)]) for g in self.param_groups for p in g["params"] if id(p) in self._names],
            "state": list(self._state_entries().items()),
            "skipped": self._skipped,
        }

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self._set_up(
            saved["spec"], saved["compile"], saved["on_nonfinite"], saved["explicit_hyper"],
            names={id(p): name for p, name in saved["names"]},
        )
        super().__setstate__({"defaults": saved["defaults"], "param_groups": saved["param_groups"], "state": {}})
        self._skipped = saved["skipped"]
        self._rebuild()
        self._dormant = self._import_state({id(p): entry for p, entry in saved["state"]}, strict=False)
        self._start_clocks()  # the step counters were just loaded

    # ---- param groups and routing --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; the spec's routing rules may split it into several groups (one per graph)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(_with_names(params, self._names))
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        here: set[int] = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor ({self._name(p)})")
            if type(p.data) is not torch.Tensor:  # a wrapper subclass: FSDP2's and tensor parallelism's DTensor
                raise BindError(
                    f"parameter {self._name(p)} is a {type(p.data).__name__}, a tensor subclass (FSDP2's fully_shard "
                    "and tensor parallelism make parameters DTensors); opdsl steps parameters it can move into flat "
                    "buffers of plain tensors: with FSDP2 or tensor parallelism use DDP, FSDP1 with "
                    "use_orig_params=False (building the optimizer before the first forward), or a torch.optim optimizer"
                )
            if id(p) in here:
                raise ValueError(f"parameter {self._name(p)} appears twice in one parameter group; list it once")
            if id(p) in seen:
                raise ValueError(f"parameter {self._name(p)} appears in more than one parameter group")
            here.add(id(p))
            seen.add(id(p))
        explicit = {k: _normalize(k, v) for k, v in param_group.items() if k not in ("params", "param_names")}
        for key, route_params, route in self._split_by_route(params):
            group = dict(self.defaults)
            if route is not None:
                group.update({k: _normalize(k, v) for k, v in route.hyper.items()})
            group.update(explicit)
            if self._follows_lr(explicit, route):
                group["initial_lr"] = group["lr"]  # LR schedulers setdefault() this same value
            group["graph"] = key
            group["spec"] = self.spec.name  # kept by checkpoint helpers that drop the state_dict's own entry
            group["params"] = route_params
            group["param_names"] = [self._name(p) for p in route_params]
            self._check_flattened(group)
            self.param_groups.append(group)
        if not self._building:
            self._rebuild()

    def _check_flattened(self, group: Mapping[str, Any]) -> None:
        """FSDP1's flattened shards: refused by graphs that reduce per tensor or over the model."""
        flat = [p for p in group["params"] if getattr(p, "_is_flat_param", False)]
        if flat:
            refusal = flattened_refusal(self.spec, group["graph"], self._name(flat[0]))
            if refusal:
                raise BindError(refusal)
            self._advice.flattened_routes(self._name(flat[0]), group["graph"])

    def _follows_lr(self, explicit: Mapping[str, Any], route: Any) -> bool:
        """A spec's ``initial_lr`` (lr_0 of schedule-relative decay) defaults to the group's lr."""
        if "initial_lr" not in self._hyper_names:
            return False
        given = "initial_lr" in explicit or "initial_lr" in self._explicit_hyper
        return not given and (route is None or "initial_lr" not in route.hyper)

    def _split_by_route(self, params: list[torch.Tensor]):
        if not params:  # an empty group stays one (empty) group, as in torch: ZeRO hands some ranks one
            yield (MAIN_GRAPH if MAIN_GRAPH in self.spec.graphs else next(iter(self.spec.graphs))), [], None
            return
        routed: dict[str, list[torch.Tensor]] = {}
        routes: dict[str, Any] = {}
        strays = []
        for p in params:
            name = self._names.get(id(p))
            index, route = self.spec.route_for(name, p.shape)
            target = route.target if route is not None else MAIN_GRAPH
            if target not in self.spec.graphs:
                strays.append(self._name(p))
                continue
            label = f"{target}#{index}" if route is not None and route.hyper else target
            routed.setdefault(label, []).append(p)
            routes[label] = route
        if strays:
            raise BindError(
                f"spec {self.spec.name!r} routes no graph to parameter(s): {', '.join(strays)}; "
                "add a `groups` rule that matches them"
            )
        named_rules = [r for r in self.spec.groups if r.match.needs_names]
        if named_rules and not any(id(p) in self._names for p in params):
            warn_user(
                f"spec {self.spec.name!r} routes by parameter name but the parameters came without names; "
                "pass model.named_parameters()"
            )
        for label, route_params in routed.items():
            yield label.split("#")[0], route_params, routes[label]

    def _name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"<unnamed {tuple(p.shape)}>")

    def _where(self, bucket: Bucket, i: int) -> str:
        """A bucket's i-th parameter as the user can find it: its name, else its place in param_groups."""
        p = bucket.flat.params[i]
        place = f"param_groups[{bucket.group_index}]['params'][{bucket.positions[i]}]"
        name = self._names.get(id(p))
        return f"{name!r} ({place}, shape {tuple(p.shape)})" if name else f"{place} (shape {tuple(p.shape)})"

    # ---- plan -------------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """(Re)bind the spec to the current groups, keeping state by parameter and node name."""
        if self._buckets:
            self._adopt_state_edits()
        saved = self._export_state() if self._buckets else {}
        old_flats = [b.flat for b in self._buckets]
        self._buckets = build_buckets(self.spec, self.param_groups, self._names, self._hyper_names, old_flats)
        self._envs = {}
        self._seen = [{} for _ in self.param_groups]
        self._reads = [graph_reads(self.spec, g["graph"]) for g in self.param_groups]
        self._condition_reads = [condition_hypers(self.spec, g["graph"]) for g in self.param_groups]
        self._key_counts = [0] * len(self.param_groups)
        # each group's values as last applied: a change converts and checks the changed ones alone
        self._floats = [float_env(g, self._hyper_names) for g in self.param_groups]
        self._conditions = [conditions_of(self.spec, g["graph"], env) for g, env in zip(self.param_groups, self._floats)]
        self._maximize = [maximizes(g, f"param_groups[{gi}]['maximize']") for gi, g in enumerate(self.param_groups)]
        for bucket in self._buckets:
            self._envs.setdefault((bucket.group_index, bucket.flat.device), {})
        self._sync_hypers(force=True)
        self._dormant = self._import_state(saved, strict=False)
        self._refresh_state_views()
        self._start_clocks()
        self._step_fn = None
        self._needs_grad2 = any(reads_source(b.program, "grad2") for b in self._buckets)
        # a kept flat buffer keeps its spare too: it swaps between two buffers, whose views it caches by address
        spares = {id(flat): spare for flat, spare in zip(old_flats, self._first_grads)}
        self._first_grads = (
            [spares[id(b.flat)] if id(b.flat) in spares else _spare_grad(b.flat) for b in self._buckets]
            if self._needs_grad2 else []
        )
        # the step forms its shared values (global sums, the finiteness verdict) where this counter lives:
        # an accelerator if any bucket is on one, so that only CPU buckets wait for them
        devices = [b.flat.device for b in self._buckets]
        if not devices:  # every group is empty: nothing to step
            return
        device = next((d for d in devices if d.type != "cpu"), devices[0])
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        elif self._skipped.device != device:  # a group on an accelerator was added
            self._skipped = self._skipped.to(device)

    def _start_clocks(self) -> None:
        """One clock per step counter whose graph has scheduled nodes; its flags go into the step's env."""
        self._clocks = []
        for gi, device in self._envs:
            buckets = [b for b in self._buckets if (b.group_index, b.flat.device) == (gi, device)]
            scheduled = {s.name: s.block.host_schedule() for b in buckets for s in b.program.steps}
            flags = {node: DueFlag(schedule, device) for node, schedule in scheduled.items() if schedule is not None}
            if not flags:
                continue
            for node, flag in flags.items():
                self._envs[(gi, device)][due_key(node)] = (flag.host, flag.device)
            self._clocks.append(StepClock(buckets[0].step, self.on_nonfinite != "propagate", list(flags.values())))

    def _refresh_state_views(self) -> None:
        self._installed = InstalledState([
            (p, bucket.group_index, per_param_state(bucket, i), shared_state_keys(bucket))
            for bucket in self._buckets
            for i, p in enumerate(bucket.flat.params)
        ])
        self.state = self._installed.mapping

    def _adopt_state_edits(self) -> None:
        """Follow edits of ``self.state`` made the torch way, or refuse them before anything is stepped."""
        if not self._installed.edited(self.state):
            return
        edits = self._installed.edits(self.state, self._name)
        if edits.problems:
            raise StateDictError(
                "optimizer.state was edited in a way opdsl cannot follow (nothing was stepped):\n  "
                + "\n  ".join(edits.problems)
            )
        for bucket in self._buckets:
            if bucket.group_index in edits.reset_groups:
                reset_state(bucket)
                for p in bucket.flat.params:  # cleared as in torch, switched-off nodes' state included
                    self._dormant.pop(id(p), None)
        self._import_state(edits.replaced, strict=False)
        self._refresh_state_views()
        self._start_clocks()  # step counters may have been reset or replaced

    def _sync_hypers(self, force: bool = False) -> None:
        """Copy changed group values into the 0-d tensors the step reads; re-plan if a condition flips.

        Every changed group is checked before any is applied, so a refused value in one group leaves the
        others' changes pending (a condition flipped there still re-plans once the user fixes the first).
        ``force`` (a re-plan) applies every value: ``build_buckets`` has just checked them all.
        """
        pending = []
        replan = False
        for gi, group in enumerate(self.param_groups):
            if len(group) != self._key_counts[gi]:
                self._key_counts[gi] = len(group)
                self._advice.mistyped_keys(gi, group)
            replan |= maximizes(group, f"param_groups[{gi}]['maximize']") != self._maximize[gi]
            seen = self._seen[gi]
            changed = [k for k in self._hyper_names if force or seen.get(k, _UNSET) != _mark(group[k])]
            if not changed:
                continue
            env = {**self._floats[gi], **{k: float_value(k, group[k]) for k in changed}}
            if not force:
                graph = group["graph"]
                check = self._value_checks.get(graph) or self._value_checks.setdefault(graph, GroupValueCheck(self.spec, graph))
                check(env, f"param_groups[{gi}]", changed)
            pending.append((gi, group, changed, env))
        for gi, group, changed, env in pending:
            seen = self._seen[gi]
            if not force:
                for k in changed:
                    if k in seen and _unread_change(k, seen[k], _mark(group[k]), self._reads[gi]):
                        self._advice.unread(gi, group["graph"], k, self._reads[gi])
                if self._condition_reads[gi].intersection(changed):
                    replan |= conditions_of(self.spec, group["graph"], env) != self._conditions[gi]
            self._floats[gi] = env
            for (g, device), tensors in self._envs.items():
                if g == gi:
                    _write_env(tensors, env, changed, device)
            for k in changed:
                seen[k] = _mark(group[k])
        if replan:
            self._rebuild()

    def _compiled(self) -> Callable[..., Any]:
        if self._step_fn is None:
            # A plan seen before (a condition flipped back, a state_dict reloaded) reuses its compiled step:
            # equal bucket facts lower to the same function, and dynamo's guards check the tensors.
            key = (tuple(b.args for b in self._buckets), self.on_nonfinite != "propagate")
            if key not in self._step_fns:
                if len(self._step_fns) >= _KEPT_STEPS:
                    del self._step_fns[next(iter(self._step_fns))]
                build = build_step if self._compile else build_eager_step  # eager on a CPU: chunk by chunk
                fn = build(list(key[0]), check_finite=key[1])
                self._step_fns[key] = fuse(fn, self._compile)
            self._step_fn = self._step_fns[key]
        return self._step_fn

    # ---- the step -----------------------------------------------------------------------------------------
    # Under a user's torch.compile(train_step) dynamo would trace this host-side bookkeeping and guard on
    # every hyperparameter's value (one recompile per scheduler step); the step it calls is compiled already.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        self._adopt_state_edits()
        self._sync_hypers()
        if self._needs_grad2:
            if closure is None:
                raise ValueError(
                    f"spec {self.spec.name!r} reads `grad2`, a second independent gradient at the same point: "
                    "call step(closure) with a closure that zeroes grads, draws a fresh batch, computes the loss "
                    "and calls backward (it is called twice per step)"
                )
            loss = self._two_gradients(closure)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        actives, any_grad = [], False
        for bucket in self._buckets:
            moved = bucket.flat.moved_params()
            if moved:
                raise RuntimeError(
                    f"parameter {self._where(bucket, moved[0])} no longer points into the optimizer's flat buffer, "
                    f"so a step would not reach it: {moved_cause(bucket.flat.params[moved[0]])}"
                )
            missing = bucket.flat.gather_grads()
            if missing is None:
                actives.append(None)
                any_grad = True
                continue
            mask = torch.ones(len(bucket.flat.params), dtype=torch.bool)
            mask[missing] = False
            any_grad |= bool(mask.any())
            actives.append(mask.to(bucket.flat.device, non_blocking=True))
        if not any_grad:
            return loss
        if self._masking or any(a is not None for a in actives):
            # From the first missing gradient on, every bucket passes a mask (all True where none is missing):
            # dynamo guards on which masks are None, so mixing would compile a graph per combination of
            # buckets missing a gradient, past the recompile limit (a hard error under fullgraph).
            self._masking = True
            actives = [b.all_active if a is None else a for a, b in zip(actives, self._buckets)]
        if not (self._first_written if self._needs_grad2 else any(b.flat.written() for b in self._buckets)):
            self._advice.no_gradient()
            return loss
        buckets = self._buckets
        for clock in self._clocks:
            clock.decide()
        ok = self._compiled()(
            [b.shaped_param for b in buckets],
            [b.shaped(self._first_grads[i] if self._needs_grad2 else b.flat.grad) for i, b in enumerate(buckets)],
            [b.shaped_state for b in buckets],
            [b.step for b in buckets],
            [self._envs[(b.group_index, b.flat.device)] for b in buckets],
            actives,
            [{"grad2": b.shaped(b.flat.grad)} if self._needs_grad2 else {} for b in buckets],
            self._skipped if self.on_nonfinite != "propagate" else None,
        )
        for clock in self._clocks:
            clock.advance()
        if self.on_nonfinite == "error" and not bool(ok):
            raise FloatingPointError("a gradient holds inf or NaN; the step was skipped (parameters and state unchanged)")
        return loss

    def _two_gradients(self, closure: Callable[[], Any]) -> Any:
        """Run the closure twice at the same parameters; keep the first gradient aside."""
        with torch.enable_grad():
            loss = closure()
        self._first_written = False  # `grad` is the first gradient: the step needs it written
        for i, bucket in enumerate(self._buckets):
            bucket.flat.gather_grads()
            self._first_written |= bucket.flat.written()
            self._first_grads[i] = bucket.flat.swap_grad(self._first_grads[i])
        with torch.enable_grad():
            closure()
        return loss

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear every gradient. By default the gradient buffer is zeroed and the views kept, and until a
        backward writes a gradient the step steps nothing, as torch's does after its default
        ``zero_grad()`` (every ``.grad`` None). ``set_to_none=False`` zeroes them as torch does with that
        argument: zero gradients, which the step applies (decay and momentum act). ``True`` sets them to None.
        """
        for bucket in self._buckets:
            bucket.flat.zero_grad(bool(set_to_none), zeros_are_gradients=set_to_none is False)

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite gradients (reads a device counter: syncs)."""
        return int(self._skipped.item()) if self._skipped is not None else 0

    # ---- inspection -------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Which parameter goes to which graph, by which rule, with its state bytes."""
        from opdsl.describe import describe_optimizer

        return describe_optimizer(self)

    # ---- state_dict -------------------------------------------------------------------------------------
    def _export_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """A copy of every parameter's state (switched-off nodes' included), by ``id(param)``, for a re-plan."""
        return {
            id(p): {k: v.detach().clone() for k, v in entry.items()} for p, entry in self._state_entries().items()
        }

    def _import_state(
        self, saved: Mapping[int, Mapping[str, torch.Tensor]], strict: bool
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Copy saved state (by ``id(param)``) into the buckets; return what no bucket takes (dormant state).

        A node switched off by ``if:`` keeps no state in the step, but its state is not lost: torch keeps
        SGD's ``momentum_buffer`` through steps with momentum 0, and opdsl keeps a switched-off node's state
        aside (in ``state_dict`` too) until the node is switched on again.
        """
        dormant_state: dict[int, dict[str, torch.Tensor]] = {}
        problems = []
        for bucket in self._buckets:
            for i, p in enumerate(bucket.flat.params):
                entry = saved.get(id(p))
                if entry is None:
                    if strict:
                        problems.append(f"no state for parameter {self._name(p)}")
                    continue
                target = per_param_state(bucket, i)
                nodes = self.spec.graphs[bucket.graph].nodes
                dormant = {k: v for k, v in entry.items() if k not in target and k.split(".", 1)[0] in nodes}
                if dormant:
                    dormant_state[id(p)] = dormant
                for key, dest in target.items():
                    src = entry.get(key)
                    if src is None and "." in key:  # a state the node's block added since the checkpoint
                        node, name = key.split(".", 1)
                        own = {k.split(".", 1)[1]: v for k, v in entry.items() if k.startswith(node + ".")}
                        src = nodes[node].missing_state(name, own, entry.get("step")) if node in nodes else None
                    if src is None:
                        if strict:
                            problems.append(f"parameter {self._name(p)}: missing state {key!r}")
                        continue
                    if tuple(src.shape) != tuple(dest.shape):
                        problems.append(
                            f"parameter {self._name(p)}: state {key!r} has shape {tuple(src.shape)}, "
                            f"expected {tuple(dest.shape)}"
                        )
                        continue
                    dest.copy_(src.to(device=dest.device, dtype=dest.dtype))
        if problems:
            raise StateDictError("cannot load optimizer state:\n  " + "\n  ".join(problems))
        return dormant_state

    def _state_entries(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Every parameter's state as saved: the step's views, and the state of switched-off nodes."""
        return {p: {**self._dormant.get(id(p), {}), **entry} for p, entry in self.state.items()}

    def state_dict(self) -> dict[str, Any]:
        """torch-shaped (``state`` by parameter index, ``param_groups``) plus the spec and its digest.

        State is keyed ``node.state`` (e.g. ``m.value``), so it survives spec edits that keep node names.
        torch's state_dict hooks run as in ``torch.optim.Optimizer.state_dict``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._adopt_state_edits()
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        state = {index[id(p)]: entry for p, entry in self._state_entries().items()}
        state_dict = {
            "state": state,
            "param_groups": groups,
            "opdsl": {
                "format": STATE_DICT_FORMAT,
                "spec": self.spec.name,
                "digest": self.spec.digest,
                "definition": self.spec.canonical(),
                "skipped_steps": self._skipped.clone() if self._skipped is not None else None,
            },
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            returned = post_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` wrote (torch's load_state_dict hooks run around it, as in torch)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        self._load(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load(self, state_dict: Mapping[str, Any]) -> None:
        meta = state_dict.get("opdsl")
        if meta is None:
            meta = self._meta_from_groups(state_dict)
        if meta.get("spec") != self.spec.name:
            raise StateDictError(
                f"state_dict was written by spec {meta.get('spec')!r} (digest {meta.get('digest')}), "
                f"but this optimizer runs spec {self.spec.name!r} (digest {self.spec.digest})"
            )
        if meta.get("digest") != self.spec.digest:
            warn_user(
                f"spec {self.spec.name!r} changed since this state_dict was saved (digest {meta.get('digest')} -> "
                f"{self.spec.digest}); loading state by node name"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise StateDictError(
                f"state_dict has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        by_index: dict[int, torch.Tensor] = {}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise StateDictError(
                    f"param_groups[{gi}] has {len(saved['params'])} parameters in the state_dict, "
                    f"{len(group['params'])} here"
                )
            if saved.get("graph", group["graph"]) != group["graph"]:
                raise StateDictError(
                    f"param_groups[{gi}] ran graph {saved.get('graph')!r} when saved, {group['graph']!r} here"
                )
            for idx, p in zip(saved["params"], group["params"]):
                if tuple(state_dict["state"].get(idx, {}).get("step", torch.zeros(())).shape) != ():
                    raise StateDictError(f"parameter {self._name(p)}: bad 'step' entry")
                by_index[idx] = p
        for saved, group in zip(groups, self.param_groups):
            for key, value in saved.items():
                if key not in ("params", "param_names", "graph", "spec"):
                    group[key] = value
            if "maximize" not in saved:  # saved before the option existed, so it descended (torch does the same)
                group["maximize"] = False
        saved_state = {id(by_index[i]): s for i, s in state_dict["state"].items() if i in by_index}
        self._refresh_state_views()  # what is loaded replaces any edit of self.state
        self._rebuild()
        self._dormant = self._import_state(saved_state, strict=True)
        self._start_clocks()  # the step counters were just loaded
        skipped = meta.get("skipped_steps")
        if skipped is not None and self._skipped is not None:
            self._skipped.copy_(skipped)

    def _meta_from_groups(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A state_dict without its ``opdsl`` entry, as torch.distributed.checkpoint's state_dict helpers
        rebuild it (they keep ``state`` and ``param_groups`` only): opdsl's if every group names a graph of
        this spec. The spec's digest cannot be compared, and the skipped-step count is not restored."""
        groups = state_dict.get("param_groups")
        if groups and all(isinstance(g, Mapping) and g.get("spec") == self.spec.name for g in groups):
            return {"spec": self.spec.name, "digest": self.spec.digest}
        named = {g.get("spec") for g in groups or () if isinstance(g, Mapping)} - {None}
        if named:
            raise StateDictError(
                f"state_dict was written by spec {', '.join(map(repr, sorted(named)))}, but this optimizer runs "
                f"spec {self.spec.name!r}"
            )
        raise StateDictError(
            f"this state_dict was not written by opdsl (no 'opdsl' entry, and its param_groups name no spec); it "
            f"cannot be loaded into an opdsl optimizer running spec {self.spec.name!r}"
        )

    def _group_values(self, group: Mapping[str, Any]) -> str:
        """A group's hyperparameters as ``name=value``, and ``maximize=True`` where it climbs."""
        shown = [*self._hyper_names, "maximize"] if group.get("maximize") else self._hyper_names
        return ", ".join(f"{k}={group[k]}" for k in shown)

    def __repr__(self) -> str:
        lines = [f"opdsl.Optimizer(spec={self.spec.name!r}, compile={bool(self._compile)}, groups={len(self.param_groups)})"]
        for gi, group in enumerate(self.param_groups):
            values = self._group_values(group)
            lines.append(f"  [{gi}] graph={group['graph']} params={len(group['params'])} {values}")
        return "\n".join(lines)


_UNSET = object()
_KEPT_STEPS = 8  # compiled steps kept per optimizer (plans a run flips between)


class _TensorMark:
    """A tensor-valued hyperparameter as last seen: the tensor itself and its version counter.

    Schedulers change a tensor ``lr`` in place (``fill_``), which bumps the counter; comparing values
    instead would read the tensor on every step, changed or not.
    """

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        try:
            self.version: int | None = tensor._version
        except RuntimeError:  # inference tensors keep no version counter: always treat them as changed
            self.version = None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _TensorMark) and other.tensor is self.tensor
            and self.version is not None and other.version == self.version
        )

    __hash__ = None  # type: ignore[assignment]


def _mark(value: Any) -> Any:
    """What tells whether a group's hyperparameter changed since it was last copied into the step's tensors."""
    if isinstance(value, torch.Tensor):
        return _TensorMark(value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_mark(v) for v in value))
    return (type(value), value)


def _unread_change(key: str, old: Any, new: Any, reads: frozenset[tuple[str, int | None]]) -> bool:
    """Whether a value changed (marks ``old`` -> ``new``) only where the graph does not read it."""
    if (key, None) in reads:
        return False
    indices = {i for name, i in reads if name == key}
    if not indices:
        return True
    if not (_is_sequence_mark(old) and _is_sequence_mark(new) and len(old[1]) == len(new[1])):
        return False
    changed = {i for i, (a, b) in enumerate(zip(old[1], new[1])) if a != b}
    return not changed & indices


def _is_sequence_mark(mark: Any) -> bool:
    return isinstance(mark, tuple) and mark[0] in (tuple, list)


def _normalize(name: str, value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


def _with_names(params: Iterable[Any], names: dict[int, str]) -> list[Any]:
    """Accept tensors, (name, tensor) pairs or group dicts; record names by tensor id."""
    out = []
    for item in params if not isinstance(params, torch.Tensor) else [params]:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            names[id(item[1])] = item[0]
            out.append(item[1])
        elif isinstance(item, dict):
            group = dict(item)
            group["params"] = _with_names(item["params"], names)
            out.append(group)
        else:
            out.append(item)
    return out


def _spare_grad(flat: FlatBuffers) -> torch.Tensor:
    """The second gradient buffer of a graph that reads ``grad2``: read beside the first, so staggered from it
    and from the states (``layout.full_buffer``)."""
    return full_buffer(flat.numel, 0.0, -1, dtype=flat.dtype, device=flat.device)


def _write_env(tensors: dict[str, Any], env: Mapping[str, Any], changed: list[str], device: torch.device) -> None:
    dtype = scalar_dtype(device)
    for key in changed:
        value = env[key]
        if isinstance(value, bool):
            tensors[key] = value
            continue
        if isinstance(value, tuple):
            current = tensors.get(key)
            if not isinstance(current, tuple) or len(current) != len(value):
                tensors[key] = tuple(scalar_slot(v, device, dtype) for v in value)
            else:
                for t, v in zip(current, value):
                    t.fill_(float(v))
            continue
        current = tensors.get(key)
        if isinstance(current, torch.Tensor):
            current.fill_(float(value))
        else:
            tensors[key] = scalar_slot(value, device, dtype)
