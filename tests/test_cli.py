"""The opdsl command line: validate, show, schema, list, demo."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opdsl.cli import main
from opdsl.loader import shipped_specs


def test_validate_every_shipped_spec(capsys):
    assert main(["validate", *map(str, shipped_specs().values())]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(shipped_specs())


def test_validate_reports_file_line_col_and_fails(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("opdsl: 1\nname: bad\nhyper: {lr: 0.1}\nnodes:\n  m: {block: emaa, input: grad}\noutput: m\n")
    good = tmp_path / "good.yaml"
    good.write_text("opdsl: 1\nname: good\nhyper: {lr: 0.1}\nnodes:\n  s: {block: sign, input: grad}\noutput: s\n")
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith(f"{bad}:5:") and "unknown block 'emaa'" in err[0]


def test_show_prints_graph_and_mermaid(capsys):
    assert main(["show", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "param <- param - lr * update" in out and "flowchart LR" in out and "m -->|input| mhat" in out


def test_show_with_model_prints_the_plan(capsys):
    assert main(["show", "muon", "--no-mermaid", "--model", "opdsl.demo:demo_model"]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "adamw" in out and "bytes per parameter" in out


def test_schema_is_json_with_every_block(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    text = json.dumps(schema)
    for block in ("ema", "preconditioned-norm", "orthogonalize", "direction-mixer"):
        assert f'"{block}"' in text
    assert "hyper" in schema["properties"] and "groups" in schema["properties"]


def _number_branch(prop: dict) -> dict:
    """The literal-number branch of a scalar field's schema (the other branch is the expression)."""
    (number,) = [branch for branch in prop["anyOf"] if branch.get("type") == "number"]
    assert any(branch.get("type") == "string" for branch in prop["anyOf"]), "expressions stay allowed"
    return number


def test_schema_says_what_the_loader_enforces():
    """Version, name pattern, graph layout, hyper values and scalar ranges (checked without jsonschema)."""
    import re

    from opdsl.blocks import block_class
    from opdsl.scalars import scalar_ranges
    from opdsl.schema import spec_json_schema
    from opdsl.spec import Spec

    schema = spec_json_schema()
    props, defs = schema["properties"], schema["$defs"]
    assert props["opdsl"]["const"] == 1 and "opdsl" in schema["required"] and "name" in schema["required"]
    pattern = props["name"]["pattern"]
    assert pattern == Spec.model_fields["name"].metadata[0].pattern
    assert re.search(pattern, "adamw-sn_2.1") and not re.search(pattern, "bad name!")
    # nodes and output come together; without them the spec has named graphs, none called `main`
    assert schema["dependentRequired"] == {"nodes": ["output"], "output": ["nodes"], "output_is": ["nodes"]}
    for graph in (props, defs["Graph"]["properties"]):  # what the output is: an update lr scales, or the next param
        assert graph["output_is"]["enum"] == ["update", "param"] and graph["output_is"]["default"] == "update"
    assert {"required": ["nodes"]} in schema["anyOf"] and {"required": ["graphs"]} in schema["anyOf"]
    assert props["output"]["type"] == "string" and props["nodes"]["minProperties"] == 1
    assert "default" not in props["output"] and "default" not in props["nodes"]
    assert props["graphs"]["propertyNames"] == {"not": {"const": "main"}}
    assert defs["Graph"]["required"] == ["nodes", "output"] and defs["Graph"]["properties"]["nodes"]["minProperties"] == 1
    assert defs["Route"]["not"]["required"] == ["graph", "use"]
    # hyperparameter values: true/false, a number, or a non-empty list of numbers (in `hyper` and in routes)
    for hyper in (props["hyper"], defs["Route"]["properties"]["hyper"]):
        types = {branch["type"]: branch for branch in hyper["additionalProperties"]["anyOf"]}
        assert set(types) == {"boolean", "number", "array"}
        assert types["array"]["minItems"] == 1 and types["array"]["items"] == {"type": "number"}
    # scalar ranges: a literal number in range, or an expression string
    ema = defs[block_class("ema", None).__name__]["properties"]
    assert _number_branch(ema["beta"])["minimum"] == 0 and _number_branch(ema["beta"])["maximum"] == 1
    assert _number_branch(ema["weight"])["minimum"] == 0 and "maximum" not in _number_branch(ema["weight"])
    assert {"type": "null"} in ema["weight"]["anyOf"]  # optional fields stay optional
    adam = defs[block_class("preconditioned-norm", "adam").__name__]["properties"]
    assert _number_branch(adam["beta"])["exclusiveMaximum"] == 1 and "maximum" not in _number_branch(adam["beta"])
    online = defs[block_class("online-step-size", None).__name__]["properties"]
    assert _number_branch(online["smoothness"])["exclusiveMinimum"] == 0
    lr_scale = defs[block_class("lr-scale", None).__name__]["properties"]
    assert set(_number_branch(lr_scale["factor"])) == {"type"}  # unbounded
    # every bounded field of every block is in the schema with its bounds
    keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    for cls in _block_classes():
        assert {"$ref": f"#/$defs/{cls.__name__}"} in props["nodes"]["additionalProperties"]["anyOf"]
        for field, rng in scalar_ranges(cls).items():
            prop = defs[cls.__name__]["properties"][cls.model_fields[field].alias or field]
            number = _number_branch(_scalar_prop(prop))
            for attr, key in keys.items():
                assert number.get(key) == getattr(rng, attr), (cls.__name__, field, key)


