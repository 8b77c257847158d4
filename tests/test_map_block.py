"""The `map` block: elementwise arithmetic written as an expression over the node's inputs.

Checked against torch.optim.Adamax (the shipped `adamax` spec, in test_torch_oracles.py) and here against
a float64 AdaBelief written from its paper's equations, eager and compiled; and for the errors a spec
author meets while writing one."""
from __future__ import annotations

import copy
import re
import pickle

import pytest
import torch

import opdsl
from opdsl import SpecError
from conftest import loss_of, make_model

ADABELIEF = """\
opdsl: 1
name: adabelief
hyper: {lr: 1.0e-2, betas: [0.9, 0.999], eps: 1.0e-8}
nodes:
  m:    {block: ema, input: grad, beta: "$betas[0]"}
  dev:  {block: map, input: grad, with: {m: m}, expr: "(x - m) ** 2"}
  s:    {block: map, input: dev, with: {s: s@prev}, expr: "$betas[1] * s + (1 - $betas[1]) * x + $eps", keep: true}
  mhat: {block: bias-correction, input: m, beta: "$betas[0]"}
  d:    {block: map, input: mhat, with: {s: s}, expr: "x / (sqrt(s / (1 - $betas[1] ** step)) + $eps)"}
output: d
"""


def adabelief_reference(params, grads_per_step, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    """Zhuang et al. 2020, Algorithm 2, in float64: s_t = b2 s + (1-b2)(g - m_t)^2 + eps."""
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    s = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            s[i] = b2 * s[i] + (1 - b2) * (g - m[i]) ** 2 + eps
            mhat, shat = m[i] / (1 - b1**t), s[i] / (1 - b2**t)
            params[i] -= lr * mhat / (shat.sqrt() + eps)
    return params


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_adabelief_written_with_map_matches_its_equations(compiled):
    model = make_model("mlp", torch.float64)
    spec = opdsl.load_spec("adabelief.yaml", text=ADABELIEF)
    _matches_reference(model, opdsl.Optimizer(model.parameters(), spec, compile=compiled), adabelief_reference, 40)


def _matches_reference(model, opt, reference, steps: int) -> None:
    """Train with ``opt``, then replay the same gradients from the same start through the float64
    ``reference`` (each gradient was taken at opdsl's parameters, which the reference must then reproduce
    to agree at all)."""
    start = [p.detach().clone() for p in model.parameters()]
    grads_per_step = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, "mlp", step, torch.float64).backward()
        grads_per_step.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    expected = reference(start, grads_per_step)
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), expected)) < 1e-12


def test_map_values_comparisons_where_sign_and_constants():
    spec = opdsl.load_spec("m.yaml", text="""\
opdsl: 1
name: m
hyper: {lr: 1.0}
nodes:
  agree: {block: map, input: grad, with: {p: param}, expr: "where(x * p > 0, sign(x), 0) + (p < 0)"}
  one:   {block: map, expr: 1}
  out:   {block: map, input: agree, with: {one: one}, expr: "x + 0.5 * one"}
output: out
""")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0], dtype=torch.float64))
    p.grad = torch.tensor([2.0, 1.0, -1.0, -3.0, 5.0], dtype=torch.float64)
    before = p.detach().clone()
    opdsl.Optimizer([p], spec, compile=False).step()
    agree = torch.where(p.grad * before > 0, p.grad.sign(), 0.0) + (before < 0).double()
    assert torch.equal(before - p.detach(), agree + 0.5)


def test_a_spec_with_map_nodes_survives_deepcopy_and_pickle():
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), "adamax", compile=False)
    for step in range(2):
        opt.zero_grad()
        loss_of(model, "mlp", step).backward()
        opt.step()
    for copy_of in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        model2, opt2 = copy_of((model, opt))
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            loss_of(m, "mlp", 5).backward()
            o.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def _node(fields: str) -> str:
    """MAP_NODE with these fields, reading the gradient as `x` where the expression names x."""
    return MAP_NODE.replace("NODE", ("input: grad, " if re.search(r"(?<![$\w])x(?!\w)", fields) else "") + fields)


MAP_NODE = """\
opdsl: 1
name: e
hyper: {lr: 0.1, beta: 0.9}
nodes:
  u: {block: map, NODE}
output: u
"""


