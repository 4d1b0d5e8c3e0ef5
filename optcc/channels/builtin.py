"""optcc's built-in op rules (see :mod:`optcc.channels.rules` for the contract).

- Weighted layers (Conv, Gemm, MatMul with a float constant weight) create ids for their
  output channels and slice their input columns by the ids they read; a depthwise Conv
  passes ids through (each channel is its own group).
- Elementwise ops (activations, Add/Mul/... between carrying tensors) couple ids position
  by position: a residual ``Add`` makes the channels of both branches one unit. Constants
  broadcast along a carried axis are sliced with it.
- BatchNorm and InstanceNorm slice their per-channel vectors; pooling and resizing keep
  the channel axis; Transpose, Squeeze and Unsqueeze move ids to other axes.
- ``Concat`` on the carried axis concatenates id lists; ``Split`` with explicit sizes
  slices them; ``Flatten`` repeats each channel's id over its spatial positions.
- Multi-head attention: a ``Reshape`` that splits the last axis into ``(heads, head
  size)`` makes each head one unit; a MatMul between two activations couples heads on
  its batch axes and the contracted axis; the ``Reshape`` back merges them again.
- Softmax, LayerNormalization and reductions over a carried axis block it.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.analysis import FIXED_SOURCE
from optcc.channels.graph import AxisIds, ChannelContext, normalize_axis
from optcc.channels.index import ShapeSlot, set_shape_dim, shape_slot
from optcc.channels.rules import ChannelRule
from optcc.ir.model import Model

UNARY = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Erf", "Gelu", "Softplus", "Softsign", "Clip", "Identity", "Dropout", "Cast", "Neg", "Abs",
    "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Mish", "Celu",
    "IsInf", "IsNaN", "Not",
})
BINARY = frozenset({
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
})
SPATIAL = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize",
    "Upsample", "GlobalLpPool",
})


# --------------------------------------------------------------------------- fixup writers
def _write_group(model: Model, node: gs.Node, sizes: list[int]) -> None:
    node.attrs["group"] = sizes[0]


def _write_split(model: Model, node: gs.Node, sizes: list[int]) -> None:
    if "split" in node.attrs:
        node.attrs["split"] = sizes
    else:  # opset 13+: sizes are an input (an initializer or a Constant node's output)
        node.inputs[1] = gs.Constant(f"{node.name}_split_pruned", np.array(sizes, np.int64))


def _write_reshape_dim(slot: ShapeSlot, model: Model, node: gs.Node, sizes: list[int]) -> None:
    set_shape_dim(model, node, slot, sizes[0])


def float_weight(node: gs.Node, ctx: ChannelContext) -> np.ndarray | None:
    """The float constant weight (second input) of a layer, or None after blocking every
    input's ids (a quantized layer or a weight computed at run time is not sliced)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Constant) and np.asarray(w.values).dtype.kind == "f":
        return np.asarray(w.values)
    for t in node.inputs:
        ctx.block_all(t, f"read by {node.op} '{node.name}' without a float constant weight")
    return None


# --------------------------------------------------------------------------- weighted layers
class WeightedLayerRule(ChannelRule):
    """Base of layers with a float constant weight (second input) and an optional bias
    (third): they create ids for their outputs, so they run on every node."""

    creates_channels = True

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        wv = float_weight(node, ctx)
        if wv is not None:
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            self.layer(node, ctx, node.inputs[0], node.inputs[1], wv, bias)

    def layer(self, node: gs.Node, ctx: ChannelContext, x: gs.Tensor, w: gs.Constant,
              wv: np.ndarray, bias: gs.Tensor | None) -> None:
        raise NotImplementedError


