"""on_nonfinite='skip' through the sums a graph computes of its gradients anyway (BlockContext.witness)."""
from __future__ import annotations

import pytest
import torch

import opdsl
from conftest import loss_of, make_model, with_node

# stack model: runs of two row-reduced (24x8) and two column-reduced (8x24) matrices, a 3x8 head and biases
ROW_REDUCED, COLUMN_REDUCED = 2, 0  # indices into model.parameters(): 24x8 and 8x24 weights


def stepped(spec: str, compile: bool, steps: int = 3, **hyper):
    model = make_model("stack")
    opt = opdsl.Optimizer(model.parameters(), spec, compile=compile, **hyper)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, "stack", step).backward()
        opt.step()
    return model, opt


def poisoned_step(model, opt, index: int, value: float) -> bool:
    """One step with ``value`` written into one gradient entry; True if it left everything untouched."""
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, "stack", 10).backward()
    list(model.parameters())[index].grad[1, 2] = value
    opt.step()
    same_params = all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    same_state = all(
        torch.equal(v, before[k]) for p, before in zip(model.parameters(), states) for k, v in opt.state[p].items()
    )
    return same_params and same_state


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_subset_norm_skips_nonfinite_gradients_through_its_sums(compile):
    model, opt = stepped("adagrad-sn", compile)
    cases = [(ROW_REDUCED, float("nan")), (COLUMN_REDUCED, float("inf")), (ROW_REDUCED, float("-inf"))]
    for index, value in cases:
        assert poisoned_step(model, opt, index, value), (index, value)
    assert opt.skipped_steps == len(cases)
    assert not poisoned_step(model, opt, ROW_REDUCED, 1.0)  # a finite gradient steps again
    assert opt.skipped_steps == len(cases)


def closure_for(model, opt, step: int, poison=None):
    """A closure for ``step(closure)``; ``poison = (call, index, value)`` writes ``value`` into one gradient
    entry on that call (SGDOL's second call computes ``grad2``)."""
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, "stack", step + len(calls))
        loss.backward()
        if poison is not None and poison[0] == len(calls):
            list(model.parameters())[poison[1]].grad[1, 2] = poison[2]
        calls.append(1)
        return loss

    return closure


def checked_shapes(monkeypatch, model, opt) -> list[tuple[int, ...]]:
    """Shapes of everything the finiteness check of one eager step looks at."""
    seen = []
    original = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(tuple(t.shape)) or original(t))
    opt.step(closure_for(model, opt, 5))
    return seen


def test_subset_norm_check_reads_its_sums_not_the_gradient(monkeypatch):
    """The matrices' buckets are checked through their per-row or per-column sums: no full-size isfinite."""
    model, opt = stepped("adagrad-sn", compile=False)
    seen = checked_shapes(monkeypatch, model, opt)
    # runs (count, rows, cols) -> sums (count, rows, 1) for 24x8 and (count, 1, cols) for 8x24 and 3x8
    assert sorted(s for s in seen if len(s) == 3) == [(1, 1, 8), (2, 1, 24), (2, 24, 1)]
    assert all(len(s) == 1 for s in seen if len(s) != 3)  # the biases' AdaGrad bucket: its flat gradient


# span tensor: one tiled bucket for all shapes, checked through its 10 tensors' norms
@pytest.mark.parametrize("span, expected", [("global", [()]), ("tensor", [(10,)])])
def test_global_norm_check_reads_its_norms(monkeypatch, span, expected):
    """AdaGrad-Norm is checked through its squared norms, the global total or one per tensor, not its gradients."""
    model = make_model("stack")
    spec = with_node(opdsl.load_spec("adagrad-norm"), "scaled", span=span)
    opt = opdsl.Optimizer(model.parameters(), spec, compile=False)
    assert sorted(checked_shapes(monkeypatch, model, opt)) == expected
    assert poisoned_step(model, opt, COLUMN_REDUCED, float("nan"))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("spec", ["adagrad-sn", "adagrad-norm"])
def test_overflowing_squares_skip_the_step_instead_of_freezing_the_accumulator(spec):
    """|g| = 1e20 squares to inf in float32: the sum-based check skips the step. Stepped, the row's (or,
    for AdaGrad-Norm, the model's) accumulator would turn infinite and its update would stay 0 for ever."""
    model, opt = stepped(spec, compile=False)
    assert poisoned_step(model, opt, ROW_REDUCED, 1e20)
    assert opt.skipped_steps == 1


def test_float16_sums_are_not_used_as_witnesses():
    """float16 squares (summed in any type) overflow at |g| > 256: such sums would skip ordinary steps, so the gradient is read."""
    from opdsl.compiled.context import BlockContext
    from opdsl.compiled.layout import plan_segments

    ctx = BlockContext(plan_segments([torch.Size((4, 2))]), {}, torch.ones((), dtype=torch.float64), torch.zeros(8), 8, (0,))
    ctx.reading = {"stats": "grad", "input": None}
    ctx.witness("stats", [torch.full((1, 4, 1), 300.0, dtype=torch.float16) ** 2])
    ctx.witness("input", [torch.zeros(1, 4, 1)])  # reads a state: nothing to witness
    ctx.witness("stats", [torch.zeros((), dtype=torch.float64)], terms_dtype=torch.float16)  # float16 terms
    assert ctx.witnesses == {}
    ctx.witness("stats", [torch.zeros(1, 4, 1, dtype=torch.bfloat16)])
    assert list(ctx.witnesses) == ["grad"]


# scsadamw: ||g - D||^2 summed over the model (one bucket: one 0-d sum). coba: its conjugate mixer's
# per-tensor sum of g*(g - p), on the output of the coupled weight decay that carries g's inf and NaN
# through (one tiled bucket for all shapes: one sum per parameter, 10 of them). sgdol: ||g||^2 for grad
# and <g, g'> for grad2.
@pytest.mark.parametrize("spec, expected", [
    ("scsadamw", [()]),
    ("coba", [(10,)]),
    ("sgdol", [(), ()]),
])
def test_mixers_and_online_step_size_are_checked_through_their_sums(monkeypatch, spec, expected):
    model = make_model("stack")
    opt = opdsl.Optimizer(model.parameters(), spec, compile=False)
    opt.step(closure_for(model, opt, 0))
    assert sorted(checked_shapes(monkeypatch, model, opt)) == expected


def unchanged_by(model, opt, closure) -> bool:
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.step(closure)
    return all(torch.equal(a, b) for a, b in zip(params, model.parameters())) and all(
        torch.equal(v, before[k]) for p, before in zip(model.parameters(), states) for k, v in opt.state[p].items()
    )


@pytest.mark.parametrize("spec, compile", [("scsadamw", False), ("coba", False), ("coba", True), ("sgdol", False)])
def test_nonfinite_gradients_seen_only_through_sums_still_skip(spec, compile):
    model = make_model("stack")
    opt = opdsl.Optimizer(model.parameters(), spec, compile=compile)
    opt.step(closure_for(model, opt, 0))
    calls = [0, 1] if spec == "sgdol" else [0]  # sgdol: poison grad, then grad2
    cases = [(call, index, value) for call in calls
             for index, value in [(ROW_REDUCED, float("nan")), (COLUMN_REDUCED, float("inf")), (4, float("-inf"))]]
    for step, poison in enumerate(cases, start=1):
        assert unchanged_by(model, opt, closure_for(model, opt, step, poison)), poison
    assert opt.skipped_steps == len(cases)
    assert not unchanged_by(model, opt, closure_for(model, opt, 20))  # finite gradients step again
