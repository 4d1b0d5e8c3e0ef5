"""Reshape: where a channel axis goes when a tensor is viewed with another shape.

The input and output shapes (concrete, from the probe) are cut into *groups*: runs of
consecutive axes whose sizes multiply to the same number on both sides (``[1, 5, 64] ->
[5, 64]`` is ``([0, 1] -> [0])``, ``([2] -> [1])``). A carried axis then

- **moves** when its group holds it alone on the input side and one axis of the same size
  on the output side (unit axes aside): batch flattening, window partitions, a
  ``[B, heads, S, d] <-> [B*heads, S, d]`` view;
- is **split** when its group has one input axis and several output axes: the outermost
  output axis becomes the unit. ``[.., hidden] -> [.., heads, head_size]`` makes every head
  one class (its head-size ids are coupled), and the heads axis carries one id per head;
- is **merged** when its group has several input axes of which it is the only carried
  one: each position of the merged axis takes the id of its coordinate on the carried
  axis (``[.., heads, head_size] -> [.., hidden]``, and GQA's ``[B, kv, rep, S, d] ->
  [B, kv*rep, S, d]``, where every key/value head stands for ``rep`` query heads).

Any other regrouping blocks the carried ids. The target size of a moved, split or merged
axis must follow the pruning: a literal is rewritten (a :class:`~optcc.channels.SizeFixup`),
-1 is inferred, 0 copies the input's dimension (valid only for an axis that stays at the
same index), and a size read at run time from the Shape of a carried tensor follows by
itself; any other run-time size blocks the ids.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.graph import AxisIds, ChannelContext, normalize_axis
from optcc.channels.index import ShapeSlot, concat_part_at, set_shape_dim, shape_slot
from optcc.channels.rules import ChannelRule
from optcc.ir.model import Model


def write_target_dim(slot: ShapeSlot, model: Model, node: gs.Node, sizes: list[int]) -> None:
    """SizeFixup writer: put the new size into a Reshape/Expand target slot."""
    set_shape_dim(model, node, slot, sizes[0])


def reshape_groups(in_shape: list[int], out_shape: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of consecutive input and output axes with equal products (see the module
    docstring); None when the shapes do not line up (sizes of 0, or a mismatch)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        if i < len(in_shape):
            gi.append(i)
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            gj.append(j)
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif pj < pi and j < len(out_shape):
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                return None
        if pi == 0:
            return None
        groups.append((gi, gj))
    return groups


def runtime_size_follows(node: gs.Node, axis: int, ctx: ChannelContext, channel: list[int],
                         unit: int = 1, shape_input: int = 1) -> bool:
    """Whether the target size at ``axis`` of ``node`` (a Reshape or Expand; a
    ConstantOfShape with ``shape_input=0``), computed at run time, follows the pruning of
    ``channel`` (``unit`` positions per id).

    The value is traced back through the ops exporters build shapes with: Concat (to the
    piece holding the element), Gather/Slice of a shape vector, Unsqueeze/Squeeze, Cast,
    Identity, a flattening Reshape, the ``Where(shape == -1, 1, shape)`` of expand, and
    multiplication by a constant. It follows when it ends at ``Shape(x)`` with ``x``
    carrying ids on the dimension read (those ids are coupled with ``channel``). When it
    ends at a dimension without ids (the batch) multiplied by a literal equal to the
    channel count (``view(batch * heads, ...)``), the literal is rewritten on a private copy
    of the computation.
    """
    tensor, position, factor = node.inputs[shape_input], axis, 1
    path: list[int] = []  # input index followed at each producer, from the target down
    literal: tuple[int, int] | None = None  # (step in path, input index) of a Mul constant
    for _ in range(32):
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None:
            return False
        op = producer.op
        follow = 0
        if op == "Concat":
            found = concat_part_at(producer, position, ctx.shapes)
            if found is None:
                return False
            follow, position = producer.inputs.index(found[0]), found[1]
        elif op == "Where":
            follow = 2  # the "shape" branch of Where(shape == -1, 1, shape)
        elif op == "Mul":
            const = [ctx.constant_value(t) for t in producer.inputs]
            index = 1 if const[1] is not None and const[1].size == 1 else 0
            if const[index] is None or const[index].size != 1:
                return False
            factor *= int(const[index].ravel()[0])
            literal = (len(path), index)
            follow = 1 - index
        elif op == "Gather":
            index_value = ctx.constant_value(producer.inputs[1])
            if index_value is None:
                return False
            position = int(index_value.ravel()[position if index_value.size > 1 else 0])
        elif op == "Slice":
            starts, ends = (ctx.constant_value(t) for t in producer.inputs[1:3])
            steps = ctx.constant_value(producer.inputs[4]) if len(producer.inputs) > 4 else None
            length = (ctx.shape(producer.inputs[0]) or [0])[0]
            if starts is None or ends is None:
                return False
            step = int(steps.ravel()[0]) if steps is not None else 1
            picked = range(length)[slice(int(starts.ravel()[0]), int(ends.ravel()[0]), step)]
            if position >= len(picked):
                return False
            position = picked[position]
        elif op == "Shape":
            source = producer.inputs[0]
            rank = len(ctx.shape(source) or [])
            start = normalize_axis(int(producer.attrs.get("start", 0)), rank)
            carried = ctx.ids(source).get(start + position)
            if carried is not None:
                if len(carried) != len(channel) or factor != unit:
                    return False
                if carried != channel:
                    ctx.couple(carried, channel)
                return True
            if literal is None or factor != len(channel) * unit:
                return False
            writer = partial(_write_traced_literal, path, literal, shape_input)
            ctx.fixup(node, [channel], writer, unit=unit)
            return True
        elif op not in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape"):
            return False
        path.append(follow)
        tensor = producer.inputs[follow]
    return False


def _write_traced_literal(path: list[int], literal: tuple[int, int], shape_input: int,
                          model: Model, node: gs.Node, sizes: list[int]) -> None:
    """Rewrite the Mul constant found by :func:`runtime_size_follows`: copy the chain of
    shape computations from ``node``'s target down to that Mul, so that nodes sharing the
    original chain keep it, and give the copy the new factor ``sizes[0]``."""
    step, const_index = literal
    tensor, position = node.inputs[shape_input], shape_input
    reader = node
    for depth, follow in enumerate(path[: step + 1]):
        producer = tensor.inputs[0]
        copy_out = gs.Variable(f"{tensor.name}_{node.name}", dtype=tensor.dtype, shape=tensor.shape)
        copy = gs.Node(producer.op, f"{producer.name}_{node.name}", dict(producer.attrs),
                       list(producer.inputs), [copy_out])
        model.graph.nodes.append(copy)
        reader.inputs[position] = copy_out
        if depth == step:
            old = copy.inputs[const_index]
            dtype = np.asarray(old.values if isinstance(old, gs.Constant) else 0).dtype
            copy.inputs[const_index] = gs.Constant(f"{copy.name}_factor", np.array(sizes[0], dtype=dtype))
            return
        reader, position, tensor = copy, follow, copy.inputs[follow]


def target_follows(node: gs.Node, out_axis: int, in_axis: int | None, ctx: ChannelContext,
                   ids: list[int], unit: int = 1) -> bool:
    """Make the target size at ``out_axis`` follow the kept ids: record a fixup for a
    literal; accept -1, 0 when ``in_axis == out_axis`` (it copies the same axis), and sizes
    computed from carried tensors. Returns False when the size cannot follow (the caller
    blocks the ids)."""
    slot = shape_slot(node, out_axis, ctx.shapes)
    if slot == "infer":
        return True
    if slot == "copy":
        return in_axis == out_axis
    if slot is None:
        return runtime_size_follows(node, out_axis, ctx, ids, unit)
    ctx.fixup(node, [ids], partial(write_target_dim, slot), unit=unit)
    return True


class ReshapeRule(ChannelRule):
    """Reshape: carried axes move, split into (unit, rest) or merge (module docstring)."""

    ops: ClassVar[frozenset[str]] = frozenset({"Reshape"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        x, out = node.inputs[0], node.outputs[0]
        in_shape, out_shape = ctx.shapes.get(x.name), ctx.shapes.get(out.name)
        groups = reshape_groups(list(in_shape), list(out_shape)) if in_shape and out_shape else None
        if groups is None:
            ctx.block_all(x, f"Reshape '{node.name}' with unknown shapes")
            return
        ids = ctx.ids(x)
        out_ids: AxisIds = {}
        for axis, channel in ids.items():
            group = next(((gi, gj) for gi, gj in groups if axis in gi), None)
            moved = self._place(node, ctx, axis, channel, group, ids, in_shape, out_shape)
            if moved is None:
                ctx.block(channel, f"Reshape '{node.name}' regroups their axis")
                continue
            if moved == "blocked":
                continue
            out_ids.update(moved)
        ctx.set_ids(out, out_ids)

    @staticmethod
    def _place(node: gs.Node, ctx: ChannelContext, axis: int, channel: list[int],
               group: tuple[list[int], list[int]] | None, ids: AxisIds,
               in_shape: list[int], out_shape: list[int]) -> AxisIds | str | None:
        """The output ids for carried ``axis``, "blocked" when a size cannot follow, or
        None for a regrouping no rule covers."""
        if group is None or in_shape[axis] == 1:
            return None
        gi, gj = group
        ni = [a for a in gi if in_shape[a] != 1]
        nj = [b for b in gj if out_shape[b] != 1]
        runtime = f"Reshape '{node.name}' computes their size at run time"
        if ni == [axis] and len(nj) == 1:  # move
            target = nj[0]
            if not target_follows(node, target, axis, ctx, channel):
                ctx.block(channel, runtime)
                return "blocked"
            return {target: channel}
        if ni == [axis] and len(nj) > 1:  # split
            return ReshapeRule._split(node, ctx, channel, nj, out_shape, runtime)
        if axis in ni and len(nj) == 1 and not any(a in ids for a in ni if a != axis):  # merge
            sizes = [in_shape[a] for a in ni]
            coords = np.indices(sizes).reshape(len(ni), -1)[ni.index(axis)]
            merged = [channel[c] for c in coords]
            unit = int(np.prod(sizes)) // len(channel)
            if not target_follows(node, nj[0], None, ctx, channel, unit=unit):
                ctx.block(channel, runtime)
                return "blocked"
            return {nj[0]: merged}
        return None

    @staticmethod
    def _split(node: gs.Node, ctx: ChannelContext, channel: list[int], nj: list[int],
               out_shape: list[int], runtime: str) -> AxisIds | str | None:
        """Split one carried axis into ``nj``. Distinct ids (fresh channels): the outermost
        output axis is the unit, its inner positions are coupled (hidden -> heads x head
        size). Ids that repeat along all but one output axis (a merge being undone, such as
        windows x heads in Swin): they move to that axis."""
        sizes = [out_shape[b] for b in nj]
        grid = np.array(channel).reshape(sizes)
        if len(set(channel)) == len(channel):
            outer = nj[0]
            size = len(channel) // sizes[0]
            per_head = [channel[h * size] for h in range(sizes[0])]
            inner_fixed = all(isinstance(shape_slot(node, b, ctx.shapes), tuple) or
                              shape_slot(node, b, ctx.shapes) == "infer" for b in nj[1:])
            if not inner_fixed or not target_follows(node, outer, None, ctx, per_head):
                ctx.block(channel, runtime)
                return "blocked"
            for h in range(sizes[0]):
                members = channel[h * size : (h + 1) * size]
                ctx.couple([members[0]] * (len(members) - 1), members[1:])
            return {outer: per_head}
        for t, b in enumerate(nj):
            along = np.moveaxis(grid, t, 0).reshape(sizes[t], -1)
            if (along == along[:, :1]).all():
                ids = [int(i) for i in along[:, 0]]
                others_fixed = all(isinstance(shape_slot(node, o, ctx.shapes), tuple) or
                                   shape_slot(node, o, ctx.shapes) == "infer" for o in nj if o != b)
                if not others_fixed or not target_follows(node, b, None, ctx, ids):
                    ctx.block(channel, runtime)
                    return "blocked"
                return {b: ids}
        return None

