"""Optimizer step benchmark: opdsl specs against torch's fused/foreach/compiled steps and HeavyBall.

    python benchmarks/step.py                                   # default: adamw, 10M + GPT-2 x0.25 (~5 min)
    python benchmarks/step.py --full --out docs/benchmarks.md   # every shipped spec, 1M..100M, GPT-2 small
    python benchmarks/step.py --specs adamw sgd adagrad --sizes 1e6 1e7 1e8 --gpt2-scale 1.0
    python benchmarks/step.py --specs adamw --out docs/benchmarks.md

For every (spec, workload) it prints a markdown table: median step time and IQR over interleaved
rounds (A B C A B C ..., the order rotated every round, warm-up rounds excluded; each contender built
twice for them, in order and mirrored, after a build of its own for the first call), the floor (the
spec's own bytes moved per parameter x parameters / in-place streaming bandwidth measured inside
the same interleaved loop), the ratio to the floor, the first call (compile) time, recompiles over
``--recompile-steps`` steps with the LR changed before every step, optimizer-state bytes per
parameter, full-size state tensors per parameter tensor, and the peak extra memory of one
steady-state step (temporaries; "kept" when the step leaves memory allocated).

With several specs each runs in a fresh Python process with a fresh inductor cache (``--one-process``
runs them all in this one), so that a spec's first call is the compile a user sees.

Contenders: opdsl compiled and eager (skipped until ``import opdsl`` works), torch.optim with
``foreach=True``, with ``fused=True`` where torch supports it on the device, ``torch.compile`` of
torch's own step (tensor LR, as torch's compiled-optimizer tutorial recommends, so an LR change
does not recompile), and HeavyBall's compiled optimizer when ``import heavyball`` works (it is not
a dependency of opdsl; ``pip install heavyball`` to include it).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repo root, so that an uninstalled checkout's opdsl imports (an installed one wins).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import harness as H  # noqa: E402
import targets as T  # noqa: E402

# --------------------------------------------------------------------------------------------
# Algorithms with a torch (and maybe HeavyBall) equivalent
# --------------------------------------------------------------------------------------------

LR = 1e-3


@dataclasses.dataclass
class Algo:
    name: str
    torch_cls: str | None  # attribute of torch.optim
    torch_kwargs: dict[str, Any]
    state_elems: int  # full-size state tensors per parameter in theory
    fused_devices: tuple[str, ...] = ()
    foreach: bool = True
    only_2d: bool = False
    heavyball: tuple[str, dict[str, Any]] | None = None
    bytes_doc: str = ""

    def theory_bpp(self, itemsize: int) -> float:
        """param read + write, grad read, each full-size state read + write."""
        return itemsize * (3 + 2 * self.state_elems)


ALGOS: dict[str, Algo] = {
    "adamw": Algo(
        "adamw", "AdamW", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), 2, ("cpu", "cuda"),
        heavyball=("AdamW", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
        bytes_doc="read p,g,m,v; write p,m,v",
    ),
    "adam": Algo(
        "adam", "Adam", dict(betas=(0.9, 0.999), eps=1e-8), 2, ("cpu", "cuda"),
        bytes_doc="read p,g,m,v; write p,m,v",
    ),
    "sgd": Algo(
        "sgd", "SGD", dict(momentum=0.9), 1, ("cpu", "cuda"),
        heavyball=("SGD", dict(beta=0.9)), bytes_doc="read p,g,buf; write p,buf",
    ),
    "sgd_nesterov": Algo(
        "sgd_nesterov", "SGD", dict(momentum=0.9, nesterov=True), 1, ("cpu", "cuda"),
        bytes_doc="read p,g,buf; write p,buf",
    ),
    "adagrad": Algo(
        "adagrad", "Adagrad", dict(), 1, ("cpu", "cuda"), bytes_doc="read p,g,sum; write p,sum",
    ),
    "rmsprop": Algo(
        "rmsprop", "RMSprop", dict(alpha=0.99), 1, (), bytes_doc="read p,g,sq; write p,sq",
    ),
    # torch has foreach steps (no fused ones) for the specs written with `map`
    "adamax": Algo("adamax", "Adamax", dict(), 2, bytes_doc="read p,g,m,u; write p,m,u"),
    "nadam": Algo("nadam", "NAdam", dict(), 2, bytes_doc="read p,g,m,v; write p,m,v"),
    "radam": Algo("radam", "RAdam", dict(), 2, bytes_doc="read p,g,m,v; write p,m,v"),
    "adadelta": Algo("adadelta", "Adadelta", dict(), 2, bytes_doc="read p,g,square_avg,acc_delta; write p and both"),
    "rprop": Algo("rprop", "Rprop", dict(), 2, bytes_doc="read p,g,prev,step_size; write p,prev,step_size"),
    "asgd": Algo("asgd", "ASGD", dict(), 1, bytes_doc="read p,g,ax; write p,ax"),
    "muon": Algo(
        "muon", "Muon", dict(momentum=0.95, nesterov=True, weight_decay=0.1), 1, (), foreach=False, only_2d=True,
        bytes_doc="2-D params only; read p,g,buf; write p,buf (+ Newton-Schulz matmuls, compute-bound)",
    ),
}
ALIASES = {
    "sgdm": "sgd", "sgd_momentum": "sgd", "momentum": "sgd", "nesterov": "sgd_nesterov",
    "sgd_nesterov_momentum": "sgd_nesterov",
}


# Shipped specs that are matrix specs (2-D params only in the torch oracle; FLOP/s reported).
MATRIX_SPECS = {"muon"}


def canonical(spec: str) -> str:
    s = spec.lower().replace("-", "_")
    if s.endswith(".yaml"):
        s = os.path.basename(s)[:-5]
    return ALIASES.get(s, s)


def projection_flops(params: list[torch.Tensor], rank: int) -> float:
    """Subspace-momentum FLOPs per step (refresh steps aside): P(G) and P*(M), 2 m n r each."""
    total = 0.0
    for p in params:
        if p.ndim >= 2:
            m, n = p.shape[0], p.numel() // p.shape[0]
            total += 4 * m * n * min(rank, m, n)
    return total


def muon_flops(params: list[torch.Tensor], ns_steps: int = 5) -> float:
    """Newton-Schulz FLOPs per step: per iteration X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n)."""
    total = 0.0
    for p in params:
        if p.ndim != 2:
            continue
        m, n = sorted(p.shape)
        total += ns_steps * (4 * m * m * n + 2 * m**3)
    return total


# --------------------------------------------------------------------------------------------
# torch contenders
# --------------------------------------------------------------------------------------------


def _set_lr_float(opt: torch.optim.Optimizer) -> Callable[[float], None]:
    def set_lr(lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr

    return set_lr


def _set_lr_tensor(opt: torch.optim.Optimizer) -> Callable[[float], None]:
    def set_lr(lr: float) -> None:
        for g in opt.param_groups:
            g["lr"].fill_(lr)

    return set_lr


def _fused_skipping_nonfinite(cls: type, params: list[torch.nn.Parameter], kw: dict[str, Any]) -> H.Stepper:
    """torch's fused step that leaves params and state untouched when a gradient is not finite."""
    opt = cls(params, lr=LR, fused=True, **kw)
    grads = [p.grad for p in params]
    found_inf = torch.zeros((), device=params[0].device)
    unit = torch.ones((), device=params[0].device)

    def step() -> None:
        found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, unit)
        opt.found_inf = found_inf
        opt.step()

    return H.Stepper(step, opt, _set_lr_float(opt))


