"""Whole training iterations (zero_grad, forward + backward, step), opdsl against torch's fused AdamW.

    python benchmarks/iteration.py                       # 10 x Linear(1024, 1024), batch 4, CPU, 1 thread
    python benchmarks/iteration.py --device cuda --width 4096 --layers 8

step.py times the optimizer step alone. This times what the step's design costs the rest of the
iteration: opdsl keeps gradients as views of a flat buffer, so ``zero_grad()`` zeroes it and backward
adds into it in place, where torch's default sets gradients to None and keeps backward's fresh
tensors. Each contender is built twice (in order, then mirrored) and every build runs in every round,
interleaved (the order rotated every round); the table gives medians of the rounds' means over the builds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import opdsl

PHASES = ("zero_grad", "forward + backward", "step")


def contenders() -> dict[str, tuple[Callable[[torch.nn.Module], torch.optim.Optimizer], bool]]:
    """name -> (optimizer factory, set_to_none passed to zero_grad)."""
    fused = lambda m: torch.optim.AdamW(m.parameters(), fused=True)  # noqa: E731
    return {
        "opdsl, `zero_grad()` (views, default)": (lambda m: opdsl.Optimizer(m.parameters(), "adamw"), False),
        "opdsl, views, `on_nonfinite=\"propagate\"`": (
            lambda m: opdsl.Optimizer(m.parameters(), "adamw", on_nonfinite="propagate"), False,
        ),
        "opdsl, `zero_grad(set_to_none=True)`": (lambda m: opdsl.Optimizer(m.parameters(), "adamw"), True),
        "torch fused, `zero_grad()` (None)": (fused, True),
        "torch fused, `zero_grad(set_to_none=False)`": (fused, False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def make_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(device)

    x = torch.randn(args.batch, args.width, device=device)
    # Each contender built twice, in order and then mirrored (where a step's buffers were allocated moved its
    # time: benchmarks/harness.py, run_workload); a round's time is the mean over the two builds.
    made = list(contenders().items())
    runs = {}
    for build, order in enumerate((made, made[::-1])):
        for name, (factory, set_to_none) in order:
            model = make_model()
            runs[name, build] = (model, factory(model), set_to_none)
    times = {name: {phase: [] for phase in PHASES} for name, _ in made}

    def iteration(key: tuple[str, int]) -> list[float]:
        """One iteration of a build; the seconds of each phase."""
        model, opt, set_to_none = runs[key]
        marks = [time.perf_counter()]
        for phase in PHASES:
            if phase == "zero_grad":
                opt.zero_grad(set_to_none=set_to_none)
            elif phase == "step":
                opt.step()
            else:
                model(x).square().mean().backward()
            sync()
            marks.append(time.perf_counter())
        return [end - start for start, end in zip(marks, marks[1:])]

    keys = list(runs)
    for key in keys:
        for _ in range(args.warmup):
            iteration(key)
    for r in range(args.rounds):
        seconds: dict[str, list[list[float]]] = {}
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            seconds.setdefault(key[0], []).append(iteration(key))
        for name, builds in seconds.items():
            for phase, per_build in zip(PHASES, zip(*builds)):
                times[name][phase].append(statistics.fmean(per_build))

    params = sum(p.numel() for p in runs[keys[0]][0].parameters())
    print(
        f"{args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M parameters, batch {args.batch}, "
        f"{device}, {args.threads} thread(s), adamw, each contender built twice (in order, then mirrored); median "
        f"of {args.rounds} interleaved rounds, each the mean over the two builds (ms)\n"
    )
    print("| | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for name, phases in times.items():
        medians = [statistics.median(phases[phase]) * 1e3 for phase in PHASES]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {sum(medians):.2f} |")


if __name__ == "__main__":
    main()
