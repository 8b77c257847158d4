"""Host-decided schedules (opdsl.schedule): exact decisions with the device counter read only near due steps.

The step counter is simulated: each launched step is applied (counter + 1) or skipped, as a non-finite
gradient would skip it on the device. The clock must decide exactly what the schedule says for the
counter's true value, without reading it between due steps.
"""
from __future__ import annotations

import random

import pytest
import torch

from opdsl.schedule import DueFlag, Periodic, StepClock


def test_periodic_steps():
    every7 = Periodic(7)
    assert [t for t in range(1, 30) if every7.due(t)] == [1, 7, 14, 21, 28]
    assert [every7.next_due(t) for t in (0, 1, 2, 7, 8, 14, 15)] == [1, 1, 7, 7, 14, 14, 21]
    assert [t for t in range(1, 6) if Periodic(1).due(t)] == [1, 2, 3, 4, 5]


def run_clock(skips: set[int], may_skip: bool = True, launches: int = 100, start: int = 0):
    """Launch ``launches`` steps (1-based launch numbers in ``skips`` are skipped); check every decision."""
    counter = torch.full((1,), float(start), dtype=torch.float64)
    flags = [DueFlag(Periodic(7), counter.device), DueFlag(Periodic(10), counter.device)]
    clock = StepClock(counter, may_skip, flags)
    for launch in range(1, launches + 1):
        clock.decide()
        t = int(counter.item()) + 1
        assert [f.value for f in flags] == [f.schedule.due(t) for f in flags], f"launch {launch}, t = {t}"
        assert [bool(f.host) for f in flags] == [f.value for f in flags]
        assert all(f.device is f.host for f in flags)  # one tensor on a CPU
        if launch not in skips:
            counter += 1
        clock.advance()
    return clock


def test_decisions_are_exact_and_the_counter_is_read_only_near_due_steps():
    clock = run_clock(set())
    # Due steps in 1..100 of either schedule: 1, then 7, 10, 14, 20, ..., 100 (multiples of 7 or 10).
    due = [t for t in range(2, 101) if t % 7 == 0 or t % 10 == 0]
    # One read where the clock is built; then each due step is read at itself and at the step after it
    # (was it applied?), and the step after t = 1 confirms t = 1. Reads of adjacent due steps coincide.
    reads_at = {2} | {t for d in due for t in (d, d + 1) if t <= 100}
    assert clock.reads == 1 + len(reads_at)
    assert clock.reads < 100 // 2


@pytest.mark.parametrize("seed", range(5))
def test_decisions_stay_exact_when_steps_are_skipped(seed):
    rng = random.Random(seed)
    skips = {launch for launch in range(1, 201) if rng.random() < 0.15} | {7, 8, 20}  # some at due steps
    run_clock(skips, launches=200)


def test_skipping_never_possible_means_no_reads():
    assert run_clock(set(), may_skip=False).reads == 1  # where it is built


def test_a_loaded_counter_is_picked_up():
    run_clock(set(), launches=30, start=68)  # t = 69, 70 (due), ...


@pytest.mark.parametrize("mode,reads", [("skip", 1 + 5), ("propagate", 1)])
def test_subspace_momentum_reads_its_step_count_only_around_refreshes(monkeypatch, mode, reads):
    """45 steps with gap 20 (refreshes at t = 1, 20, 40): the optimizer reads the device step counter where it
    is built, then at t = 2, 20, 21, 40, 41 when a step may be skipped, and never when none can be."""
    import opdsl
    from conftest import loss_of, make_model, with_node

    counted = []
    original = StepClock._read
    monkeypatch.setattr(StepClock, "_read", lambda self: counted.append(1) or original(self))
    model = make_model("mlp", torch.float64)
    spec = with_node(opdsl.load_spec("adamw-sm"), "sm", gap=20, rank=2)
    opt = opdsl.Optimizer(model.parameters(), spec, compile=False, on_nonfinite=mode)
    for step in range(45):
        opt.zero_grad()
        loss_of(model, "mlp", step, torch.float64).backward()
        opt.step()
    assert len(counted) == reads