def torch_contenders(algo: Algo, device: torch.device, compile_torch: bool, extra: bool) -> list[H.Contender]:
    if algo.torch_cls is None or not hasattr(torch.optim, algo.torch_cls):
        return []
    cls = getattr(torch.optim, algo.torch_cls)
    kw = dict(algo.torch_kwargs)
    flops_fn = muon_flops if algo.name == "muon" else None
    out: list[H.Contender] = []

    def eager(name: str, **impl: Any) -> H.Contender:
        def make(params: list[torch.nn.Parameter]) -> H.Stepper:
            opt = cls(params, lr=LR, **kw, **impl)
            return H.Stepper(opt.step, opt, _set_lr_float(opt), flops=flops_fn(params) if flops_fn else None)

        return H.Contender(name, make, compiled=False, family="torch")

    if algo.foreach:
        out.append(eager("torch foreach", foreach=True))
    else:
        out.append(eager("torch eager"))
    if device.type in algo.fused_devices:
        out.append(eager("torch fused", fused=True))
        out.append(H.Contender(
            "torch fused, skips non-finite", lambda ps: _fused_skipping_nonfinite(cls, ps, kw), family="torch",
            note="what torch offers for opdsl's default on_nonfinite='skip': GradScaler's check "
            "(_amp_foreach_non_finite_check_and_unscale_ with scale 1, which also rewrites the gradients) and "
            "the fused step's found_inf",
        ))
    if extra and algo.foreach:
        out.append(eager("torch for-loop", foreach=False))

    if compile_torch:

        def make_compiled(params: list[torch.nn.Parameter], **impl: Any) -> H.Stepper:
            # What torch's compiled-optimizer tutorial says to do: LR as a 0-d tensor (an LR
            # change then updates data, not a guard), step wrapped in torch.compile.
            lr = torch.tensor(LR, device=params[0].device)
            opt = cls(params, lr=lr, **kw, **impl)

            @torch.compile(fullgraph=False)
            def step() -> None:
                opt.step()

            return H.Stepper(step, opt, _set_lr_tensor(opt), flops=flops_fn(params) if flops_fn else None)

        out.append(
            H.Contender(
                "torch.compile(step), tensor lr",
                make_compiled,
                compiled=True,
                family="torch",
                note="torch's default implementation (on CPU the per-tensor for-loop) inside torch.compile, "
                "lr a 0-d tensor as torch's compiled-optimizer tutorial recommends",
            )
        )
        if extra and algo.foreach:
            out.append(
                H.Contender(
                    "torch.compile(foreach step), tensor lr",
                    lambda ps: make_compiled(ps, foreach=True, capturable=True),
                    compiled=True,
                    family="torch",
                    note="foreach=True needs capturable=True for a tensor lr",
                )
            )
    return out


