"""Every kind of bad spec gives one clear, located error (never a traceback from inside opdsl)."""
from __future__ import annotations

import re
import textwrap

import pytest
import torch

import opdsl
from opdsl import SpecError
from opdsl.errors import BindError

GOOD = """\
opdsl: 1
name: tiny
hyper:
  lr: 0.1
  beta: 0.9
nodes:
  m: {block: ema, input: grad, beta: $beta}
output: m
"""


def problems(text: str, name: str = "spec.yaml") -> list[str]:
    with pytest.raises(SpecError) as info:
        opdsl.load_spec(name, text=textwrap.dedent(text))
    return [str(p) for p in info.value.problems]


def test_good_spec_loads():
    spec = opdsl.load_spec("spec.yaml", text=GOOD)
    assert spec.name == "tiny" and list(spec.main.nodes) == ["m"]


def test_malformed_yaml_points_at_the_line():
    found = problems("opdsl: 1\nname: x\nnodes: {m: [\n")
    assert len(found) == 1 and found[0].startswith("spec.yaml:")


def test_unknown_block_suggests_the_nearest():
    found = problems(GOOD.replace("block: ema", "block: emma"))
    assert "spec.yaml:7:" in found[0] and "unknown block 'emma'" in found[0] and "did you mean 'ema'" in found[0]


def test_unknown_field_suggests_the_nearest():
    found = problems(GOOD.replace("beta: $beta", "betta: $beta"))
    assert any("unknown field 'betta'" in p and "did you mean 'beta'" in p and "spec.yaml:7:" in p for p in found)


def test_wrong_type():
    found = problems(GOOD.replace("input: grad", "input: [grad]"))
    assert any("spec.yaml:7:" in p and "'input'" in p for p in found)


def test_value_out_of_range_literal_and_through_hyper():
    assert any("out of range" in p and "spec.yaml:7:" in p for p in problems(GOOD.replace("beta: $beta", "beta: 1.5")))
    found = problems(GOOD.replace("beta: 0.9", "beta: 1.5"))
    assert any("'beta'" in p and "1.5" in p and "<= 1" in p for p in found)


def test_cycle_is_printed():
    text = GOOD.replace(
        "  m: {block: ema, input: grad, beta: $beta}\n",
        "  m: {block: ema, input: s, beta: $beta}\n  s: {block: sign, input: m}\n",
    )
    assert any("cycle: m -> s -> m" in p or "cycle: s -> m -> s" in p for p in problems(text))


def test_missing_output():
    assert any("missing `output:`" in p for p in problems(GOOD.replace("output: m\n", "")))


def test_output_not_a_node_and_dead_node():
    text = GOOD.replace("output: m", "output: mm").replace(
        "  m: {block: ema, input: grad, beta: $beta}\n",
        "  m: {block: ema, input: grad, beta: $beta}\n  unused: {block: sign, input: grad}\n",
    )
    found = problems(text)
    assert any("output 'mm' is not a node" in p and "did you mean 'm'" in p for p in found)
    text = GOOD.replace("output: m", "output: m\n").replace(
        "  m: {block: ema, input: grad, beta: $beta}\n",
        "  m: {block: ema, input: grad, beta: $beta}\n  unused: {block: sign, input: grad}\n",
    )
    assert any("'unused' never reaches the output" in p for p in problems(text))


def test_unknown_hyper_reference():
    found = problems(GOOD.replace("beta: $beta}", "beta: $bta}"))
    assert any("unknown hyperparameter '$bta'" in p and "did you mean '$beta'" in p and "spec.yaml:7:" in p for p in found)


def test_unknown_reference_to_a_node():
    found = problems(GOOD.replace("input: grad", "input: gard"))
    assert any("reads 'gard'" in p and "did you mean 'grad'" in p for p in found)


def test_python_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = GOOD.replace("name: tiny", f"name: !!python/object/apply:os.system ['touch {marker}']")
    found = problems(text)
    assert any("!!python/object/apply:os.system" in p and "not allowed" in p for p in found)
    assert not marker.exists()


def test_huge_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(GOOD + "# " + "x" * 10_000_000 + "\n")
    with pytest.raises(SpecError) as info:
        opdsl.load_spec(path)
    assert "big.yaml" in str(info.value) and "limit" in str(info.value)


