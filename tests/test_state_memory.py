"""Optimizer-state memory per parameter, checked against the oracle in ``benchmarks/state_theory.py``.

Every shipped spec is built eagerly over a parameter list that exercises every route (tall and wide
matrices below and above the default subspace rank, a 4-D kernel, a vector, a 0-d and a 1-element
tensor), stepped once with random gradients, and its ``opt.state[p]`` is counted.

How opdsl exposes state (found by inspecting real optimizers, see ``opdsl.plan.per_param_state``):

* ``"step"`` is the bucket's step count, a 0-d float64 tensor shared by every parameter of the bucket.
  It is the only step counter and is not counted.
* Every other key is ``node.state`` (``m.value``, ``adam.v``, ``sm.basis``, ...): a view of the
  parameter's slice of a flat elementwise buffer, a per-parameter tensor, or a scalar shared by the
  whole bucket (0-d, the same storage in every parameter's dict: AdaGrad-Norm's ``b2``, SGDOL's sums).

Counting rule: the elements of a parameter = the sum of ``numel()`` over every tensor in its state dict
except ``"step"``; a shared scalar counts 1 for each parameter that sees it (the oracle's rule too).
A state is "full-size" when it has the parameter's shape and is not a shared scalar; its dtype must be
the parameter's.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import opdsl

ROOT = Path(__file__).resolve().parents[1]
SPEC_NAMES = sorted(path.stem for path in (ROOT / "specs").glob("*.yaml"))
COUNTER_KEYS = frozenset({"step"})

# tall/wide below the default subspace rank (128), tall/wide above it, a 4-D kernel, a vector, 0-d, 1-element
SHAPES = [(12, 5), (4, 9), (150, 130), (130, 150), (4, 3, 2, 2), (7,), (), (1,)]

# Specs whose count differs from the oracle: (spec, reason). Reported, not fixed here.
KNOWN_DISAGREEMENTS: dict[str, str] = {}  # spec -> why opdsl keeps other state than the theory


# Non-default hyperparameters that change the state the oracle predicts.
VARIANTS = [
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", {"centered": True}),
    ("rmsprop", {"momentum": 0.9}),
    ("rmsprop", {"centered": True, "momentum": 0.9}),
    ("adam", {"amsgrad": True}),
    ("adam-l2", {"amsgrad": True}),
    ("adamw", {"amsgrad": True}),
    ("qhadamw", {"amsgrad": True}),
    ("aggmo-adamw", {"amsgrad": True}),
    ("coba", {"amsgrad": True}),
    ("scgadam", {"amsgrad": True}),
    ("adagrad-sn", {"momentum": 0.9}),
]

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_theory():
    """benchmarks/ is not a package: load the oracle module from its file."""
    path = ROOT / "benchmarks" / "state_theory.py"
    spec = importlib.util.spec_from_file_location("state_theory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("state_theory", module)
    spec.loader.exec_module(module)
    return module


theory = _load_theory()


def _mark_known(spec: str):
    reason = KNOWN_DISAGREEMENTS.get(spec)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(spec, marks=marks, id=spec)


def _random_grads(params: list[torch.Tensor], gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@functools.lru_cache(maxsize=None)
def _stepped(spec: str, dtype: torch.dtype = torch.float32, hyper: tuple = ()):
    """Parameters and an eager optimizer after one step on random gradients (cached per case).

    The step goes through a closure that draws fresh gradients, so SGDOL (which reads ``grad2``
    by calling the closure twice) and every other spec are driven the same way."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    opt = opdsl.Optimizer(params, spec, compile=False, **dict(hyper))

    def closure():
        _random_grads(params, gen)
        return torch.zeros(())

    _random_grads(params, gen)
    opt.step(closure)
    return params, opt


def _state_tensors(opt, p) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if k not in COUNTER_KEYS and isinstance(v, torch.Tensor)}


def _counted_elements(opt, p) -> int:
    return sum(v.numel() for v in _state_tensors(opt, p).values())


