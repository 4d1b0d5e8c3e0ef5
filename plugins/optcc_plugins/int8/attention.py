"""Attention fusion for ONNX Runtime: exported multi-head attention → ``MultiHeadAttention``.

Exporters write self-attention as a dozen small ops per layer (torch's legacy exporter with
Hugging Face's ``sdpa`` or ``eager`` attention, the dynamo exporter's decomposition)::

    q = x·Wq + bq ─ Reshape [B,S,N,H] ─ Transpose(0,2,1,3) ─ (×c_q) ┐
    k = x·Wk + bk ─ Reshape [B,S,N,H] ─ Transpose(0,2,3,1) ─ (×c_k) ┴ MatMul ─ (×c) ─ Add(mask) ─ Softmax ─┐
    v = x·Wv + bv ─ Reshape [B,S,N,H] ─ Transpose(0,2,1,3) ─────────────────────────────────────────── MatMul
                                                       out ─ Reshape [B,S,N·H] ─ Transpose(0,2,1,3) ─┘

On a CPU at batch 1 and short sequences those ops cost more in dispatch than they compute,
and ONNX Runtime's own transformer fusions match only some exporter versions. This module
matches the pattern structurally, from each ``Softmax`` outwards, whatever the exporter
wrote around it, and replaces it with one ``com.microsoft.MultiHeadAttention`` node:

- every scalar ``Mul``/``Div`` on the Q, K or score paths folds into the node's ``scale``
  (the product ``c_q·c_k·c``);
- an additive mask (``Add``) or a ``Where(cond, fill, scores)`` mask becomes its float
  ``attention_bias``, broadcast to ``[B, 1, S, T]`` (the only layout the kernel takes);
- the NaN guard some exports put after the Softmax (``Where(IsNaN(p), 0, p)``) is dropped:
  it only acts on rows whose keys are all masked;
- the head count comes from the head-split Reshape.

Where the three projections read the same input through constant 2-D weights, they are
packed into one MatMul (``[D, Dq+Dk+Dv]``, biases concatenated) followed by a ``Split``: one
larger GEMM instead of three (INT8 then quantizes it as one layer). Both rewrites are exact
up to float rounding; the pass that uses them checks that on data.

A Softmax that does not fit is left alone, with the reason (:class:`AttentionReport`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc import Model, static_shapes

logger = logging.getLogger(__name__)

CONTRIB = "com.microsoft"
SCALE_OPS = ("Mul", "Div")
PASS_THROUGH = ("Identity", "Dropout", "Cast")


@dataclass
class AttentionMatch:
    """One matched attention block."""

    softmax: str
    query: gs.Tensor
    key: gs.Tensor
    value: gs.Tensor
    output: gs.Tensor
    heads: int
    scale: float
    bias: gs.Tensor | None = None
    where: tuple[gs.Tensor, gs.Tensor] | None = None  # (condition, fill) of a Where mask


@dataclass
class AttentionReport:
    """What the fusion did: fused blocks by Softmax name, and why others were skipped."""

    fused: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    packed_projections: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"fused": self.fused, "skipped": self.skipped,
                "packed_projections": self.packed_projections}


class _NoMatch(Exception):
    """Raised inside the matcher; the message is the reason reported."""


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (an initializer or a Constant node's output)."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor)
    if node is not None and node.op == "Identity":  # exporters alias shared initializers
        return constant_value(node.inputs[0])
    if node is not None and node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key in ("value_float", "value_int"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
    return None


def _scalar(tensor: gs.Tensor) -> float | None:
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _scale_step(node: gs.Node, data: gs.Tensor) -> float | None:
    """The factor a scalar Mul/Div applies to ``data``, or None when it is not one."""
    if node.op not in SCALE_OPS or len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    if node.op == "Div" and node.inputs[0] is not data:
        return None
    c = _scalar(other)
    if c is None or c == 0.0:
        return None
    return 1.0 / c if node.op == "Div" else c


def _scaled(node: gs.Node) -> tuple[gs.Tensor, float]:
    """``(data, factor)`` for a Mul/Div of a tensor by a scalar constant, else no match."""
    data = next((i for i in node.inputs if _scalar(i) is None), None)
    factor = _scale_step(node, data) if data is not None else None
    if data is None or factor is None:
        raise _NoMatch(f"{node.op} '{node.name}' is not a scale by a scalar constant")
    return data, factor


def _perm(node: gs.Node) -> list[int]:
    return [int(p) for p in node.attrs.get("perm", [])]


def _walk_head_split(
    tensor: gs.Tensor, transposed_key: bool, shapes: dict[str, list[int]]
) -> tuple[gs.Tensor, gs.Node, float]:
    """From a per-head tensor ([B,N,S,H], or [B,N,H,S] for a transposed key) back to the
    [B,S,D] projection: scalar factors, the head Transpose(s), the head-split Reshape."""
    scale = 1.0
    perms: list[list[int]] = []
    t = tensor
    for _ in range(8):
        node = _producer(t)
        if node is None:
            raise _NoMatch("no head-split Reshape before the attention MatMul")
        if node.op in SCALE_OPS:
            t, factor = _scaled(node)
            scale *= factor
        elif node.op in PASS_THROUGH:
            t = node.inputs[0]
        elif node.op == "Transpose":
            perms.append(_perm(node))
            t = node.inputs[0]
        elif node.op == "Reshape" and _same_shape(node, shapes):
            t = node.inputs[0]
        elif node.op == "Reshape" and (swap := _flattened_swap(node, shapes)) is not None:
            perms.append([0, 1, 3, 2])
            t = swap
        elif node.op == "Reshape":
            composed = _compose(perms[::-1])
            want = [0, 2, 3, 1] if transposed_key else [0, 2, 1, 3]
            if composed != want:
                raise _NoMatch(f"head layout {composed} before '{node.name}' is not {want}")
            return node.inputs[0], node, scale
        else:
            raise _NoMatch(f"unexpected {node.op} '{node.name}' on a Q/K/V path")
    raise _NoMatch("Q/K/V path too long")


def _compose(perms: list[list[int]]) -> list[int]:
    """The permutation of applying ``perms`` in order (each as ONNX Transpose's ``perm``)."""
    result = [0, 1, 2, 3]
    for p in perms:
        if len(p) != 4:
            return []
        result = [result[i] for i in p]
    return result


def _flattened_swap(reshape: gs.Node, shapes: dict[str, list[int]]) -> gs.Tensor | None:
    """The dynamo exporter swaps the last two axes of a [B, N, S, H] tensor as
    ``Reshape → [B·N, S, H] → Transpose(0, 2, 1) → Reshape → [B, N, H, S]``. When
    ``reshape`` ends that chain, return the 4-D tensor it started from."""
    out = shapes.get(reshape.outputs[0].name)
    transpose = _producer(reshape.inputs[0])
    if out is None or len(out) != 4 or transpose is None or transpose.op != "Transpose" \
            or _perm(transpose) != [0, 2, 1]:
        return None
    first = _producer(transpose.inputs[0])
    if first is None or first.op != "Reshape":
        return None
    start = shapes.get(first.inputs[0].name)
    flat = shapes.get(first.outputs[0].name)
    if start is None or flat is None or len(start) != 4 or len(flat) != 3:
        return None
    a, b, c, d = start
    if flat != [a * b, c, d] or out != [a, b, d, c]:
        return None
    return first.inputs[0]


def _same_shape(node: gs.Node, shapes: dict[str, list[int]]) -> bool:
    before, after = shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name)
    return before is not None and before == after


