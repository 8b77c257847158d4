"""The compiled step with all of opdsl's graph passes against the same step without one of them.

    python benchmarks/graph_passes.py                                   # scalars-before-loops, 4 specs, 10M
    python benchmarks/graph_passes.py --without shared-scalars --specs coba adamw-sn
    python benchmarks/graph_passes.py --specs adamw --size 1e6 --steps 10 --on-nonfinite propagate

A pass may only make the step faster: it must not change a bit. Two optimizers of each kind step the same
parameters and gradients, built in the order with, without, without, with (build order alone moved a
step by up to 12%: where its buffers land), timed interleaved with the order rotated every round; the
columns are the means of each kind's two medians, and the last says whether each pair's parameters and
states were still bitwise equal after every round. The step without the pass is compiled with
``compiled.passes.ENABLED`` lacking it, so inductor's cache keeps the two apart.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import harness as H
import opdsl
from opdsl.compiled import passes

HYPER: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9}}


def build(spec: str, shapes: list[tuple[int, ...]], enabled: tuple[str, ...], on_nonfinite: str) -> Any:
    """An optimizer over fresh parameters (seeded: every build gets the same), compiled with ``enabled``."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt = opdsl.Optimizer(params, spec, on_nonfinite=on_nonfinite, **HYPER.get(spec, {}))
    saved = passes.ENABLED
    passes.ENABLED = enabled
    try:
        opt.step()  # compiles now, with these passes
    finally:
        passes.ENABLED = saved
    return opt


def same_bits(a: Any, b: Any) -> bool:
    def tensors(opt: Any) -> list[torch.Tensor]:
        params = [p for g in opt.param_groups for p in g["params"]]
        return params + [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]

    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--without", default="scalars-before-loops", choices=list(passes.PASSES))
    parser.add_argument("--specs", nargs="+", default=["adamw", "sgd", "adagrad", "nadam"])
    parser.add_argument("--size", type=float, default=1e7, help="parameters, in 101 tensors (harness.sized_shapes)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed sample (their mean)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--on-nonfinite", default="skip", choices=["skip", "propagate"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [shape for _, shape in H.sized_shapes(args.size, 101)]
    print(f"{H.machine_line('cpu')}\n{sum(torch.Size(s).numel() for s in shapes) / 1e6:.2f}M parameters in "
          f"{len(shapes)} tensors, float32, on_nonfinite={args.on_nonfinite!r}; two optimizers of each kind, "
          f"the mean of their medians over {args.rounds} interleaved rounds of {args.steps} step(s), ms\n")
    print(f"| spec | all passes | without {args.without} | all / without | same bits |")
    print("|---|---|---|---|---|")
    without = tuple(n for n in passes.ENABLED if n != args.without)
    for spec in args.specs:
        # built in the order A B B A, each time paired: where a buffer lands moved a step by up to 12% on the
        # AMX Xeon, and the first-built optimizer of a process was the slow one
        contenders = {
            "all 1": build(spec, shapes, passes.ENABLED, args.on_nonfinite),
            "without 1": build(spec, shapes, without, args.on_nonfinite),
            "without 2": build(spec, shapes, without, args.on_nonfinite),
            "all 2": build(spec, shapes, passes.ENABLED, args.on_nonfinite),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        pairs = [(contenders["all 1"], contenders["without 1"]), (contenders["all 2"], contenders["without 2"])]
        equal = all(same_bits(a, b) for a, b in pairs)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    contenders[name].step()
                times[name].append((time.perf_counter() - start) / args.steps)
            equal = equal and all(same_bits(a, b) for a, b in pairs)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        on, off = (ms["all 1"] + ms["all 2"]) / 2, (ms["without 1"] + ms["without 2"]) / 2
        print(f"| {spec} | {on:.2f} | {off:.2f} | {on / off:.3f} | {'yes' if equal else 'NO'} |")
        del contenders, pairs
        H.release_memory(torch.device("cpu"))


if __name__ == "__main__":
    main()