def _shared_keys(opt, params) -> set[tuple[int, str]]:
    """(param index, key) of states whose storage appears under the same key for another parameter."""
    seen: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(params):
        for key, value in _state_tensors(opt, p).items():
            seen.setdefault((key, value.data_ptr()), []).append(i)
    return {(i, key) for (key, _), owners in seen.items() if len(owners) > 1 for i in owners}


def _mismatches(spec: str, params, opt, hyper: dict | None = None) -> list[str]:
    out = []
    for p in params:
        want = theory.theory_elements(spec, tuple(p.shape), hyper)
        got = _counted_elements(opt, p)
        if got != want:
            keys = {k: tuple(v.shape) for k, v in _state_tensors(opt, p).items()}
            out.append(f"shape {tuple(p.shape)}: opdsl {got} elements {keys}, theory {want}")
    return out


# ---- the oracle itself ------------------------------------------------------------------------------

def test_oracle_covers_every_shipped_spec():
    assert len(SPEC_NAMES) >= 28
    assert set(theory.SPECS) == set(SPEC_NAMES)


def test_oracle_rejects_unknown_spec():
    with pytest.raises(KeyError, match="no state theory for spec 'nope'"):
        theory.theory_elements("nope", (3, 3))
    with pytest.raises(ValueError, match="does not model"):
        theory.theory_elements("adamw", (3, 3), {"lr": 1.0})


@pytest.mark.parametrize("spec", SPEC_NAMES)
def test_oracle_assumptions_match_the_spec_file(spec):
    """The defaults and fixed fields the oracle's count relies on are the spec file's."""
    entry = theory.THEORY[spec]
    loaded = opdsl.load_spec(spec)
    assert theory.theory_note(spec)
    for name, value in entry.hyper.items():
        have = loaded.hyper[name]
        assert (tuple(have) if isinstance(have, (list, tuple)) else have) == value, name
    for dotted, value in entry.fields.items():
        node, attr = dotted.split(".")
        assert getattr(loaded.graphs["main"].nodes[node], attr) == value, dotted


# ---- opdsl against the oracle -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", [_mark_known(s) for s in SPEC_NAMES])
def test_state_elements_match_theory(spec):
    params, opt = _stepped(spec)
    assert not _mismatches(spec, params, opt), "\n".join(_mismatches(spec, params, opt))


@pytest.mark.parametrize(("spec", "hyper"), VARIANTS, ids=[f"{s}-{'-'.join(h)}" for s, h in VARIANTS])
def test_state_elements_match_theory_off_defaults(spec, hyper):
    params, opt = _stepped(spec, hyper=tuple(sorted(hyper.items())))
    modelled = {k: v for k, v in hyper.items() if k in theory.THEORY[spec].hyper}
    problems = _mismatches(spec, params, opt, modelled)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("spec", SPEC_NAMES)
def test_state_tensors_fit_their_parameter(spec, dtype):
    """No state tensor is larger than its parameter; full-size states have the parameter's dtype."""
    params, opt = _stepped(spec, dtype)
    shared = _shared_keys(opt, params)
    for i, p in enumerate(params):
        for key, value in _state_tensors(opt, p).items():
            assert value.numel() <= p.numel(), f"{key} of {tuple(p.shape)} has {value.numel()} elements"
            if value.shape == p.shape and (i, key) not in shared:
                assert value.dtype == p.dtype, f"{key} of {tuple(p.shape)} is {value.dtype}"


def test_step_is_the_only_counter_and_is_shared():
    """The counting rule's premise: one 0-d ``step`` per bucket, the same tensor for its parameters."""
    params, opt = _stepped("adamw")
    steps = {opt.state[p]["step"].data_ptr() for p in params}
    assert len(steps) == 1
    assert all(opt.state[p]["step"].dim() == 0 and float(opt.state[p]["step"]) == 1.0 for p in params)
