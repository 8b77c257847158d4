"""Small helpers for mixing 0-d hyperparameter tensors (float64) with flat buffers."""
from __future__ import annotations

from typing import Any

import torch


def as_weight(value: Any, like: torch.Tensor) -> Any:
    """A scalar usable as a ``torch.lerp`` weight / multiplier for ``like`` (0-d tensors cast to its dtype)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype)
    return value
