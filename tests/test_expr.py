"""opdsl.expr: grammar and precedence, float and tensor evaluation, references, and refusals."""
from __future__ import annotations

import copy
import inspect
import math
import pickle
import re

import pytest
import torch

import opdsl.expr
from opdsl.expr import MAX_DEPTH, Expr, ExprEvalError, ExprSyntaxError, MissingHyperError, is_expr, parse_expr, variables


def value(text: str, **env):
    return parse_expr(text).evaluate(env)


def t64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ---- grammar and Python evaluation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", 3.0),
        ("0.9", 0.9),
        ("1e-8", 1e-8),
        ("2.5E+3", 2500.0),
        (".5", 0.5),
        ("-2 ** 2", -4.0),
        ("(-2) ** 2", 4.0),
        ("2 ** 3 ** 2", 512.0),
        ("2 ** -1", 0.5),
        ("1 - 0.9 ** 2", 1 - 0.9**2),
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("10 - 4 - 3", 3.0),
        ("10 / 4 / 5", 0.5),
        ("2*-3", -6.0),
        ("--3", 3.0),
        ("+2", 2.0),
        ("1 + 2 == 3", True),
        ("1 - 0.5 >= 0.5", True),
        ("2 < 1", False),
        ("1 != 1", False),
        ("not 1 == 2", True),
        ("not true or true", True),
        ("true and not false", True),
        ("false or 1 > 2", False),
        ("1 < 2 and 2 < 3", True),
        ("false and true or true", True),
        ("sqrt(16)", 4.0),
        ("exp(0)", 1.0),
        ("log(1)", 0.0),
        ("abs(-3)", 3.0),
        ("min(1, 2)", 1.0),
        ("max(1, 2 + 1)", 3.0),
        ("min(max(0.1, 2), 1)", 1.0),
        ("sqrt(1 - 0.999 ** 3) / (1 - 0.9 ** 3)", math.sqrt(1 - 0.999**3) / (1 - 0.9**3)),
    ],
)
def test_precedence_and_values(text, expected):
    result = value(text)
    assert result == expected and type(result) is type(expected)


def test_exact_python_float_math():
    env = {"lr": 3e-4, "betas": (0.9, 0.999), "step": 7.0}
    expr = parse_expr("$lr * sqrt(1 - $betas[1] ** step) / (1 - $betas[0] ** step)")
    assert expr.evaluate(env) == 3e-4 * math.sqrt(1 - 0.999**7.0) / (1 - 0.9**7.0)


def test_hyper_references_and_indexing():
    assert value("$betas[0]", betas=(0.9, 0.999)) == 0.9
    assert value("$betas[1]", betas=[0.9, 0.999]) == 0.999
    assert value("1 - $momentum", momentum=0.9) == 1 - 0.9
    assert value("$momentum != 0", momentum=0.0) is False
    assert value("$nesterov and $momentum > 0", nesterov=True, momentum=0.9) is True
    assert value("$nesterov and $momentum > 0", nesterov=False, momentum=0.9) is False
    assert value("not $amsgrad", amsgrad=False) is True


def test_logic_short_circuits_on_python_values():
    assert value("$m != 0 and 1 / $m > 1", m=0.0) is False
    assert value("$m == 0 or 1 / $m > 1", m=0.0) is True


@pytest.mark.parametrize(
    "text, hypers, uses_step",
    [
        ("0.9", set(), False),
        ("$lr", {"lr"}, False),
        ("$betas[0] * $betas[1] + $lr", {"betas", "lr"}, False),
        ("1 - $beta ** step", {"beta"}, True),
        ("step", set(), True),
        ("sqrt(step) * $lr", {"lr"}, True),
        ("$stepsize", {"stepsize"}, False),
    ],
)
def test_hypers_and_uses_step(text, hypers, uses_step):
    expr = parse_expr(text)
    assert expr.hypers == frozenset(hypers)
    assert expr.uses_step is uses_step


