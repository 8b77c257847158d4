"""A tiny, safe expression language for hyperparameter arithmetic in specs.

Numeric fields of a spec may be strings such as ``"1 - $betas[1]"`` or ``"$lr * sqrt(1 - $beta ** step)"``.
They are parsed by the recursive-descent parser below (never by ``eval``) into nested closures, once, so
:meth:`Expr.evaluate` does no parsing. The same closures run on Python numbers (exact float math) and on
0-d tensors (torch ops, traceable by ``torch.compile``), or on a mix of both.

Grammar, loosest binding first (as in Python; comparisons do not chain)::

    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)?
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/" | "%") unary)*
    unary      := ("-" | "+") unary | power
    power      := atom ("**" unary)?
    atom       := NUMBER | "$" NAME ("[" INT "]")? | "step" | "true" | "false" | VARIABLE
                | FUNCTION "(" or_expr ("," or_expr)* ")" | "(" or_expr ")"

``VARIABLE`` is one of the names given to :func:`parse_expr` (the ``map`` block's tensor inputs); scalar
fields have none. ``a % b`` is the remainder with the sign of ``b``, as Python's and torch.remainder's
(``step % 10 == 0``: every tenth step). Functions: ``sqrt exp log abs sign floor`` (one argument),
``min max`` (two), ``where(c, a, b)`` (``a`` where ``c`` holds, else ``b``), ``clamp(v, lo, hi)``, and in a map the
per-tensor ``tensor_sum tensor_mean tensor_norm``.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Expr", "ExprSyntaxError", "ExprEvalError", "MissingHyperError", "parse_expr", "is_expr", "MAX_DEPTH", "EXPRESSION_WORDS", "HOIST", "DTYPE", "PER_TENSOR", "PER_TENSOR_FUNCTIONS", "variables", "NAME"]

#: Deeper nesting (parentheses, calls, prefix operators) is refused; it bounds parser and evaluator recursion.
MAX_DEPTH = 32

Env = Mapping[str, Any]
_Fn = Callable[[Env], Any]


class ExprSyntaxError(ValueError):
    """An expression is malformed; ``col`` is the 1-based column of the problem in the expression text."""

    def __init__(self, message: str, col: int):
        super().__init__(f"{message} (at column {col})")
        self.message = message
        self.col = col


class ExprEvalError(ValueError):
    """An expression cannot be evaluated with the given values (bad index, math domain error, ...)."""


class MissingHyperError(ExprEvalError, KeyError):
    """An expression refers to a name that has no value; also a KeyError, like the failed lookup it is."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


# ---- operations that work on Python numbers and on tensors ----------------------------------------------


def _pow(base: Any, exponent: Any) -> Any:
    """Python floats via math.pow (an error rather than a complex number for a negative base)."""
    if isinstance(base, Tensor) or isinstance(exponent, Tensor):
        return base**exponent
    return math.pow(base, exponent)


def _divide(a: Any, b: Any) -> Any:
    """a / b, where a divisor that is the number 0 is an error even for a tensor dividend (it would be inf
    or nan everywhere): ``x / ($beta - 0.9)`` at beta 0.9 is found where the spec is read."""
    if not isinstance(b, Tensor) and b == 0:
        raise ZeroDivisionError("division by zero")
    return a / b


def _remainder(a: Any, b: Any) -> Any:
    """a % b (Python's and torch.remainder's: the sign of b); the number 0 as divisor is refused, as in
    :func:`_divide`."""
    if not isinstance(b, Tensor) and b == 0:
        raise ZeroDivisionError("remainder of division by zero")
    return a % b


def _math(python: Callable[[Any], Any], tensor: Callable[[Tensor], Tensor]) -> Callable[[Any], Any]:
    return lambda value: tensor(value) if isinstance(value, Tensor) else python(value)


def _extremum(
    python: Callable[[Any, Any], Any], tensor: Callable[[Tensor, Tensor], Tensor], bound: str
) -> Callable[[Any, Any], Any]:
    """min/max: torch.minimum/maximum for two tensors, a clamp for a tensor and a number, else Python's."""

    def apply(a: Any, b: Any) -> Any:
        if isinstance(b, Tensor) and not isinstance(a, Tensor):
            a, b = b, a
        if not isinstance(a, Tensor):
            return python(a, b)
        return tensor(a, b) if isinstance(b, Tensor) else a.clamp(**{bound: b})

    return apply


