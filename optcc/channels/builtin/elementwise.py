"""Elementwise ops and pooling: ids pass position by position, and meet at binary ops."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.builtin.reshape import runtime_size_follows, write_target_dim
from optcc.channels.graph import AxisIds, ChannelContext
from optcc.channels.index import shape_slot, slot_value
from optcc.channels.rules import ChannelRule

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


def slice_constant_operand(ctx: ChannelContext, t: gs.Tensor, axis: int, ids: list[int],
                           node: gs.Node) -> bool:
    """Make an operand without ids follow ``ids`` on ``axis`` (of ``t``) when it is built
    from constants: a constant (sliced), a constant broadcast by ``Expand`` (a class token,
    a ``full_like`` fill: the constant is sliced if it spans the axis, and a literal size in
    the Expand target is rewritten), or ``ConstantOfShape`` (its shape must follow). False
    when ``t`` is none of these, or its size cannot follow."""
    if isinstance(t, gs.Constant):
        shape = list(t.shape or [])
        if axis < len(shape) and shape[axis] == len(ids):
            ctx.slice(t, axis, ids, node)
            return True
        return False
    producer = t.inputs[0] if t.inputs else None
    if producer is None:
        return False
    if producer.op == "ConstantOfShape":
        return runtime_size_follows(producer, axis, ctx, ids, shape_input=0)
    if producer.op != "Expand" or ctx.constant_value(producer.inputs[0]) is None:
        return False
    value = ctx.constant_value(producer.inputs[0])
    assert value is not None
    caxis = axis - ((ctx.rank(t) or 0) - value.ndim)
    if caxis >= 0 and value.shape[caxis] not in (1, len(ids)):
        return False
    slot = shape_slot(producer, axis, ctx.shapes)
    if isinstance(slot, tuple):
        if slot_value(producer, slot) != 1:
            ctx.fixup(producer, [ids], partial(write_target_dim, slot))
    elif not runtime_size_follows(producer, axis, ctx, ids):
        return False
    if caxis >= 0 and value.shape[caxis] == len(ids):
        if not isinstance(producer.inputs[0], gs.Constant):
            return False
        ctx.slice(producer.inputs[0], caxis, ids, producer)
    return True


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
                if size != len(ids) or not slice_constant_operand(ctx, t, axis, ids, node):
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
