"""Which integer inputs of a model are indices into a table, and how many rows it has.

Token ids reach an embedding through ``Gather(table, ids)``, possibly behind shape-only
ops (Cast, Reshape, Unsqueeze, ...). Valid ids lie in ``[0, rows)`` where ``rows`` is the
table's size along the Gather's axis; anything else makes ONNX Runtime fail or, worse,
wrap around. Tools that invent inputs (the ``random`` data source) use this to produce
ids the model can actually look up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optcc.ir.model import Model

# Ops whose first output holds (a rearrangement of) the values of their first input.
_VALUE_PRESERVING = frozenset({
    "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose",
    "Slice", "Tile",
})


@dataclass(frozen=True)
class IndexRange:
    """An integer input whose values index ``table``: valid values are ``[0, limit)``."""

    limit: int
    table: str


def _table_rows(node: gs.Node) -> tuple[int, str] | None:
    data = node.inputs[0]
    if not isinstance(data, gs.Constant) and len(data.inputs) == 1:
        producer = data.inputs[0]  # a quantized table behind DequantizeLinear
        if producer.op == "DequantizeLinear" and isinstance(producer.inputs[0], gs.Constant):
            data = producer.inputs[0]
    if not isinstance(data, gs.Constant):
        return None
    shape = np.asarray(data.values).shape
    axis = int(node.attrs.get("axis", 0))
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape):
        return None
    return int(shape[axis]), data.name


def index_ranges(model: Model) -> dict[str, IndexRange]:
    """For each integer graph input that (through value-preserving ops) indexes constant
    tables with Gather: the smallest table's row count. Inputs not found here have no
    known range."""
    found: dict[str, IndexRange] = {}
    for graph_input in model.graph.inputs:
        if graph_input.dtype is None or np.dtype(graph_input.dtype).kind not in "iu":
            continue
        best: IndexRange | None = None
        frontier, seen = [graph_input], {graph_input.name}
        while frontier:
            tensor = frontier.pop()
            for node in tensor.outputs:
                if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is tensor:
                    rows = _table_rows(node)
                    if rows is not None and (best is None or rows[0] < best.limit):
                        best = IndexRange(*rows)
                elif node.op in _VALUE_PRESERVING and node.inputs and node.inputs[0] is tensor:
                    out = node.outputs[0]
                    if out.name not in seen:
                        seen.add(out.name)
                        frontier.append(out)
        if best is not None:
            found[graph_input.name] = best
    return found
