"""Every kind of bad spec gives one clear, located error (never a traceback from inside opdsl)."""
from __future__ import annotations

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


def test_missing_file_and_unknown_shipped_name():
    with pytest.raises(SpecError, match="no spec file or shipped spec named 'adamv'; did you mean 'adam"):
        opdsl.load_spec("adamv")