class ConvRule(WeightedLayerRule):
    """Conv: new ids for output channels; input columns sliced; depthwise passes through."""

    ops: ClassVar[frozenset[str]] = frozenset({"Conv"})

    def layer(self, node: gs.Node, ctx: ChannelContext, x: gs.Tensor, w: gs.Constant,
              wv: np.ndarray, bias: gs.Tensor | None) -> None:
        groups = int(node.attrs.get("group", 1))
        in_ids = ctx.ids(x).get(1)
        if groups > 1:
            cin = wv.shape[1] * groups
            if groups == cin and wv.shape[0] == cin and in_ids is not None:
                # Depthwise: every channel is its own group; ids pass through.
                ctx.slice(w, 0, in_ids, node)
                if isinstance(bias, gs.Constant):
                    ctx.slice(bias, 0, in_ids, node)
                ctx.fixup(node, [in_ids], _write_group)
                ctx.set_ids(node.outputs[0], {1: in_ids})
                return
            if in_ids is not None:
                ctx.block(in_ids, f"grouped Conv '{node.name}' (groups={groups})")
            return  # output channels of a grouped conv are not pruned either
        if in_ids is not None:
            ctx.slice(w, 1, in_ids, node, "in")
        out = ctx.new_ids(wv.shape[0], node.name)
        ctx.slice(w, 0, out, node, "out")
        if isinstance(bias, gs.Constant):
            ctx.slice(bias, 0, out, node, "out")
        ctx.set_ids(node.outputs[0], {1: out})


