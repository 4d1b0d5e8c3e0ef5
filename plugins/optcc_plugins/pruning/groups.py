"""Channel dependency analysis on an ONNX graph.

Every output channel of a weighted layer (Conv, Gemm, MatMul with a constant weight) gets
an *id*. Ids flow forward through the graph with the tensors that carry them:

- elementwise ops (activations, BatchNormalization, Add/Mul/... between two carrying
  tensors) couple the ids position by position: a residual ``Add`` makes the channels of
  both branches one unit;
- ``Concat`` on the channel axis concatenates the id lists (offsets); ``Split`` slices them;
- ``Flatten`` repeats each id over the flattened spatial positions (``Flatten → Gemm``);
- a depthwise Conv passes ids through (a channel is its own group);
- a ``Reshape`` that splits the channel axis into ``(heads, head_size)`` turns each head
  into one unit (all its ids are coupled); a MatMul between two activations couples heads
  on the batch axes; the ``Reshape`` back merges them again. This is multi-head attention.

Coupled ids form *classes* (union-find); a class is what gets pruned, everywhere at once.
Consumers that *absorb* channels (the input axis of a Conv/Gemm/MatMul weight) end a path.
A class that reaches something unknown — an op without a rule, a graph output,
normalization over the channel axis (LayerNorm, Softmax), a reduction over it — is
*blocked* and never pruned, with the reason recorded. Every constant that must be sliced
when a class goes (weights, biases, BatchNorm vectors, broadcast constants) is recorded
with its axis and the id at each position; so are the attributes and shape constants that
must change (``group`` of a depthwise Conv, Split sizes, Reshape targets).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc import Model

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Erf", "Gelu", "Softplus", "Softsign", "Clip", "Identity", "Dropout", "Cast", "Neg", "Abs",
    "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Mish", "Celu",
    "IsInf", "IsNaN", "Not",
}
BINARY = {
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
}
SPATIAL = {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize",
    "Upsample", "GlobalLpPool",
}


@dataclass
class ParamSlice:
    """A constant sliced along ``axis``; ``ids[i]`` is the channel id of position ``i``."""

    tensor: gs.Constant
    axis: int
    ids: list[int]
    role: str  # "out" (a layer's own channels), "in" (a consumer's columns), "vector"
    node: gs.Node | None = None  # the node reading the constant (to unshare it if needed)


@dataclass
class Analysis:
    """The result of the analysis: classes, what to slice, and why some are blocked."""

    parent: list[int] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)  # root -> reason (after finalize)
    block_requests: list[tuple[int, str]] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    source_of: dict[int, str] = field(default_factory=dict)  # id -> layer that created it
    tensor_ids: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    group_attrs: list[tuple[gs.Node, list[int]]] = field(default_factory=list)
    split_fixups: list[tuple[gs.Node, list[list[int]]]] = field(default_factory=list)
    reshape_fixups: list[tuple[gs.Node, int, list[int], int]] = field(default_factory=list)

    # -- union-find
    def new_ids(self, n: int, source: str) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        for i in range(start, start + n):
            self.source_of[i] = source
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, ids: list[int], reason: str) -> None:
        for i in ids:
            self.block_requests.append((i, reason))

    def finalize(self) -> None:
        self.blocked = {}
        for i, reason in self.block_requests:
            self.blocked.setdefault(self.find(i), reason)

    def classes(self) -> dict[int, list[int]]:
        members: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            members[self.find(i)].append(i)
        return dict(members)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class ChannelAnalyzer:
    """Walks the graph once in topological order and fills an :class:`Analysis`."""

    def __init__(self, model: Model, shapes: dict[str, list[int]]) -> None:
        self.model = model
        self.shapes = shapes
        self.a = Analysis()

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def constant_value(t: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor: an initializer or a Constant node's output."""
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        if t.inputs and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
            return np.asarray(t.inputs[0].attrs["value"].values)
        return None

    def shape(self, t: gs.Tensor) -> list[int] | None:
        value = self.constant_value(t)
        if value is not None:
            return list(value.shape)
        shape = self.shapes.get(t.name)
        return list(shape) if shape is not None else None

    def rank(self, t: gs.Tensor) -> int | None:
        shape = self.shape(t)
        if shape is None and t.shape is not None:
            return len(t.shape)
        return len(shape) if shape is not None else None

    def ids(self, t: gs.Tensor) -> dict[int, list[int]]:
        return self.a.tensor_ids.get(t.name, {})

    def set_ids(self, t: gs.Tensor, ids: dict[int, list[int]]) -> None:
        if ids:
            self.a.tensor_ids[t.name] = ids

    def block_all(self, t: gs.Tensor, reason: str) -> None:
        for ids in self.ids(t).values():
            self.a.block(ids, reason)

    # ----------------------------------------------------------------- main walk
    def run(self) -> Analysis:
        graph = self.model.graph
        graph.toposort()
        for node in graph.nodes:
            carrying = [t for t in node.inputs if t.name in self.a.tensor_ids]
            handler = getattr(self, f"op_{node.op}", None)
            if node.op in UNARY:
                handler = self.op_unary
            elif node.op in BINARY:
                handler = self.op_binary
            elif node.op in SPATIAL:
                handler = self.op_spatial
            if node.op in {"Conv", "Gemm", "MatMul"}:
                self.weighted(node)
                continue
            if not carrying:
                continue
            if handler is None:
                for t in carrying:
                    self.block_all(t, f"read by {node.op} '{node.name}', which has no pruning rule")
                continue
            handler(node)
        for out in graph.outputs:
            self.block_all(out, f"reaches the graph output '{out.name}'")
        self.a.finalize()
        return self.a

    # ----------------------------------------------------------------- weighted layers
    def weighted(self, node: gs.Node) -> None:
        x = node.inputs[0]
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(w, gs.Constant) or np.asarray(w.values).dtype.kind != "f":
            # Activation x activation (attention scores) or a quantized layer.
            if node.op == "MatMul" and isinstance(w, gs.Variable):
                self.activation_matmul(node)
            else:
                for t in node.inputs:
                    self.block_all(t, f"read by {node.op} '{node.name}' without a float constant weight")
            return
        wv = np.asarray(w.values)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.op == "Conv":
            groups = int(node.attrs.get("group", 1))
            in_ids = self.ids(x).get(1)
            if groups > 1:
                cin = wv.shape[1] * groups
                if groups == cin and wv.shape[0] == cin and in_ids is not None:
                    # Depthwise: every channel is its own group; ids pass through.
                    self.a.slices.append(ParamSlice(w, 0, in_ids, "vector", node))
                    if isinstance(bias, gs.Constant):
                        self.a.slices.append(ParamSlice(bias, 0, in_ids, "vector", node))
                    self.a.group_attrs.append((node, in_ids))
                    self.set_ids(node.outputs[0], {1: in_ids})
                    return
                if in_ids is not None:
                    self.a.block(in_ids, f"grouped Conv '{node.name}' (groups={groups})")
                return  # output channels of a grouped conv are not pruned either
            if in_ids is not None:
                self.a.slices.append(ParamSlice(w, 1, in_ids, "in", node))
            out = self.a.new_ids(wv.shape[0], node.name)
            self.a.slices.append(ParamSlice(w, 0, out, "out", node))
            if isinstance(bias, gs.Constant):
                self.a.slices.append(ParamSlice(bias, 0, out, "out", node))
            self.set_ids(node.outputs[0], {1: out})
            return
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                self.block_all(x, f"Gemm '{node.name}' with transA")
                return
            trans_b = int(node.attrs.get("transB", 0))
            in_axis, out_axis = (1, 0) if trans_b else (0, 1)
            in_ids = self.ids(x).get(1)
            if in_ids is not None:
                self.a.slices.append(ParamSlice(w, in_axis, in_ids, "in", node))
            out = self.a.new_ids(wv.shape[out_axis], node.name)
            self.a.slices.append(ParamSlice(w, out_axis, out, "out", node))
            if isinstance(bias, gs.Constant) and bias.shape and bias.shape[-1] == len(out):
                self.a.slices.append(ParamSlice(bias, len(bias.shape) - 1, out, "out", node))
            self.set_ids(node.outputs[0], {1: out})
            return
        # MatMul x @ W (W 2-D)
        rank = self.rank(x)
        if wv.ndim != 2 or rank is None:
            self.block_all(x, f"MatMul '{node.name}' with a {wv.ndim}-D weight")
            return
        x_ids = self.ids(x)
        last = rank - 1
        for axis, ids in x_ids.items():
            if axis == last:
                self.a.slices.append(ParamSlice(w, 0, ids, "in", node))
            else:
                self.a.block(ids, f"MatMul '{node.name}' reads them on a non-contracted axis")
        out = self.a.new_ids(wv.shape[1], node.name)
        self.a.slices.append(ParamSlice(w, 1, out, "out", node))
        self.set_ids(node.outputs[0], {last: out})

    def activation_matmul(self, node: gs.Node) -> None:
        """A @ B between activations: couple contracted and batch axes; carry the rest."""
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = self.rank(a), self.rank(b)
        if ra is None or rb is None or ra < 2 or rb < 2:
            for t in (a, b):
                self.block_all(t, f"MatMul '{node.name}' of unknown rank")
            return
        ia, ib = self.ids(a), self.ids(b)
        out_rank = max(ra, rb)
        out: dict[int, list[int]] = {}
        # Contracted: a's last axis with b's second-to-last.
        ca, cb = ia.get(ra - 1), ib.get(rb - 2)
        if ca is not None or cb is not None:
            if ca is None or cb is None or len(ca) != len(cb):
                for ids in (ca, cb):
                    if ids is not None:
                        self.a.block(ids, f"contracted by MatMul '{node.name}' with an untracked side")
            else:
                for x, y in zip(ca, cb, strict=True):
                    self.a.union(x, y)
        # Batch axes (aligned from the right, excluding the last two).
        shape_a, shape_b = self.shape(a), self.shape(b)
        for k in range(out_rank - 2):
            axa, axb = k - (out_rank - ra), k - (out_rank - rb)
            ida = ia.get(axa) if axa >= 0 else None
            idb = ib.get(axb) if axb >= 0 else None
            if ida is not None and idb is not None and len(ida) == len(idb):
                for x, y in zip(ida, idb, strict=True):
                    self.a.union(x, y)
                out[k] = ida
            elif ida is not None or idb is not None:
                tracked = ida if ida is not None else idb
                other_shape, other_axis = (shape_b, axb) if ida is not None else (shape_a, axa)
                size = (other_shape[other_axis] if other_shape is not None and other_axis >= 0
                        else 1 if other_axis < 0 else None)
                if size != 1:  # the other side has these channels too, but untracked
                    self.a.block(tracked, f"MatMul '{node.name}' pairs them with an untracked operand")
                    continue
                out[k] = tracked  # type: ignore[assignment]
        if ra - 2 in ia:
            out[out_rank - 2] = ia[ra - 2]
        if rb - 1 in ib:
            out[out_rank - 1] = ib[rb - 1]
        self.set_ids(node.outputs[0], out)

    # ----------------------------------------------------------------- pass-through ops
    def op_unary(self, node: gs.Node) -> None:
        ids = self.ids(node.inputs[0])
        for extra in node.inputs[1:]:
            if isinstance(extra, gs.Constant) and extra.shape and int(np.prod(extra.shape)) > 1:
                rank = self.rank(node.inputs[0]) or 0
                self._slice_broadcast_constant(extra, ids, rank, node)
        self.set_ids(node.outputs[0], ids)

    def op_spatial(self, node: gs.Node) -> None:
        ids = self.ids(node.inputs[0])
        for axis, channel in ids.items():
            if axis != 1:
                self.a.block(channel, f"{node.op} '{node.name}' acts on their axis")
        self.set_ids(node.outputs[0], {k: v for k, v in ids.items() if k == 1})

    def op_BatchNormalization(self, node: gs.Node) -> None:
        ids = self.ids(node.inputs[0]).get(1)
        if ids is None:
            self.block_all(node.inputs[0], f"BatchNormalization '{node.name}' on another axis")
            return
        for p in node.inputs[1:5]:
            if isinstance(p, gs.Constant):
                self.a.slices.append(ParamSlice(p, 0, ids, "vector", node))
            else:
                self.a.block(ids, f"BatchNormalization '{node.name}' has non-constant parameters")
        self.set_ids(node.outputs[0], {1: ids})

    op_InstanceNormalization = op_BatchNormalization

    def _slice_broadcast_constant(
        self, const: gs.Constant, ids: dict[int, list[int]], rank: int, node: gs.Node
    ) -> None:
        shape = list(const.shape)
        offset = rank - len(shape)
        for axis, channel in ids.items():
            caxis = axis - offset
            if 0 <= caxis < len(shape) and shape[caxis] == len(channel):
                self.a.slices.append(ParamSlice(const, caxis, channel, "vector", node))
            elif 0 <= caxis < len(shape) and shape[caxis] not in (1, len(channel)):
                self.a.block(channel, f"{node.op} '{node.name}' broadcasts a constant of another size")

    def op_binary(self, node: gs.Node) -> None:
        ranks = [self.rank(t) for t in node.inputs]
        if any(r is None for r in ranks):
            for t in node.inputs:
                self.block_all(t, f"{node.op} '{node.name}' of unknown rank")
            return
        out_rank = max(ranks)  # type: ignore[type-var]
        merged: dict[int, list[int]] = {}
        for t, r in zip(node.inputs, ranks, strict=True):
            for axis, ids in self.ids(t).items():
                oaxis = axis + (out_rank - r)
                if oaxis in merged:
                    if len(merged[oaxis]) != len(ids):
                        self.a.block(ids + merged[oaxis], f"{node.op} '{node.name}' mixes sizes")
                        continue
                    for x, y in zip(merged[oaxis], ids, strict=True):
                        self.a.union(x, y)
                else:
                    merged[oaxis] = ids
        for t, r in zip(node.inputs, ranks, strict=True):
            if self.ids(t):
                continue
            shape = self.shape(t)
            for oaxis, ids in merged.items():
                axis = oaxis - (out_rank - r)
                if axis < 0 or shape is None or axis >= len(shape):
                    if shape is None and axis >= 0:
                        self.a.block(ids, f"{node.op} '{node.name}' with an input of unknown shape")
                    continue
                size = shape[axis]
                if size == 1:
                    continue
                if isinstance(t, gs.Constant) and size == len(ids):
                    self.a.slices.append(ParamSlice(t, axis, ids, "vector", node))
                else:
                    self.a.block(ids, f"{node.op} '{node.name}' combines them with '{t.name}', "
                                 "which has no channel ids")
        self.set_ids(node.outputs[0], merged)

    def op_Concat(self, node: gs.Node) -> None:
        rank = self.rank(node.outputs[0]) or self.rank(node.inputs[0])
        if rank is None:
            for t in node.inputs:
                self.block_all(t, f"Concat '{node.name}' of unknown rank")
            return
        axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
        parts: list[int] = []
        for t in node.inputs:
            ids = self.ids(t)
            for other, channel in ids.items():
                if other != axis:
                    self.a.block(channel, f"Concat '{node.name}' on another axis")
            if axis in ids:
                parts.extend(ids[axis])
            else:
                shape = self.shape(t)
                if shape is None:
                    for ids_ in self.ids(t).values():
                        self.a.block(ids_, f"Concat '{node.name}' with an input of unknown shape")
                    self.block_all(node.inputs[0], "unknown Concat size")
                    return
                fixed = self.a.new_ids(shape[axis], f"{node.name}:fixed")
                self.a.block(fixed, f"come from '{t.name}', which is not prunable")
                parts.extend(fixed)
        self.set_ids(node.outputs[0], {axis: parts})

    def op_Split(self, node: gs.Node) -> None:
        rank = self.rank(node.inputs[0])
        ids = self.ids(node.inputs[0])
        axis = _norm_axis(int(node.attrs.get("axis", 0)), rank or 0)
        channel = ids.get(axis)
        if channel is None:
            for other in ids.values():
                self.a.block(other, f"Split '{node.name}' on another axis")
            return
        explicit = "split" in node.attrs or (
            len(node.inputs) > 1 and self.constant_value(node.inputs[1]) is not None
        )
        if not explicit:
            self.a.block(channel, f"Split '{node.name}' into equal parts (sizes would diverge)")
            return
        sizes = [self.shapes.get(o.name, [None] * (axis + 1))[axis] for o in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != len(channel):  # type: ignore[arg-type]
            self.a.block(channel, f"Split '{node.name}' with unknown sizes")
            return
        pieces, start = [], 0
        for out, size in zip(node.outputs, sizes, strict=True):
            piece = channel[start : start + size]  # type: ignore[operator]
            pieces.append(piece)
            self.set_ids(out, {axis: piece})
            start += size  # type: ignore[operator]
        self.a.split_fixups.append((node, pieces))

    def op_Flatten(self, node: gs.Node) -> None:
        ids = self.ids(node.inputs[0])
        shape = self.shapes.get(node.inputs[0].name)
        axis = int(node.attrs.get("axis", 1))
        channel = ids.get(1)
        if axis != 1 or channel is None or shape is None or set(ids) != {1}:
            self.block_all(node.inputs[0], f"Flatten '{node.name}' that mixes their axis")
            return
        inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        self.set_ids(node.outputs[0], {1: [i for i in channel for _ in range(inner)]})

    def op_Reshape(self, node: gs.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        ids = self.ids(x)
        in_shape, out_shape = self.shapes.get(x.name), self.shapes.get(out.name)
        if in_shape is None or out_shape is None:
            self.block_all(x, f"Reshape '{node.name}' with unknown shapes")
            return
        if list(in_shape) == list(out_shape):
            self.set_ids(out, ids)
            return
        # Split the last axis into (heads, head_size): attention heads.
        last_in = len(in_shape) - 1
        if (set(ids) == {last_in} and len(out_shape) == len(in_shape) + 1
                and out_shape[:last_in] == in_shape[:last_in]
                and out_shape[-2] * out_shape[-1] == in_shape[-1]):
            heads, size = out_shape[-2], out_shape[-1]
            channel = ids[last_in]
            if shape_slot(node, len(out_shape) - 2) is None:
                self.a.block(channel, f"Reshape '{node.name}' computes its target at run time")
                return
            per_head = []
            for h in range(heads):
                members = channel[h * size : (h + 1) * size]
                for m in members[1:]:
                    self.a.union(members[0], m)
                per_head.append(members[0])
            self.a.reshape_fixups.append((node, len(out_shape) - 2, per_head, 1))
            self.set_ids(out, {len(out_shape) - 2: per_head})
            return
        # Merge (heads, head_size) back into one axis.
        if (set(ids) == {len(in_shape) - 2} and len(out_shape) == len(in_shape) - 1
                and out_shape[:-1] == in_shape[:-2]
                and out_shape[-1] == in_shape[-2] * in_shape[-1]):
            per_head = ids[len(in_shape) - 2]
            size = in_shape[-1]
            if shape_slot(node, len(out_shape) - 1) is None:
                self.a.block(per_head, f"Reshape '{node.name}' computes its target at run time")
                return
            self.a.reshape_fixups.append((node, len(out_shape) - 1, per_head, size))
            self.set_ids(out, {len(out_shape) - 1: [h for h in per_head for _ in range(size)]})
            return
        # Only unit axes move (batch 1 in the probe: [B, heads, S, d] <-> [B*heads, S, d]):
        # a reindex, valid when the target size at each carried axis is implicit (-1/0,
        # it follows the pruned tensor) or a literal that can be rewritten.
        in_big = [i for i, d in enumerate(in_shape) if d != 1]
        out_big = [i for i, d in enumerate(out_shape) if d != 1]
        if [in_shape[i] for i in in_big] == [out_shape[i] for i in out_big]:
            mapping = dict(zip(in_big, out_big, strict=True))
            out_ids: dict[int, list[int]] = {}
            for axis, channel in ids.items():
                target = mapping.get(axis)
                slot = shape_slot(node, target) if target is not None else None
                if slot is None and target is not None and self._size_read_from_tracked(node, target):
                    slot = "implicit"  # read from a pruned tensor's Shape: follows it
                if target is None or slot is None:
                    self.a.block(channel, f"Reshape '{node.name}' computes their size at run time")
                    return
                if slot != "implicit":
                    self.a.reshape_fixups.append((node, target, channel, 1))
                out_ids[target] = channel
            self.set_ids(out, out_ids)
            return
        self.block_all(x, f"Reshape '{node.name}' regroups their axis")

    def _size_read_from_tracked(self, node: gs.Node, axis: int) -> bool:
        """Whether a Reshape's target size at ``axis`` is read, at run time, from the Shape
        of a tensor whose channels are tracked (so it follows the pruning by itself)."""
        shape = node.inputs[1]
        producer = shape.inputs[0] if shape.inputs else None
        if producer is None or producer.op != "Concat":
            return False
        offset = 0
        for part in producer.inputs:
            length = (self.shape(part) or [1])[0] if self.shape(part) else 1
            if offset <= axis < offset + length:
                source = part.inputs[0] if part.inputs else None
                while source is not None and source.op in ("Slice", "Gather", "Squeeze", "Unsqueeze", "Cast"):
                    upstream = source.inputs[0]
                    source = upstream.inputs[0] if upstream.inputs else None
                return (source is not None and source.op == "Shape"
                        and source.inputs[0].name in self.a.tensor_ids)
            offset += length
        return False

    def op_Transpose(self, node: gs.Node) -> None:
        ids = self.ids(node.inputs[0])
        rank = self.rank(node.inputs[0])
        perm = node.attrs.get("perm") or list(reversed(range(rank or 0)))
        inverse = {old: new for new, old in enumerate(perm)}
        self.set_ids(node.outputs[0], {inverse[axis]: channel for axis, channel in ids.items()})

    def op_Shape(self, node: gs.Node) -> None:
        """Shape reads dimensions, not values: nothing to slice, no ids carried."""

    op_Size = op_Shape

    def op_Softmax(self, node: gs.Node) -> None:
        rank = self.rank(node.inputs[0]) or 0
        axis = _norm_axis(int(node.attrs.get("axis", -1)), rank)
        ids = self.ids(node.inputs[0])
        if axis in ids:
            self.a.block(ids[axis], f"Softmax '{node.name}' normalizes over them")
        self.set_ids(node.outputs[0], {k: v for k, v in ids.items() if k != axis})

    def op_LayerNormalization(self, node: gs.Node) -> None:
        rank = self.rank(node.inputs[0]) or 0
        axis = _norm_axis(int(node.attrs.get("axis", -1)), rank)
        for k, channel in self.ids(node.inputs[0]).items():
            if k >= axis:
                self.a.block(channel, f"LayerNormalization '{node.name}' normalizes over them")
        self.set_ids(node.outputs[0], {k: v for k, v in self.ids(node.inputs[0]).items() if k < axis})

    def _reduce(self, node: gs.Node, axes: list[int] | None) -> None:
        rank = self.rank(node.inputs[0]) or 0
        keep = int(node.attrs.get("keepdims", 1))
        axes = [_norm_axis(a, rank) for a in axes] if axes else list(range(rank))
        ids = self.ids(node.inputs[0])
        out: dict[int, list[int]] = {}
        for axis, channel in ids.items():
            if axis in axes:
                self.a.block(channel, f"{node.op} '{node.name}' reduces over them")
            else:
                out[axis if keep else axis - sum(a < axis for a in axes)] = channel
        self.set_ids(node.outputs[0], out)

    def op_ReduceMean(self, node: gs.Node) -> None:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            axes = [int(a) for a in np.asarray(node.inputs[1].values).ravel()]
        self._reduce(node, axes)

    op_ReduceMax = op_ReduceSum = op_ReduceMin = op_ReduceMean

    def op_Squeeze(self, node: gs.Node) -> None:
        self._shape_preserving_reindex(node)

    op_Unsqueeze = op_Squeeze

    def _shape_preserving_reindex(self, node: gs.Node) -> None:
        """Squeeze/Unsqueeze: map each carried axis by matching the shapes' channel sizes."""
        ids = self.ids(node.inputs[0])
        in_shape, out_shape = self.shapes.get(node.inputs[0].name), self.shapes.get(node.outputs[0].name)
        if in_shape is None or out_shape is None:
            self.block_all(node.inputs[0], f"{node.op} '{node.name}' with unknown shapes")
            return
        in_big = [i for i, d in enumerate(in_shape) if d != 1]
        out_big = [i for i, d in enumerate(out_shape) if d != 1]
        if [in_shape[i] for i in in_big] != [out_shape[i] for i in out_big]:
            self.block_all(node.inputs[0], f"{node.op} '{node.name}' changes their layout")
            return
        mapping = dict(zip(in_big, out_big, strict=True))
        out = {}
        for axis, channel in ids.items():
            if axis not in mapping:
                self.a.block(channel, f"{node.op} '{node.name}' drops their axis")
            else:
                out[mapping[axis]] = channel
        self.set_ids(node.outputs[0], out)


def shape_slot(node: gs.Node, axis: int) -> tuple[Any, int] | str | None:
    """Where a Reshape's target size for ``axis`` lives: (constant, index), 'implicit'
    (0 or -1, nothing to fix), or None when it is computed at run time."""
    shape = node.inputs[1]
    if shape.inputs and shape.inputs[0].op == "Constant":
        value = int(np.asarray(shape.inputs[0].attrs["value"].values).ravel()[axis])
        return "implicit" if value in (0, -1) else (shape.inputs[0], axis)
    if isinstance(shape, gs.Constant):
        value = int(np.asarray(shape.values).ravel()[axis])
        return "implicit" if value in (0, -1) else (shape, axis)
    producer = shape.inputs[0] if shape.inputs else None
    if producer is not None and producer.op == "Concat":
        offset = 0
        for part in producer.inputs:
            length = int(np.prod(part.shape)) if part.shape is not None else 1
            if offset <= axis < offset + length:
                if isinstance(part, gs.Constant):
                    value = int(np.asarray(part.values).ravel()[axis - offset])
                    return "implicit" if value in (0, -1) else (part, axis - offset)
                if part.inputs and part.inputs[0].op == "Constant":
                    value = int(np.asarray(part.inputs[0].attrs["value"].values).ravel()[axis - offset])
                    return "implicit" if value in (0, -1) else (part.inputs[0], axis - offset)
                return None
            offset += length
    return None


def analyze(model: Model, shapes: dict[str, list[int]]) -> Analysis:
    """Run the channel analysis on ``model`` (not modified)."""
    return ChannelAnalyzer(model, shapes).run()


def describe_blocked(analysis: Analysis) -> dict[str, str]:
    """Blocked reasons by source layer (for the report)."""
    out: dict[str, str] = {}
    for i, source in analysis.source_of.items():
        reason = analysis.blocked.get(analysis.find(i))
        if reason and ":fixed" not in source:
            out.setdefault(source, reason)
    return out


__all__: list[Any] = ["Analysis", "ParamSlice", "analyze", "describe_blocked"]