@pytest.mark.parametrize(
    ("node", "line", "fragment"),
    [
        ('with: {v: u@prev}, expr: "max($beta * v, abs(x))"', 5, "keeps no state that `@prev` reads (set `keep: true` on it)"),
        ('expr: "x * y"', 5, "unknown name 'y'"),
        ('expr: "x * $betta"', 5, "unknown hyperparameter '$betta'; did you mean '$beta'?"),
        ('with: {step: u@prev}, expr: "x", keep: true', 5, "input name 'step' cannot be used"),
        ('expr: "x +"', 5, "field 'expr'"),
        ("expr: [x]", 5, "expected an expression (a string), got list"),
    ],
)
def test_map_mistakes_are_located(node, line, fragment):
    with pytest.raises(SpecError) as info:
        opdsl.load_spec("spec.yaml", text=_node(node))
    found = [str(p) for p in info.value.problems]
    assert len(found) == 1 and found[0].startswith(f"spec.yaml:{line}:") and fragment in found[0], found


@pytest.mark.parametrize(
    ("node", "offered"),
    [
        ('input: grad, with: {k: param}, expr: "x * k * y"', "; inputs: k, x"),
        ('with: {k: param}, expr: "k * y"', "; inputs: k"),  # no `input:`: no x to offer
        ('scalar: true, expr: "$beta ** step + y"', ", sqrt, where"),  # nothing to offer: no tensor_* either
    ],
)
def test_unknown_names_list_only_what_the_node_offers(node, offered):
    text = MAP_NODE.replace("NODE", node)
    with pytest.raises(SpecError) as info:
        opdsl.load_spec("spec.yaml", text=text)
    (problem,) = [str(p) for p in info.value.problems]
    assert "unknown name 'y'" in problem and problem.endswith(offered), problem


def _one_step(expr: str, with_: str = "{p: param}", dtype=torch.float64, compiled: bool = False) -> list[float]:
    spec = opdsl.load_spec("e.yaml", text=_node(f"with: {with_}, expr: \"{expr}\""))
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=dtype))
    p.grad = torch.tensor([2.0, 1.0, -1.0, -3.0], dtype=dtype)
    before = p.detach().clone()
    opdsl.Optimizer([p], spec, compile=compiled, on_nonfinite="propagate").step()
    return ((before - p.detach()) / 0.1).tolist()


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("(x > 0) + (p > 0)", [2, 1, 1, 0]),  # torch adds bool tensors as a logical or
        ("(x > 0) - (p > 0)", [0, 1, -1, 0]),
        ("-(x > 0) * (p > -3)", [-1, -1, 0, 0]),
        ("abs(x > 0) + sign(p > 0)", [2, 1, 1, 0]),
        ("max(x > 0, p > 0)", [1, 1, 1, 0]),
        ("where(x * p > 0, 0.1, 0.3)", [0.1, 0.3, 0.3, 0.1]),
        ("x % 1.5 + p % -3", [-1.5, -1, 0.5, -1]),  # the remainder takes the divisor's sign, as in Python
    ],
)
def test_comparisons_count_as_one_and_zero(expr, expected):
    got = _one_step(expr)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-12, got  # float64 throughout: where's 0.1 too


def test_comparisons_and_remainders_compile():
    got = _one_step("(x > 0) - (p > 0) + abs(x > 0) + x % 1.5", compiled=True)
    assert max(abs(a - b) for a, b in zip(got, [1.5, 3, -0.5, 0])) < 1e-12, got


def test_a_map_can_read_a_scalar_state_and_gives_a_parameter_like_value():
    """`n@prev` of a model-wide norm is one float64 value: the output still has the parameters' shape and dtype."""
    spec = opdsl.load_spec("s.yaml", text="""\
opdsl: 1
name: s
hyper: {lr: 1.0}
nodes:
  n: {block: global-norm, input: grad, initial: 4.0}
  u: {block: map, input: n@prev, with: {g: n}, expr: "x + 0 * g"}
output: u
""")
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = opdsl.Optimizer([p], spec, compile=False)
    opt.step()  # b2 was 0 before the first step
    opt.step()  # b2 = 4 + 3 after it
    assert p.dtype == torch.float32 and torch.equal(p.detach(), torch.full((3,), -7.0))


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ('expr: "x * $lr[0]"', "indexes $lr, which is a float"),
        ('expr: "x * (1 / 0)"', "cannot evaluate"),
        ('with: {m: grad}, expr: "x"', "`with` input(s) m are not read by the expression"),
        ('with: {expr: grad}, expr: "x * expr"', "input name 'expr' cannot be used"),
        ('with: {"\\u03b2": grad}, expr: "x"', "is letters, digits and '_' (ASCII"),
        ('expr: "x", keep: "yes"', "Input should be a valid boolean"),
    ],
)
def test_expression_mistakes_are_found_where_the_spec_is_read(node, fragment):
    with pytest.raises(SpecError) as info:
        opdsl.load_spec("spec.yaml", text=_node(node))
    found = [str(p) for p in info.value.problems]
    assert len(found) == 1 and found[0].startswith("spec.yaml:5:") and fragment in found[0], found