def test_reads_say_which_element_of_a_hyperparameter():
    """What a scheduler's change of one element (betas[0]) is checked against."""
    assert parse_expr("$betas[1] * $lr + $betas[1]").reads == {("betas", 1), ("lr", None)}
    assert parse_expr("$betas[0] + $betas[1]").reads == {("betas", 0), ("betas", 1)}


# ---- tensors -------------------------------------------------------------------------------------------


def test_tensor_evaluation_matches_float_math():
    expr = parse_expr("$lr * sqrt(1 - $betas[1] ** step) / (1 - $betas[0] ** step) + exp(log(abs(-$eps)))")
    floats = {"lr": 1e-3, "betas": (0.9, 0.999), "step": 5.0, "eps": 1e-8}
    tensors = {"lr": t64(1e-3), "betas": (t64(0.9), t64(0.999)), "step": t64(5.0), "eps": t64(1e-8)}
    result = expr.evaluate(tensors)
    assert isinstance(result, torch.Tensor) and result.dim() == 0 and result.dtype == torch.float64
    assert result.item() == pytest.approx(expr.evaluate(floats), rel=1e-14)


def test_mixed_floats_and_tensors():
    expr = parse_expr("$lr * (1 - $beta ** step)")
    result = expr.evaluate({"lr": 0.1, "beta": 0.9, "step": t64(3.0)})
    assert isinstance(result, torch.Tensor)
    assert result.item() == pytest.approx(0.1 * (1 - 0.9**3))


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("min($a, 0.5)", {"a": torch.tensor(0.25)}, 0.25),
        ("min(0.5, $a)", {"a": torch.tensor(0.75)}, 0.5),
        ("max($a, $b)", {"a": torch.tensor(0.25), "b": torch.tensor(0.75)}, 0.75),
        ("max(2, $a)", {"a": torch.tensor(1.0)}, 2.0),
        ("sqrt($a)", {"a": torch.tensor(4.0)}, 2.0),
        ("abs($a)", {"a": torch.tensor(-4.0)}, 4.0),
    ],
)
def test_functions_on_tensors(text, env, expected):
    result = value(text, **env)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
    assert result.item() == expected


def test_logic_and_comparisons_on_tensors():
    on, off = torch.tensor(True), torch.tensor(False)
    assert value("$m > 0", m=torch.tensor(0.9)).dtype == torch.bool
    assert value("$n and $m > 0", n=True, m=torch.tensor(0.9)).item() is True
    assert value("$n and $m > 0", n=on, m=0.0).item() is False
    assert value("$n or $m", n=off, m=off).item() is False
    assert value("$n or $m", n=False, m=on).item() is True
    assert value("not $n", n=on).item() is False


# ---- errors at evaluation -----------------------------------------------------------------------------


def test_missing_hyper_is_key_error_and_value_error():
    with pytest.raises(MissingHyperError, match=r"uses \$lr, which has no value") as err:
        value("2 * $lr")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert "'2 * $lr'" in str(err.value)
    with pytest.raises(KeyError, match="uses step"):
        value("1 - 0.9 ** step")


def test_index_errors_name_the_expression():
    with pytest.raises(ExprEvalError, match=r"'\$betas\[2\]': index 2 is out of range \(\$betas has 2 values\)"):
        value("$betas[2]", betas=(0.9, 0.999))
    with pytest.raises(ValueError, match=r"'\$lr\[0\]' indexes \$lr, which is a float, not a list"):
        value("$lr[0]", lr=0.1)


@pytest.mark.parametrize("text", ["sqrt(-1)", "log(0)", "1 / 0", "(-8) ** 0.5", "exp(1000)", "$a + 1"])
def test_math_errors_name_the_expression(text):
    with pytest.raises(ExprEvalError, match=re.escape(f"cannot evaluate {text!r}")):
        value(text, a=(1.0,))