def _walk_head_merge(tensor: gs.Tensor, shapes: dict[str, list[int]]) -> gs.Tensor:
    """From the context MatMul's [B,N,S,H] output forward to the merged [B,S,D] tensor."""
    t = tensor
    perms: list[list[int]] = []
    for _ in range(6):
        consumers = [n for n in t.outputs if n.op != "Shape"]  # shape reads die with the block
        if len(consumers) != 1:
            raise _NoMatch("the attention context has several readers")
        node = consumers[0]
        if node.op == "Transpose":
            perms.append(_perm(node))
        elif node.op == "Reshape" and _same_shape(node, shapes):
            pass  # a reshape to the shape it already has
        elif node.op == "Reshape":
            if _compose(perms) != [0, 2, 1, 3]:
                raise _NoMatch("the context is not merged as [B, S, heads*size]")
            return node.outputs[0]
        elif node.op not in PASS_THROUGH:
            raise _NoMatch(f"unexpected {node.op} '{node.name}' after the attention context")
        t = node.outputs[0]
    raise _NoMatch("context path too long")


def _context_matmul(softmax: gs.Node) -> gs.Node:
    """Forward from the Softmax: probabilities → (NaN guard, dropout) → context MatMul."""
    probs = softmax.outputs[0]
    for _ in range(4):
        readers = [n for n in probs.outputs if n.op not in ("IsNaN", "Shape")]
        if len(readers) != 1:
            raise _NoMatch("the attention probabilities have several readers")
        node = readers[0]
        if node.op == "MatMul" and node.inputs[0] is probs:
            return node
        if node.op == "Where" and node.inputs[2] is probs:
            cond = _producer(node.inputs[0])
            if cond is None or cond.op != "IsNaN" or cond.inputs[0] is not probs:
                raise _NoMatch("a Where after the Softmax that is not a NaN guard")
            probs = node.outputs[0]
        elif node.op in PASS_THROUGH:
            probs = node.outputs[0]
        else:
            raise _NoMatch(f"unexpected {node.op} '{node.name}' after the Softmax")
    raise _NoMatch("no context MatMul after the Softmax")