class GemmRule(WeightedLayerRule):
    """Gemm: new ids for output features; input features sliced (transB aware)."""

    ops: ClassVar[frozenset[str]] = frozenset({"Gemm"})

    def layer(self, node: gs.Node, ctx: ChannelContext, x: gs.Tensor, w: gs.Constant,
              wv: np.ndarray, bias: gs.Tensor | None) -> None:
        if int(node.attrs.get("transA", 0)):
            ctx.block_all(x, f"Gemm '{node.name}' with transA")
            return
        in_axis, out_axis = (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
        in_ids = ctx.ids(x).get(1)
        if in_ids is not None:
            ctx.slice(w, in_axis, in_ids, node, "in")
        out = ctx.new_ids(wv.shape[out_axis], node.name)
        ctx.slice(w, out_axis, out, node, "out")
        if isinstance(bias, gs.Constant) and bias.shape and bias.shape[-1] == len(out):
            ctx.slice(bias, len(bias.shape) - 1, out, node, "out")
        ctx.set_ids(node.outputs[0], {1: out})


class MatMulRule(WeightedLayerRule):
    """MatMul ``x @ W`` with a 2-D constant W: new ids for W's columns, x's last axis
    sliced into W's rows. Between two activations (attention scores and context), the
    contracted axes and the batch axes are coupled and the others carried."""

    ops: ClassVar[frozenset[str]] = frozenset({"MatMul"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        if isinstance(node.inputs[1], gs.Variable):
            self.between_activations(node, ctx)
        else:
            super().propagate(node, ctx)

    def layer(self, node: gs.Node, ctx: ChannelContext, x: gs.Tensor, w: gs.Constant,
              wv: np.ndarray, bias: gs.Tensor | None) -> None:
        rank = ctx.rank(x)
        if wv.ndim != 2 or rank is None:
            ctx.block_all(x, f"MatMul '{node.name}' with a {wv.ndim}-D weight")
            return
        last = rank - 1
        for axis, ids in ctx.ids(x).items():
            if axis == last:
                ctx.slice(w, 0, ids, node, "in")
            else:
                ctx.block(ids, f"MatMul '{node.name}' reads them on a non-contracted axis")
        out = ctx.new_ids(wv.shape[1], node.name)
        ctx.slice(w, 1, out, node, "out")
        ctx.set_ids(node.outputs[0], {last: out})

    @staticmethod
    def between_activations(node: gs.Node, ctx: ChannelContext) -> None:
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = ctx.rank(a), ctx.rank(b)
        if ra is None or rb is None or ra < 2 or rb < 2:
            for t in (a, b):
                ctx.block_all(t, f"MatMul '{node.name}' of unknown rank")
            return
        ia, ib = ctx.ids(a), ctx.ids(b)
        out_rank = max(ra, rb)
        out: AxisIds = {}
        # Contracted: a's last axis with b's second-to-last.
        ca, cb = ia.get(ra - 1), ib.get(rb - 2)
        if ca is not None or cb is not None:
            if ca is None or cb is None or len(ca) != len(cb):
                for ids in (ca, cb):
                    if ids is not None:
                        ctx.block(ids, f"contracted by MatMul '{node.name}' with an untracked side")
            else:
                ctx.couple(ca, cb)
        # Batch axes (aligned from the right, excluding the last two).
        shape_a, shape_b = ctx.shape(a), ctx.shape(b)
        for k in range(out_rank - 2):
            axa, axb = k - (out_rank - ra), k - (out_rank - rb)
            ida = ia.get(axa) if axa >= 0 else None
            idb = ib.get(axb) if axb >= 0 else None
            if ida is not None and idb is not None and len(ida) == len(idb):
                ctx.couple(ida, idb)
                out[k] = ida
            elif ida is not None or idb is not None:
                tracked = ida if ida is not None else idb
                assert tracked is not None
                other_shape, other_axis = (shape_b, axb) if ida is not None else (shape_a, axa)
                size = (other_shape[other_axis] if other_shape is not None and other_axis >= 0
                        else 1 if other_axis < 0 else None)
                if size != 1:  # the other side has these channels too, but untracked
                    ctx.block(tracked, f"MatMul '{node.name}' pairs them with an untracked operand")
                    continue
                out[k] = tracked
        if ra - 2 in ia:
            out[out_rank - 2] = ia[ra - 2]
        if rb - 1 in ib:
            out[out_rank - 1] = ib[rb - 1]
        ctx.set_ids(node.outputs[0], out)


# --------------------------------------------------------------------------- elementwise
def slice_broadcast_constant(
    ctx: ChannelContext, const: gs.Constant, ids: AxisIds, rank: int, node: gs.Node
) -> None:
    """Slice a constant broadcast against a tensor of rank ``rank`` carrying ``ids``."""
    shape = list(const.shape)
    offset = rank - len(shape)
    for axis, channel in ids.items():
        caxis = axis - offset
        if 0 <= caxis < len(shape) and shape[caxis] == len(channel):
            ctx.slice(const, caxis, channel, node)
        elif 0 <= caxis < len(shape) and shape[caxis] not in (1, len(channel)):
            ctx.block(channel, f"{node.op} '{node.name}' broadcasts a constant of another size")


class UnaryRule(ChannelRule):
    """Elementwise ops of one tensor: ids pass through; per-channel constant operands
    (PRelu slopes, Clip bounds) are sliced."""

    ops = UNARY

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        for extra in node.inputs[1:]:
            if isinstance(extra, gs.Constant) and extra.shape and int(np.prod(extra.shape)) > 1:
                slice_broadcast_constant(ctx, extra, ids, ctx.rank(node.inputs[0]) or 0, node)
        ctx.set_ids(node.outputs[0], ids)


class BinaryRule(ChannelRule):
    """Elementwise ops of several tensors (numpy broadcasting): carried axes are aligned
    from the right and coupled; constants along a carried axis are sliced; an untracked
    activation along a carried axis blocks it."""

    ops = BINARY

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ranks = [ctx.rank(t) for t in node.inputs]
        if any(r is None for r in ranks):
            for t in node.inputs:
                ctx.block_all(t, f"{node.op} '{node.name}' of unknown rank")
            return
        known = [int(r) for r in ranks if r is not None]
        out_rank = max(known)
        merged: AxisIds = {}
        for t, r in zip(node.inputs, known, strict=True):
            for axis, ids in ctx.ids(t).items():
                oaxis = axis + (out_rank - r)
                if oaxis in merged:
                    if len(merged[oaxis]) != len(ids):
                        ctx.block(ids + merged[oaxis], f"{node.op} '{node.name}' mixes sizes")
                        continue
                    ctx.couple(merged[oaxis], ids)
                else:
                    merged[oaxis] = ids
        for t, r in zip(node.inputs, known, strict=True):
            if ctx.ids(t):
                continue
            shape = ctx.shape(t)
            for oaxis, ids in merged.items():
                axis = oaxis - (out_rank - r)
                if axis < 0 or shape is None or axis >= len(shape):
                    if shape is None and axis >= 0:
                        ctx.block(ids, f"{node.op} '{node.name}' with an input of unknown shape")
                    continue
                size = shape[axis]
                if size == 1:
                    continue
                if isinstance(t, gs.Constant) and size == len(ids):
                    ctx.slice(t, axis, ids, node)
                else:
                    ctx.block(ids, f"{node.op} '{node.name}' combines them with '{t.name}', "
                              "which has no channel ids")
        ctx.set_ids(node.outputs[0], merged)


class SpatialRule(ChannelRule):
    """Pooling and resizing: the channel axis (1) passes; others are acted on (blocked)."""

    ops = SPATIAL

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        for axis, channel in ids.items():
            if axis != 1:
                ctx.block(channel, f"{node.op} '{node.name}' acts on their axis")
        ctx.set_ids(node.outputs[0], {k: v for k, v in ids.items() if k == 1})


class BatchNormRule(ChannelRule):
    """BatchNorm / InstanceNorm: per-channel vectors sliced along axis 1."""

    ops: ClassVar[frozenset[str]] = frozenset({"BatchNormalization", "InstanceNormalization"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0]).get(1)
        if ids is None:
            ctx.block_all(node.inputs[0], f"{node.op} '{node.name}' on another axis")
            return
        for p in node.inputs[1:5]:
            if isinstance(p, gs.Constant):
                ctx.slice(p, 0, ids, node)
            else:
                ctx.block(ids, f"{node.op} '{node.name}' has non-constant parameters")
        ctx.set_ids(node.outputs[0], {1: ids})


# --------------------------------------------------------------------------- layout
class ConcatRule(ChannelRule):
    """Concat on the carried axis: id lists are concatenated (untracked inputs get fixed,
    blocked ids); on another axis, carried ids are blocked."""

    ops: ClassVar[frozenset[str]] = frozenset({"Concat"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        rank = ctx.rank(node.outputs[0]) or ctx.rank(node.inputs[0])
        if rank is None:
            for t in node.inputs:
                ctx.block_all(t, f"Concat '{node.name}' of unknown rank")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        parts: list[int] = []
        for t in node.inputs:
            ids = ctx.ids(t)
            for other, channel in ids.items():
                if other != axis:
                    ctx.block(channel, f"Concat '{node.name}' on another axis")
            if axis in ids:
                parts.extend(ids[axis])
                continue
            shape = ctx.shape(t)
            if shape is None:
                for t2 in node.inputs:
                    ctx.block_all(t2, f"Concat '{node.name}' with an input of unknown shape")
                return
            fixed = ctx.new_ids(shape[axis], f"{node.name}{FIXED_SOURCE}")
            ctx.block(fixed, f"come from '{t.name}', which is not prunable")
            parts.extend(fixed)
        ctx.set_ids(node.outputs[0], {axis: parts})


class SplitRule(ChannelRule):
    """Split with explicit sizes on the carried axis: each output gets its slice of ids,
    and the sizes follow the kept channels."""

    ops: ClassVar[frozenset[str]] = frozenset({"Split"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        axis = normalize_axis(int(node.attrs.get("axis", 0)), ctx.rank(node.inputs[0]) or 0)
        channel = ids.get(axis)
        if channel is None:
            for other in ids.values():
                ctx.block(other, f"Split '{node.name}' on another axis")
            return
        explicit = "split" in node.attrs or (
            len(node.inputs) > 1 and ctx.constant_value(node.inputs[1]) is not None
        )
        if not explicit:
            ctx.block(channel, f"Split '{node.name}' into equal parts (sizes would diverge)")
            return
        sizes = [ctx.shapes.get(o.name, [None] * (axis + 1))[axis] for o in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != len(channel):  # type: ignore[arg-type]
            ctx.block(channel, f"Split '{node.name}' with unknown sizes")
            return
        pieces, start = [], 0
        for out, size in zip(node.outputs, sizes, strict=True):
            piece = channel[start : start + size]  # type: ignore[operator]
            pieces.append(piece)
            ctx.set_ids(out, {axis: piece})
            start += size  # type: ignore[operator]
        ctx.fixup(node, pieces, _write_split)


class FlattenRule(ChannelRule):
    """Flatten at axis 1 of an NCHW tensor: each channel's id repeats over its positions."""

    ops: ClassVar[frozenset[str]] = frozenset({"Flatten"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        shape = ctx.shapes.get(node.inputs[0].name)
        channel = ids.get(1)
        if int(node.attrs.get("axis", 1)) != 1 or channel is None or shape is None or set(ids) != {1}:
            ctx.block_all(node.inputs[0], f"Flatten '{node.name}' that mixes their axis")
            return
        inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        ctx.set_ids(node.outputs[0], {1: [i for i in channel for _ in range(inner)]})


class ReshapeRule(ChannelRule):
    """Reshape: identity shapes pass; splitting the last axis into (heads, head size) and
    merging it back handle attention heads; moving only unit axes is a reindex."""

    ops: ClassVar[frozenset[str]] = frozenset({"Reshape"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        x, out = node.inputs[0], node.outputs[0]
        ids = ctx.ids(x)
        in_shape, out_shape = ctx.shapes.get(x.name), ctx.shapes.get(out.name)
        if in_shape is None or out_shape is None:
            ctx.block_all(x, f"Reshape '{node.name}' with unknown shapes")
            return
        if list(in_shape) == list(out_shape):
            ctx.set_ids(out, ids)
            return
        last_in = len(in_shape) - 1
        # Split the last axis into (heads, head_size): attention heads.
        if (set(ids) == {last_in} and len(out_shape) == len(in_shape) + 1
                and out_shape[:last_in] == in_shape[:last_in]
                and out_shape[-2] * out_shape[-1] == in_shape[-1]):
            heads, size = out_shape[-2], out_shape[-1]
            channel = ids[last_in]
            slot = shape_slot(node, len(out_shape) - 2, ctx.shapes)
            if slot is None:
                ctx.block(channel, f"Reshape '{node.name}' computes its target at run time")
                return
            per_head = []
            for h in range(heads):
                members = channel[h * size : (h + 1) * size]
                ctx.couple([members[0]] * (len(members) - 1), members[1:])
                per_head.append(members[0])
            ctx.fixup(node, [per_head], partial(_write_reshape_dim, slot))
            ctx.set_ids(out, {len(out_shape) - 2: per_head})
            return
        # Merge (heads, head_size) back into one axis.
        if (set(ids) == {len(in_shape) - 2} and len(out_shape) == len(in_shape) - 1
                and out_shape[:-1] == in_shape[:-2]
                and out_shape[-1] == in_shape[-2] * in_shape[-1]):
            per_head = ids[len(in_shape) - 2]
            size = in_shape[-1]
            slot = shape_slot(node, len(out_shape) - 1, ctx.shapes)
            if slot is None:
                ctx.block(per_head, f"Reshape '{node.name}' computes its target at run time")
                return
            ctx.fixup(node, [per_head], partial(_write_reshape_dim, slot), unit=size)
            ctx.set_ids(out, {len(out_shape) - 1: [h for h in per_head for _ in range(size)]})
            return
        # Only unit axes move (batch 1 in the probe: [B, heads, S, d] <-> [B*heads, S, d]):
        # a reindex, valid when the target size at each carried axis is implicit (-1/0,
        # it follows the pruned tensor) or a literal that can be rewritten.
        in_big = [i for i, d in enumerate(in_shape) if d != 1]
        out_big = [i for i, d in enumerate(out_shape) if d != 1]
        if [in_shape[i] for i in in_big] == [out_shape[i] for i in out_big]:
            mapping = dict(zip(in_big, out_big, strict=True))
            out_ids: AxisIds = {}
            for axis, channel in ids.items():
                target = mapping.get(axis)
                slot = shape_slot(node, target, ctx.shapes) if target is not None else None
                if slot is None and target is not None and size_read_from_tracked(node, target, ctx):
                    slot = "implicit"  # read from a pruned tensor's Shape: follows it
                if target is None or slot is None:
                    ctx.block(channel, f"Reshape '{node.name}' computes their size at run time")
                    return
                if slot != "implicit":
                    ctx.fixup(node, [channel], partial(_write_reshape_dim, slot))
                out_ids[target] = channel
            ctx.set_ids(out, out_ids)
            return
        ctx.block_all(x, f"Reshape '{node.name}' regroups their axis")


def size_read_from_tracked(node: gs.Node, axis: int, ctx: ChannelContext) -> bool:
    """Whether a Reshape's target size at ``axis`` is read, at run time, from the Shape of
    a tensor whose channels are tracked (so it follows the pruning by itself)."""
    from optcc.channels.index import concat_part_at

    shape = node.inputs[1]
    producer = shape.inputs[0] if shape.inputs else None
    if producer is None or producer.op != "Concat":
        return False
    found = concat_part_at(producer, axis, ctx.shapes)
    if found is None:
        return False
    part = found[0]
    source = part.inputs[0] if part.inputs else None
    while source is not None and source.op in ("Slice", "Gather", "Squeeze", "Unsqueeze", "Cast"):
        upstream = source.inputs[0]
        source = upstream.inputs[0] if upstream.inputs else None
    return source is not None and source.op == "Shape" and ctx.tracked(source.inputs[0])


class TransposeRule(ChannelRule):
    """Transpose: ids move with their axes."""

    ops: ClassVar[frozenset[str]] = frozenset({"Transpose"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        rank = ctx.rank(node.inputs[0])
        perm = node.attrs.get("perm") or list(reversed(range(rank or 0)))
        inverse = {old: new for new, old in enumerate(perm)}
        ctx.set_ids(node.outputs[0], {inverse[axis]: channel for axis, channel in ids.items()})


class ShapeRule(ChannelRule):
    """Shape and Size read dimensions, not values: nothing to slice, no ids carried."""

    ops: ClassVar[frozenset[str]] = frozenset({"Shape", "Size"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        return None


class SoftmaxRule(ChannelRule):
    """Softmax normalises over its axis: ids there are blocked, others pass."""

    ops: ClassVar[frozenset[str]] = frozenset({"Softmax"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        axis = normalize_axis(int(node.attrs.get("axis", -1)), ctx.rank(node.inputs[0]) or 0)
        ids = ctx.ids(node.inputs[0])
        if axis in ids:
            ctx.block(ids[axis], f"Softmax '{node.name}' normalizes over them")
        ctx.set_ids(node.outputs[0], {k: v for k, v in ids.items() if k != axis})


class LayerNormRule(ChannelRule):
    """LayerNormalization normalises over its trailing axes: ids there are blocked."""

    ops: ClassVar[frozenset[str]] = frozenset({"LayerNormalization"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        axis = normalize_axis(int(node.attrs.get("axis", -1)), ctx.rank(node.inputs[0]) or 0)
        ids = ctx.ids(node.inputs[0])
        for k, channel in ids.items():
            if k >= axis:
                ctx.block(channel, f"LayerNormalization '{node.name}' normalizes over them")
        ctx.set_ids(node.outputs[0], {k: v for k, v in ids.items() if k < axis})


class ReduceRule(ChannelRule):
    """Reductions block the ids they reduce over and carry the others (keepdims aware)."""

    ops: ClassVar[frozenset[str]] = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            value = ctx.constant_value(node.inputs[1])
            if value is not None:
                axes = [int(a) for a in value.ravel()]
        rank = ctx.rank(node.inputs[0]) or 0
        keep = int(node.attrs.get("keepdims", 1))
        axes = [normalize_axis(a, rank) for a in axes] if axes else list(range(rank))
        out: AxisIds = {}
        for axis, channel in ctx.ids(node.inputs[0]).items():
            if axis in axes:
                ctx.block(channel, f"{node.op} '{node.name}' reduces over them")
            else:
                out[axis if keep else axis - sum(a < axis for a in axes)] = channel
        ctx.set_ids(node.outputs[0], out)


class SqueezeRule(ChannelRule):
    """Squeeze/Unsqueeze: each carried axis maps by matching the non-unit dimensions."""

    ops: ClassVar[frozenset[str]] = frozenset({"Squeeze", "Unsqueeze"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        in_shape = ctx.shapes.get(node.inputs[0].name)
        out_shape = ctx.shapes.get(node.outputs[0].name)
        if in_shape is None or out_shape is None:
            ctx.block_all(node.inputs[0], f"{node.op} '{node.name}' with unknown shapes")
            return
        in_big = [i for i, d in enumerate(in_shape) if d != 1]
        out_big = [i for i, d in enumerate(out_shape) if d != 1]
        if [in_shape[i] for i in in_big] != [out_shape[i] for i in out_big]:
            ctx.block_all(node.inputs[0], f"{node.op} '{node.name}' changes their layout")
            return
        mapping = dict(zip(in_big, out_big, strict=True))
        out: AxisIds = {}
        for axis, channel in ids.items():
            if axis not in mapping:
                ctx.block(channel, f"{node.op} '{node.name}' drops their axis")
            else:
                out[mapping[axis]] = channel
        ctx.set_ids(node.outputs[0], out)


BUILTIN_RULES: tuple[ChannelRule, ...] = (
    ConvRule(), GemmRule(), MatMulRule(), UnaryRule(), BinaryRule(), SpatialRule(),
    BatchNormRule(), ConcatRule(), SplitRule(), FlattenRule(), ReshapeRule(), TransposeRule(),
    ShapeRule(), SoftmaxRule(), LayerNormRule(), ReduceRule(), SqueezeRule(),
)