# ---- syntax errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragment, col",
    [
        ("__import__('os')", "unknown function '__import__'", 1),
        ("$a.__class__", "unexpected character '.'", 3),
        ("open('x').read()", "unknown function 'open'", 1),
        ("foo", "unknown name 'foo' (a hyperparameter is written $foo)", 1),
        ("1 + lr", "unknown name 'lr'", 5),
        ("import os", "unknown name 'import'", 1),
        ("lambda: 1", "unexpected character ':'", 7),
        ("$a; 1", "unexpected character ';'", 3),
        ("'x'", "unexpected character \"'\"", 1),
        ("[1]", "expected a number", 1),
        ("", "empty expression", 1),
        ("   ", "empty expression", 1),
        ("1 +", "got the end of the expression", 4),
        ("1 2", "expected an operator or the end of the expression, got '2'", 3),
        ("(1", "expected ')'", 3),
        ("and", "got 'and'", 1),
        ("1 < 2 < 3", "comparisons cannot be chained", 7),
        ("$", "expected a hyperparameter name after '$'", 1),
        ("$ lr", "expected a hyperparameter name after '$'", 1),
        ("1e", "malformed number '1e'", 1),
        ("1.2.3", "malformed number '1.2.3'", 1),
        ("$a[x]", "expected a non-negative integer index into $a, got 'x'", 4),
        ("$a[-1]", "expected a non-negative integer index into $a", 4),
        ("$a[0.5]", "expected a non-negative integer index into $a", 4),
        ("$a[0", "expected ']'", 5),
        ("min(1)", "min() takes 2 arguments, got 1", 1),
        ("sqrt(1, 2)", "sqrt() takes 1 argument, got 2", 1),
        ("sqrt()", "expected a number", 6),
        ("step(1)", "expected an operator", 5),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels", MAX_DEPTH + 2),
        ("-" * (MAX_DEPTH + 1) + "1", f"nested more than {MAX_DEPTH} levels", MAX_DEPTH + 2),
    ],
)
def test_syntax_errors(text, fragment, col):
    with pytest.raises(ExprSyntaxError) as err:
        parse_expr(text)
    assert fragment in err.value.message
    assert err.value.col == col
    assert isinstance(err.value, ValueError) and str(err.value) == f"{err.value.message} (at column {col})"


def test_unknown_names_list_what_is_allowed_where_they_are_written():
    """The per-tensor functions and the inputs are offered only in a map node's expression."""
    from opdsl.expr import EXPRESSION_WORDS, PER_TENSOR_FUNCTIONS

    functions = sorted(EXPRESSION_WORDS - {"step", "true", "false", "and", "or", "not"})
    with pytest.raises(ExprSyntaxError) as scalar_field:
        parse_expr("gamma(2)")
    scalar_functions = [f for f in functions if f not in PER_TENSOR_FUNCTIONS]
    assert scalar_field.value.message.endswith("$hyperparameters, step, true, false and the functions " + ", ".join(scalar_functions))
    with pytest.raises(ExprSyntaxError) as map_expr:
        parse_expr("gamma(x)", {"x", "u"})
    assert map_expr.value.message.endswith("the functions " + ", ".join(functions) + "; inputs: u, x")


