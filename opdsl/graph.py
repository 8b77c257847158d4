"""The block graph: references, cycles, dead nodes and execution order, with networkx.

Sources are ``grad`` (this step's gradient), ``param`` (the parameters before this step) and
``grad2`` (a second, independent gradient at the same point: specs that read it make ``step`` call the
closure twice, see :class:`opdsl.Optimizer`). A node
reads another node's output by name, or its primary state *as it was before this step* with
``name@prev``; ``@prev`` reads carry no edge, because that value exists before the step starts.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import networkx as nx

from opdsl.blocks.base import StateKind
from opdsl.spec import GraphSpec

__all__ = ["SOURCES", "Reference", "parse_ref", "build_digraph", "check_graph", "execution_order", "to_mermaid", "to_text"]

SOURCES = ("grad", "param", "grad2")
EXTRA_SOURCES = ("grad2",)  # provided by the optimizer only when a graph reads them
PREV_SUFFIX = "@prev"


@dataclass(frozen=True)
class Reference:
    node: str
    prev: bool = False

    def __str__(self) -> str:
        return self.node + (PREV_SUFFIX if self.prev else "")


def parse_ref(ref: str) -> Reference:
    if ref.endswith(PREV_SUFFIX):
        return Reference(ref[: -len(PREV_SUFFIX)], prev=True)
    return Reference(ref)


def build_digraph(graph: GraphSpec) -> nx.DiGraph:
    """Edges run from each input to the node that reads it (``@prev`` reads are not edges)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(SOURCES)
    for order, (name, block) in enumerate(graph.nodes.items()):
        dag.add_node(name, block=block, order=order)
    for name, block in graph.nodes.items():
        for port, ref in block.inputs().items():
            parsed = parse_ref(ref)
            if not parsed.prev and parsed.node in dag:
                dag.add_edge(parsed.node, name, port=port)
    return dag


def _scalar_value(graph: GraphSpec, ref: Reference) -> bool:
    """Whether a reference reads one value per step: a scalar node, or the previous value of a scalar state."""
    if ref.node in SOURCES:
        return False
    source = graph.nodes.get(ref.node)
    if source is None:
        return True  # an unknown name is reported on its own
    return source.prev_kind() is StateKind.SCALAR if ref.prev else source.scalar_output()


def check_graph(graph: GraphSpec) -> list[tuple[str, tuple]]:
    """Every structural problem as (message, path inside the graph mapping)."""
    problems: list[tuple[str, tuple]] = []
    names = list(graph.nodes)
    for name, block in graph.nodes.items():
        for port, ref in block.inputs().items():
            parsed = parse_ref(ref)
            if parsed.node in SOURCES and not parsed.prev:
                continue
            if parsed.node not in graph.nodes:
                hint = difflib.get_close_matches(parsed.node, names + list(SOURCES), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                problems.append(
                    (f"node {name!r} reads {ref!r}, which is not a node or a source (grad, param, grad2){suggestion}",
                     ("nodes", name, port))
                )
            elif parsed.prev and not graph.nodes[parsed.node].has_prev():
                source = graph.nodes[parsed.node]
                hint = f" ({source.PREV_NEEDS})" if source.PREV_NEEDS else ""
                problems.append(
                    (f"node {name!r} reads {ref!r}, but this {source.block!r} block keeps no state that `@prev` "
                     f"reads{hint}",
                     ("nodes", name, port))
                )
            elif parsed.prev and graph.nodes[parsed.node].prev_kind() is StateKind.TENSOR:
                problems.append(
                    (f"node {name!r} reads {ref!r}, a state with one value per parameter tensor, which no block "
                     "takes as an input (`@prev` reads elementwise or scalar states); read the node's output instead",
                     ("nodes", name, port))
                )
    for name, block in graph.nodes.items():
        for port in block.scalar_ports():
            ref = block.inputs()[port]
            if not _scalar_value(graph, parse_ref(ref)):
                problems.append(
                    (f"node {name!r} is a scalar map, but {port!r} reads {ref!r}, a full-size value; a scalar map reads "
                     "scalar maps, scalar states (`@prev`), $hyperparameters and step", ("nodes", name, port))
                )
    if graph.output not in graph.nodes:
        hint = difflib.get_close_matches(graph.output, names, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        problems.append((f"output {graph.output!r} is not a node{suggestion} (nodes: {', '.join(names)})", ("output",)))
    elif graph.output_is == "param" and _scalar_value(graph, parse_ref(graph.output)):
        problems.append((f"output {graph.output!r} is one value per step, but with `output_is: param` the output is the "
                         "parameters' next value, one per element: it would set every weight to that number", ("output",)))
    dag = build_digraph(graph)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
        problems.append((f"the graph has a cycle: {path} (use `name@prev` to read last step's state)", ("nodes", cycle[0][0])))
    elif graph.output in graph.nodes:
        # the output and the nodes kept to be read from outside (a map with keep: true: ASGD's average)
        roots = {graph.output} | {n for n, block in graph.nodes.items() if block.read_from_outside()}
        live: set[str] = set()
        while roots:  # what reaches a root, then what reaches a node whose state a live node reads as @prev
            live |= set().union(*(nx.ancestors(dag, root) | {root} for root in roots))
            read_prev = {parse_ref(ref).node for n in live if n in graph.nodes for ref in graph.nodes[n].inputs().values()}
            roots = {n for n in read_prev if n in dag} - live  # an unknown name is reported on its own
        for name in names:
            if name not in live:
                problems.append((f"node {name!r} never reaches the output {graph.output!r}; remove it or wire it in",
                                 ("nodes", name)))
    return problems


def execution_order(graph: GraphSpec) -> list[str]:
    """Topological order of the nodes, ties broken by declaration order (deterministic)."""
    dag = build_digraph(graph)
    order = nx.lexicographical_topological_sort(dag, key=lambda n: dag.nodes[n].get("order", -1))
    return [n for n in order if n in graph.nodes]


def to_text(graph: GraphSpec) -> str:
    lines = []
    for name in execution_order(graph):
        block = graph.nodes[name]
        ports = block.inputs()
        params = block.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"block", *block.PORTS})
        inputs = ", ".join(f"{port}={ref}" for port, ref in ports.items())
        extra = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ports)  # `else` is both
        lines.append(f"  {name} = {block.block}({inputs}{', ' if inputs and extra else ''}{extra})")
    lines.append(f"  param <- {graph.output}" if graph.output_is == "param" else f"  param <- param - lr * {graph.output}")
    return "\n".join(lines)


def to_mermaid(graph: GraphSpec, title: str = "") -> str:
    lines = ["flowchart LR"]
    if title:
        lines.insert(0, f"%% {title}")
    lines += ["  grad([grad])", "  param([param])"]
    for name, block in graph.nodes.items():
        lines.append(f'  {name}["{name}: {block.block}"]')
        for port, ref in block.inputs().items():
            parsed = parse_ref(ref)
            arrow = "-.->" if parsed.prev else "-->"
            label = f"{port}{' (prev)' if parsed.prev else ''}"
            lines.append(f"  {parsed.node} {arrow}|{label}| {name}")
    # "params" is a reserved name, so no node of the spec can share this id (a node may be called "update")
    lines.append(f"  {graph.output} --> params([param update])")
    return "\n".join(lines)
