"""From a spec name, path or text to a validated :class:`Spec`, with every problem located.

Loading never runs code: YAML is composed safely (see :mod:`opdsl.yaml_loader`), blocks are pydantic
models, expressions are parsed by our own small grammar. All problems are collected and raised together
as one :class:`SpecError` whose lines read ``FILE:LINE:COL: message``.
"""
from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from pydantic import ValidationError

from opdsl.blocks import BLOCKS, Block, block_class
from opdsl.compiled.lowering import PlanError, build_program
from opdsl.errors import Location, Problem, SpecError
from opdsl.expr import Expr, ExprSyntaxError
from opdsl.graph import SOURCES, check_graph, parse_ref
from opdsl.plan import decider
from opdsl.scalars import evaluator_at
from opdsl.spec import ENGINE_OPTIONS, MAIN_GRAPH, RESERVED_NAMES, SPEC_VERSION, GraphSpec, OUTPUT_KINDS, Requirement, Spec, lr_problem, requirement_problems
from opdsl.yaml_loader import LocatedDocument, load_yaml_file, load_yaml_text

__all__ = ["load_spec", "shipped_specs", "resolve_spec_path"]

_GRAPH_KEYS = ("nodes", "output", "output_is")


def shipped_specs() -> dict[str, Path]:
    """Name -> path of every spec shipped with opdsl."""
    root = resources.files("opdsl.specs")
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


