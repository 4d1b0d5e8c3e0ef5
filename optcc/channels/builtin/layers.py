"""Layers that create channels: Conv, Gemm and MatMul with a float constant weight, and
Gather from a constant table (embeddings, relative position biases)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.graph import AxisIds, ChannelContext, normalize_axis
from optcc.channels.rules import ChannelRule
from optcc.ir.model import Model


def _write_group(model: Model, node: gs.Node, sizes: list[int]) -> None:
    node.attrs["group"] = sizes[0]


def float_weight(node: gs.Node, ctx: ChannelContext) -> np.ndarray | None:
    """The float constant weight (second input) of a layer, or None after blocking every
    input's ids (a quantized layer or a weight computed at run time is not sliced)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, gs.Constant) and np.asarray(w.values).dtype.kind == "f":
        return np.asarray(w.values)
    for t in node.inputs:
        ctx.block_all(t, f"read by {node.op} '{node.name}' without a float constant weight")
    return None


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


class GatherRule(ChannelRule):
    """Gather. From a 2-D float constant table along axis 0 (an embedding, a relative
    position bias table), the table's columns become new channels of the output's last
    axis (the table is sliced with them). On a carried tensor, ids on the other axes pass
    (shifted by the indices' rank); gathering along a carried axis blocks it."""

    ops: ClassVar[frozenset[str]] = frozenset({"Gather"})
    creates_channels = True

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        data, indices = node.inputs[0], node.inputs[1]
        axis = int(node.attrs.get("axis", 0))
        table = data.values if isinstance(data, gs.Constant) else None
        if table is not None and ctx.tracked(indices):
            ctx.block_all(indices, f"Gather '{node.name}' uses them as indices")
        if table is not None:
            table = np.asarray(table)
            out_rank = ctx.rank(node.outputs[0])
            if table.ndim == 2 and table.dtype.kind == "f" and axis == 0 and out_rank:
                created = ctx.new_ids(table.shape[1], node.name)
                ctx.slice(data, 1, created, node, "out")
                ctx.set_ids(node.outputs[0], {out_rank - 1: created})
            return
        ids = ctx.ids(data)
        rank = ctx.rank(data)
        index_rank = ctx.rank(indices)
        if not ids or rank is None or index_rank is None:
            ctx.block_all(data, f"Gather '{node.name}' of unknown rank")
            return
        axis = normalize_axis(axis, rank)
        out: AxisIds = {}
        for a, channel in ids.items():
            if a == axis:
                ctx.block(channel, f"Gather '{node.name}' selects among them")
            else:
                out[a if a < axis else a + index_rank - 1] = channel
        ctx.set_ids(node.outputs[0], out)