def _sign(value: float) -> float:
    return 0.0 if value == 0 else math.copysign(1.0, value)


def _number_type(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The float type numbers and comparisons take beside ``tensor``: one value (a per-step scalar) keeps
    float64 where the device has it, as the step count does; a full-size one takes ``dtype`` (the map
    block's parameters'), else torch's default."""
    if tensor.dim() == 0:
        return torch.float32 if tensor.device.type == "mps" else torch.float64
    return dtype or torch.get_default_dtype()


def _where(condition: Any, a: Any, b: Any, dtype: torch.dtype | None = None) -> Any:
    """``a`` where ``condition`` holds, else ``b``: elementwise once a tensor is involved. Two plain numbers
    become tensors of :func:`_number_type` (not float32: 0.999 in a bfloat16 tensor is 1)."""
    if any(isinstance(v, (tuple, list)) for v in (a, b)):
        raise TypeError("a list where one number goes; index it, e.g. $betas[0]")
    a, b = _num(a, dtype), _num(b, dtype)
    if not any(isinstance(v, Tensor) for v in (condition, a, b)):
        return a if condition else b
    if not isinstance(condition, Tensor):
        condition = torch.as_tensor(bool(condition))
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        kind = _number_type(condition, dtype)
        a, b = (torch.full((), v, dtype=kind, device=condition.device) for v in (a, b))  # a fill, not a copy
    return torch.where(condition.bool(), a, b)


def _num(value: Any, dtype: torch.dtype | None = None) -> Any:
    """A comparison as 1 and 0: a bool tensor (torch adds two as a logical or) or a Python bool (torch
    refuses ``tensor - True``)."""
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        return value.to(_number_type(value, dtype))
    if isinstance(value, bool):
        return float(value)
    return value


def _numeric(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with comparisons among its arguments read as 1 and 0, and no list among them; it takes
    the environment's :data:`DTYPE` as ``dtype``."""

    def apply(*args: Any, dtype: torch.dtype | None = None) -> Any:
        if any(isinstance(a, (tuple, list)) for a in args):
            raise TypeError("a list where one number goes; index it, e.g. $betas[0]")
        return function(*(_num(a, dtype) for a in args))

    apply.numeric = True  # type: ignore[attr-defined]
    return apply


def _not(value: Any) -> Any:
    return torch.logical_not(value) if isinstance(value, Tensor) else not value


#: Function name -> (number of arguments, implementation).
_FUNCTIONS: dict[str, tuple[int, Callable[..., Any]]] = {
    "sqrt": (1, _numeric(_math(math.sqrt, torch.sqrt))),
    "exp": (1, _numeric(_math(math.exp, torch.exp))),
    "log": (1, _numeric(_math(math.log, torch.log))),
    "abs": (1, _numeric(_math(abs, torch.abs))),
    "sign": (1, _numeric(_math(_sign, torch.sign))),
    "where": (3, _where),
    "floor": (1, _numeric(_math(lambda v: float(math.floor(v)) if math.isfinite(v) else v, torch.floor))),
    "clamp": (3, _numeric(lambda v, lo, hi: _extremum(min, torch.minimum, "max")(_extremum(max, torch.maximum, "min")(v, lo), hi))),
    "min": (2, _numeric(_extremum(min, torch.minimum, "max"))),
    "max": (2, _numeric(_extremum(max, torch.maximum, "min"))),
}
#: Functions over each parameter tensor: the map block reduces its argument over every tensor and
#: broadcasts the result back (the function the environment holds under :data:`PER_TENSOR` does it).
PER_TENSOR_FUNCTIONS = ("tensor_sum", "tensor_mean", "tensor_norm")
_FUNCTIONS.update({name: (1, name) for name in PER_TENSOR_FUNCTIONS})  # resolved in _apply
#: Environment key of ``reduce(function name, value, variable key or None)`` for :data:`PER_TENSOR_FUNCTIONS`.
PER_TENSOR = "$per_tensor"
#: Prefix of a variable's key in the environment: a variable never stands in for `$name` of the same name.
_VARIABLE = "%"


def variables(values: Mapping[str, Any]) -> dict[str, Any]:
    """Environment entries for variables (the map block's inputs), beside the hyperparameters."""
    return {_VARIABLE + name: value for name, value in values.items()}


#: Environment key of the dtype that plain numbers become where a function makes a tensor of them alone
#: (``where(c, 0.1, 0.3)``); names cannot clash with it.
DTYPE = "$dtype"
#: Words an expression reserves (keywords, constants, functions): no variable given to :func:`parse_expr` may be one.
EXPRESSION_WORDS = frozenset({"step", "true", "false", "and", "or", "not", *_FUNCTIONS})

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": _numeric(operator.add),
    "-": _numeric(operator.sub),
    "*": _numeric(operator.mul),
    "/": _numeric(_divide),
    "%": _numeric(_remainder),
    "**": _numeric(_pow),
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")


def _allowed(variables: frozenset[str]) -> str:
    """What an expression may name: the per-tensor functions and the inputs only where there are inputs
    (a map node's expression)."""
    functions = sorted(f for f in _FUNCTIONS if variables or f not in PER_TENSOR_FUNCTIONS)
    inputs = f"; inputs: {', '.join(sorted(variables))}" if variables else ""
    return f"allowed are numbers, $hyperparameters, step, true, false and the functions {', '.join(functions)}{inputs}"


# ---- closures the parser composes ------------------------------------------------------------------------
#
# Each closure is marked ``free`` when it reads no variable (only numbers, hyperparameters and ``step``),
# and ``simple`` when it is a number or a plain lookup. Where a compound free part meets a variable (in
# ``x / (1 - $beta ** step)``), the part is wrapped to go through the function the environment holds under
# :data:`HOIST`, if any: the ``map`` block passes ``BlockContext.once`` there, so that the part is computed
# once per step instead of once per element of the kernel that reads it (3.2x the step time of Adam
# written in one map node, before).

#: Environment key of the function a variable-free compound part goes through (see above); no name can
#: clash with it (names are identifiers).
HOIST = "$hoist"


def _marked(fn: _Fn, free: bool, simple: bool = False) -> _Fn:
    fn.free, fn.simple = free, simple  # type: ignore[attr-defined]
    return fn


def _is_free(fn: _Fn) -> bool:
    return getattr(fn, "free", True)


def _hoisted(fn: _Fn) -> _Fn:
    """``fn`` as a part of an expression that also reads variables: through ``env[HOIST]`` if compound."""
    if not _is_free(fn) or getattr(fn, "simple", False):
        return fn

    def run(env: Env) -> Any:
        value, once = fn(env), env.get(HOIST)
        return once(value) if once is not None and isinstance(value, Tensor) else value

    return _marked(run, free=True, simple=True)


def _combined(parts: Sequence[_Fn]) -> tuple[bool, list[_Fn]]:
    """Whether a combination of ``parts`` is free, and the parts to combine (compound free ones hoisted
    when some part is not free)."""
    if all(map(_is_free, parts)):
        return True, list(parts)
    return False, [_hoisted(p) for p in parts]


def _constant(value: Any) -> _Fn:
    return _marked(lambda env: value, free=True, simple=True)


def _lookup(key: str, label: str, source: str, variable: bool = False) -> _Fn:
    def run(env: Env) -> Any:
        try:
            return env[key]
        except KeyError:
            raise MissingHyperError(f"{source!r} uses {label}, which has no value") from None

    run.key = key  # type: ignore[attr-defined]
    return _marked(run, free=not variable, simple=True)


def _indexed(name: str, index: int, source: str) -> _Fn:
    lookup = _lookup(name, f"${name}", source)

    def run(env: Env) -> Any:
        value = lookup(env)
        if not isinstance(value, (tuple, list)):
            raise ExprEvalError(f"{source!r} indexes ${name}, which is a {type(value).__name__}, not a list")
        if index >= len(value):
            raise ExprEvalError(f"{source!r}: index {index} is out of range (${name} has {len(value)} values)")
        return value[index]

    return _marked(run, free=True, simple=True)


def _apply(function: Callable[..., Any] | str, args: Sequence[_Fn]) -> _Fn:
    free, args = _combined(args)
    if isinstance(function, str):  # a per-tensor function: one value per tensor, never computed once
        name, (arg,) = function, args

        of = getattr(arg, "key", None)  # a variable's name: the map computes the reduction once

        def per_tensor(env: Env) -> Any:
            reduce = env.get(PER_TENSOR)
            if reduce is None:
                raise ExprEvalError(f"{name}() reduces over each parameter tensor: it belongs in a map node's expr")
            return reduce(name, _num(arg(env), env.get(DTYPE)), of)

        return _marked(per_tensor, free=False)
    if function is _where:
        return _marked(lambda env: _where(*[arg(env) for arg in args], env.get(DTYPE)), free)
    return _marked(lambda env: function(*[arg(env) for arg in args], dtype=env.get(DTYPE)), free)


def _unary(op: Callable[..., Any], operand: _Fn) -> _Fn:
    if getattr(op, "numeric", False):
        return _marked(lambda env: op(operand(env), dtype=env.get(DTYPE)), _is_free(operand))
    return _marked(lambda env: op(operand(env)), _is_free(operand))


def _chain(first: _Fn, rest: Sequence[tuple[Callable[[Any, Any], Any], _Fn]]) -> _Fn:
    """Left-to-right application of binary operators, as one flat closure."""
    if not rest:
        return first
    operands = [first, *(fn for _, fn in rest)]
    leading = next((k for k, fn in enumerate(operands) if not _is_free(fn)), len(operands))
    if 1 < leading < len(operands):  # `$a * $b * x`: the free prefix is one part, computed once
        first, rest = _chain(first, rest[: leading - 1]), rest[leading - 1 :]
    free, parts = _combined([first, *(fn for _, fn in rest)])
    first, rest = parts[0], [(op, fn) for (op, _), fn in zip(rest, parts[1:])]

    numeric = [getattr(op, "numeric", False) for op, _ in rest]

    def run(env: Env) -> Any:
        value, dtype = first(env), env.get(DTYPE)
        for (op, operand), with_dtype in zip(rest, numeric):
            value = op(value, operand(env), dtype=dtype) if with_dtype else op(value, operand(env))
        return value

    return _marked(run, free)


def _logic(parts: Sequence[_Fn], stop: bool) -> _Fn:
    """``and`` (stop=False) or ``or`` (stop=True) over parts.

    Python values short-circuit and give a bool; once a tensor is involved the parts are combined
    elementwise into a bool tensor (no host sync).
    """
    if len(parts) == 1:
        return parts[0]
    combine = torch.logical_or if stop else torch.logical_and
    free, parts = _combined(parts)

    def run(env: Env) -> Any:
        result: Any = not stop
        for part in parts:
            value = part(env)
            if isinstance(result, Tensor) or isinstance(value, Tensor):
                result = combine(torch.as_tensor(result), torch.as_tensor(value))
            elif bool(value) is stop:
                return stop
        return result

    return _marked(run, free)


# ---- lexer and parser ----------------------------------------------------------------------------------


class _Token(NamedTuple):
    kind: str  # number, hyper, name, op, end
    text: str
    col: int


#: A name as the tokenizer reads it (``$`` + a name is a hyperparameter).
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)(?P<junk>[A-Za-z0-9_.]*)"
    rf"|(?P<hyper>\$(?P<hyper_name>{NAME.pattern})?)"
    rf"|(?P<name>{NAME.pattern})"
    r"|(?P<op>\*\*|[=!<>]=|[-+*/%<>()\[\],])"
    r"|(?P<end>\Z))"
)