def test_prev_of_a_per_tensor_state_is_refused():
    with pytest.raises(SpecError, match="a state with one value per parameter tensor"):
        opdsl.load_spec("t.yaml", text="""\
opdsl: 1
name: t
hyper: {lr: 1.0}
nodes:
  n: {block: global-norm, input: grad, span: tensor}
  u: {block: map, input: n, with: {b: n@prev}, expr: "x * b"}
output: u
""")


def test_a_scalar_map_reads_only_scalar_values():
    found = [str(p) for p in pytest.raises(SpecError, opdsl.load_spec, "spec.yaml", text=MAP_NODE.replace(
        "NODE", 'scalar: true, with: {g: grad}, expr: "2 * g"')).value.problems]
    assert len(found) == 1 and found[0].startswith("spec.yaml:5:")
    assert "is a scalar map, but 'g' reads 'grad', a full-size value" in found[0]


def test_a_kept_scalar_map_is_a_recurrence_from_its_initial_value():
    """prod_t = prod_{t-1} * 0.5 from 1: one float64 value per bucket, shown in every parameter's state."""
    spec = opdsl.load_spec("r.yaml", text="""\
opdsl: 1
name: r
hyper: {lr: 1.0}
nodes:
  prod: {block: map, scalar: true, with: {p: prod@prev}, expr: "p * 0.5", keep: true, initial: 1}
  u:    {block: map, input: grad, with: {prod: prod}, expr: "x * prod"}
output: u
""")
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = opdsl.Optimizer(params, spec, compile=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(params[0].detach(), torch.full((3,), -(0.5 + 0.25 + 0.125)))
    state = opt.state[params[1]]["prod.value"]
    assert state.dtype == torch.float64 and state.shape == () and float(state) == 0.125


def lamb_reference(params, grads_per_step, lr=1e-2, b1=0.9, b2=0.999, eps=1e-6, wd=1e-2):
    """You et al. 2020, Algorithm 2 (phi(z) = z) in float64; the trust ratio is 1 where a norm is 0."""
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps) + wd * params[i]
            p_norm, u_norm = params[i].norm(), u.norm()
            trust = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            params[i] = params[i] - lr * trust * u
    return params


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_lamb_per_tensor_trust_ratio_matches_its_equations(compiled):
    model = make_model("mlp", torch.float64)
    with torch.no_grad():
        model[2].bias.zero_()  # a zero tensor: its trust ratio is 1 at the first step
    _matches_reference(model, opdsl.Optimizer(model.parameters(), "lamb", lr=1e-2, compile=compiled), lamb_reference, 30)


def test_per_tensor_functions_reduce_over_each_tensor():
    spec = opdsl.load_spec("t.yaml", text=_node(
        'with: {p: param}, expr: "tensor_sum(x) + 10 * tensor_mean(p) + 100 * tensor_norm(1)"'))
    params = [torch.nn.Parameter(torch.tensor([1.0, 3.0], dtype=torch.float64)),
              torch.nn.Parameter(torch.tensor([[2.0, 2.0], [2.0, 6.0]], dtype=torch.float64))]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opdsl.Optimizer(params, spec, compile=False).step()
    for p, b in zip(params, before):
        expected = p.grad.sum() + 10 * b.mean() + 100 * b.numel() ** 0.5
        assert torch.allclose((b - p.detach()) / 0.1, expected.expand_as(b), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (MAP_NODE.replace("NODE", 'scalar: true, expr: "tensor_sum(1)"'), "a scalar map has no tensors to reduce"),
        (MAP_NODE.replace("{block: map, NODE}", '{block: ema, input: grad, beta: "tensor_mean(1)"}'),
         "it belongs in a map node's expr"),
    ],
)
def test_per_tensor_functions_outside_an_elementwise_map_are_refused(text, fragment):
    with pytest.raises(SpecError, match=re.escape(fragment)):
        opdsl.load_spec("spec.yaml", text=text)


def test_a_with_input_never_stands_in_for_a_hyperparameter_of_its_name():
    got = _one_step("x * 0 + beta * 0 + $beta", with_="{beta: param}")
    assert got == [pytest.approx(0.9)] * 4


