"""Human-readable plans: which parameter goes to which graph, by which rule, with what state."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from opdsl.optimizer import Optimizer

__all__ = ["describe_optimizer", "format_bytes"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _rule_of(opt: "Optimizer", name: str | None, shape) -> str:
    index, route = opt.spec.route_for(name, shape)
    if route is None:
        return "default"
    label = f" ({route.label})" if route.label else ""
    return f"groups[{index}]{label}: {route.match.describe()}"


def describe_optimizer(opt: "Optimizer") -> str:
    rows = []
    total_params = total_state = 0
    for bucket in opt._buckets:
        group = opt.param_groups[bucket.group_index]
        for i, p in enumerate(bucket.flat.params):
            name = opt._names.get(id(p))
            state = bucket.state_bytes(i)
            total_params += p.numel()
            total_state += state
            rows.append(
                (
                    name or f"params[{bucket.group_index}][{bucket.positions[i]}]",  # its place in param_groups
                    "x".join(map(str, p.shape)) or "scalar",
                    f"{bucket.group_index}",
                    group["graph"],
                    _rule_of(opt, name, p.shape),
                    format_bytes(state),
                )
            )
    header = ("parameter", "shape", "group", "graph", "rule", "state")
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [f"spec {opt.spec.name!r} (digest {opt.spec.digest}): {len(rows)} parameters, {total_params:,} values"]
    for gi, group in enumerate(opt.param_groups):
        values = opt._group_values(group)
        out.append(f"  param_groups[{gi}] graph={group['graph']}: {values}")
    disabled = {b.program.graph_name: b.program.disabled for b in opt._buckets if b.program.disabled}
    for graph, nodes in disabled.items():
        out.append(f"  graph {graph!r}: nodes off by their `if:`: {', '.join(nodes)}")
    out += ["", line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    per_param = total_state / max(total_params, 1)
    out.append(f"\nstate: {format_bytes(total_state)} in total, {per_param:.2f} bytes per parameter value")
    out.append("buffers (docs/design.md, \"bucket\"):")
    out += [f"  {_bucket_line(b)}" for b in opt._buckets]
    return "\n".join(out)


def _bucket_line(bucket) -> str:
    """How one bucket lays out its parameters: one flat buffer, or tiles with their padding."""
    flat = bucket.flat
    shapes = len({p.shape for p in flat.params})
    where = f"group {bucket.group_index} graph {bucket.graph}: {len(flat.params)} parameters of {shapes} shape(s)"
    if flat.tile == 1:
        return f"{where}, one flat buffer"
    padding = flat.numel - sum(p.numel() for p in flat.params)
    return f"{where}, tiled by {flat.tile} ({padding:,} padding values, {padding / flat.numel:.1%})"