def _tokens(text: str) -> Iterator[_Token]:
    """Tokens of ``text``, lazily (so the first problem in reading order is the one reported)."""
    pos = 0
    while True:
        match = _TOKEN.match(text, pos)
        if match is None:
            col = len(text) - len(text[pos:].lstrip()) + 1
            raise ExprSyntaxError(f"unexpected character {text[col - 1]!r}", col)
        kind = next(k for k in ("number", "hyper", "name", "op", "end") if match.group(k) is not None)
        col = match.start(kind) + 1
        if kind == "number" and match.group("junk"):
            raise ExprSyntaxError(f"malformed number {match.group('number') + match.group('junk')!r}", col)
        if kind == "hyper" and match.group("hyper_name") is None:
            raise ExprSyntaxError("expected a hyperparameter name after '$'", col)
        yield _Token(kind, match.group(kind), col)
        if kind == "end":
            return
        pos = match.end()


def _describe(token: _Token) -> str:
    return "the end of the expression" if token.kind == "end" else repr(token.text)


class _Parser:
    """Recursive descent over :data:`_TOKEN` tokens, producing closures directly."""

    def __init__(self, text: str, variables: frozenset[str] = frozenset()):
        self.text = text
        self.variables = variables
        self.tokens = _tokens(text)
        self.tok = next(self.tokens)
        self.hypers: set[str] = set()
        self.reads: set[tuple[str, int | None]] = set()  # (hyper, index read, or None for the whole value)
        self.functions: set[str] = set()
        self.read_variables: set[str] = set()
        self.uses_step = False
        self.depth = 0

    # ---- token helpers
    def advance(self) -> _Token:
        token = self.tok
        self.tok = next(self.tokens)
        return token

    def accept(self, *texts: str) -> _Token | None:
        if self.tok.kind in ("op", "name") and self.tok.text in texts:
            return self.advance()
        return None

    def expect(self, text: str) -> None:
        if self.accept(text) is None:
            raise self.error(f"expected {text!r}")

    def error(self, message: str) -> ExprSyntaxError:
        return ExprSyntaxError(f"{message}, got {_describe(self.tok)}", self.tok.col)

    def nested(self, parse: Callable[[], _Fn]) -> _Fn:
        """Parse a sub-expression one level deeper, refusing pathological nesting."""
        if self.depth >= MAX_DEPTH:
            raise ExprSyntaxError(f"expression is nested more than {MAX_DEPTH} levels deep", self.tok.col)
        self.depth += 1
        try:
            return parse()
        finally:
            self.depth -= 1

    # ---- grammar
    def parse(self) -> _Fn:
        if self.tok.kind == "end":
            raise ExprSyntaxError("empty expression", 1)
        run = self.or_expr()
        if self.tok.kind != "end":
            raise self.error("expected an operator or the end of the expression")
        return run

    def or_expr(self) -> _Fn:
        parts = [self.and_expr()]
        while self.accept("or"):
            parts.append(self.and_expr())
        return _logic(parts, stop=True)

    def and_expr(self) -> _Fn:
        parts = [self.not_expr()]
        while self.accept("and"):
            parts.append(self.not_expr())
        return _logic(parts, stop=False)

    def not_expr(self) -> _Fn:
        if self.accept("not"):
            return _unary(_not, self.nested(self.not_expr))
        return self.comparison()

    def comparison(self) -> _Fn:
        left = self.sum()
        token = self.accept(*_COMPARISONS)
        if token is None:
            return left
        right = self.sum()
        if self.tok.kind == "op" and self.tok.text in _COMPARISONS:
            raise ExprSyntaxError("comparisons cannot be chained; combine them with 'and'", self.tok.col)
        return _chain(left, [(_BINARY[token.text], right)])

    def sum(self) -> _Fn:
        first, rest = self.product(), []
        while token := self.accept("+", "-"):
            rest.append((_BINARY[token.text], self.product()))
        return _chain(first, rest)

    def product(self) -> _Fn:
        first, rest = self.unary(), []
        while token := self.accept("*", "/", "%"):
            rest.append((_BINARY[token.text], self.unary()))
        return _chain(first, rest)

    def unary(self) -> _Fn:
        token = self.accept("-", "+")
        if token is None:
            return self.power()
        return _unary(_numeric(operator.neg if token.text == "-" else operator.pos), self.nested(self.unary))

    def power(self) -> _Fn:
        base = self.atom()
        if self.accept("**"):
            return _chain(base, [(_pow, self.nested(self.unary))])
        return base

    def atom(self) -> _Fn:
        token = self.tok
        if token.kind == "number":
            self.advance()
            return _constant(float(token.text))
        if token.kind == "hyper":
            self.advance()
            return self.hyper(token.text[1:])
        if token.kind == "name" and token.text not in ("and", "or", "not"):
            self.advance()
            return self.name(token)
        if self.accept("("):
            inner = self.nested(self.or_expr)
            self.expect(")")
            return inner
        raise self.error("expected a number, a $hyperparameter, step, a function call or '('")

    def hyper(self, name: str) -> _Fn:
        self.hypers.add(name)
        if not self.accept("["):
            self.reads.add((name, None))
            return _lookup(name, f"${name}", self.text)
        if self.tok.kind != "number" or not self.tok.text.isdigit():
            raise self.error(f"expected a non-negative integer index into ${name}")
        index = int(self.advance().text)
        self.expect("]")
        self.reads.add((name, index))
        return _indexed(name, index, self.text)

    def name(self, token: _Token) -> _Fn:
        if token.text == "step":
            self.uses_step = True
            return _lookup("step", "step", self.text)
        if token.text in ("true", "false"):
            return _constant(token.text == "true")
        if token.text in self.variables:
            self.read_variables.add(token.text)
            return _lookup(_VARIABLE + token.text, token.text, self.text, variable=True)
        if token.text not in _FUNCTIONS:
            what = "function" if self.tok.text == "(" else "name"
            hint = "" if what == "function" else f" (a hyperparameter is written ${token.text})"
            raise ExprSyntaxError(f"unknown {what} {token.text!r}{hint}; {_allowed(self.variables)}", token.col)
        arity, function = _FUNCTIONS[token.text]
        self.functions.add(token.text)
        self.expect("(")
        args = [self.nested(self.or_expr)]
        while self.accept(","):
            args.append(self.nested(self.or_expr))
        self.expect(")")
        if len(args) != arity:
            plural = "s" if arity > 1 else ""
            raise ExprSyntaxError(f"{token.text}() takes {arity} argument{plural}, got {len(args)}", token.col)
        return _apply(function, args)


