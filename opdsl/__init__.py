"""opdsl: optimizers as validated YAML block graphs, compiled to one fused torch.optim step."""
from __future__ import annotations

from opdsl.errors import BindError, Problem, SpecError, StateDictError
from opdsl.loader import load_spec, shipped_specs
from opdsl.optimizer import Optimizer
from opdsl.spec import Spec

__all__ = ["Optimizer", "Spec", "SpecError", "BindError", "StateDictError", "Problem", "load_spec", "shipped_specs"]
__version__ = "0.1.0"
