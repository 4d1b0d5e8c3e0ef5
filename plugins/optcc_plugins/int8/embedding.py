"""INT8 embedding tables: ``Gather`` on a large constant table, stored as INT8 per row.

In an encoder the token-embedding table is often the largest tensor in the file (all-MiniLM
-L6-v2: 30522 × 384, 47 MB of its 90). A Gather only copies the rows it is asked for, so the
table can stay INT8 in the file and in memory, with one float scale per row::

    rows  = Gather(table_int8, ids)                # [..., D] int8
    scale = Gather(row_scales, ids)                # [..., 1] float
    out   = Cast(rows, float) · scale              # the dequantized rows

Per row: ``scale_r = max|table_r| / 127``, rounded up to a one-byte code (compact scales,
4.4 % apart, that ONNX Runtime decodes to float32 once, when it loads the model: a row keeps
at least 121 of its 127 levels), symmetric (zero point 0, so an exact zero stays
zero). Rounding moves each value by at most half a step of its own row, which a per-tensor
scale could not promise for rows of very different norms. Standard ONNX ops only, so every
runtime runs it; ONNX Runtime's cost is two small Gathers, a Cast and a Mul on the looked-up
rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc import Model

from .graph import compact_positive, decode_positive, namer, positive_constant

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingTable:
    node: str
    table: str
    rows: int
    width: int
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def quantize_embeddings(model: Model, min_bytes: int) -> list[EmbeddingTable]:
    """Quantize every Gather (axis 0) that reads a 2-D float32 constant of ``min_bytes`` or
    more, in place; returns what was done per table."""
    graph = model.graph
    done: list[EmbeddingTable] = []
    shared: dict[str, tuple[gs.Constant, gs.Tensor]] = {}
    fresh = namer(graph)
    for node in list(graph.nodes):
        if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0:
            continue
        table = node.inputs[0]
        if not isinstance(table, gs.Constant):
            continue
        values = np.asarray(table.values)
        if values.dtype != np.float32 or values.ndim != 2 or values.nbytes < min_bytes:
            continue
        if table.name not in shared:
            amax = np.abs(values).max(axis=1, keepdims=True)
            codes, base = compact_positive(np.where(amax > 0, amax, amax.max() or 1.0) / 127.0,
                                           round_up=True)
            scale = decode_positive(codes, base)
            q = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
            scale_tensor = positive_constant(graph, fresh, f"{table.name}_row_scale", codes, base)
            shared[table.name] = (gs.Constant(fresh(f"{table.name}_int8"), q), scale_tensor)
        q_table, scales = shared[table.name]
        ids = node.inputs[1]
        out = node.outputs[0]
        base = node.name
        rows = gs.Variable(f"{base}_int8_rows", dtype=np.int8)
        row_scale = gs.Variable(f"{base}_row_scale", dtype=np.float32)
        rows_f = gs.Variable(f"{base}_float_rows", dtype=np.float32)
        node.outputs = []
        graph.nodes += [
            gs.Node("Gather", f"{base}_int8", attrs={"axis": 0}, inputs=[q_table, ids], outputs=[rows]),
            gs.Node("Gather", f"{base}_scale", attrs={"axis": 0}, inputs=[scales, ids],
                    outputs=[row_scale]),
            gs.Node("Cast", f"{base}_cast", attrs={"to": 1}, inputs=[rows], outputs=[rows_f]),
            gs.Node("Mul", f"{base}_dequantize", inputs=[rows_f, row_scale], outputs=[out]),
        ]
        node.inputs = []
        done.append(EmbeddingTable(
            node=base, table=table.name, rows=int(values.shape[0]), width=int(values.shape[1]),
            bytes_before=int(values.nbytes), bytes_after=int(q_table.values.nbytes + values.shape[0]),
        ))
    if done:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done