def test_a_map_that_gives_a_list_is_refused():
    with pytest.raises(SpecError, match="it gives the list"):
        opdsl.load_spec("spec.yaml", text=MAP_NODE.replace("beta: 0.9", "betas: [0.9, 0.99]").replace("NODE", 'expr: "$betas"'))


def test_where_of_numbers_in_a_per_step_part_keeps_float64_in_bfloat16():
    """`where($warm > 0, 0.9, 0.999)` is one value per step: 0.999 in bfloat16 would be 1, and 1 - 1 ** t = 0."""
    spec = opdsl.load_spec("w.yaml", text=_node('expr: "x / (1 - where($warm > 0, 0.9, 0.999) ** step)"').replace(
        "beta: 0.9", "warm: 0.0"))
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    p.grad = torch.full((3,), 1e-3, dtype=torch.bfloat16)
    opdsl.Optimizer([p], spec, compile=False).step()
    assert torch.isfinite(p.detach()).all() and abs(float(p.detach()[0]) + 0.1) < 2e-3  # -lr * 1e-3 / (1 - 0.999)


def test_a_per_tensor_function_of_the_gradient_compiles_once():
    """Memoised by the variable's name, not the tensor's identity (a fresh gradient view every step, which
    dynamo guarded on: a recompile per step, then the recompile limit)."""
    from torch._dynamo.utils import counters

    spec = opdsl.load_spec("n.yaml", text=_node('with: {g: grad}, expr: "x / (tensor_norm(g) + tensor_norm(x) + 1)"'))
    model = make_model("mlp")
    opt = opdsl.Optimizer(model.parameters(), spec)
    for step in range(4):
        opt.zero_grad()
        loss_of(model, "mlp", step).backward()
        opt.step()
    assert counters["stats"]["unique_graphs"] == 1


def test_a_per_tensor_mean_of_a_comparison_is_exact_in_float64():
    spec = opdsl.load_spec("m.yaml", text=_node('expr: "tensor_mean(x > 0)"').replace("lr: 0.1", "lr: 1.0"))
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    opdsl.Optimizer([p], spec, compile=False).step()
    assert torch.equal(-p.detach(), torch.full((3,), 2 / 3, dtype=torch.float64))  # float32 had made it 2e-8 off


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ('expr: "2 * x"', "the expression reads x, the node's `input:`, which is not set"),
        ('input: grad, expr: "2"', "`input:` is read as x, which the expression does not read; remove it"),
        ('expr: "$beta", initial: 1', "`initial:` is the kept state's first value: it needs `keep: true`"),
        ('expr: "$beta", if: "$beta > 0.5"', "a map switched by `if:` needs `else:` or `input:`"),
        ('expr: "$beta", export: true', "`export:` reads the kept state: it needs `keep: true`"),
    ],
)
def test_map_field_combinations_that_cannot_work_are_refused(fields, fragment):
    """x is read exactly when an input is given; initial: needs keep; a map with no input needs else."""
    with pytest.raises(SpecError, match=re.escape(fragment)):
        opdsl.load_spec("spec.yaml", text=MAP_NODE.replace("NODE", fields))


def test_a_guarded_division_by_the_step_is_accepted():
    spec = opdsl.load_spec("g.yaml", text=_node('expr: "x * where(step == 1, 0, 1 / (step - 1))"'))
    assert spec.graphs["main"].nodes["u"].block == "map"


def test_an_exported_map_may_feed_nothing_and_is_read_from_the_state():
    """ASGD's averaged iterate: kept for the user to read, not part of the update. Without `export:` a
    kept map that feeds nothing is a node someone forgot to wire in."""
    with pytest.raises(SpecError, match="never reaches the output"):
        opdsl.load_spec("f.yaml", text=_node('with: {u: u@prev}, expr: "max(u, abs(x))", keep: true').replace(
            "output: u", "  v: {block: sign, input: grad}\noutput: v"))
    spec = opdsl.load_spec("a.yaml", text="""\
opdsl: 1
name: a
hyper: {lr: 0.5}
nodes:
  avg: {block: map, input: param, with: {a: avg@prev}, expr: "a + (x - a) / step", keep: true, export: true}
  u:   {block: map, input: grad, expr: "x"}
output: u
""")
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = opdsl.Optimizer([p], spec, compile=False)
    seen = []
    for _ in range(3):
        seen.append(p.detach().clone())
        p.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    assert torch.equal(opt.state[p]["avg.value"], torch.stack(seen).mean(0))  # the mean of the iterates it saw
