"""Layout ops: Concat, Split, Flatten, Transpose, Squeeze/Unsqueeze, Shape, Slice, Pad,
Expand. Ids move with their axes; an op that rearranges a carried axis blocks it."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.analysis import FIXED_SOURCE
from optcc.channels.builtin.elementwise import slice_constant_operand
from optcc.channels.builtin.reshape import runtime_size_follows, write_target_dim
from optcc.channels.graph import AxisIds, ChannelContext, normalize_axis
from optcc.channels.index import shape_slot, slot_value
from optcc.channels.rules import ChannelRule
from optcc.ir.model import Model


def _write_split(model: Model, node: gs.Node, sizes: list[int]) -> None:
    if "split" in node.attrs or model.opset < 13:
        node.attrs["split"] = sizes
        return
    # opset 13+: sizes are an input; opset 18's equal parts (num_outputs) become explicit
    node.attrs.pop("num_outputs", None)
    const = gs.Constant(f"{node.name}_split_pruned", np.array(sizes, np.int64))
    if len(node.inputs) > 1:
        node.inputs[1] = const
    else:
        node.inputs.append(const)


class ConcatRule(ChannelRule):
    """Concat. On the concatenated axis, id lists are joined (inputs without ids there get
    fixed, blocked ids, so offsets stay right); on every other carried axis, the inputs'
    ids are coupled position by position (a constant operand is sliced with them)."""

    ops: ClassVar[frozenset[str]] = frozenset({"Concat"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        rank = ctx.rank(node.outputs[0]) or ctx.rank(node.inputs[0])
        if rank is None:
            for t in node.inputs:
                ctx.block_all(t, f"Concat '{node.name}' of unknown rank")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        out: AxisIds = {}
        for t in node.inputs:
            for k, channel in ctx.ids(t).items():
                if k == axis:
                    continue
                if k not in out:
                    out[k] = channel
                elif len(out[k]) == len(channel):
                    ctx.couple(out[k], channel)
                else:
                    ctx.block(channel + out[k], f"Concat '{node.name}' mixes sizes")
        for k, channel in out.items():
            for t in node.inputs:
                if k not in ctx.ids(t) and not slice_constant_operand(ctx, t, k, channel, node):
                    ctx.block(channel, f"Concat '{node.name}' joins them with '{t.name}', "
                              "which has no channel ids")
        if any(axis in ctx.ids(t) for t in node.inputs):
            parts: list[int] = []
            for t in node.inputs:
                ids = ctx.ids(t)
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
            out[axis] = parts
        ctx.set_ids(node.outputs[0], out)


class SplitRule(ChannelRule):
    """Split on the carried axis: each output gets its slice of ids, and the sizes follow
    the kept channels. A split into equal parts (no sizes given) is given explicit sizes,
    so the parts may lose different numbers of channels (q, k, v of a fused projection
    lose the same heads anyway)."""

    ops: ClassVar[frozenset[str]] = frozenset({"Split"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        ids = ctx.ids(node.inputs[0])
        axis = normalize_axis(int(node.attrs.get("axis", 0)), ctx.rank(node.inputs[0]) or 0)
        for k, channel in ids.items():
            if k != axis:  # other axes pass to every output
                for out in node.outputs:
                    ctx.set_ids(out, {**ctx.ids(out), k: channel})
        channel = ids.get(axis)
        if channel is None:
            return
        sizes = [ctx.shapes.get(o.name, [None] * (axis + 1))[axis] for o in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != len(channel):  # type: ignore[arg-type]
            ctx.block(channel, f"Split '{node.name}' with unknown sizes")
            return
        pieces, start = [], 0
        for out, size in zip(node.outputs, sizes, strict=True):
            piece = channel[start : start + size]  # type: ignore[operator]
            pieces.append(piece)
            ctx.set_ids(out, {**ctx.ids(out), axis: piece})
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


def _ints(ctx: ChannelContext, node: gs.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as input ``index`` (opset >= 10 style) or attribute ``attr``."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        value = ctx.constant_value(node.inputs[index])
        return None if value is None else [int(v) for v in value.ravel()]
    return None


class SliceRule(ChannelRule):
    """Slice: carried axes that are not sliced, or kept whole, pass; a carried axis cut
    into a sub-range (or reversed) blocks its ids."""

    ops: ClassVar[frozenset[str]] = frozenset({"Slice"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        data = node.inputs[0]
        ids = ctx.ids(data)
        shape = ctx.shape(data)
        starts, ends = _ints(ctx, node, 1, "starts"), _ints(ctx, node, 2, "ends")
        axes = _ints(ctx, node, 3, "axes")
        has_axes = "axes" in node.attrs or (len(node.inputs) > 3 and bool(node.inputs[3].name))
        steps = _ints(ctx, node, 4, "steps")
        has_steps = len(node.inputs) > 4 and bool(node.inputs[4].name)
        if shape is None or (has_axes and axes is None):
            ctx.block_all(data, f"Slice '{node.name}' on axes known only at run time")
            return
        rank = len(shape)
        if axes is None:
            count = len(starts) if starts is not None else len(ends) if ends is not None else rank
            axes = list(range(count))
        axes = [normalize_axis(a, rank) for a in axes]
        out: AxisIds = {}
        for a, channel in ids.items():
            if a not in axes:
                out[a] = channel
                continue
            i = axes.index(a)
            if starts is None or ends is None or (has_steps and steps is None):
                ctx.block(channel, f"Slice '{node.name}' cuts them at positions known at run time")
                continue
            step = steps[i] if steps else 1
            kept = range(shape[a])[slice(starts[i], ends[i], step)]
            if step == 1 and len(kept) == shape[a]:
                out[a] = channel
            else:
                ctx.block(channel, f"Slice '{node.name}' cuts out part of them")
        ctx.set_ids(node.outputs[0], out)


class PadRule(ChannelRule):
    """Pad (explicit padding, TF-style "same" convolutions): carried axes that are not
    padded pass. Pads computed at run time are taken as zero on an axis whose size the
    probe shows unchanged."""

    ops: ClassVar[frozenset[str]] = frozenset({"Pad"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        data = node.inputs[0]
        in_shape, out_shape = ctx.shape(data), ctx.shape(node.outputs[0])
        pads = _ints(ctx, node, 1, "pads")
        axes = _ints(ctx, node, 3, "axes")
        has_axes = len(node.inputs) > 3 and bool(node.inputs[3].name)
        if in_shape is None or out_shape is None or (has_axes and axes is None):
            ctx.block_all(data, f"Pad '{node.name}' of unknown shape")
            return
        rank = len(in_shape)
        axes = [normalize_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
        out: AxisIds = {}
        for a, channel in ctx.ids(data).items():
            if pads is not None:
                n = len(axes)
                padded = a in axes and (pads[axes.index(a)] != 0 or pads[n + axes.index(a)] != 0)
            else:
                padded = in_shape[a] != out_shape[a]
            if padded:
                ctx.block(channel, f"Pad '{node.name}' pads them")
            else:
                out[a] = channel
        ctx.set_ids(node.outputs[0], out)


class ExpandRule(ChannelRule):
    """Expand: carried axes keep their ids (aligned from the right); a literal size for a
    carried axis in the target shape is rewritten. GQA's key/value heads pass here before
    the Reshape that merges them with their query-head repeats."""

    ops: ClassVar[frozenset[str]] = frozenset({"Expand"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        data = node.inputs[0]
        rank, out_shape = ctx.rank(data), ctx.shape(node.outputs[0])
        if rank is None or out_shape is None:
            ctx.block_all(data, f"Expand '{node.name}' of unknown shape")
            return
        offset = len(out_shape) - rank
        out: AxisIds = {}
        for a, channel in ctx.ids(data).items():
            b = a + offset
            slot = shape_slot(node, b, ctx.shapes)
            if out_shape[b] != len(channel):
                ctx.block(channel, f"Expand '{node.name}' broadcasts them")
                continue
            if isinstance(slot, tuple):
                if slot_value(node, slot) != 1:
                    ctx.fixup(node, [channel], partial(write_target_dim, slot))
            elif slot is None and not runtime_size_follows(node, b, ctx, channel):
                ctx.block(channel, f"Expand '{node.name}' computes their size at run time")
                continue
            out[b] = channel
        ctx.set_ids(node.outputs[0], out)