def _block_classes():
    from opdsl.blocks import BLOCKS

    return [cls for family in BLOCKS.values() for cls in family.values()]


def _scalar_prop(prop: dict) -> dict:
    """The scalar in a field's schema: an optional one (``scalar() | None``) may nest its own anyOf, and a
    tuple of scalars (``weights``) has it as its items."""
    if "items" in prop:
        return prop["items"]
    nested = [branch for branch in prop.get("anyOf", []) if "anyOf" in branch]
    return nested[0] if nested else prop


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "torch.optim.AdamW" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "opdsl", "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "muon" in result.stdout


def test_demo_trains_eagerly(capsys):
    assert main(["demo", "--steps", "30", "--eager"]) == 0
    out = capsys.readouterr().out
    assert "validating shipped specs" in out and "loss" in out


def test_block_reference_is_generated_and_current(capsys):
    from pathlib import Path

    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    assert "## `preconditioned-norm`" in out and "rule `adam`" in out
    doc = Path(__file__).resolve().parents[1] / "docs" / "blocks.md"
    assert doc.read_text() == out, "docs/blocks.md is stale: run `opdsl blocks > docs/blocks.md`"


def test_bench_takes_spec_names_before_options():
    from opdsl.bench import step_arguments

    assert step_arguments(["adamw", "specs/lion.yaml", "--sizes", "1e6"]) == [
        "--specs", "adamw", "specs/lion.yaml", "--sizes", "1e6",
    ]
    assert step_arguments(["--full", "--threads", "1"]) == ["--full", "--threads", "1"]


def test_bench_passes_every_argument_to_the_benchmark(monkeypatch):
    """`opdsl bench --sizes 1e6` (an option first) and `opdsl bench --help` reach step.py's own parser."""
    import opdsl.bench

    seen = []
    monkeypatch.setattr(opdsl.bench, "main", lambda rest: seen.append(list(rest)) or 0)
    assert main(["bench", "--sizes", "1e6", "--only", "compiled"]) == 0
    assert main(["bench", "--help"]) == 0
    assert main(["bench", "adamw", "--sizes", "1e6"]) == 0
    assert seen == [["--sizes", "1e6", "--only", "compiled"], ["--help"], ["adamw", "--sizes", "1e6"]]


MODELS = """\
import torch


def build():
    return torch.nn.Linear(2, 2)


def boom():
    raise RuntimeError("factory failed")
"""


@pytest.mark.parametrize(
    "model, why",
    [
        ("opdsl_no_such_module:build", "cannot import 'opdsl_no_such_module' (ModuleNotFoundError"),
        ("torch.nn:NoSuch", "'torch.nn' has no callable 'NoSuch'"),
        ("math:pi", "'pi' is not callable"),
        ("builtins:dict", "dict() returned a dict, not a torch.nn.Module"),
        ("opdsl_cli_models:boom", "boom() raised RuntimeError: factory failed"),
        ("nocolon", "not of the form module:factory"),
    ],
)
def test_show_bad_model_is_one_line_before_any_output(tmp_path, monkeypatch, capsys, model, why):
    (tmp_path / "opdsl_cli_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "opdsl_cli_models", raising=False)
    assert main(["show", "adamw", "--model", model]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"opdsl show: error: --model {model!r}: {why}") and "returns a torch.nn.Module" in err


def test_show_model_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """`opdsl show --model mod:factory` imports from the current directory, as `python -m` would."""
    (tmp_path / "opdsl_cli_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "opdsl_cli_models", raising=False)
    assert main(["show", "adamw", "--no-mermaid", "--model", "opdsl_cli_models:build"]) == 0
    assert "bytes per parameter" in capsys.readouterr().out and str(tmp_path) not in sys.path


def test_show_with_model_notes_rules_that_take_no_parameter(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "routes.yaml"
    spec.write_text(
        "opdsl: 1\nname: routes\nhyper: {lr: 0.1, beta: 0.9}\n"
        "nodes:\n  m: {block: ema, input: grad, beta: $beta}\noutput: m\n"
        "groups:\n"
        "  - match: {ndim: 1}\n    hyper: {lr: 0.01}\n"
        "  - match: {ndim: 1}\n    hyper: {lr: 0.5}\n"  # shadowed by the rule above
        "  - match: {name: 'head.*'}\n    hyper: {lr: 0.2}\n"  # nothing is named so
    )
    (tmp_path / "opdsl_cli_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "opdsl_cli_models", raising=False)
    assert main(["show", str(spec), "--no-mermaid", "--model", "opdsl_cli_models:build"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert [n.split(" (")[0] for n in notes] == ["note: groups[1]", "note: groups[2]"]
    assert "takes no parameter of this model" in notes[0]


def test_mermaid_end_node_never_shares_an_id_with_a_spec_node(capsys):
    """adamw's output node is called `update`: the end of the diagram must not loop back onto it."""
    assert main(["show", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "update --> params([param update])" in out and "update --> update" not in out
    assert main(["show", "muon", "--no-mermaid"]) == 0
    assert capsys.readouterr().out.count("else=buf") == 1