def _score_matmul(
    scores: gs.Tensor,
) -> tuple[gs.Node, float, gs.Tensor | None, tuple[gs.Tensor, gs.Tensor] | None]:
    """Backward from the Softmax input: scores ← mask ← scale ← MatMul(Q, Kᵀ). Returns the
    MatMul, the product of scalar scales on the way, an additive mask or a Where mask."""
    bias: gs.Tensor | None = None
    where: tuple[gs.Tensor, gs.Tensor] | None = None
    scale = 1.0
    t = scores
    for _ in range(6):
        node = _producer(t)
        if node is None:
            break
        if node.op == "MatMul":
            return node, scale, bias, where
        if node.op == "Add" and bias is None and where is None:
            paths = [i for i in node.inputs if _leads_to_matmul(i)]
            if len(paths) != 1:
                raise _NoMatch(f"cannot tell the scores from the mask at '{node.name}'")
            bias = node.inputs[1] if node.inputs[0] is paths[0] else node.inputs[0]
            t = paths[0]
        elif node.op == "Where" and bias is None and where is None:
            if not _leads_to_matmul(node.inputs[2]) or constant_value(node.inputs[1]) is None:
                raise _NoMatch(f"Where '{node.name}' is not a masked fill of the scores")
            where = (node.inputs[0], node.inputs[1])
            t = node.inputs[2]
        elif node.op in SCALE_OPS:
            if bias is not None or where is not None:
                raise _NoMatch("the scores are scaled after the mask")
            t, factor = _scaled(node)
            scale *= factor
        elif node.op in PASS_THROUGH:
            t = node.inputs[0]
        else:
            raise _NoMatch(f"unexpected {node.op} '{node.name}' before the Softmax")
    raise _NoMatch("no score MatMul before the Softmax")


def _match(softmax: gs.Node, shapes: dict[str, list[int]]) -> AttentionMatch:
    axis = int(softmax.attrs.get("axis", -1))
    scores = softmax.inputs[0]
    rank = len(shapes.get(scores.name, [])) or 4
    if axis not in (-1, rank - 1) or rank != 4:
        raise _NoMatch("Softmax is not over the last axis of a 4-D score tensor")

    context_mm = _context_matmul(softmax)
    score_mm, scale, bias, where = _score_matmul(scores)
    query, q_reshape, q_scale = _walk_head_split(score_mm.inputs[0], False, shapes)
    key, _, k_scale = _walk_head_split(score_mm.inputs[1], True, shapes)
    value, _, v_scale = _walk_head_split(context_mm.inputs[1], False, shapes)
    if v_scale != 1.0:
        raise _NoMatch("the value path is scaled")
    output = _walk_head_merge(context_mm.outputs[0], shapes)
    split = shapes.get(q_reshape.outputs[0].name)
    if not split or len(split) != 4:
        raise _NoMatch("the head count is unknown (no shape for the head-split Reshape)")
    heads, size = int(split[2]), int(split[3])
    for tensor in (query, key, value, output):
        shape = shapes.get(tensor.name)
        if shape is None or len(shape) != 3:
            raise _NoMatch(f"'{tensor.name}' is not a 3-D [batch, sequence, hidden] tensor")
    if shapes[query.name][2] != heads * size or shapes[key.name][2] != heads * size:
        raise _NoMatch("query/key widths do not match heads × head size")
    if shapes[value.name][2] % heads:
        raise _NoMatch("the value width is not a multiple of the head count")
    return AttentionMatch(
        softmax=softmax.name, query=query, key=key, value=value, output=output, heads=heads,
        scale=scale * q_scale * k_scale, bias=bias, where=where,
    )


