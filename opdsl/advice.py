"""What opdsl tells a user about how they drive an optimizer: warnings shown once and at the user's own
line, and the reasons behind refusals that name the way out."""
from __future__ import annotations

import difflib
import os
import sys
import warnings
from typing import Any, Mapping

import torch

from opdsl.blocks.base import Scope
from opdsl.compiled.layout import FlatBuffers
from opdsl.spec import ENGINE_OPTIONS, Spec

__all__ = ["Advice", "GROUP_KEYS", "flattened_refusal", "moved_cause", "warn_user"]

# keys a group holds besides hyperparameters: opdsl's own and those torch's schedulers add
GROUP_KEYS = frozenset(
    {"params", "param_names", "graph", "spec", "maximize", "initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum", "swa_lr"}
)
_INTERNAL_DIRS = tuple(os.path.dirname(f) + os.sep for f in (__file__, torch.__file__))


def warn_user(message: str) -> None:
    """Warn at the user's line: the first caller outside opdsl and torch (whose wrappers around ``step``
    vary in depth)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def moved_cause(p: torch.Tensor) -> str:
    """Why a parameter's ``.data`` left its flat buffer, and what to do, as far as it can be told."""
    if FlatBuffers.holds(p):
        return "another opdsl optimizer was built over it and moved it into its own buffer; use one optimizer per parameter"
    if getattr(p, "_fsdp_flattened", False):
        return ("FSDP points it at its own flat parameter (use_orig_params=True, or a forward run before the "
                "optimizer was built); wrap with use_orig_params=False and build the optimizer before the first forward")
    return ("its .data was re-assigned after the optimizer was built: by moving the module to another device or "
            "dtype (build the optimizer after), by ZeroRedundancyOptimizer(parameters_as_bucket_view=True) (pass "
            "False), or by torch.distributed's model averaging, which assigns p.data (average in place instead: "
            "dist.all_reduce(p.data), then p.data.div_(world_size))")


def flattened_refusal(spec: Spec, graph_name: str, label: str) -> str | None:
    """Why a graph cannot step FSDP1's flattened shards (``use_orig_params=False``: one 1-D shard per rank
    and module, in which no tensor, row or model-wide sum can be told), or None if it can."""
    graph = spec.graphs[graph_name]
    needs = [f"{name!r} ({block.block}, {block.scope().value})" for name, block in graph.nodes.items()
             if block.scope() is not Scope.ELEMENTWISE]
    if not needs:
        return None
    return (
        f"parameter {label} is FSDP's flattened shard (FSDP1 with use_orig_params=False), but graph "
        f"{graph_name!r} of spec {spec.name!r} reduces over tensors or the model in {', '.join(needs)}, which a "
        "shard of flattened parameters cannot give: use DDP, or a spec whose blocks are all elementwise"
    )


class Advice:
    """The warnings of one optimizer, each shown once."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._given: set[Any] = set()

    def _once(self, key: Any, message: str) -> None:
        if key not in self._given:
            self._given.add(key)
            warn_user(message)

    def unread(self, gi: int, graph: str, key: str, reads: frozenset[tuple[str, int | None]]) -> None:
        """A group value changed where its graph does not read it (a scheduler cycling the wrong key)."""
        read = ", ".join(f"{n}[{i}]" if i is not None else n for n, i in sorted(reads, key=lambda r: (r[0], r[1] or -1)))
        hint = ""
        if key == "betas" and any(n == "momentum" for n, _ in reads):
            hint = (
                " torch's schedulers with cycle_momentum=True cycle betas[0] whenever the optimizer has `betas`; "
                "this graph's momentum is `momentum`: pass cycle_momentum=False, or set group['momentum'] yourself."
            )
        self._once(("unread", graph, key), (
            f"param_groups[{gi}][{key!r}] changed, but graph {graph!r} of spec {self.spec.name!r}, which this group "
            f"follows, does not read what changed, so the change has no effect (it reads: {read or 'nothing'}).{hint} "
            "This warning is shown once per graph and key."
        ))

    def mistyped_keys(self, gi: int, group: Mapping[str, Any]) -> None:
        """A group key close to a hyperparameter's or an engine option's name is probably a typo that would
        be silently ignored."""
        names = [*self.spec.hyper, *ENGINE_OPTIONS]
        for key in group:
            if key in self.spec.hyper or key in GROUP_KEYS:
                continue
            close = difflib.get_close_matches(key.lower(), names, n=1, cutoff=0.8)
            if close:
                self._once(("typo", key), (
                    f"param_groups[{gi}] has a key {key!r}, which spec {self.spec.name!r} does not read (did you "
                    f"mean {close[0]!r}?); it is kept, as torch keeps any key, and has no effect"
                ))

    def no_gradient(self) -> None:
        """step() found no gradient written since the buffers were zeroed: torch would see every .grad None."""
        self._once("no gradient", (
            "opdsl.Optimizer.step() found no gradient written since the optimizer was built or zero_grad() "
            "was called, so it stepped nothing, as torch.optim does when every .grad is None. (A gradient "
            "written only through `p.grad.data` is not seen: write `p.grad` in place or assign it.) "
            "This warning is shown once."
        ))

    def flattened_routes(self, label: str, graph: str) -> None:
        """Routing rules see FSDP1's flattened 1-D shards: no matrix, bias or name."""
        if self.spec.groups:
            self._once("flattened", (
                f"spec {self.spec.name!r} routes parameters by shape or name, but FSDP1 with use_orig_params=False "
                f"hands it flattened 1-D shards ({label} went to graph {graph!r} as one): routing rules then see no "
                "matrix, bias or name; use DDP, or a spec without `groups` rules"
            ))