def test_unknown_version():
    assert any("unknown spec format version 2" in p for p in problems(GOOD.replace("opdsl: 1", "opdsl: 2")))


def test_all_problems_reported_at_once():
    text = GOOD.replace("block: ema, input: grad, beta: $beta", "block: ema, input: grad, beta: $beta, extra: 1") + "  s: {block: sihn}\n"
    text = text.replace("output: m\n  s: {block: sihn}\n", "  s: {block: sihn}\noutput: m\n")
    found = problems(text)
    assert len(found) >= 2


def test_spec_that_routes_no_parameter():
    text = """\
    opdsl: 1
    name: only-matrices
    hyper: {lr: 0.1}
    graphs:
      mats:
        nodes: {s: {block: sign, input: grad}}
        output: s
    groups:
      - match: {ndim: 2}
        graph: mats
    """
    spec = opdsl.load_spec("routes.yaml", text=textwrap.dedent(text))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(BindError, match=r"routes no graph to parameter\(s\): bias"):
        opdsl.Optimizer(model.named_parameters(), spec, compile=False)


def test_orthogonalize_on_a_vector_names_the_parameter():
    text = """\
    opdsl: 1
    name: ortho-all
    hyper: {lr: 0.1}
    nodes:
      o: {block: orthogonalize, input: grad}
    output: o
    """
    spec = opdsl.load_spec("o.yaml", text=textwrap.dedent(text))
    with pytest.raises(BindError, match=r"parameter '0\.bias' \(param_groups\[0\]\['params'\]\[1\], shape \(4,\)\).*orthogonalize needs a matrix"):
        opdsl.Optimizer(torch.nn.Sequential(torch.nn.Linear(3, 4)).named_parameters(), spec, compile=False)


def test_unknown_constructor_hyperparameter():
    with pytest.raises(TypeError, match="no hyperparameter.*momentun.*valid: lr"):
        opdsl.Optimizer(torch.nn.Linear(2, 2).parameters(), "sgd", momentun=0.9)