def heavyball_contenders(algo: Algo, device: torch.device) -> list[H.Contender]:
    if algo.heavyball is None:
        return []
    try:
        import heavyball  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed: skipped cleanly
        return []
    cls_name, hkw = algo.heavyball
    version = getattr(heavyball, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v

            version = _v("heavyball")
        except Exception:  # noqa: BLE001
            version = "?"

    def make(params: list[torch.nn.Parameter]) -> H.Stepper:
        cls = getattr(heavyball, cls_name)
        grads = [p.grad for p in params]
        opt = cls(params, lr=LR, **hkw)

        def refill() -> None:  # HeavyBall sets p.grad = None after each step
            for p, g in zip(params, grads):
                p.grad = g

        return H.Stepper(opt.step, opt, _set_lr_float(opt), refill=refill)

    return [
        H.Contender(
            f"heavyball {cls_name} (compiled)",
            make,
            compiled=True,
            family="heavyball",
            note=f"heavyball {version}, its default compile (mode {getattr(heavyball.utils, 'compile_mode', '?')}); "
            "p.grad is restored untimed before each step because HeavyBall clears it",
        )
    ]


# --------------------------------------------------------------------------------------------
# opdsl contenders  ---- HOOK: skipped until the engine lands ----
# --------------------------------------------------------------------------------------------


def opdsl_available() -> str | None:
    """None when ``opdsl.Optimizer`` can be imported, else the reason it cannot."""
    try:
        import opdsl

        opdsl.Optimizer  # noqa: B018
        return None
    except Exception as exc:  # noqa: BLE001 - ImportError, AttributeError, a half-written engine
        return f"{type(exc).__name__}: {exc}"


def opdsl_spec_problem(spec_name: str) -> str | None:
    """None when opdsl loads ``spec_name`` (a shipped spec or a YAML file), else why it does not (a torch-only name
    such as ``sgd_nesterov`` gets torch's rows alone)."""
    import opdsl

    try:
        opdsl.load_spec(spec_name)
        return None
    except opdsl.SpecError as exc:
        return str(exc).splitlines()[0]


def opdsl_contenders(spec_name: str, device: torch.device) -> list[H.Contender]:
    """``opdsl.Optimizer(params, spec, compile=True)`` and ``compile=False``; [] until opdsl imports."""
    if opdsl_available() is not None:
        return []
    import opdsl

    algo = ALGOS.get(canonical(spec_name))
    # Same hyperparameters as the torch contenders, where the spec has them (lr is set below).
    probe = opdsl.Optimizer([torch.nn.Parameter(torch.zeros(2, 2))], spec_name, compile=False)
    okw = {k: v for k, v in (algo.torch_kwargs if algo else {}).items() if k in probe.spec.hyper}
    del probe

    def maker(compiled: bool, **options: Any) -> Callable[[list[torch.nn.Parameter]], H.Stepper]:
        def make(params: list[torch.nn.Parameter]) -> H.Stepper:
            grads = [p.grad for p in params]
            opt = opdsl.Optimizer(params, spec_name, lr=LR, compile=compiled, **options, **okw)
            # opdsl may re-home p.grad into its flat gradient buffer: write the same numbers there
            # instead of replacing the grad (replacing would force a gather every step).
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g
                elif p.grad is not g:
                    p.grad.copy_(g)
            flops = muon_flops(params, ns_steps) if ns_steps else None
            if rank:
                flops = projection_flops(params, rank)
            if opt._needs_grad2:
                # SGDOL calls its closure twice a step. A user's closure runs forward and backward, which is not
                # the optimizer's cost: here it does nothing. The first gradient is refilled untimed before
                # every step; the second is the zeroed buffer the step hands the closure. What is timed is the
                # step's own work: setting the first gradient aside, zeroing the second buffer, both sums and
                # the update (the numbers do not change the kernels' work).
                saved = [p.grad.clone() for p in params]

                def refill_first_gradient() -> None:
                    for p, g in zip(params, saved):
                        p.grad.copy_(g)

                return H.Stepper(
                    lambda: opt.step(lambda: None), opt, _set_lr_float(opt), refill=refill_first_gradient, flops=flops
                )
            return H.Stepper(opt.step, opt, _set_lr_float(opt), flops=flops)

        return make

    ortho, projector = T.block_of(spec_name, "orthogonalize"), T.block_of(spec_name, "subspace-projector")
    ns_steps = ortho.steps if ortho else None
    rank = projector.rank if projector else None

    out = [
        H.Contender(f"opdsl {spec_name} compiled", maker(True), compiled=True, family="opdsl"),
        H.Contender(f"opdsl {spec_name} eager", maker(False), compiled=False, family="opdsl"),
    ]
    full_states = full_size_states_in_theory(spec_name, algo)
    if full_states is not None and not ns_steps and not rank:
        out.append(same_access_stream(full_states))
    if ns_steps:
        out.append(newton_schulz_alone(spec_name, ortho))
    if rank:
        out.append(projections_alone(spec_name, rank))
    # What the default's finiteness check costs, and like for like with torch's fused kernel, which does
    # no check of its own.
    out.insert(1, H.Contender(
        f"opdsl {spec_name} compiled, no check", maker(True, on_nonfinite="propagate"), compiled=True,
        family="opdsl", note="on_nonfinite='propagate': no finiteness check of the gradients, as torch's "
        "fused and foreach steps (the default 'skip' reads every gradient no block has summed once more "
        "before the update)",
    ))
    return out


def theory_hyper(spec_name: str, algo: Algo | None) -> dict[str, Any]:
    """The hyperparameters the opdsl rows are given (torch's, where the spec has them) that the state theory models."""
    import state_theory

    modelled = state_theory.theory_of(spec_name).hyper
    return {k: v for k, v in (algo.torch_kwargs if algo else {}).items() if k in modelled}


def full_size_states_in_theory(spec_name: str, algo: Algo | None) -> int | None:
    """Full-size state tensors per parameter in theory (None when the state is not a whole number of them)."""
    import state_theory

    if spec_name not in state_theory.SPECS:
        return None
    shape = (64, 48)
    elements = state_theory.theory_elements(spec_name, shape, theory_hyper(spec_name, algo)) / math.prod(shape)
    return int(elements) if elements == int(elements) else None


def same_access_stream(full_states: int) -> H.Contender:
    """The cheapest kernel with the spec's memory traffic: read p, g and each state, write p and each state.

    One compiled loop doing a multiply-add per array: it tells how much of the gap to the in-place floor
    comes from streaming 3 + 2k arrays at once rather than from the optimizer's arithmetic.
    """

    def make(params: list[torch.nn.Parameter]) -> H.Stepper:
        with torch.no_grad():
            flat_p = torch.cat([p.detach().reshape(-1) for p in params])
            flat_g = torch.cat([p.grad.reshape(-1) for p in params])
        states = [torch.zeros_like(flat_p) for _ in range(full_states)]
        c = torch.tensor(0.5, device=flat_p.device, dtype=flat_p.dtype)

        @torch.compile(fullgraph=True)
        def stream(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], c: torch.Tensor) -> None:
            for s in states:
                s.copy_(s * c + g)
            p.copy_(p - g * c)

        return H.Stepper(lambda: stream(flat_p, flat_g, states, c), None, None)

    return H.Contender(
        f"same-access stream ({full_states} states)", make, compiled=True, family="stream",
        note="one compiled loop that reads p, g and every full-size state and writes p and every state, with a "
        "multiply-add each: the memory traffic of a one-pass step and none of its arithmetic",
    )