def resolve_spec_path(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A shipped spec name (``adamw``) or a path to a YAML file."""
    text = str(name_or_path)
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / text)
    candidates.append(Path(text))
    for path in candidates:
        if path.is_file():
            return path
    shipped = shipped_specs()
    if text in shipped:
        return shipped[text]
    if any(path.is_dir() for path in candidates):
        pattern = os.path.join(text, "*.yaml")
        raise SpecError([Problem(Location(text), f"{text!r} is a directory, not a spec file; give its spec files, e.g. {pattern}")])
    hint = difflib.get_close_matches(text, list(shipped), n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise SpecError(
        [
            Problem(
                Location(text),
                f"no spec file or shipped spec named {text!r}{suggestion} (shipped: {', '.join(sorted(shipped))})",
            )
        ]
    )


def load_spec(source: str | os.PathLike | Spec, *, text: str | None = None) -> Spec:
    """Load and validate a spec.

    ``source`` is a shipped spec name (``"adamw"``), a path to a YAML file, or an already-loaded Spec.
    With ``text=...``, ``source`` is only the display name and the YAML comes from the string.
    """
    if isinstance(source, Spec):
        return source
    return _load(source, text, stack=())


def _load(source: str | os.PathLike, text: str | None, stack: tuple[Path, ...]) -> Spec:
    """``stack``: the resolved paths of the files whose `use:` led here, to refuse a cycle."""
    if text is not None:
        doc = load_yaml_text(text, file=str(source))
        base_dir = None
    else:
        path = resolve_spec_path(source)
        doc = load_yaml_file(path)
        base_dir = path.parent
        stack += (path.resolve(),)
    return _SpecBuilder(doc, base_dir, stack).build()


class _SpecBuilder:
    """Turns one located YAML document into a Spec, collecting problems instead of stopping at the first."""

    def __init__(self, doc: LocatedDocument, base_dir: Path | None, stack: tuple[Path, ...]):
        self.doc = doc
        self.base_dir = base_dir
        self.stack = stack
        self.problems: list[Problem] = []
        # What failed validation (and was reported), so the cross-checks can run over the rest without
        # reporting it again: hyperparameters with bad values (None: the whole `hyper`), graphs that could
        # not be built at all, graphs whose `output` is missing.
        self.failed_hyper: set[str] | None = set()
        self.failed_graphs: set[str] = set()
        self.no_output: set[str] = set()

    def problem(self, path: Sequence[str | int], message: str, key: bool = False) -> None:
        where = self.doc.key_where(path) if key else self.doc.where(path)
        self.problems.append(Problem(where, message))

    def build(self) -> Spec:
        data = self.doc.data
        if not isinstance(data, dict):
            self.problem((), "a spec must be a mapping with keys opdsl, name, hyper, nodes, output")
            raise SpecError(self.problems)
        graphs = self._graphs(data)
        top = {k: v for k, v in data.items() if k not in (*_GRAPH_KEYS, "graphs")}
        spec = None
        try:
            spec = Spec.model_validate({**top, "graphs": graphs or {}, "source": self.doc.file})
        except ValidationError as err:
            self._pydantic_problems(err, (), Spec)
            spec = self._salvage(top, graphs or {}, err)
        if spec is not None and graphs is not None:
            spec = self._resolve_uses(spec)
            self._check(spec)
        if self.problems:
            raise SpecError(self.problems)
        assert spec is not None
        return spec

    def _salvage(self, top: dict[str, Any], graphs: dict[str, GraphSpec], err: ValidationError) -> Spec | None:
        """A Spec with every top-level field that failed (already reported) made neutral, so that the graph
        and hyperparameter cross-checks still run: a bad name or version is replaced, a bad hyperparameter
        is dropped (and remembered, see ``failed_hyper``), a bad route becomes an empty one (its index kept)."""
        top = dict(top)
        for item in err.errors():
            key, rest = (item["loc"] or (None,))[0], item["loc"][1:]
            if key == "opdsl":
                top[key] = SPEC_VERSION
            elif key == "name":
                top[key] = "unnamed"
            elif key == "hyper" and rest and isinstance(top.get("hyper"), dict) and self.failed_hyper is not None:
                top["hyper"] = {k: v for k, v in top["hyper"].items() if k != rest[0]}
                self.failed_hyper.add(str(rest[0]))
            elif key == "hyper":
                top.pop(key, None)
                self.failed_hyper = None
            elif key == "groups" and rest and isinstance(rest[0], int) and isinstance(top.get("groups"), list):
                top["groups"] = [{} if i == rest[0] else r for i, r in enumerate(top["groups"])]
            else:  # summary, paper, notes, an unknown key, `groups` that is not a list
                top.pop(key, None)
        try:
            return Spec.model_validate({**top, "graphs": graphs, "source": self.doc.file})
        except ValidationError:
            return None

    def _hyper_failed(self, name: str) -> bool:
        """Whether hyperparameter ``name`` was given but failed validation (so it is reported already)."""
        return self.failed_hyper is None or name in self.failed_hyper

    # ---- graphs and their nodes ---------------------------------------------------------------------
    def _graphs(self, data: dict[str, Any]) -> dict[str, GraphSpec] | None:
        if "nodes" not in data and "output" not in data and "graphs" not in data:
            self.problem((), "the spec has no graph: add `nodes:` and `output:`")
            return None
        has_main = "nodes" in data or "output" in data
        if "output_is" in data and not has_main:
            self.problem(("output_is",), "`output_is` belongs to a graph: give it beside the top-level `nodes` and `output`", key=True)
        extra = data.get("graphs", {})
        if not isinstance(extra, dict):
            self.problem(("graphs",), "`graphs` must map graph names to {nodes, output}")
            extra = {}
        if MAIN_GRAPH in extra:
            self.problem(("graphs", MAIN_GRAPH), f"graph name {MAIN_GRAPH!r} is reserved for the top-level nodes", key=True)
        out: dict[str, GraphSpec] = {}
        main = [(MAIN_GRAPH, (), {k: data[k] for k in _GRAPH_KEYS if k in data})] if has_main else []
        for name, path, body in main + [(g, ("graphs", g), b) for g, b in extra.items()]:
            graph = self._graph(path, body)
            if graph is None:
                self.failed_graphs.add(name)
            else:
                out[name] = graph
                if not isinstance(body.get("output"), str):
                    self.no_output.add(name)
        return out

    def _graph(self, path: tuple, body: Any) -> GraphSpec | None:
        if not isinstance(body, dict):
            self.problem(path, "a graph must be a mapping with `nodes` and `output`")
            return None
        for key in body:
            if key not in _GRAPH_KEYS and path:
                self._unknown_key(path + (key,), key, _GRAPH_KEYS, "graph")
        nodes_raw, output = body.get("nodes"), body.get("output")
        output_is = body.get("output_is", "update")
        if output_is not in OUTPUT_KINDS:
            self.problem(path + ("output_is",), f"`output_is` must be one of {', '.join(OUTPUT_KINDS)}, got {output_is!r}: "
                         "`update` steps param <- param - lr * output, `param` sets param <- output")
            output_is = "update"
        if not isinstance(nodes_raw, dict) or not nodes_raw:
            self.problem(path + ("nodes",), "`nodes` must be a non-empty mapping of node name -> block")
            return None
        if not isinstance(output, str):
            self.problem(path + ("output",) if "output" in body else path, "missing `output:` (the node whose value updates the parameters)")
            output = ""  # the graph is still checked; _check drops what check_graph says about this output
        nodes = {}
        for name, node in nodes_raw.items():
            block = self._node(path + ("nodes", name), name, node)
            if block is None and name not in RESERVED_NAMES:
                block = _Failed.stand_in(node, set(nodes_raw) | set(SOURCES))
            if block is not None:
                nodes[name] = block
        return GraphSpec(nodes=nodes, output=output, output_is=output_is)

    def _node(self, path: tuple, name: str, node: Any):
        if name in RESERVED_NAMES or not name.replace("_", "a").replace("-", "a").isalnum():
            self.problem(path, f"bad node name {name!r}: use letters, digits, '_' or '-' (not {sorted(RESERVED_NAMES)})", key=True)
            return None
        if not isinstance(node, dict):
            self.problem(path, f"node {name!r} must be a mapping like {{block: ema, input: grad, beta: 0.9}}")
            return None
        kind = node.get("block")
        if kind is None:
            self.problem(path, f"node {name!r} has no `block:`; valid blocks: {', '.join(BLOCKS)}")
            return None
        family = BLOCKS.get(kind) if isinstance(kind, str) else None
        if family is not None and None not in family:
            rule = node.get("rule")
            if not isinstance(rule, str) or rule not in family:
                rules = ", ".join(str(r) for r in family)
                hint = difflib.get_close_matches(str(rule), [str(r) for r in family], n=1)
                suggestion = f"did you mean {hint[0]!r}? " if hint else ""
                what = f"unknown rule {rule!r}" if rule is not None else "missing `rule:`"
                self.problem(path + (("rule",) if rule is not None else ()), f"{what} for block {kind!r} in node {name!r}; {suggestion}valid rules: {rules}")
                return None
        cls = block_class(kind, node.get("rule")) if family is not None else None
        if cls is None:
            hint = difflib.get_close_matches(str(kind), list(BLOCKS), n=1)
            suggestion = f"did you mean {hint[0]!r}? " if hint else ""
            self.problem(path + ("block",), f"unknown block {kind!r} in node {name!r}; {suggestion}valid blocks: {', '.join(BLOCKS)}")
            return None
        try:
            return cls.model_validate(node)
        except ValidationError as err:
            self._pydantic_problems(err, path, cls, context=f"node {name!r} ({kind})")
            return None

    # ---- `use:` routes pull in another spec's main graph --------------------------------------------
    def _resolve_uses(self, spec: Spec) -> Spec:
        graphs = dict(spec.graphs)
        hyper = dict(spec.hyper)
        used_require: dict[str, tuple[Requirement, ...]] = {}
        for index, route in enumerate(spec.groups):
            if route.use is None or route.use in graphs:
                continue
            where = self.doc.where(("groups", index, "use"))
            try:
                path = resolve_spec_path(route.use, self.base_dir)
                if path.resolve() in self.stack:
                    chain = " -> ".join(map(str, self.stack + (path.resolve(),)))
                    self.problems.append(Problem(where, f"`use: {route.use}` forms a cycle: {chain}"))
                    continue
                used = _load(path, None, self.stack)
            except SpecError as err:
                # located at this file's `use:` entry, then (for a problem inside the used file) at its own place
                self.problems.extend(
                    Problem(where, f"in `use: {route.use}`: {p}" if p.location.line else p.message) for p in err.problems
                )
                continue
            if len(used.graphs) > 1 or used.groups:
                self.problems.append(Problem(where, f"`use: {route.use}` must name a spec with one graph and no groups"))
                continue
            graphs[route.use] = used.main
            if used.require:
                used_require[route.use] = used.require
            for key, value in used.hyper.items():
                hyper.setdefault(key, value)
        return spec.model_copy(update={"graphs": graphs, "hyper": hyper, "used_require": used_require})

    # ---- cross-checks: graph structure, hyper references, ranges at the defaults --------------------
    def _check(self, spec: Spec) -> None:
        if "lr" not in spec.hyper:
            if not self._hyper_failed("lr"):
                self.problem(("hyper",), "hyper must define `lr`: torch's schedulers and trainers read and set it "
                             "(and a graph's update is param <- param - lr * output, unless it has `output_is: param`)")
        elif problem := lr_problem(spec.hyper["lr"]):
            self.problem(("hyper", "lr"), problem)
        for key in spec.hyper:
            if key in RESERVED_NAMES or not key.isidentifier():
                self.problem(("hyper", key), f"bad hyperparameter name {key!r}", key=True)
            elif key in ENGINE_OPTIONS:
                self.problem(("hyper", key), f"`{key}` is an option of every optimizer (as in torch.optim), not a "
                             "hyperparameter a spec defines: pass maximize=True to the optimizer or set it in a group",
                             key=True)
        for index, route in enumerate(spec.groups):
            if route.graph is not None and route.graph not in spec.graphs and route.graph not in self.failed_graphs:
                self._unknown_ref(("groups", index, "graph"), route.graph, list(spec.graphs), "graph")
            for key in route.hyper:
                if key not in spec.hyper and not self._hyper_failed(key):
                    self._unknown_ref(("groups", index, "hyper", key), key, list(spec.hyper), "hyperparameter", key=True)
            if "lr" in route.hyper and (problem := lr_problem(route.hyper["lr"])):
                self.problem(("groups", index, "hyper", "lr"), problem)
        for index, requirement in enumerate(spec.require):
            self._check_requirement(spec, index, requirement)
        for gname, graph in spec.graphs.items():
            path = () if gname == MAIN_GRAPH else ("graphs", gname)
            used = gname not in (MAIN_GRAPH,) and any(r.use == gname for r in spec.groups)
            locate = (lambda p, _path=path: self.doc.where(_path + tuple(p))) if not used else (
                lambda p, _g=gname: self.doc.where(("groups",))
            )
            for message, sub in check_graph(graph):
                if sub == ("output",) and gname in self.no_output:
                    continue  # reported as missing
                self.problems.append(Problem(locate(sub), message if not used else f"in `use: {gname}`: {message}"))
            if used:  # checked in its own file at its own defaults; here at this spec's values
                for index, route in enumerate(spec.groups):
                    if route.use == gname:
                        env, where = _route_env(spec, route), ("groups", index, "use")
                        for message in requirement_problems(spec.used_require.get(gname, ()), env):
                            self.problem(where, f"in `use: {gname}`: {message}")
                        for nname, block in graph.nodes.items():
                            self._check_at(env, f"`use: {gname}` with this spec's hyperparameters", where, nname, block)
                continue
            envs = [("the spec's default hyperparameters", spec.hyper), *_override_envs(spec, gname)]
            for nname, block in graph.nodes.items():
                if self._check_hyper_refs(spec, path + ("nodes", nname), nname, block):
                    for context, env in envs:
                        self._check_at(env, context, path + ("nodes", nname), nname, block)
            if not self.problems:  # the graph is sound: the `if:` conditions decided at those values leave it runnable
                self._check_plans(gname, graph, path, envs)

    def _check_plans(self, gname: str, graph: GraphSpec, path: tuple, envs: list[tuple[str, Any]]) -> None:
        """The graph as it runs at each of ``envs``: a node switched off there must not be read as ``@prev``
        and must have something to pass through."""
        for context, env in envs:
            try:
                build_program(gname, graph, decider({**env, "step": 1.0}))
            except PlanError as err:
                self.problem(path + ("nodes", err.node) if err.node else path, f"at {context}: {err}")
                return

    def _check_requirement(self, spec: Spec, index: int, requirement: Requirement) -> None:
        """A `require:` entry reads known hyperparameters, not `step`, and holds at the defaults and at
        each group's overrides."""
        where, check = ("require", index, "check"), requirement.check
        if isinstance(check, Expr):
            if check.uses_step:
                self.problem(where, f"`{check}` reads `step`, but a requirement is checked on a group's values, "
                             "once per change, not per step")
                return
            unknown = [ref for ref in sorted(check.hypers) if ref not in spec.hyper]
            for ref in unknown:
                if not self._hyper_failed(ref):
                    self._unknown_ref(where, f"${ref}", [f"${h}" for h in spec.hyper], "hyperparameter")
            if unknown:
                return
        for context, env in [("the spec's default hyperparameters", spec.hyper), *_override_envs(spec)]:
            for message in requirement_problems([requirement], env):
                self.problem(where, f"{message} (at {context})")

    def _check_hyper_refs(self, spec: Spec, path: tuple, nname: str, block) -> bool:
        """Problems for unknown ``$hyper`` references and for conditions that read ``step``; True if none."""
        ok = True
        for field, value in block.expressions():
            label = "if" if field == "when" else field  # `when` is the YAML key `if:`
            where = path + (label.split("[")[0],)
            if field in dict(block.conditions()) and value.uses_step:
                self.problem(where, f"node {nname!r}: `{label}: {value}` reads `step`, "
                             "but conditions are decided once, when the spec is bound to parameters; use `step` in "
                             "a number field instead (e.g. a factor `\"min(1, step / 100)\"`)")
                ok = False
            for ref in sorted(value.hypers):
                if self._hyper_failed(ref):
                    ok = False  # reported where it is defined; no value to check this node at
                elif ref not in spec.hyper:
                    self._unknown_ref(where, f"${ref}", [f"${h}" for h in spec.hyper], "hyperparameter")
                    ok = False
        return ok

    def _check_at(self, hyper: dict, context: str, path: tuple, nname: str, block) -> None:
        """Every field and condition of a node evaluated at one set of hyperparameter values."""
        for field, message in block.problems_over_steps(evaluator_at(hyper)):
            if field is None and "field '" in message:
                field = message.split("field '")[1].split("'")[0]
            self.problem(path + ((field.split("[")[0],) if field else ()), f"node {nname!r}: {message} (at {context})")

    # ---- message helpers ------------------------------------------------------------------------------
    def _unknown_key(self, path: tuple, key: str, valid: Iterable[str], what: str) -> None:
        valid = list(valid)
        hint = difflib.get_close_matches(key, valid, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        self.problem(path, f"unknown field {key!r} in {what}; {suggestion}valid fields: {', '.join(valid)}", key=True)

    def _unknown_ref(self, path: tuple, ref: str, valid: list[str], what: str, key: bool = False) -> None:
        hint = difflib.get_close_matches(ref, valid, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        self.problem(path, f"unknown {what} {ref!r}; {suggestion}defined: {', '.join(valid) or 'none'}", key=key)

    def _pydantic_problems(self, err: ValidationError, base: tuple, model, context: str | None = None) -> None:
        short: set[tuple] = set()  # fixed-length lists already reported as too short
        for item in err.errors():
            path = self._data_path(base, item["loc"])
            field = ".".join(str(p) for p in path[len(base):]) or "value"
            where = f"{context}, field {field!r}" if context else f"{field!r}"
            if item["type"] == "extra_forbidden":
                inside = path[len(base):-1]
                owner = _owner_fields(model, inside)
                what = context or (f"`{_dotted(inside)}`" if inside else "the spec")
                self._unknown_key(path, str(path[-1]), owner, what)
            elif item["type"] == "missing" and item["loc"] and isinstance(item["loc"][-1], int):
                if path not in short:  # an item of a fixed-length list (one report per list)
                    short.add(path)
                    self.problem(path, f"{where} has too few items: item {item['loc'][-1]} (counting from 0) is missing")
            elif item["type"] == "missing":
                self.problem(path[:-1] if len(path) > len(base) else path, f"{where} is required")
            elif isinstance(error := item.get("ctx", {}).get("error"), ExprSyntaxError) and (
                at := self.doc.where_in(path, error.col - 1)
            ):
                self.problems.append(Problem(at, f"{where}: {error.message}"))  # at the column itself
            else:
                message = item["msg"].removeprefix("Value error, ")
                self.problem(path, f"{where}: {message}")

    def _data_path(self, base: tuple, loc: tuple) -> tuple:
        """Map a pydantic error location onto the document (dropping union-member labels)."""
        node = self.doc.data
        for part in base:
            node = node[part] if isinstance(node, (dict, list)) else None
        path = list(base)
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
                path.append(part)
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
                path.append(part)
            elif isinstance(node, dict) and isinstance(part, str) and part not in node and not _is_union_label(part):
                path.append(part)  # a missing or extra key: point at its parent mapping
                node = None
        return tuple(path)


class _Failed(Block):
    """Stands in for a node that failed validation (already reported) so that the graph checks still run over
    the others: the node's name stays known, it keeps the references it makes to known names (so what it reads
    is not dead, and a cycle through it is found), and it has no fields to check."""

    PRIMARY_STATE: ClassVar[str | None] = "state"
    refs: dict[str, str] = {}

    def has_prev(self) -> bool:
        return True  # `name@prev` of a failed node is not a second problem

    @classmethod
    def stand_in(cls, node: Any, known: set[str]) -> "_Failed":
        refs = {}
        for key, value in node.items() if isinstance(node, dict) else ():
            for i, ref in enumerate(value if isinstance(value, list) else [value]):
                if key not in ("block", "rule", "if") and isinstance(ref, str) and parse_ref(ref).node in known:
                    refs[f"{key}[{i}]"] = ref
        return cls(block=str(node.get("block")) if isinstance(node, dict) else "?", refs=refs)

    def inputs(self) -> dict[str, str]:
        return dict(self.refs)


def _is_union_label(part: str) -> bool:
    return any(ch in part for ch in "[]()") or part in {"int", "float", "str", "bool", "tuple", "list", "none"} or part.startswith("function-")


def _route_env(spec: Spec, route: Any) -> dict[str, Any]:
    """The values a route's groups run at (before a user's keyword arguments): the spec's, its overrides."""
    return {**spec.hyper, **route.hyper}


def _override_envs(spec: Spec, graph: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(context, values) of each route that overrides hyperparameters (of ``graph``'s routes, if given);
    a route naming an unknown hyperparameter is reported on its own and skipped here."""
    return [
        (f"the hyper of groups[{i}]", _route_env(spec, route))
        for i, route in enumerate(spec.groups)
        if route.hyper and (graph is None or route.target == graph) and all(k in spec.hyper for k in route.hyper)
    ]


def _dotted(path: tuple) -> str:
    """A document path as written in a spec: ``groups[0].match``."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _owner_fields(model, path: tuple) -> list[str]:
    """Field names of the (sub)model an unknown key was found in."""
    current = model
    for part in path:
        if isinstance(part, int):  # an item of a list field: the list's item model holds it
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            break
        annotation = info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if nxt is None:
            break
        current = nxt
    fields = getattr(current, "model_fields", {})
    return [info.alias or name for name, info in fields.items() if name != "source"]
