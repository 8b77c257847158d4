"""What the step benchmark counts: the floor's bytes per parameter, and SGDOL's timed step.

The benchmark's numbers are read against its floor, so the floor must count every stream the spec
reads; and a contender's timed step must be the optimizer's work, not the benchmark's set-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is scripts, not a package: step.py imports harness, targets

import harness  # noqa: E402
import step  # noqa: E402
import targets  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _opdsl_result(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> harness.Result:
    state_bytes, _ = harness.state_stats(optimizer, params)
    return harness.Result(
        name="opdsl x compiled", family="opdsl", compiled=True, numel=sum(p.numel() for p in params),
        state_bytes=state_bytes,
    )


@pytest.mark.parametrize(("spec", "streams"), [("adamw", 3), ("sgdol", 4)])
def test_floor_counts_every_gradient_the_spec_reads(spec, streams):
    """p read and write, g read, and SGDOL's second gradient read: 4 bytes each, plus the state's bytes twice."""
    import opdsl

    params = [torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))]
    optimizer = opdsl.Optimizer(params, spec, compile=False)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step(lambda: None) if targets.reads_second_gradient(spec) else optimizer.step()
    result = _opdsl_result(optimizer, params)

    # AdamW keeps m and v; SGDOL three global scalars (a few bytes over these 528 parameters)
    assert result.state_bytes_per_param == pytest.approx(8.0 if spec == "adamw" else 0.0, abs=0.1)
    second = targets.reads_second_gradient(spec)
    assert second == (spec == "sgdol")
    bytes_per_param, note = step.bytes_per_param_fn(None, 4, second)([result])
    assert bytes_per_param == pytest.approx(streams * 4 + 2 * result.state_bytes_per_param)
    assert ("grad2 r" in note) == second


def test_sgdol_timed_step_is_the_optimizers_work():
    """The timed step calls the closure twice but the closure does nothing; the first gradient is refilled
    untimed before every step, so every step sees the same first gradient and still moves the parameters."""
    params = [torch.nn.Parameter(torch.randn(24, 8)), torch.nn.Parameter(torch.randn(8))]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    eager = next(c for c in step.opdsl_contenders("sgdol", torch.device("cpu")) if c.name == "opdsl sgdol eager")
    stepper = eager.make(params)
    assert stepper.refill is not None

    for _ in range(3):
        before = [p.detach().clone() for p in params]
        stepper.refill()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
        stepper.step()
        assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_a_torch_only_name_gets_no_opdsl_rows():
    """A name opdsl has no spec for (torch's Nesterov SGD) is benchmarked with torch's contenders alone, and
    the target summary says it has no opdsl row instead of failing."""
    assert step.opdsl_spec_problem("sgd_nesterov") is not None
    assert step.opdsl_spec_problem("sgdol") is None

    torch_only = harness.Result(name="torch fused", family="torch", compiled=False, numel=10, times=[1e-3])
    report = harness.WorkloadReport(
        workload="sized 1e1", algo="sgd_nesterov", numel=10, n_tensors=1, bytes_per_param=20.0, bytes_note="theory",
        bandwidth=1e9, stream_times=[1e-3], results=[torch_only], memory_method="-", dtype=torch.float32,
    )
    verdict = targets.check(report, first_workload=True)
    assert verdict.problems == ["no compiled opdsl row"] and verdict.target is None
    row = targets.summary_table([verdict]).splitlines()[-1]
    assert row.startswith("| sgd_nesterov | sized 1e1 | - |") and "MISSED: no compiled opdsl row" in row


@pytest.mark.parametrize(("spec", "left_out"), [("muon", "no matmuls-alone row"), ("adamw", "no torch fused row")])
def test_a_target_whose_comparison_row_was_left_out_is_not_met(spec, left_out):
    """With `--only compiled`, the matrix specs' matmuls-alone row and AdamW's torch fused row are not run: their
    targets are then not measured, neither met nor missed (the step here sits at its floor)."""
    ours = harness.Result(name=f"opdsl {spec} compiled", family="opdsl", compiled=True, numel=10, times=[1e-3],
                          first_call_s=1.0, recompiles=0)
    report = harness.WorkloadReport(
        workload="sized 1e1", algo=spec, numel=10, n_tensors=1, bytes_per_param=1e5, bytes_note="theory",
        bandwidth=1e9, stream_times=[1e-3], results=[ours], memory_method="-", dtype=torch.float32,
    )
    verdict = targets.check(report, first_workload=True)
    assert not verdict.met and verdict.unmeasured == [left_out]
    assert targets.summary_table([verdict]).splitlines()[-1].endswith(f"| not measured: {left_out} |")


def test_resnet50_workload_is_torchvisions_parameter_list():
    """161 tensors of 28 shapes, as torchvision's resnet50() (25,557,032 parameters)."""
    shapes = harness.resnet50_shapes()
    assert len(shapes) == 161 and len({s for _, s in shapes}) == 28
    assert harness.numel_of(shapes) == 25_557_032
    assert len({name for name, _ in shapes}) == 161


def test_every_contender_is_timed_over_mirrored_builds_after_its_first_call(monkeypatch):
    """Where a step's buffers were allocated moved its time, so no contender may always be built first: each
    takes its first call (the compile) on a build of its own, then is built twice more, in order and then
    mirrored, and a round's time is the mean over those builds. Each build here reports a known time."""
    built: list[str] = []
    seconds = {("a", 1): 0.002, ("a", 2): 0.004, ("b", 1): 0.001, ("b", 2): 0.001}
    monkeypatch.setattr(harness, "_timed", lambda fn, device: (lambda t: t if isinstance(t, float) else 1e-3)(fn()))

    def contender(name: str) -> harness.Contender:
        def make(params: list[torch.nn.Parameter]) -> harness.Stepper:
            built.append(name)
            nth = built.count(name) - 1  # 0: the first-call build, then timed builds 1 and 2
            return harness.Stepper(step=lambda: seconds.get((name, nth), 60.0), optimizer=torch.optim.SGD(params, lr=0.1))

        return harness.Contender(name, make)

    report = harness.run_workload(
        "sized 1e1", "sgd", [("w", (10,))], [contender("a"), contender("b")], lambda results: (12.0, "theory"),
        repeats=5, warmup=1, recompile_steps=0, log=lambda line: None,
    )
    assert built == ["a", "b", "a", "b", "b", "a"] and report.builds == 2
    a, b = report.results
    assert a.first_call_s == b.first_call_s == 60.0
    assert a.times == [pytest.approx(0.003)] * 5 and b.times == [pytest.approx(0.001)] * 5


def test_a_second_build_that_would_not_fit_is_left_out(monkeypatch):
    """The first timed builds took 60 bytes and left 40 free: a second set would not fit beside them, so each
    contender is timed on one build and the report says so."""
    used = iter([1000, 1060])
    monkeypatch.setattr(harness, "_free_bytes", lambda device: 40)
    monkeypatch.setattr(harness, "_used_bytes", lambda device: next(used))
    built: list[str] = []

    def make(params: list[torch.nn.Parameter]) -> harness.Stepper:
        built.append("a")
        return harness.Stepper(step=lambda: None, optimizer=torch.optim.SGD(params, lr=0.1))

    report = harness.run_workload(
        "sized 1e1", "sgd", [("w", (10,))], [harness.Contender("a", make)], lambda results: (12.0, "theory"),
        repeats=3, warmup=0, recompile_steps=0, log=lambda line: None,
    )
    assert built == ["a", "a"] and report.builds == 1 and len(report.results[0].times) == 3