def test_runtime_hyper_out_of_range_is_refused_before_the_step():
    model = torch.nn.Linear(2, 2)
    opt = opdsl.Optimizer(model.parameters(), "adamw", compile=False)
    model(torch.ones(1, 2)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"(?s)param_groups\[0\].*betas\[1\].*1\.5"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_maximize_takes_true_or_false_and_is_no_spec_hyperparameter():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="maximize must be True or False, got 'yes'"):
        opdsl.Optimizer(model.parameters(), "sgd", maximize="yes")
    opt = opdsl.Optimizer(model.parameters(), "sgd", compile=False)
    model(torch.ones(1, 2)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["maximize"] = 1
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['maximize'\] must be True or False, got 1"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (problem,) = problems(GOOD.replace("  beta: 0.9", "  beta: 0.9\n  maximize: false"))
    assert problem.startswith("spec.yaml:6:3: `maximize` is an option of every optimizer")


def test_missing_file_and_unknown_shipped_name():
    with pytest.raises(SpecError, match="no spec file or shipped spec named 'adamv'; did you mean 'adam"):
        opdsl.load_spec("adamv")


def test_directory_is_named_as_a_directory(tmp_path):
    with pytest.raises(SpecError) as info:
        opdsl.load_spec(f"{tmp_path}/")
    message = str(info.value)
    assert "is a directory" in message and f"{tmp_path}/*.yaml" in message and "shipped:" not in message


def test_rule_given_as_a_list():
    found = problems(GOOD.replace("block: ema, input: grad, beta: $beta", "block: preconditioned-norm, rule: [adam], input: grad, stats: grad"))
    assert any(p.startswith("spec.yaml:7:") and "unknown rule ['adam']" in p and "valid rules: adagrad, adam, rmsprop" in p for p in found)


def test_use_cycle_through_unnormalised_paths(tmp_path):
    (tmp_path / "d").mkdir()
    uses = {"b": "../d/c.yaml", "c": "b.yaml"}  # b -> c -> b, each path spelled differently from the other's
    for name, use in uses.items():
        (tmp_path / "d" / f"{name}.yaml").write_text(GOOD + f"groups:\n  - match: {{ndim: 1}}\n    use: {use}\n")
    with pytest.raises(SpecError) as info:
        opdsl.load_spec(tmp_path / "d" / "b.yaml")
    b, c = (str((tmp_path / "d" / f"{name}.yaml").resolve()) for name in uses)
    [found] = info.value.problems  # at b's `use:`, then where c closes the cycle
    assert found.message.startswith("in `use: ../d/c.yaml`: ") and found.message.endswith(f"`use: b.yaml` forms a cycle: {b} -> {c} -> {b}")


# Values that would have been accepted and then trained wrongly (inf in a parameter, lr 1, a node never on).
SILENTLY_WRONG = [
    ("negative lr", ("lr: 0.1", "lr: -0.1"), "4:", "lr must be a finite number >= 0, got -0.1"),
    ("infinite lr", ("lr: 0.1", "lr: .inf"), "4:", "expected a finite number, got inf"),
    ("lr: yes (YAML 1.1)", ("lr: 0.1", "lr: yes"), "4:", "got 'yes' (str)"),
    ("lr as a list", ("lr: 0.1", "lr: [0.1, 0.2]"), "4:", "lr must be a number, got (0.1, 0.2)"),
    ("a boolean among numbers", ("beta: 0.9", "beta: [true, 0.5]"), "5:", "expected a number, got True (bool)"),
    ("if: reading step", ("beta: $beta}", "beta: $beta, if: 'step > 2'}"), "7:", "reads `step`, but conditions are decided once"),
    ("optional field out of range through an expression", ("beta: $beta}", "beta: $beta, weight: '1 - $beta * 10'}"),
     "7:", "field 'weight' (= 1 - $beta * 10) is -8; must be 0 <= value"),
    ("a field that evaluates to inf", ("beta: $beta}", "beta: $beta, weight: '1 / (1 - $beta * 10 / 9)'}"),
     "7:", "cannot evaluate '1 / (1 - $beta * 10 / 9)': division by zero"),
    ("a comparison where a number goes", ("beta: $beta}", "beta: $beta, weight: '$beta > 0.5'}"),
     "7:", "field 'weight' (= $beta > 0.5) is a condition (true); expected a number"),
    ("a 400-digit number", ("beta: $beta}", "beta: " + "9" * 400 + "}"), "7:", "(400 digits) is too large"),
    ("a condition indexing past a list", ("beta: $beta}", "beta: $beta, if: '$beta[3] > 0'}"), "7:", "indexes $beta"),
    ("a list where one number goes", ("beta: 0.9", "beta: [0.9, 0.99]"), "7:",
     "field 'beta' (= $beta) is the list [0.9, 0.99]; expected one number (index it: $beta[0])"),
]


@pytest.mark.parametrize("case", SILENTLY_WRONG, ids=[c[0] for c in SILENTLY_WRONG])
def test_values_that_would_train_wrongly_are_refused_where_written(case):
    _, (old, new), line, message = case
    assert old in GOOD
    found = problems(GOOD.replace(old, new, 1))
    assert any(p.startswith(f"spec.yaml:{line}") and message in p for p in found), found


def test_group_overrides_and_used_graphs_are_checked_at_their_own_values():
    found = problems(GOOD + "groups:\n  - match: {ndim: 1}\n    hyper: {beta: 1.5}\n")
    assert any("spec.yaml:7:" in p and "is 1.5; must be 0 <= value <= 1 (at the hyper of groups[0])" in p for p in found)
    found = problems(GOOD + "groups:\n  - match: {ndim: 1}\n    use: adamw\n  - match: {ndim: 2}\n    hyper: {lr: -1}\n")
    assert any("spec.yaml:13:" in p and "lr must be a finite number >= 0" in p for p in found), found
    text = GOOD.replace("beta: 0.9", "beta: 0.9\n  betas: 0.5") + "groups:\n  - match: {ndim: 1}\n    use: adamw\n"
    assert any("spec.yaml:12:" in p and "'$betas[0]' indexes $betas, which is a float" in p for p in problems(text))


def test_bad_lr_given_to_the_optimizer_or_set_later_is_refused_before_the_step():
    model = torch.nn.Linear(3, 2)
    for bad in (-1.0, float("nan"), [0.1], "abc"):
        with pytest.raises(ValueError, match="lr"):
            opdsl.Optimizer(model.parameters(), "sgd", compile=False, lr=bad)
    with pytest.raises(ValueError, match=r"'momentum'.*could not|field 'weight' \(= 1 - \$dampening\) is -4"):
        opdsl.Optimizer(model.parameters(), "sgd", compile=False, momentum=0.9, dampening=5.0)
    opt = opdsl.Optimizer(model.parameters(), "sgd", compile=False, lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = float("inf")
    with pytest.raises(ValueError, match=r"hyperparameter 'lr': expected a finite number, got inf"):
        opt.step()
    opt.param_groups[0]["lr"] = "abc"
    with pytest.raises(ValueError, match=r"hyperparameter 'lr': expected true, false, a number"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# One bad node or one bad top-level field must not hide the graph and hyperparameter checks.
def test_a_node_that_fails_validation_does_not_hide_the_graph_checks():
    found = problems("""\
        opdsl: 1
        name: t
        hyper: {lr: 0.1}
        nodes:
          a: {block: ema, input: grad, beta: 1.5}
          b: {block: sign, input: zzz}
        output: q
        """)
    assert any(p.startswith("spec.yaml:5:") and "out of range" in p for p in found), found
    assert any(p.startswith("spec.yaml:6:") and "reads 'zzz'" in p for p in found), found
    assert any(p.startswith("spec.yaml:7:") and "output 'q' is not a node" in p for p in found), found
    # Reading a node that failed (even one with an unknown block) is not an unknown reference, and what only a
    # failed node reads is not dead; the validated nodes are still checked against the hyperparameters.
    found = problems("""\
        opdsl: 1
        name: t
        hyper: {lr: 0.1, beta: 0.9}
        nodes:
          g: {block: sign, input: grad}
          a: {block: ema, input: g, beta: 1.5}
          c: {block: emma, input: a}
          b: {block: ema, input: c, beta: $beta, weight: $nope}
          f: {block: sign, input: grad}
        output: b
        """)
    assert [p.split(":")[1] for p in found] == ["6", "7", "8", "9"], found
    assert "unknown hyperparameter '$nope'" in found[2] and "'f' never reaches the output" in found[3], found
    # `a@prev` of a failed node is no second problem, and a missing output is reported once.
    found = problems("opdsl: 1\nname: t\nhyper: {lr: 0.1}\nnodes:\n  a: {block: ema, input: grad, beta: 1.5}\n"
                     "  d: {block: sign, input: a@prev}\n")
    assert len(found) == 2 and "missing `output:`" in found[0] and "out of range" in found[1], found


def test_a_bad_top_level_field_does_not_hide_the_graph_checks():
    found = problems(GOOD.replace("name: tiny", 'name: "bad name!"').replace("input: grad", "input: zzz"))
    assert any(p.startswith("spec.yaml:2:") and "'name'" in p for p in found), found
    assert any(p.startswith("spec.yaml:7:") and "reads 'zzz'" in p for p in found), found
    # A hyperparameter with a bad value is reported where it is defined, not again where it is read.
    found = problems(GOOD.replace("beta: 0.9", "beta: yes").replace("input: grad", "input: zzz") + "unknown: 1\n")
    assert [p.split(":")[1] for p in found] == ["5", "7", "9"], found
    # A bad route is reported; the routes and graphs around it are still checked.
    text = GOOD + "groups:\n  - match: {ndim: x}\n  - {graph: nope}\n  - {hyper: {lr: -1}}\n"
    found = problems(text.replace("output: m", "output: mm"))
    assert [p.split(":")[1] for p in found] == ["8", "10", "10", "11", "12"], found


def test_problems_in_a_used_file_name_the_route_that_uses_it(tmp_path):
    (tmp_path / "other.yaml").write_text(GOOD.replace("beta: $beta", "beta: 1.5"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD + "groups:\n  - match: {ndim: 1}\n    use: other.yaml\n")
    with pytest.raises(SpecError) as info:
        opdsl.load_spec(spec)
    found = [str(p) for p in info.value.problems]
    assert len(found) == 1 and found[0].startswith(f"{spec}:11:10: in `use: other.yaml`: {tmp_path / 'other.yaml'}:7:"), found
    assert "out of range" in found[0]


STEPPED = GOOD.replace("beta: 0.9", "k: 0.001").replace("beta: $beta", 'beta: "step * $k"')


def test_a_field_that_reads_step_is_range_checked_at_later_steps_too():
    """`step * $k` is a fine beta at step 1 and leaves [0, 1] after step 1000: refused where written, naming
    a sampled step where it is out of range, at load, at construction and when a value it reads changes."""
    found = problems(STEPPED)
    assert len(found) == 1 and "spec.yaml:7:" in found[0] and "<= 1" in found[0]
    step = int(re.search(r"at step (\d+): field 'beta'", found[0]).group(1))
    assert step * 0.001 > 1 and (step - 1) * 0.001 <= 1.4  # the first sampled step past it, not a distant one
    spec = opdsl.load_spec("spec.yaml", text=STEPPED.replace("k: 0.001", "k: 0.0"))
    with pytest.raises(ValueError, match=r"at step \d+: field 'beta'"):
        opdsl.Optimizer([torch.nn.Parameter(torch.zeros(2))], spec, k=0.01, compile=False)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = opdsl.Optimizer([param], spec, compile=False)
    param.grad = torch.ones(2)
    opt.param_groups[0]["lr"] = 0.5
    opt.step()
    opt.param_groups[0]["k"] = 1e-6  # beta 1e-6 at step 1, past 1 from step 1_000_001
    with pytest.raises(ValueError, match=r"(?s)param_groups\[0\].*at step \d+: field 'beta'"):
        opt.step()


ORTHO = """\
opdsl: 1
name: o
hyper: {lr: 0.1}
nodes:
  o: {block: orthogonalize, input: grad, FIELDS}
output: o
groups:
  - match: {ndim: 2}
"""


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("steps: -1", "field 'steps': Input should be greater than or equal to 0"),
        ("eps: -1.0", "field 'eps': Input should be greater than or equal to 0"),
        ("eps: .inf", "field 'eps': Input should be a finite number"),
        ("coefficients: [1.0]", "field 'coefficients' has too few items: item 1 (counting from 0) is missing"),
    ],
)
def test_orthogonalize_fields_are_checked_where_written(fields, expected):
    found = problems(ORTHO.replace("FIELDS", fields))
    assert len(found) == 1 and found[0].startswith("spec.yaml:5:") and expected in found[0]


def test_unknown_match_criterion_lists_the_match_fields():
    found = problems(ORTHO.replace("FIELDS", "steps: 5").replace("ndim: 2", "ndims: 2"))
    assert len(found) == 1 and "spec.yaml:8:" in found[0]
    assert "unknown field 'ndims' in `groups[0].match`; did you mean 'ndim'? valid fields: ndim, shape, name" in found[0]


REQUIRE = GOOD + """\
require:
  - check: "$beta < 0.95"
    message: beta must stay below 0.95 here
"""


def test_requirements_are_checked_where_written_and_when_values_change():
    found = problems(REQUIRE.replace("beta: 0.9", "beta: 0.99"))
    assert len(found) == 1 and found[0].startswith("spec.yaml:10:") and "beta must stay below 0.95 here" in found[0]
    typo = problems(REQUIRE.replace('"$beta < 0.95"', '"$betta < 0.95"'))
    assert len(typo) == 1 and "unknown hyperparameter '$betta'; did you mean '$beta'?" in typo[0]
    stepped = problems(REQUIRE.replace('"$beta < 0.95"', '"step < 10"'))
    assert len(stepped) == 1 and "reads `step`" in stepped[0]
    spec = opdsl.load_spec("spec.yaml", text=REQUIRE)
    with pytest.raises(ValueError, match="beta must stay below 0.95 here"):
        opdsl.Optimizer([torch.nn.Parameter(torch.zeros(2))], spec, beta=0.97, compile=False)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = opdsl.Optimizer([param], spec, compile=False)
    param.grad = torch.ones(2)
    opt.step()
    opt.param_groups[0]["beta"] = 0.96
    with pytest.raises(ValueError, match=r"(?s)param_groups\[0\].*beta must stay below 0.95 here"):
        opt.step()


def test_sgd_refuses_nesterov_without_momentum_as_torch_does():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for bad in ({"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}):
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening") as ours:
            opdsl.Optimizer(params, "sgd", compile=False, **bad)
        with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
            torch.optim.SGD(params, **bad)
        assert "require:" in str(ours.value)


def test_a_used_specs_requirements_hold_for_its_route(tmp_path):
    (tmp_path / "main.yaml").write_text(textwrap.dedent("""\
        opdsl: 1
        name: main
        hyper: {lr: 0.1}
        nodes:
          s: {block: sign, input: grad}
        output: s
        groups:
          - match: {ndim: 1}
            use: sgd
            hyper: {nesterov: true}
        """))
    with pytest.raises(SpecError, match=r"main.yaml:9:.*in `use: sgd`: Nesterov momentum requires a momentum"):
        opdsl.load_spec(str(tmp_path / "main.yaml"))


def test_a_requirement_that_is_not_a_condition_is_refused():
    found = problems(REQUIRE.replace('"$beta < 0.95"', '"$beta"'))
    assert len(found) == 1 and "is not a condition (it gives 0.9)" in found[0]


LOCATED_EXPRESSIONS = {
    "plain": "  m: {block: ema, input: grad, beta: $beta +* 2}\n",
    "single-quoted": "  m: {block: ema, input: grad, beta: '$beta +* 2'}\n",
    "double-quoted": '  m: {block: ema, input: grad, beta: "$beta +* 2"}\n',
    "folded": "  m:\n    block: ema\n    input: grad\n    beta: >-\n      $beta\n      +* 2\n",
    "literal": "  m:\n    block: ema\n    input: grad\n    beta: |\n      $beta +\n        * 2\n",
    "plain, two lines": "  m:\n    block: ema\n    input: grad\n    beta: $beta\n      +* 2\n",
}


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
@pytest.mark.parametrize("style", list(LOCATED_EXPRESSIONS))
def test_an_expression_error_points_at_its_column_in_the_file(style, newline):
    text = "opdsl: 1\nname: t\nhyper: {lr: 0.1, beta: 0.9}\nnodes:\n" + LOCATED_EXPRESSIONS[style] + "output: m\n"
    with pytest.raises(SpecError) as info:
        opdsl.load_spec("spec.yaml", text=text.replace("\n", newline))
    (problem,) = info.value.problems
    line = text.splitlines()[problem.location.line - 1]
    assert line[problem.location.col - 1 :].startswith("* 2"), (style, problem)
    assert problem.message.endswith("got '*'") and "column" not in problem.message


def test_expression_errors_are_located_in_conditions_maps_and_at_the_end_of_the_text():
    text = textwrap.dedent("""\
        opdsl: 1
        name: t
        hyper: {lr: 0.1, beta: 0.9}
        require:
          - {check: "$beta < 1 and", message: beta below 1}
        nodes:
          m: {block: ema, input: grad, beta: $beta}
          d:
            block: map
            input: m
            expr: >
              x * 2
                + foo(x)
        output: d
        """)
    with pytest.raises(SpecError) as info:
        opdsl.load_spec("spec.yaml", text=text)
    lines = text.splitlines()
    located = {p.message.split(":")[0]: lines[p.location.line - 1][p.location.col - 1 :] for p in info.value.problems}
    assert located == {"'require.0.check'": '", message: beta below 1}', "node 'd' (map), field 'expr'": "foo(x)"}


def test_an_expression_error_behind_an_escape_sequence_keeps_the_field_location_and_the_column():
    (problem,) = problems('opdsl: 1\nname: t\nhyper: {lr: 0.1}\nnodes:\n  d: {block: map, input: grad, expr: "x \\" + 1"}\noutput: d\n')
    assert problem.startswith("spec.yaml:5:38: ") and problem.endswith("unexpected character '\"' (at column 3)")


def test_output_is_takes_update_or_param_beside_a_graph():
    """`output_is` says what the output is; a wrong value, or one with no graph beside it, is located."""
    found = problems(GOOD + "output_is: params\n")
    assert len(found) == 1 and found[0].startswith("spec.yaml:9:") and "`output_is` must be one of update, param" in found[0]
    no_graph = GOOD.replace("nodes:\n  m: {block: ema, input: grad, beta: $beta}\noutput: m\n", "output_is: param\n")
    no_graph += "graphs:\n  g:\n    nodes: {m: {block: ema, input: grad, beta: $beta}}\n    output: m\n"
    found = problems(no_graph)
    assert len(found) == 1 and found[0].startswith("spec.yaml:6:") and "`output_is` belongs to a graph" in found[0]
    named = problems(no_graph.replace("output_is: param\n", "").replace("    output: m\n", "    output: m\n    output_is: 0\n"))
    assert len(named) == 1 and named[0].startswith("spec.yaml:10:") and "got 0" in named[0]


def test_output_is_param_sets_the_parameter_and_keeps_the_engines_guards():
    """param <- output: lr scales nothing (it is read as $lr or not at all); a parameter without a gradient
    and a skipped non-finite step are left alone as with an update; the default leaves digests as they were."""
    from opdsl.graph import to_text

    spec = opdsl.load_spec("next.yaml", text=GOOD.replace("output: m\n", "  new: {block: map, input: param, with: {m: m}, expr: \"x - 0.5 * m\"}\noutput: new\noutput_is: param\n"))
    assert spec.main.output_is == "param" and to_text(spec.main).endswith("param <- new")
    assert "output_is" not in str(opdsl.load_spec("spec.yaml", text=GOOD).canonical())
    assert opdsl.load_spec("spec.yaml", text=GOOD).digest == opdsl.load_spec("spec.yaml", text=GOOD + "output_is: update\n").digest
    p, frozen = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([3.0]))
    opt = opdsl.Optimizer([p, frozen], spec, lr=7.0, compile=False)
    p.grad = torch.tensor([2.0, 4.0])
    opt.step()  # m = 0.1 g; the lr of 7 is not applied
    assert torch.allclose(p.detach(), torch.tensor([1.0 - 0.5 * 0.2, -2.0 - 0.5 * 0.4])) and frozen.item() == 3.0
    before = p.detach().clone()
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    assert torch.equal(p.detach(), before) and opt.skipped_steps == 1


def _reads_state_of_switched_off(reader_first: bool, on: str) -> str:
    reader = '  a: {block: map, input: grad, with: {u: m@prev}, expr: "x + u"}\n'
    switched = '  m: {block: ema, input: grad, beta: 0.9, if: "$on"}\n'
    nodes = reader + switched if reader_first else switched + reader
    return f"opdsl: 1\nname: t\nhyper: {{lr: 0.01, on: {on}}}\nnodes:\n{nodes}output: a\n"


@pytest.mark.parametrize("reader_first", [True, False], ids=["reader-first", "reader-after"])
def test_reading_the_state_of_a_node_switched_off_is_refused_wherever_the_reader_is_listed(reader_first):
    """At the spec's own values at load, located at the reader; at a group's values when it is built (it
    was a KeyError inside the step when the reader came first in the file)."""
    (problem,) = problems(_reads_state_of_switched_off(reader_first, "false"))
    line = 5 if reader_first else 6
    assert problem == f"spec.yaml:{line}:6: at the spec's default hyperparameters: 'a' reads m@prev, but node 'm' is disabled by its `if:`"
    spec = opdsl.load_spec("t.yaml", text=_reads_state_of_switched_off(reader_first, "true"))
    with pytest.raises(ValueError, match="'a' reads m@prev, but node 'm' is disabled by its `if:`"):
        opdsl.Optimizer([torch.nn.Parameter(torch.ones(2))], spec, on=False, compile=False)


def test_a_node_that_feeds_only_a_state_read_as_prev_is_live_and_stepped():
    """Lion's shape with a preprocessed momentum input: h reaches the update only through m@prev."""
    spec = opdsl.load_spec("t.yaml", text=textwrap.dedent("""\
        opdsl: 1
        name: t
        hyper: {lr: 0.5}
        nodes:
          c: {block: map, input: grad, with: {u: m@prev}, expr: "x + u"}
          m: {block: ema, input: h, beta: 0.5}
          h: {block: map, input: grad, expr: "2 * x"}
        output: c
        """))
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = opdsl.Optimizer([p], spec, compile=False)
    want, m = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for step in range(4):
        g = torch.tensor([1.0, -3.0], dtype=torch.float64) * (step + 1)
        p.grad = g.clone()
        opt.step()
        want -= 0.5 * (g + m)
        m = 0.5 * m + 0.5 * (2 * g)
    assert torch.equal(p.detach(), want)


def test_output_is_param_refuses_an_output_of_one_value_per_step():
    text = 'opdsl: 1\nname: t\nhyper: {lr: 0.1}\nnodes:\n  n: {block: map, scalar: true, expr: "0.2"}\noutput: n\noutput_is: param\n'
    (problem,) = problems(text)
    assert problem.startswith("spec.yaml:6:9: output 'n' is one value per step, but with `output_is: param`")
