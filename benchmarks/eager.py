"""The eager step (``compile=False``) on a CPU: chunk by chunk, over whole buckets, and torch's foreach step.

    python benchmarks/eager.py                               # 10M parameters in 101 tensors, 1 thread
    python benchmarks/eager.py --size 1e6 --threads 2 --specs adamw sgd
    python benchmarks/eager.py --size 1e5 --steps 20         # small steps: 20 timed a sample

opdsl's eager step runs over cache-sized chunks of each bucket (``opdsl/compiled/chunking.py``): cut
anywhere for graphs whose blocks are elementwise or global sums, between parameters for the others;
"whole buckets" is the whole-bucket step (``lowering.build_step`` run eagerly), as it ran before chunking.
All contenders step the same parameter list with the same gradients, interleaved (order rotated every
round); the table gives medians and the ratios between them. Specs torch has no optimizer for
(adagrad-norm, sgdol, the scsadamw family, ...) get no torch column.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch

import harness as H
import opdsl
from opdsl.compiled import chunking

# spec -> (hyperparameters given to both, torch's optimizer); torch's runs its foreach step
RIVALS: dict[str, tuple[dict[str, Any], type[torch.optim.Optimizer]]] = {
    "adamw": ({"lr": 1e-3, "weight_decay": 1e-2}, torch.optim.AdamW),
    "adam": ({"lr": 1e-3}, torch.optim.Adam),
    "adamax": ({"lr": 2e-3}, torch.optim.Adamax),
    "nadam": ({"lr": 2e-3}, torch.optim.NAdam),
    "sgd": ({"lr": 1e-2, "momentum": 0.9}, torch.optim.SGD),
    "rmsprop": ({"lr": 1e-2}, torch.optim.RMSprop),
}


def opdsl_eager(spec: str, chunk: int | None, **options: Any) -> Callable[[list[torch.nn.Parameter]], Any]:
    """An eager opdsl optimizer whose step is built with ``chunk`` elements per thread (None: the whole-bucket
    step, ``lowering.build_step`` run eagerly, as before chunking)."""
    def make(params: list[torch.nn.Parameter]) -> Any:
        opt = opdsl.Optimizer(params, spec, compile=False, **options)
        before = chunking.CHUNK_NUMEL_PER_THREAD
        chunking.CHUNK_NUMEL_PER_THREAD = chunk
        try:
            opt.step(_no_closure) if opt._needs_grad2 else opt.step()  # builds the step at this chunk size
        finally:
            chunking.CHUNK_NUMEL_PER_THREAD = before
        return opt

    return make


def _no_closure() -> None:
    """SGDOL's second gradient: the closure would run forward and backward, which is not the step's cost."""


def stepper(make: Callable[[list[torch.nn.Parameter]], Any], steps: int) -> Callable[[list[torch.nn.Parameter]], H.Stepper]:
    """``make``'s optimizer as the harness steps it: ``steps`` steps a timed sample (their mean is taken by the
    caller). SGDOL's step leaves its zeroed second buffer as the gradient, so its first gradient is refilled,
    untimed, before each sample (the later steps of a sample do the same work on other numbers)."""
    def build(params: list[torch.nn.Parameter]) -> H.Stepper:
        opt = make(params)
        step = (lambda: opt.step(_no_closure)) if getattr(opt, "_needs_grad2", False) else opt.step
        saved = [(p, p.grad.clone()) for p in params] if getattr(opt, "_needs_grad2", False) else []

        def refill() -> None:
            for p, g in saved:
                p.grad.copy_(g)

        def sample() -> None:
            for _ in range(steps):
                step()

        return H.Stepper(sample, opt, refill=refill if saved else None)

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=["adamw", "adamax", "nadam", "sgd"], choices=sorted(opdsl.shipped_specs()))
    parser.add_argument("--size", type=float, default=1e7, help="parameters, in 101 tensors (harness.sized_shapes)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed sample (their mean): more for small sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = H.sized_shapes(args.size, 101)
    cpu = torch.device("cpu")
    print(f"{H.machine_line('cpu')}\n{H.numel_of(shapes) / 1e6:.2f}M parameters "
          f"in {len(shapes)} tensors, float32; each contender built twice (in order, then mirrored); median of "
          f"{args.rounds} interleaved rounds of {args.steps} step(s) of each build, ms\n")
    print("| spec | chunked | chunked, no check | whole buckets | torch foreach | whole / chunked | chunked / torch |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.specs:
        hyper, rival = RIVALS.get(spec, ({}, None))
        makers = {
            "chunked": opdsl_eager(spec, chunking.CHUNK_NUMEL_PER_THREAD, **hyper),
            "chunked, no check": opdsl_eager(spec, chunking.CHUNK_NUMEL_PER_THREAD, on_nonfinite="propagate", **hyper),
            "whole buckets": opdsl_eager(spec, None, **hyper),
        }
        if rival is not None:
            makers["torch foreach"] = lambda params: rival(params, foreach=True, **hyper)
        contenders = [H.Contender(name, stepper(make, args.steps)) for name, make in makers.items()]
        live = [(c, H.Result(c.name, "eager", compiled=False)) for c in contenders]
        # each built twice, in order and then mirrored: where a step's buffers were allocated moved its time
        instances = H.timed_builds(live, 2, shapes, cpu, torch.float32, log=print)
        H.interleave(instances, None, cpu, args.rounds, warmup=1)
        failed = [f"{r.name}: {r.error}" for _, r in live if r.error]
        if failed:
            raise RuntimeError(f"{spec}: " + "; ".join(failed))
        times = {r.name: r.times for _, r in live}
        ms = {name: statistics.median(t) / args.steps * 1e3 for name, t in times.items()}
        shown = {name: f"{t:.2f}" if t < 10 else f"{t:.1f}" for name, t in ms.items()}  # 3 digits at least
        torch_ratio = f"{ms['chunked'] / ms['torch foreach']:.2f}" if rival else "-"
        print(f"| {spec} | {shown['chunked']} | {shown['chunked, no check']} | {shown['whole buckets']} | "
              f"{shown.get('torch foreach', '-')} | {ms['whole buckets'] / ms['chunked']:.2f} | {torch_ratio} |")
        del instances
        H.release_memory(cpu)


if __name__ == "__main__":
    main()
