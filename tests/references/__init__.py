"""Independent float64 reference optimizers ("oracles") for the opdsl seed specs.

Written from /work/shared/algorithms.md (and the authors' code where it could be read), with plain loops
over parameters and torch ops only; they share NO code with opdsl (never import it here). Contract:

    ref = REFERENCES[name](params, **hyper)   # params: float64 tensors, updated IN PLACE
    ref.step(grads)                           # SGDOL: ref.step(grads, grads2)

Hyperparameters are attributes read at every step (e.g. ``ref.lr = ...`` between steps). Every class
docstring states its paper-vs-code choices.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from ._base import Reference, newton_schulz
from .basic import SGDOL, AdaGradNorm, Adam, AdamW, GeneralizedSignSGD, Lion, SignSGD, Signum
from .muadam import MuAdam
from .mtdao import AggMoAdamW
from .scg import SCGAdam, CoBA
from .scs import SCSAdamW
from .sn_sm import AdaGradSN, AdamWSM, AdamWSN, SubsetLayout, SVDProjector

REFERENCES: dict[str, Callable[..., Reference]] = {
    "scsadamw": SCSAdamW,
    "scsadamw-sigmoid": partial(SCSAdamW, smoothing="sigmoid"),
    "scsadamw-restart": partial(SCSAdamW, restart_every=100),
    "scgadam": SCGAdam,
    "scgamsgrad": partial(SCGAdam, amsgrad=True),
    "scgadam-diminishing": partial(SCGAdam, diminishing=True),
    "coba": CoBA,
    "adamw-sn": AdamWSN,
    "adagrad-sn": AdaGradSN,
    "adamw-sm": AdamWSM,
    "adamw-snsm": partial(AdamWSM, subset="heuristic"),
    "muadam": MuAdam,
    "muadam-sania": partial(MuAdam, sania=True),
    "lion": Lion,
    "signsgd": SignSGD,
    "signum": Signum,
    "generalized-signsgd": GeneralizedSignSGD,
    "adagrad-norm": AdaGradNorm,
    "adam-l2": Adam,
    "adamw": AdamW,
    "qhadamw": AggMoAdamW,
    "aggmo-adamw": partial(AggMoAdamW, betas=(0.9, 0.99, 0.999), vs=(0.35, 0.35)),
    "sgdol": SGDOL,
}

__all__ = [
    "REFERENCES", "Reference", "newton_schulz", "SubsetLayout", "SVDProjector",
    "SCSAdamW", "SCGAdam", "CoBA", "AdamWSN", "AdaGradSN", "AdamWSM", "MuAdam", "Lion", "SignSGD", "Signum",
    "GeneralizedSignSGD", "AdaGradNorm", "Adam", "AdamW", "AggMoAdamW", "SGDOL",
]