def _leads_to_matmul(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is the score MatMul's output, possibly through scalar scales."""
    t = tensor
    for _ in range(4):
        node = _producer(t)
        if node is None:
            return False
        if node.op == "MatMul":
            return True
        if node.op in SCALE_OPS or node.op in PASS_THROUGH:
            t = next((i for i in node.inputs if _scalar(i) is None), node.inputs[0])
            continue
        return False
    return False


def probe_shapes(model: Model) -> dict[str, list[int]]:
    """Input shapes for a shape probe: dynamic dimensions get distinct small sizes (batch 2,
    then 3, 5, 7, ...) so that a reshape that swaps two of them cannot pass for a no-op."""
    sizes = iter([3, 5, 7, 11, 13, 17, 19, 23])
    named: dict[str, int] = {}
    result = {}
    for tensor in model.inputs:
        dims = []
        for i, d in enumerate(tensor.shape or []):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(2)
            else:
                key = str(d) if d is not None else f"{tensor.name}:{i}"
                if key not in named or d is None:
                    named[key] = next(sizes, 3)
                dims.append(named[key])
        result[tensor.name] = dims
    return result


class _Emitter:
    """Builds the replacement nodes, sharing mask tensors between layers where it can."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, list[int]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.count = 0
        self.bias_cache: dict[tuple[str, str], gs.Tensor] = {}

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}/fused_{self.count}"

    def node(self, op: str, inputs: list[Any], outputs: list[gs.Variable], **attrs: Any) -> None:
        self.graph.nodes.append(gs.Node(op, self.name(op), attrs=attrs, inputs=inputs, outputs=outputs))

    def var(self, base: str, dtype: Any = np.float32) -> gs.Variable:
        return gs.Variable(self.name(base), dtype=dtype)

    def attention_bias(self, m: AttentionMatch) -> gs.Tensor | None:
        """The mask as a float [B, 1 or N, S, T] tensor, as the kernel wants it. A mask that
        already has that shape (in the shape probe, where batch and lengths are distinct
        sizes) is used as it is, and shared by every layer that reads it."""
        if m.bias is None and m.where is None:
            return None
        source = m.bias if m.bias is not None else m.where[0]  # type: ignore[index]
        full = self._full_shape(source, m)
        key = (source.name, "" if full else m.query.name)
        if key in self.bias_cache:
            return self.bias_cache[key]
        if m.where is not None:
            cond, fill = m.where
            bias = self.var("mask_bias")
            zero = gs.Constant(self.name("zero"), np.zeros((), np.float32))
            fill_value = constant_value(fill).astype(np.float32).reshape(())
            fill_c = gs.Constant(self.name("fill"), fill_value)
            self.node("Where", [cond, fill_c, zero], [bias])
        else:
            assert m.bias is not None
            bias = m.bias
        if full:
            self.bias_cache[key] = bias
            return bias
        # Broadcast to [B?, 1, S, T]: S from the query, T from the key.
        s_len = self.var("query_length", np.int64)
        t_len = self.var("key_length", np.int64)
        self.node("Shape", [m.query], [s_len], start=1, end=2)
        self.node("Shape", [m.key], [t_len], start=1, end=2)
        ones = gs.Constant(self.name("ones"), np.ones(2, np.int64))
        target = self.var("bias_shape", np.int64)
        self.node("Concat", [ones, s_len, t_len], [target], axis=0)
        expanded = self.var("attention_bias")
        self.node("Expand", [bias, target], [expanded])
        self.bias_cache[key] = expanded
        return expanded


    def _full_shape(self, mask: gs.Tensor, m: AttentionMatch) -> bool:
        shape, query, key = (self.shapes.get(t.name) for t in (mask, m.query, m.key))
        if shape is None or query is None or key is None or len(shape) != 4:
            return False
        return shape[0] == query[0] and shape[1] in (1, m.heads) and shape[2] == query[1] \
            and shape[3] == key[1]


def fuse_attention(model: Model, *, pack: bool = True) -> AttentionReport:
    """Replace every matching attention block of ``model`` (in place); see the module doc."""
    report = AttentionReport()
    softmaxes = [n for n in model.graph.nodes if n.op == "Softmax"]
    if not softmaxes:
        return report
    shapes, _ = static_shapes(model, probe_shapes(model))
    graph = model.graph
    emit = _Emitter(graph, shapes)
    matches = []
    for softmax in softmaxes:
        try:
            matches.append(_match(softmax, shapes))
        except _NoMatch as exc:
            report.skipped[softmax.name] = str(exc)
    for m in matches:
        bias = emit.attention_bias(m)
        out = m.output
        out.inputs.clear()  # the MHA node now produces the merged context under its old name
        inputs: list[Any] = [m.query, m.key, m.value, gs.Variable.empty(), gs.Variable.empty()]
        if bias is not None:
            inputs.append(bias)
        attrs: dict[str, Any] = {"num_heads": m.heads, "scale": float(m.scale)}
        node = gs.Node("MultiHeadAttention", emit.name(f"{m.softmax}/MultiHeadAttention"),
                       attrs=attrs, inputs=inputs, outputs=[out], domain=CONTRIB)
        graph.nodes.append(node)
        report.fused.append({"softmax": m.softmax, "node": node.name, "heads": m.heads,
                             "scale": m.scale, "mask": "where" if m.where else
                             ("add" if m.bias is not None else None)})
    if matches:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if pack and matches:
        report.packed_projections = pack_projections(model)
    return report


def _projection(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | None:
    """``(MatMul, bias Add)`` when ``tensor = x·W (+ b)`` with constant 2-D W and 1-D b."""
    node = _producer(tensor)
    add = None
    if node is not None and node.op == "Add":
        add = node
        node = next((_producer(i) for i in node.inputs if _producer(i) is not None
                     and _producer(i).op == "MatMul"), None)
        bias = next((v for v in map(constant_value, add.inputs) if v is not None), None)
        if bias is None or bias.ndim != 1:
            return None
    if node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant):
        return None
    if np.asarray(node.inputs[1].values).ndim != 2 or len(node.outputs[0].outputs) != 1:
        return None
    return node, add


def pack_projections(model: Model) -> int:
    """Pack the Q/K/V projections of each ``MultiHeadAttention`` into one MatMul + Split."""
    graph = model.graph
    packed = 0
    for mha in [n for n in graph.nodes if n.op == "MultiHeadAttention"]:
        parts = [_projection(t) for t in mha.inputs[:3]]
        if any(p is None for p in parts):
            continue
        mms = [p[0] for p in parts]  # type: ignore[index]
        adds = [p[1] for p in parts]  # type: ignore[index]
        if len({id(m) for m in mms}) != 3 or len({id(m.inputs[0]) for m in mms}) != 1:
            continue
        if any(a is None for a in adds) != all(a is None for a in adds):
            continue
        weights = [np.asarray(m.inputs[1].values) for m in mms]
        if len({w.dtype for w in weights}) != 1 or len({w.shape[0] for w in weights}) != 1:
            continue
        widths = [int(w.shape[1]) for w in weights]
        base = mms[0].name.rsplit("/", 1)[0] if "/" in mms[0].name else mms[0].name
        x = mms[0].inputs[0]
        w = gs.Constant(f"{base}/qkv_weight_{packed}", np.concatenate(weights, axis=1))
        y = gs.Variable(f"{base}/qkv_{packed}", dtype=weights[0].dtype)
        graph.nodes.append(gs.Node("MatMul", f"{base}/qkv/MatMul_{packed}", inputs=[x, w], outputs=[y]))
        if adds[0] is not None:
            biases = [next(v for v in map(constant_value, a.inputs) if v is not None)
                      for a in adds]  # type: ignore[union-attr]
            b = gs.Constant(f"{base}/qkv_bias_{packed}", np.concatenate(biases))
            yb = gs.Variable(f"{base}/qkv_biased_{packed}", dtype=weights[0].dtype)
            graph.nodes.append(gs.Node("Add", f"{base}/qkv/Add_{packed}", inputs=[y, b], outputs=[yb]))
            y = yb
        outs = list(mha.inputs[:3])
        for t in outs:
            t.inputs.clear()
        if model.opset >= 13:
            sizes = gs.Constant(f"{base}/qkv_split_{packed}", np.asarray(widths, np.int64))
            split = gs.Node("Split", f"{base}/qkv/Split_{packed}", attrs={"axis": -1},
                            inputs=[y, sizes], outputs=outs)
        else:
            split = gs.Node("Split", f"{base}/qkv/Split_{packed}",
                            attrs={"axis": -1, "split": widths}, inputs=[y], outputs=outs)
        graph.nodes.append(split)
        packed += 1
    if packed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return packed
