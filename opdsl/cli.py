"""The ``opdsl`` command: validate, show, schema, list, demo, bench.

    opdsl validate specs/*.yaml          exit 0, or 1 with every problem as FILE:LINE:COL: message
    opdsl show adamw [--model pkg.mod:factory]
    opdsl schema > opdsl-spec.schema.json
    opdsl list
    opdsl blocks                         the block reference (docs/blocks.md is its output)
    opdsl demo                           validate + show the shipped specs, train a small model with one
    opdsl bench adamw muon               step-time benchmark (see benchmarks/step.py)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

from opdsl.errors import BindError, SpecError

if TYPE_CHECKING:
    import torch

__all__ = ["main"]


def _cmd_validate(args: argparse.Namespace) -> int:
    from opdsl.loader import load_spec

    failed = 0
    for source in args.files:
        try:
            spec = load_spec(source)
        except SpecError as err:
            failed += 1
            for problem in err.problems:
                print(problem, file=sys.stderr)
        else:
            if not args.quiet:
                print(f"{source}: ok ({spec.name}, {sum(len(g.nodes) for g in spec.graphs.values())} nodes)")
    return 1 if failed else 0


class _ModelError(Exception):
    """A bad ``--model`` value; the message is the one line shown to the user."""


def _load_model(target: str) -> torch.nn.Module:
    """Import ``module:factory`` (the current directory first on sys.path, as ``python -m``) and call it."""
    import torch

    def fail(why: str) -> _ModelError:
        why = " ".join(why.split())  # one line, whatever the factory's message
        return _ModelError(f"--model {target!r}: {why}; expected module:factory (e.g. mypkg.models:build) "
                           "where factory() returns a torch.nn.Module")

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise fail("not of the form module:factory")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise fail(f"cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    finally:
        sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise fail(f"{module_name!r} has no callable {attr!r}" if factory is None else f"{attr!r} is not callable")
    try:
        model = factory()
    except Exception as err:
        raise fail(f"{attr}() raised {type(err).__name__}: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise fail(f"{attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _cmd_show(args: argparse.Namespace) -> int:
    from opdsl.graph import to_mermaid, to_text
    from opdsl.loader import load_spec

    try:
        spec = load_spec(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return 1
    try:
        model = _load_model(args.model) if args.model else None
    except _ModelError as err:
        print(f"opdsl show: error: {err}", file=sys.stderr)
        return 2
    print(f"{spec.name}: {spec.summary}")
    if spec.paper:
        print(f"paper: {spec.paper}")
    print("hyper: " + ", ".join(f"{k}={v}" for k, v in spec.hyper.items()))
    for route_index, route in enumerate(spec.groups):
        target = route.target
        extra = f" with {dict(route.hyper)}" if route.hyper else ""
        print(f"groups[{route_index}]: {route.match.describe()} -> {target}{extra}")
    for requirement in spec.require:
        print(f"require: {requirement.check}  ({requirement.message})")
    for name, graph in spec.graphs.items():
        print(f"\ngraph {name}:\n{to_text(graph)}")
    if args.mermaid:
        for name, graph in spec.graphs.items():
            print(f"\n```mermaid\n{to_mermaid(graph, f'{spec.name} / {name}')}\n```")
    if model is not None:
        from opdsl.optimizer import Optimizer

        try:
            opt = Optimizer(model.named_parameters(), spec, compile=False)
        except (BindError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print("\n" + opt.describe())
        taken = {spec.route_for(name, p.shape)[0] for name, p in model.named_parameters()}
        for index, route in enumerate(spec.groups):
            if index not in taken:
                print(f"note: groups[{index}] ({route.match.describe()}) takes no parameter of this model: nothing "
                      "matches it, or an earlier rule takes what does", file=sys.stderr)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from opdsl.schema import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from opdsl.loader import load_spec, shipped_specs

    for name in sorted(shipped_specs()):
        spec = load_spec(name)
        print(f"{name:24s} {spec.summary}")
    return 0


def _cmd_blocks(args: argparse.Namespace) -> int:
    from opdsl.reference import blocks_markdown

    print(blocks_markdown(), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from opdsl.demo import run_demo

    return run_demo(spec=args.spec, steps=args.steps, compile=not args.eager)


def _bench(rest: Sequence[str]) -> int:
    from opdsl.bench import main as bench_main

    return bench_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdsl", description="optimizers as validated, compiled YAML block graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate spec files; print every problem as FILE:LINE:COL: message")
    p.add_argument("files", nargs="+")
    p.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    p.set_defaults(run=_cmd_validate)
    p = sub.add_parser("show", help="print a spec's graphs as text (and Mermaid), optionally bound to a model")
    p.add_argument("file", help="a spec file or shipped spec name")
    p.add_argument("--model", help="module:factory returning an nn.Module; prints the routing plan")
    p.add_argument("--no-mermaid", dest="mermaid", action="store_false")
    p.set_defaults(run=_cmd_show)
    p = sub.add_parser("schema", help="JSON Schema of the spec format (for editors' YAML completion)")
    p.set_defaults(run=_cmd_schema)
    p = sub.add_parser("list", help="shipped specs with one-line summaries")
    p.set_defaults(run=_cmd_list)
    p = sub.add_parser("blocks", help="the block reference (markdown): every block, rule and field")
    p.set_defaults(run=_cmd_blocks)
    p = sub.add_parser("demo", help="validate and show the shipped specs, then train a small model with one")
    p.add_argument("--spec", default="adamw")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eager", action="store_true", help="skip torch.compile")
    p.set_defaults(run=_cmd_demo)
    # listed for `opdsl --help` only: main() hands everything after `bench` to step.py's own parser, so that
    # `opdsl bench --help` is step.py's and an option may come first (argparse's REMAINDER refuses that)
    sub.add_parser("bench", add_help=False, help="step-time benchmark against torch.optim (args as benchmarks/step.py)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