def test_long_flat_expressions_are_fine():
    assert value(" + ".join(["1"] * 2000)) == 2000.0
    assert value("(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1)) == 1.0


def test_never_uses_python_eval():
    source = inspect.getsource(opdsl.expr)
    assert not re.search(r"(?<![\w.])(eval|exec|compile|literal_eval|__import__)\s*\(", source)


# ---- the Expr object ----------------------------------------------------------------------------------


def test_expr_value_semantics():
    expr = parse_expr("1 - $beta ** step")
    assert str(expr) == "1 - $beta ** step"
    assert expr == parse_expr("1 - $beta ** step") and hash(expr) == hash(parse_expr("1 - $beta ** step"))
    assert expr != parse_expr("1-$beta**step")
    assert "source='1 - $beta ** step'" in repr(expr)
    for clone in (pickle.loads(pickle.dumps(expr)), copy.deepcopy(expr)):
        assert isinstance(clone, Expr) and clone == expr
        assert clone.evaluate({"beta": 0.5, "step": 2.0}) == 0.75


@pytest.mark.parametrize(
    "candidate, expected",
    [
        ("$lr", True),
        ("1 - $momentum", True),
        ("0.9 ** step", True),
        ("sqrt(2)", True),
        ("min (1, 2)", True),
        ("1 - 0.9", False),
        ("adam", False),
        ("stepsize", False),
        (0.9, False),
        (None, False),
    ],
)
def test_is_expr(candidate, expected):
    assert is_expr(candidate) is expected


def test_parts_that_read_no_variable_go_through_the_hoist_once():
    """The map block computes `1 - $b ** step` once per step (BlockContext.once), not once per element."""
    from opdsl.expr import HOIST, variables

    seen = []

    def hoist(value):
        seen.append(float(value))
        return value

    x = torch.tensor([1.0, 2.0])
    env = {"b": torch.tensor(0.5), "a": torch.tensor(3.0), "step": torch.tensor(2.0), **variables({"x": x}), HOIST: hoist}
    out = parse_expr("x / (1 - $b ** step) + $a * $b * x - $a", {"x"}).evaluate(env)
    assert torch.allclose(out, x / 0.75 + 1.5 * x - 3.0)
    assert seen == [0.75, 1.5]  # the compound parts; plain `$a` is read as it is
    seen.clear()
    assert float(parse_expr("1 - $b ** step").evaluate(env)) == 0.75 and seen == []  # no variable: whole


def test_floor_and_clamp():
    env = {"step": 7.0, "k": 3.0}
    assert parse_expr("step - $k * floor(step / $k)").evaluate(env) == 1.0  # every k steps: == 0
    assert parse_expr("clamp(step, 2, 5)").evaluate(env) == 5
    t = parse_expr("clamp(x, -1, 1)", {"x"}).evaluate(variables({"x": torch.tensor([-3.0, 0.5, 2.0])}))
    assert torch.equal(t, torch.tensor([-1.0, 0.5, 1.0]))


@pytest.mark.parametrize("a, b", [(7.0, 3.0), (-7.0, 3.0), (7.0, -3.0), (-7.5, -2.0), (0.25, 0.1)])
def test_remainder_has_the_sign_of_the_divisor_on_numbers_and_tensors(a, b):
    expr = parse_expr("$a % $b")
    assert expr.evaluate({"a": a, "b": b}) == a % b
    on_tensors = expr.evaluate({"a": t64(a), "b": t64(b)})
    assert on_tensors.dtype == torch.float64 and on_tensors.item() == torch.remainder(t64(a), t64(b)).item() == a % b


def test_remainder_binds_like_a_product_and_makes_periodic_conditions():
    assert value("1 + 7 % 4 * 2") == 1 + 7 % 4 * 2 == 7.0
    assert value("2 ** 3 % 5") == 3.0 and value("-7 % 3") == 2.0
    every_third = parse_expr("step % 3 == 0")
    assert [every_third.evaluate({"step": s}) for s in range(1, 7)] == [False, False, True, False, False, True]
    x = torch.tensor([-2.5, 0.5, 4.0])
    assert torch.equal(parse_expr("x % 2", {"x"}).evaluate(variables({"x": x})), torch.remainder(x, 2))


def test_remainder_by_the_number_zero_is_refused_like_division():
    with pytest.raises(ExprEvalError, match="by zero"):
        parse_expr("x % ($k - 2)", {"x"}).evaluate({"k": 2.0, **variables({"x": torch.ones(2)})})



def test_a_comparison_of_numbers_counts_as_one_and_zero_beside_a_tensor():
    """`$c > 0` alone is a Python bool (torch refuses `tensor - True`) or a 0-d bool tensor in the step."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for c in (0.5, t64(0.5)):
        env = {"c": c, "step": 3.0, **variables({"x": x})}
        assert torch.equal(parse_expr("x - ($c > 0)", {"x"}).evaluate(env), x - 1)
        assert torch.equal(parse_expr("($c > 1) - x + (not $c > 1)", {"x"}).evaluate(env), 1 - x)
        assert torch.equal(parse_expr("x - (step > 2)", {"x"}).evaluate(env), x - 1)
    assert value("(1 > 0) - (2 > 3)") == 1.0
