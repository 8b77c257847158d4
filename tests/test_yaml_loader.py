"""opdsl.yaml_loader: safe composition, core-schema scalars, positions, and every refusal with its location."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from opdsl.errors import Location, SpecError
from opdsl.yaml_loader import MAX_NESTING, MAX_SPEC_BYTES, load_yaml_file, load_yaml_text

SPEC = """\
# an example spec
opdsl: 1
name: adam
hyper:
  lr: 1e-3
  betas: [0.9, 0.999]
nodes:
  m:
    block: ema
    beta: $betas[0]
groups:
  - match: {ndim: 1}
    hyper:
      lr: 0.0
"""


def only_problem(err: pytest.ExceptionInfo[SpecError]) -> tuple[Location, str]:
    assert len(err.value.problems) == 1, err.value.problems
    problem = err.value.problems[0]
    return problem.location, problem.message


def refused(text: str) -> tuple[Location, str]:
    with pytest.raises(SpecError) as err:
        load_yaml_text(text, file="spec.yaml")
    return only_problem(err)


# ---- data -----------------------------------------------------------------------------------------------


def test_loads_plain_data_in_order():
    doc = load_yaml_text(SPEC, file="adam.yaml")
    assert doc.file == "adam.yaml"
    assert doc.data == {
        "opdsl": 1,
        "name": "adam",
        "hyper": {"lr": 0.001, "betas": [0.9, 0.999]},
        "nodes": {"m": {"block": "ema", "beta": "$betas[0]"}},
        "groups": [{"match": {"ndim": 1}, "hyper": {"lr": 0.0}}],
    }
    assert list(doc.data) == ["opdsl", "name", "hyper", "nodes", "groups"]


def test_default_file_name():
    assert load_yaml_text("a: 1").file == "<string>"


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 1e-3),
        ("3e-4", 3e-4),
        ("1.0e-3", 1e-3),
        ("1E+2", 100.0),
        (".5", 0.5),
        ("-.5", -0.5),
        ("2.", 2.0),
        ("0.9", 0.9),
        ("-2", -2),
        ("+7", 7),
        ("1_000", 1000),
        ("true", True),
        ("False", False),
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("~", None),
        ("null", None),
        ("", None),
        ("2024-01-01", "2024-01-01"),
        ("1:30", "1:30"),
        ("0x1f", "0x1f"),
        ("1e", "1e"),
        ("'1e-3'", "1e-3"),
        ('"true"', "true"),
        ("!!str 3", "3"),
        ("!!float 1", 1.0),
        ("!!int '12'", 12),
        ("adam", "adam"),
    ],
)
def test_scalar_resolution(text, value):
    loaded = load_yaml_text(f"v: {text}").data["v"]
    assert loaded == value and type(loaded) is type(value)


def test_infinity_and_nan():
    data = load_yaml_text("a: .inf\nb: -.inf\nc: .nan").data
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])


# ---- positions ----------------------------------------------------------------------------------------


def test_where_values_keys_and_list_items():
    doc = load_yaml_text(SPEC, file="adam.yaml")
    assert doc.where(("name",)) == Location("adam.yaml", 3, 7)
    assert doc.where(("hyper", "lr")) == Location("adam.yaml", 5, 7)
    assert doc.where(("hyper", "betas", 1)) == Location("adam.yaml", 6, 16)
    assert doc.where(("nodes", "m", "beta")) == Location("adam.yaml", 10, 11)
    assert doc.where(("groups", 0)) == Location("adam.yaml", 12, 5)
    assert doc.where(("groups", 0, "match", "ndim")) == Location("adam.yaml", 12, 19)
    assert doc.key_where(("nodes", "m", "beta")) == Location("adam.yaml", 10, 5)
    assert doc.key_where(("groups", 0, "hyper", "lr")) == Location("adam.yaml", 14, 7)


def test_where_falls_back_to_nearest_known_ancestor():
    doc = load_yaml_text(SPEC, file="adam.yaml")
    assert doc.where(("nodes", "m", "missing", 3)) == doc.where(("nodes", "m"))
    assert doc.where(("nowhere",)) == doc.where(()) == Location("adam.yaml", 2, 1)
    assert doc.key_where(("groups", 0)) == doc.where(("groups", 0))  # list items have no key
    assert doc.key_where(("hyper", "nope")) == doc.where(("hyper",))


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, tag",
    [
        ("run: !!python/object/apply:os.system ['echo hi']", "!!python/object/apply:os.system"),
        ("run: !!python/name:os.system", "!!python/name:os.system"),
        ("run: !!binary aGk=", "!!binary"),
        ("run: !custom 1", "!custom"),
        ("run: !!set {a: null}", "!!set"),
    ],
)
def test_refuses_non_core_tags(text, tag):
    location, message = refused(text)
    assert location == Location("spec.yaml", 1, 6)
    assert message == f"tag '{tag}' is not allowed: specs are data, never code"


def test_refuses_core_tag_on_wrong_kind_and_invalid_tagged_scalar():
    assert refused("a: !!str {b: 1}") == (Location("spec.yaml", 1, 4), "tag '!!str' cannot be used on a mapping")
    assert refused("a: !!int x") == (Location("spec.yaml", 1, 4), "'x' is not a valid !!int")
    assert refused("a: !!bool yes")[1] == "'yes' is not a valid !!bool"


def test_refuses_anchors_and_aliases():
    location, message = refused("a: 1\nb: &x 2\nc: 3")
    assert location == Location("spec.yaml", 2, 4) and "anchor '&x' is not allowed" in message
    location, message = refused("a: [1, 2]\nb: *x")
    assert location == Location("spec.yaml", 2, 4) and "alias '*x' is not allowed" in message


def test_refuses_billion_laughs_at_the_first_anchor():
    location, message = refused("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]")
    assert location == Location("spec.yaml", 1, 4) and "anchor '&a'" in message


def test_refuses_duplicate_keys():
    location, message = refused("hyper:\n  eps: 1\n  lr: 0.1\n  lr: 0.2\n")
    assert location == Location("spec.yaml", 4, 3)
    assert message == "duplicate key 'lr' (first at line 3)"


@pytest.mark.parametrize(
    "text, got",
    [("1: a", "the int 1"), ("~: a", "the null ~"), ("true: a", "the bool true"), ("[a, b]: c", "a list"), ("? {a: 1}\n: c", "a mapping")],
)
def test_refuses_non_string_keys(text, got):
    location, message = refused(text)
    assert location.line == 1
    assert message == f"keys must be strings, got {got}; quote the key to use it as text"


def test_quoted_keys_are_strings():
    assert load_yaml_text("'1': a\n\"true\": b").data == {"1": "a", "true": "b"}


def test_collects_every_problem_in_one_error():
    with pytest.raises(SpecError) as err:
        load_yaml_text("a: 1\na: 2\nb: !!python/none ''\n1: x\n", file="spec.yaml")
    assert [(p.location.line, p.location.col) for p in err.value.problems] == [(2, 1), (3, 4), (4, 1)]


def test_refuses_big_text():
    location, message = refused("a: '" + "x" * MAX_SPEC_BYTES + "'")
    assert location == Location("spec.yaml")
    assert message == f"spec is {MAX_SPEC_BYTES + 5:,} bytes; the limit is {MAX_SPEC_BYTES:,} bytes"


def test_refuses_big_file_before_parsing(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"a: [" * (MAX_SPEC_BYTES // 4 + 10))  # would be a YAML error if parsed
    with pytest.raises(SpecError) as err:
        load_yaml_file(path)
    location, message = only_problem(err)
    assert location == Location(str(path))
    assert f"{path.stat().st_size:,} bytes" in message and f"{MAX_SPEC_BYTES:,}" in message


def test_refuses_non_utf8_file(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("a: 1\nname: café\n".encode("latin-1"))
    with pytest.raises(SpecError) as err:
        load_yaml_file(path)
    location, message = only_problem(err)
    assert location == Location(str(path), 2, 10)
    assert "not valid UTF-8" in message and "0xe9" in message


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n", "~\n", "null"])
def test_refuses_empty_spec(text):
    assert refused(text) == (Location("spec.yaml"), "empty spec")


def test_refuses_multiple_documents():
    location, message = refused("a: 1\n---\nb: 2\n")
    assert location == Location("spec.yaml", 2, 1)
    assert "one YAML document" in message


@pytest.mark.parametrize(
    "text, line, col, fragment",
    [
        ("a: 1\nb: c: d\n", 2, 5, "mapping values are not allowed here"),
        ("a: [1, 2\nb: 3\n", 2, 2, "expected ',' or ']', but got ':'"),
        ("a:\n  b: 1\n c: 2\n", 3, 2, "expected <block end>"),
        ("a: 1\n\tb: 2\n", 2, 1, "found character '\\t' that cannot start any token"),
        ("a: 'open\n", 2, 1, "found unexpected end of stream"),
    ],
)
def test_malformed_yaml_reports_problem_position(text, line, col, fragment):
    location, message = refused(text)
    assert location == Location("spec.yaml", line, col)
    assert message.startswith("invalid YAML: ") and fragment in message
    assert "\n" not in message and "<unicode string>" not in message


def test_refuses_control_characters():
    assert refused("a: 1\nb: x\x00") == (Location("spec.yaml", 2, 5), "character #x0000 is not allowed in YAML")


def test_refuses_deep_nesting():
    location, message = refused("a: " + "[" * (MAX_NESTING + 5) + "]" * (MAX_NESTING + 5))
    assert location.line == 1 and message == f"nested more than {MAX_NESTING} levels deep"
    assert load_yaml_text("a: " + "[" * (MAX_NESTING - 2) + "]" * (MAX_NESTING - 2)).data["a"]


# ---- files --------------------------------------------------------------------------------------------


def test_load_file(tmp_path: Path):
    path = tmp_path / "adam.yaml"
    path.write_text(SPEC, encoding="utf-8")
    doc = load_yaml_file(path)
    assert doc.file == str(path)
    assert doc.data == load_yaml_text(SPEC).data
    assert doc.where(("hyper", "betas", 1)) == Location(str(path), 6, 16)
    assert load_yaml_file(str(path)).file == str(path)


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml_file(path)
    assert only_problem(err) == (Location(str(path)), "no such file")


def test_unreadable_path(tmp_path: Path):
    with pytest.raises(SpecError) as err:
        load_yaml_file(tmp_path)
    location, message = only_problem(err)
    assert location == Location(str(tmp_path)) and message.startswith("cannot read the file")


def test_refuses_merge_keys_by_name():
    location, message = refused("nodes:\n  s: {<<: {block: sign}, input: m}\n")
    assert (location.line, location.col) == (2, 7) and message == "merge keys (<<) are not supported: write the fields out"
    assert load_yaml_text("'<<': 1\n", file="spec.yaml").data == {"<<": 1}  # a quoted key is only text


def test_too_long_number_says_so():
    location, message = refused("lr: " + "9" * 5000 + "\n")
    assert location.line == 1 and message == "the number 999999999999... has 5000 digits; that is too long"
