"""opdsl's graph passes over the compiled step, run in order before inductor lowers it.

``ENABLED`` names the passes a step compiled from now on gets: the knob for measuring one pass against
its absence (``benchmarks/graph_passes.py``) and for the tests that hold a pass to computing the same bits.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from opdsl.compiled.cse import SharedScalars
from opdsl.compiled.loop_scalars import ScalarsBeforeLoops

__all__ = ["PASSES", "ENABLED", "StepPasses"]

# In order: common subexpressions merged first, so that every bucket's copy of a scalar is one node,
# then each scalar a loop reads realised before the loop.
PASSES: dict[str, type[CustomGraphPass]] = {"shared-scalars": SharedScalars, "scalars-before-loops": ScalarsBeforeLoops}
ENABLED: tuple[str, ...] = tuple(PASSES)


class StepPasses(CustomGraphPass):
    """The passes of ``ENABLED`` (read when the step is compiled), in ``PASSES`` order."""

    def __init__(self) -> None:
        unknown = set(ENABLED) - set(PASSES)
        if unknown:
            raise ValueError(f"unknown graph passes {sorted(unknown)}; opdsl's are {list(PASSES)}")
        self.passes = tuple(make() for name, make in PASSES.items() if name in ENABLED)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> str:  # inductor's cache key: a step compiled with other passes is another artifact
        return "+".join(graph_pass.uuid() for graph_pass in self.passes) or "opdsl: no graph passes"
