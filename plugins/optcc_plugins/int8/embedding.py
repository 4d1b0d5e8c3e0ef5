"""INT8 embedding tables: ``Gather`` on a large constant table, stored as INT8 per row.

In an encoder the token-embedding table is often the largest tensor in the file (all-MiniLM
-L6-v2: 30522 × 384, 47 MB of its 90). A Gather only copies the rows it is asked for, so the
table can stay INT8 in the file and in memory, with one float scale per row::

    rows  = Gather(table_int8, ids)                # [..., D] int8
    scale = Gather(row_scales, ids)                # [..., 1] float
    out   = Cast(rows, float) · scale              # the dequantized rows

Per row: ``scale_r = max|table_r| / 127`` (stored as float16 where it fits), symmetric (zero point 0, so an exact zero stays
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


def _row_scales(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scales ``max|row| / 127`` as used (float32) and as stored: float16, rounded
    up so that no value clips, where every non-zero row's scale fits float16's normal
    range (half the bytes); float32 otherwise."""
    amax = np.abs(values).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax, 1.0) / 127.0
    half = scale.astype(np.float16)
    low = half.astype(np.float32) < scale
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    tiny, big = np.finfo(np.float16).tiny, np.finfo(np.float16).max / 2
    if np.all((scale >= tiny) & (scale <= big)):
        return half.astype(np.float32), half
    return scale.astype(np.float32), scale.astype(np.float32)


def quantize_embeddings(model: Model, min_bytes: int) -> list[EmbeddingTable]:
    """Quantize every Gather (axis 0) that reads a 2-D float32 constant of ``min_bytes`` or
    more, in place; returns what was done per table."""
    graph = model.graph
    done: list[EmbeddingTable] = []
    shared: dict[str, tuple[gs.Constant, gs.Tensor]] = {}
    scale_bytes: dict[str, int] = {}
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
            scale, stored = _row_scales(values)
            q = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
            scale_tensor: gs.Tensor = gs.Constant(f"{table.name}_row_scale", stored)
            if stored.dtype == np.float16:  # ONNX Runtime folds this Cast when it loads
                scale_tensor = gs.Variable(f"{table.name}_row_scale_f32", dtype=np.float32)
                graph.nodes.append(gs.Node(
                    "Cast", f"{table.name}_row_scale_cast", attrs={"to": 1},
                    inputs=[gs.Constant(f"{table.name}_row_scale", stored)],
                    outputs=[scale_tensor]))
            shared[table.name] = (gs.Constant(f"{table.name}_int8", q), scale_tensor)
            scale_bytes[table.name] = stored.dtype.itemsize
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
            bytes_before=int(values.nbytes),
            bytes_after=int(q_table.values.nbytes + values.shape[0] * scale_bytes[table.name]),
        ))
    if done:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done