# ---- public API ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """A parsed expression: its source text, the hyperparameters it reads, and whether it reads ``step``.

    ``reads`` says which part of each hyperparameter: ``("betas", 1)`` for ``$betas[1]``, ``("lr", None)``
    for the whole value."""

    source: str
    hypers: frozenset[str]
    uses_step: bool
    _run: _Fn = field(repr=False, compare=False)
    reads: frozenset[tuple[str, int | None]] = frozenset()
    variables: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    read_variables: frozenset[str] = frozenset()  # the ``variables`` the expression reads

    def evaluate(self, env: Env) -> Any:
        """Value at ``env`` (hyper name -> number, bool, tuple/list, or 0-d tensor; ``"step"`` -> 1-based step).

        Python inputs give Python results (comparisons and logic give bools); any tensor input makes the
        result a tensor. Errors are :class:`ExprEvalError` (a ValueError) naming the expression;
        a missing value is a :class:`MissingHyperError` (also a KeyError).
        """
        try:
            return self._run(env)
        except ExprEvalError:
            raise
        except (ArithmeticError, TypeError, ValueError) as err:
            raise ExprEvalError(f"cannot evaluate {self.source!r}: {err}") from err

    def bound(self, values: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> "Expr":
        """This expression with its variables given values, and ``extra`` environment entries (the map
        block checks its expression early this way)."""
        run, fixed = self._run, {**variables(values), **(extra or {})}
        return Expr(
            self.source, self.hypers, self.uses_step, lambda env: run({**env, **fixed}), self.reads, self.variables,
            self.functions, self.read_variables,
        )

    def __str__(self) -> str:
        return self.source

    def __reduce__(self) -> tuple[Callable[..., Expr], tuple[str, frozenset[str]]]:
        # Closures do not pickle or deep-copy; the source text rebuilds an equal expression.
        return parse_expr, (self.source, self.variables)


def parse_expr(text: str, variables: Iterable[str] = ()) -> Expr:
    """Parse an expression; raises :class:`ExprSyntaxError` pointing at the offending column.

    ``variables`` are extra names the expression may read (values given to :meth:`Expr.evaluate` under
    those names)."""
    names = frozenset(variables)
    parser = _Parser(text, names)
    run = parser.parse()
    return Expr(
        text, frozenset(parser.hypers), parser.uses_step, run, frozenset(parser.reads), names,
        frozenset(parser.functions), frozenset(parser.read_variables),
    )


_STEP_OR_CALL = re.compile(r"\bstep\b|\b[A-Za-z_][A-Za-z0-9_]*\s*\(")


def is_expr(value: object) -> bool:
    """Whether a value looks like an expression: a string with ``$``, the name ``step``, or a call."""
    return isinstance(value, str) and ("$" in value or _STEP_OR_CALL.search(value) is not None)
