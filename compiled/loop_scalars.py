"""Scalars computed once before the loops that read them, in the loops' own dtype (CPU).

Hyperparameters reach the compiled step as float64 0-d tensors, so a learning-rate schedule never
recompiles. Inductor inlines everything a loop reads from them into the loop, and the C++ compiler may
not hoist a load past the loop's vector stores (intrinsic vector types alias everything): AdamW's
float32 loop loaded seven float64 scalars per vector of 16 elements, converted each to float32,
computed ``1 - beta`` twice and chose between ``torch.lerp``'s two formulas by ``|w| < 0.5``, all per
vector. This pass gives each such scalar its final form first: the value converted to the dtype the loop
computes in, realised by the small reduction :meth:`BlockContext.once` uses (a maximum over two copies of
itself), which inductor never inlines. The loop then reads one ready value per scalar. On one core of
the AMX Xeon at 10M parameters the elementwise steps and LAMB's took 0.89-0.99x as long, the graphs
dominated by sums or matmuls (scsadamw, coba, muadam) the same (docs/performance.md, "Scalars realised
before the loops").

Only the scalar operands of elementwise ops whose type promotion converts a 0-d operand to the loop's
dtype before computing are touched, so the values computed are the same bits: ``benchmarks/
graph_passes.py`` compares the steps with the pass and without, tests/test_loop_scalars.py the graphs
and AdamW's compiled steps in float32 and bfloat16. GPU loops are left as they are: there a 0-d load is
one broadcast read and the conversion is free beside the memory traffic, while each realised value
would cost a kernel launch.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["ScalarsBeforeLoops"]

aten = torch.ops.aten
prims = torch.ops.prims

# Elementwise ops whose tensor operands all follow torch's type promotion, value operands by position.
_ARITHMETIC: dict[Any, tuple[int, ...] | None] = {  # None: every tensor operand
    op: None
    for op in (
        aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.addcmul.default, aten.addcdiv.default,
        aten.maximum.default, aten.minimum.default, aten.fmax.default, aten.fmin.default,
        aten.pow.Tensor_Tensor, aten.lerp.Tensor, aten.copysign.Tensor, aten.atan2.default,
        aten.clamp.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor,
        aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
    )
}
_ARITHMETIC[aten.where.self] = (1, 2)  # the condition stays bool
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_VIEWS = {aten.view.default, aten.reshape.default, aten.squeeze.default, aten.squeeze.dim, aten.unsqueeze.default,
          aten.select.int, aten.expand.default}
_REDUCTIONS = {aten.amax.default, aten.amin.default, aten.sum.dim_IntList, aten.sum.default, aten.any.dim,
               aten.any.dims, aten.any.default, aten.all.dim, aten.all.default, aten.prod.dim_int}


def _value(node: Any) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is_scalar(node: Any) -> bool:
    value = _value(node)
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _loop_dtype(operands: list[torch.Tensor]) -> torch.dtype | None:
    """The dtype of a loop over these full-size operands; None where the operands hold no float."""
    dtype = operands[0].dtype
    for value in operands[1:]:
        dtype = torch.promote_types(dtype, value.dtype)
    return dtype if dtype.is_floating_point else None


def _read_by_loop(scalar: torch.fx.Node, loop_dtype: torch.dtype) -> torch.fx.Node | None:
    """The value a loop computing in float32 or float64 reads for the operand ``scalar``; None where there is
    nothing to gain or inductor's rounding must stay its own.

    A bfloat16 or float16 loop computes in float32, and inductor drops a scalar's conversion to the low
    precision there: ``(1 - beta).to(torch.bfloat16)`` is read as ``1 - beta`` converted to float32,
    unrounded. So such a conversion is skipped here too, in a loop of that dtype. A scalar with
    low-precision arithmetic anywhere in its making is left as it is: realised in a kernel of its own,
    inductor would round where the loop did not. So is a constant (made from no input), which the C++
    compiler folds into the loop.
    """
    if (scalar.op == "call_function" and scalar.target is prims.convert_element_type.default
            and loop_dtype in _LOW_PRECISION and scalar.args[1] == loop_dtype):
        scalar = scalar.args[0]
    pending, seen, reads_input = [scalar], set(), False
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if _value(node).dtype in _LOW_PRECISION:
            return None
        reads_input |= node.op == "placeholder" or any(not _is_scalar(a) for a in node.all_input_nodes)
        pending += [a for a in node.all_input_nodes if _is_scalar(a)]
    return scalar if reads_input else None


def _ready(node: torch.fx.Node, dtype: torch.dtype) -> bool:
    """Whether the loop would read ``node`` as it is: an input or a reduction's result, of ``dtype``."""
    if _value(node).dtype != dtype:
        return False
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node.op == "placeholder" or (node.op == "call_function" and node.target in _REDUCTIONS)


class ScalarsBeforeLoops(CustomGraphPass):
    """Replace every scalar operand of a full-size elementwise op on the CPU by its value realised before
    the loop, in the dtype the loop computes in."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        realised: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node] = {}
        for node in list(graph.nodes):
            positions = _ARITHMETIC.get(node.target, ()) if node.op == "call_function" else ()
            out = _value(node)
            if positions == () or not isinstance(out, torch.Tensor) or out.numel() <= 1 or out.device.type != "cpu":
                continue
            operands = [a for a in node.args if isinstance(_value(a), torch.Tensor)]
            full = [_value(a) for a in operands if not _is_scalar(a)]
            loop_dtype = _loop_dtype(full) if full else None
            if loop_dtype is None:
                continue
            dtype = torch.float32 if loop_dtype in _LOW_PRECISION else loop_dtype  # inductor upcasts those
            args = list(node.args)
            for i, arg in enumerate(args):
                if not _is_scalar(arg):
                    continue
                wanted = dtype if positions is None or i in positions else torch.bool  # where's condition: bool
                source = _read_by_loop(arg, loop_dtype)
                if source is None or _value(source).dtype.is_complex or _ready(source, wanted):
                    continue
                args[i] = self._realise(graph, source, wanted, realised)
            node.args = tuple(args)
        graph.lint()

    @staticmethod
    def _realise(graph: torch.fx.Graph, scalar: torch.fx.Node, dtype: torch.dtype,
                 realised: dict[tuple[torch.fx.Node, torch.dtype], torch.fx.Node]) -> torch.fx.Node:
        """``scalar`` in ``dtype``, as a reduction over two copies of itself, made right after ``scalar``."""
        key = (scalar, dtype)
        if key not in realised:
            made = [scalar]

            def then(target: Any, *args: Any) -> torch.fx.Node:
                with graph.inserting_after(made[-1]):
                    made.append(_call(graph, target, args))
                return made[-1]

            value = scalar if _value(scalar).dtype == dtype else then(prims.convert_element_type.default, scalar, dtype)
            row = then(aten.unsqueeze.default, value, 0)
            pair = then(aten.cat.default, [row, row])
            realised[key] = then(aten.any.dim, pair, 0) if dtype == torch.bool else then(aten.amax.default, pair, [0])
        return realised[key]

    def uuid(self) -> str:  # the source's hash: a changed pass never reuses a step cached before
        return get_hash_for_files((__file__,), "ScalarsBeforeLoops").hex()


def _call(graph: torch.fx.Graph, target: Any, args: tuple[Any, ...]) -> torch.fx.Node:
    """A new node, inserted where the graph inserts now, with its fake value for inductor's later passes."""
    node = graph.call_function(target, args)
    fake = torch.fx.node.map_arg(args, lambda a: a.meta["val"])
    node.meta["val"] = target(*fake)
    return node