def matrix_grads_by_shape(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients of the matrices (ndim >= 2, as (shape[0], -1)), one (count, m, n) stack per shape."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for p in params:
        if p.ndim >= 2:
            by_shape.setdefault(tuple(p.shape), []).append(p.grad.reshape(p.shape[0], -1))
    return [torch.stack(gs) for gs in by_shape.values()]


def matmuls_alone(
    name: str,
    note: str,
    batches_of: Callable[[list[torch.nn.Parameter]], list[Any]],
    compute: Callable[[list[Any]], list[torch.Tensor]],
    flops_of: Callable[[list[torch.nn.Parameter]], float],
) -> H.Contender:
    """A reference row: only a matrix spec's unavoidable matmuls, on batches made once, compiled."""

    def make(params: list[torch.nn.Parameter]) -> H.Stepper:
        batches = batches_of(params)
        compiled = torch.compile(compute, fullgraph=True)
        matrices = [p for p in params if p.ndim >= 2]
        return H.Stepper(
            lambda: compiled(batches), None, None, numel=sum(p.numel() for p in matrices), flops=flops_of(matrices)
        )

    return H.Contender(name, make, compiled=True, family="reference", note=note)


def newton_schulz_alone(spec_name: str, block: Any) -> H.Contender:
    """The matmuls Muon-like specs cannot avoid: their Newton-Schulz iterations on every matrix, nothing else.

    The spec's step divided by this row's time says how close the step is to "the matmuls' time".
    """
    from opdsl.blocks.orthogonalize import _DTYPES, newton_schulz

    ns_steps = block.steps

    def batches_of(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        dtype = _DTYPES.get(block.dtype, params[0].dtype)
        return [g.to(dtype) for g in matrix_grads_by_shape(params)]

    def orthogonalize_all(batches: list[torch.Tensor]) -> list[torch.Tensor]:
        return [newton_schulz(b, block.steps, block.coefficients, block.eps, block.normalize) for b in batches]

    return matmuls_alone(
        f"Newton-Schulz alone ({block.dtype}, batched by shape)",
        f"only the {ns_steps} Newton-Schulz iterations of {spec_name}'s orthogonalize block on the same matrices, "
        "one batch per shape, compiled: the matmul time the spec's step cannot go below",
        batches_of, orthogonalize_all, lambda matrices: muon_flops(matrices, ns_steps),
    )


def projections_alone(spec_name: str, rank: int) -> H.Contender:
    """The matmuls subspace momentum cannot avoid: P(G) and P*(M) per matrix (random bases of its rank)."""
    from opdsl.blocks.subspace_projector import lift, project


    def batches_of(params: list[torch.nn.Parameter]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = []
        for g in matrix_grads_by_shape(params):
            k, m, n = g.shape
            r = min(rank, m, n)
            batches.append((g, torch.randn((k, r, n) if m >= n else (k, m, r), device=g.device, dtype=g.dtype)))
        return batches

    def project_all(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [lift(project(g, b), b, g) for g, b in batches]

    return matmuls_alone(
        f"projections alone (rank {rank}, batched by shape)",
        f"only the two rank-{rank} products per matrix of {spec_name}'s subspace momentum (into the subspace and "
        "back), batched by shape, compiled: the matmul time its step cannot go below (refresh SVDs aside)",
        batches_of, project_all, lambda matrices: projection_flops(matrices, rank),
    )


# --------------------------------------------------------------------------------------------
# Floor: the spec's own bytes moved per parameter
# --------------------------------------------------------------------------------------------


def bytes_per_param_fn(algo: Algo | None, itemsize: int, second_gradient: bool) -> Callable[[list[H.Result]], tuple[float, str]]:
    """The spec's own bytes moved per parameter, one pass: read and write p, read g (and ``grad2``, for SGDOL),
    read and write every state byte. A reduction's second pass over g is not counted: its target allows it."""
    streams, named = (4, "p r/w, g r, grad2 r") if second_gradient else (3, "p r/w, g r")

    def fn(results: list[H.Result]) -> tuple[float, str]:
        for r in results:
            if r.family == "opdsl" and r.error is None and r.numel:
                sbpp = r.state_bytes_per_param
                return (
                    streams * itemsize + 2 * sbpp,
                    f"from opdsl's own state: {streams}x{itemsize} ({named}) + 2x{sbpp:.2f} state r/w",
                )
        if algo is not None:
            return float(algo.theory_bpp(itemsize)), f"theory: {algo.bytes_doc}"
        for r in results:
            if r.error is None and r.numel:
                return 3 * itemsize + 2 * r.state_bytes_per_param, f"from {r.name}'s state"
        return float(3 * itemsize), "p r/w + g r only (no state known)"

    return fn


def state_theory_of(
    spec: str, shapes: list[tuple[str, H.Shape]], only_2d: bool, itemsize: int, algo: Algo | None
) -> tuple[float, str] | None:
    """State bytes per parameter in theory: the oracle in state_theory.py (algorithms.md), else the torch algo's."""
    import state_theory

    kept = [s for _, s in H.stepped_shapes(shapes, only_2d)]
    numel = sum(math.prod(s) for s in kept)
    if spec in state_theory.SPECS:
        # the hyperparameters the opdsl rows were given (torch's, where the spec has them) and the count depends on
        given = theory_hyper(spec, algo)
        elements = sum(state_theory.theory_elements(spec, tuple(s), given) for s in kept)
        note = state_theory.theory_note(spec) + (f"; with {given}" if given else "")
        return elements * itemsize / numel, note
    if algo is not None:
        return float(algo.state_elems * itemsize), algo.bytes_doc
    return None


def warm_up_compiler(device: torch.device) -> float:
    """Seconds of torch.compile's one-off start-up in this process (imports, workers), kept out of every row."""
    t0 = time.perf_counter()
    torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(8, device=device))
    H.sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=["adamw"], help="spec names (shipped spec or torch algo)")
    ap.add_argument("--sizes", nargs="*", type=float, default=None,
                    help="total params of the sized workloads (default 1e7; --full: 1e6 1e7 1e8)")
    ap.add_argument("--n-tensors", type=int, default=101, help="tensors in each sized workload (default 101)")
    ap.add_argument("--gpt2-scale", type=float, default=None,
                    help="GPT-2 small width scale; 1.0 = 124M, 0 = skip (default 0.25; --full: 1.0)")
    ap.add_argument("--resnet50", action="store_true",
                    help="add ResNet-50's parameter list (161 tensors of 28 shapes, 25.6M): compile time with many shapes")
    ap.add_argument("--full", action="store_true",
                    help="every shipped spec (specs/*.yaml), sizes 1e6 1e7 1e8 (1e9 too on a GPU), full GPT-2, "
                    "compiled rivals everywhere: long (an hour or more on 2 CPU cores)")
    ap.add_argument("--repeats", type=int, default=20, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first call")
    ap.add_argument("--builds", type=int, default=2,
                    help="timed builds of each contender, in order then mirrored (default 2; 1 where a second "
                    "would not fit in memory)")
    ap.add_argument("--recompile-steps", type=int, default=100, help="steps with a changing LR for the recompile count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile of torch's step")
    ap.add_argument("--compiled-rivals", choices=["all", "gpt2", "none"], default=None,
                    help="workloads that get torch.compile(torch step) and HeavyBall (each compiles for a minute "
                    "or more on 2 CPU cores): default gpt2 (the GPT-2 list only; all with --full)")
    ap.add_argument("--no-heavyball", action="store_true")
    ap.add_argument("--no-opdsl", action="store_true")
    ap.add_argument("--extra", action="store_true", help="also torch for-loop and compiled foreach+capturable")
    ap.add_argument(
        "--only", nargs="+", default=None, metavar="SUBSTRING",
        help="keep only contenders whose name contains one of these substrings",
    )
    ap.add_argument("--warm-cache", action="store_true", help="reuse the inductor cache (default: a fresh one, so compile times are cold)")
    ap.add_argument("--one-process", action="store_true",
                    help="run every spec in this process (default with several specs: one fresh process per spec)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="write the markdown report here (e.g. docs/benchmarks.md)")
    return ap.parse_args(argv)


def shipped_specs() -> list[str]:
    """Names of the YAML specs shipped in the repo's specs/ (or the installed opdsl.specs)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
    names = sorted(f[:-5] for f in os.listdir(here) if f.endswith(".yaml")) if os.path.isdir(here) else []
    return names


def load_line() -> str:
    try:
        la = os.getloadavg()
        return f"load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min)"
    except OSError:
        return "load average n/a"


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on ``--full`` and the device."""
    gpu = torch.device(args.device).type == "cuda"
    if args.sizes is None:
        args.sizes = ([1e6, 1e7, 1e8] + ([1e9] if gpu else [])) if args.full else [1e7]
    if args.gpt2_scale is None:
        args.gpt2_scale = 1.0 if args.full else 0.25
    if args.compiled_rivals is None:
        args.compiled_rivals = "all" if args.full else "gpt2"
    if args.full and args.specs == ["adamw"]:
        args.specs = shipped_specs() or list(ALGOS)
    return args


@dataclasses.dataclass
class Measured:
    """What one process measured: its reports and its torch.compile start-up (kept out of every row)."""

    reports: list[H.WorkloadReport]
    startup_s: float
    opdsl_reason: str | None


def measure(args: argparse.Namespace, specs: list[str]) -> Measured:
    """Every workload of every spec in this process, after torch.compile's start-up."""
    if not args.warm_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="opdsl_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)  # about 10 MB per spec process otherwise left behind
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()

    workloads: list[tuple[str, list[tuple[str, H.Shape]]]] = []
    for n in args.sizes:
        workloads.append((f"sized {n:.0e}".replace("e+0", "e"), H.sized_shapes(n, args.n_tensors)))
    if args.gpt2_scale > 0:
        label = "GPT-2 small" if args.gpt2_scale == 1.0 else f"GPT-2 small x{args.gpt2_scale:g} width"
        workloads.append((label, H.gpt2_small_shapes(args.gpt2_scale)))
    if args.resnet50:
        workloads.append(("ResNet-50", H.resnet50_shapes()))

    opdsl_reason = None if not args.no_opdsl else "--no-opdsl"
    if opdsl_reason is None:
        opdsl_reason = opdsl_available()
    startup_s = warm_up_compiler(device)
    print(f"torch.compile start-up (once per process, not in any row): {startup_s:.1f} s")
    if opdsl_reason:
        print(f"opdsl contenders skipped: {opdsl_reason}")

    reports: list[H.WorkloadReport] = []
    for spec in specs:
        cname = canonical(spec)
        algo = ALGOS.get(cname)
        contenders: list[H.Contender] = []
        spec_problem = opdsl_reason or opdsl_spec_problem(spec)
        if spec_problem is None:
            contenders += opdsl_contenders(spec, device)
        elif not opdsl_reason:
            print(f"{spec}: no opdsl rows ({spec_problem})")
        second_gradient = spec_problem is None and T.reads_second_gradient(spec)
        if algo is not None:
            contenders += torch_contenders(algo, device, not args.no_torch_compile, args.extra)
            if not args.no_heavyball:
                contenders += heavyball_contenders(algo, device)
        if args.only:
            contenders = [c for c in contenders if any(part in c.name for part in args.only)]
        if not contenders:
            print(f"{spec}: no contenders (no torch equivalent and opdsl not importable); skipped")
            continue
        only_2d = (algo.only_2d if algo else False) or cname in MATRIX_SPECS
        for wname, shapes in workloads:
            rivals = args.compiled_rivals == "all" or (args.compiled_rivals == "gpt2" and wname.startswith("GPT-2"))
            here = [c for c in contenders if rivals or not (c.compiled and c.family not in ("opdsl", "reference", "stream"))]
            try:
                import importlib

                importlib.import_module("torch._dynamo").reset()  # no compiled contender is alive between workloads
            except Exception:  # noqa: BLE001
                pass
            print(f"== {spec} on {wname}: {H.numel_of(shapes) / 1e6:.2f}M params, {len(shapes)} tensors")
            rep = H.run_workload(
                wname, spec, shapes, here,
                bytes_per_param_fn(algo, itemsize, second_gradient),
                device=device, dtype=dtype, repeats=args.repeats, warmup=args.warmup,
                recompile_steps=args.recompile_steps, only_2d=only_2d, builds=args.builds,
            )
            rep.state_theory = state_theory_of(spec, shapes, only_2d, itemsize, algo)
            reports.append(rep)
            print()
            print(H.markdown_table(rep))
    return Measured(reports, startup_s, opdsl_reason)


def measure_in_child(args: argparse.Namespace, spec: str) -> Measured | None:
    """One spec in a fresh Python process with a fresh inductor cache, as a user compiles one optimizer.

    Compiling every spec in one long process costs compile time of its own (the garbage collector walks a
    heap that grows with every compiled graph: coba's first call took 13 s alone and 18-20 s late in a
    sweep), and a later spec could reuse kernels an earlier one compiled.
    """
    with tempfile.TemporaryDirectory(prefix="opdsl_bench_") as tmp:
        request, answer = os.path.join(tmp, "args.pkl"), os.path.join(tmp, "measured.pkl")
        with open(request, "wb") as f:
            pickle.dump((args, spec), f)
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", request, answer])
        if done.returncode != 0 or not os.path.exists(answer):
            print(f"{spec}: its benchmark process failed (exit {done.returncode}); no rows")
            return None
        with open(answer, "rb") as f:
            return Measured(*pickle.load(f))


def child_main(request: str, answer: str) -> int:
    with open(request, "rb") as f:
        args, spec = pickle.load(f)
    measured = measure(args, [spec])
    with open(answer, "wb") as f:  # plain fields: the class is __main__'s, whoever ran the script
        pickle.dump((measured.reports, measured.startup_s, measured.opdsl_reason), f)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:3])
    args = resolve(parse_args(argv))
    if args.threads:  # for the machine line; every measuring process sets it for itself
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = H.machine_line(device)
    start_load = load_line()
    print(machine)
    print(start_load)
    t_all = time.perf_counter()
    if len(args.specs) > 1 and not args.one_process:
        runs = {spec: measure_in_child(args, spec) for spec in args.specs}
    else:
        runs = {"all specs": measure(args, args.specs)}
    measured = [m for m in runs.values() if m is not None]
    reports = [rep for m in measured for rep in m.reports]
    startups = {spec: m.startup_s for spec, m in runs.items() if m is not None}
    opdsl_reason = next((m.opdsl_reason for m in measured if m.opdsl_reason), None)
    elapsed = time.perf_counter() - t_all
    end_load = load_line().replace("at start", "at end")
    start_load = f"{start_load}; {end_load}"
    print(f"total {elapsed:.0f} s; {end_load}")
    summary = T.summary_table(T.verdicts(reports))
    print()
    print(summary)

    if args.out:
        write_report(args, reports, machine, start_load, opdsl_reason, elapsed, device, startups, summary)
        print(f"wrote {args.out}")
    return 0


def startup_line(startups: dict[str, float]) -> str:
    """Where the specs ran, and torch.compile's start-up in each process: it gauges the machine's speed then."""
    if len(startups) == 1:
        return (f"One process: torch.compile's one-off start-up ({next(iter(startups.values())):.1f} s) is paid "
                "before the first row and is in no first-call figure.")
    each = ", ".join(f"{spec} {s:.1f}" for spec, s in startups.items())
    return (f"One fresh process per spec ({len(startups)}), as a user compiles one optimizer. torch.compile's "
            "one-off start-up in each process is paid before its first row and is in no first-call figure; it "
            f"gauges how fast the shared machine ran while that spec was measured (s): {each}.")


def write_report(
    args: argparse.Namespace,
    reports: list[H.WorkloadReport],
    machine: str,
    start_load: str,
    opdsl_reason: str | None,
    elapsed: float,
    device: torch.device,
    startups: dict[str, float],
    summary: str,
) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/step.py " + " ".join(sys.argv[1:])
    lines = [
        "# Benchmarks: optimizer step time against the memory floor",
        "",
        f"Generated by `{cmd}` on {now} in {elapsed:.0f} s. What the numbers mean: "
        "[performance.md](performance.md).",
        "",
        f"- Machine: {machine}",
        f"- {start_load}. The machine may be shared: contenders are interleaved (order rotated every round) "
        "and medians reported.",
        f"- {startup_line(startups)}",
        f"- Timing: {args.warmup} warm-up rounds, then {args.repeats} timed rounds; IQR = interquartile range. "
        + (f"Each contender takes its first call on a build of its own, then is built {args.builds} times for timing, "
           "in the contenders' order and then mirrored (where a step's buffers were allocated moved its time by 5-20% "
           "on the AMX Xeon); a round's time is the mean over its builds (a table says where fewer fitted)."
           if args.builds > 1 else "Each contender takes its first call on a build of its own, then is built once more for timing."),
        "- Floor = the spec's bytes moved per parameter x parameters / bandwidth of an in-place `x.mul_(c)` pass "
        "over a buffer moving the same bytes, timed inside the same interleaved loop.",
        "- First call = wall time of the first `step()` (includes compilation for compiled contenders; "
        + ("a fresh inductor cache in each process, so the first workload's compile is cold; later "
           "workloads may reuse some of it)." if not args.warm_cache else "warm inductor cache).")
        + " Recompiles = new dynamo graphs over "
        f"{args.recompile_steps} steps with the LR changed before every step (must be 0).",
        "- State B/param: bytes of the optimizer's state tensors / parameters; full-size states/tensor: state tensors "
        "with as many elements as their parameter, per parameter tensor.",
        f"- Peak extra MB: memory allocated above the pre-step level during one steady-state step "
        f"({reports[0].memory_method if reports else 'n/a'}); 'kept' = still allocated after the step.",
        "- Page faults/step: median minor page faults of the process during a timed step: memory the step "
        "touched that the OS had to map (and zero) for it, paid again every step when its temporaries are "
        "freed back to the OS.",
    ]
    if opdsl_reason:
        lines.append(f"- opdsl rows: not measured in this run ({opdsl_reason}).")
    lines += ["", "## Targets", "", T.__doc__.split("\n\n", 1)[1].strip(), "", summary]
    for rep in reports:
        lines.append(H.markdown_table(rep))
    lines += [
        "## GPU",
        "",
        "Not measured yet: no GPU was lent to the session that produced these numbers. "
        "Run `python benchmarks/step.py --device cuda --sizes 1e6 1e7 1e8 1e9 --gpt2-scale 1.0` on one.",
        "",
    ]
    if device.type == "cuda":
        lines = lines[:-4]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
