"""Reshape: where a channel axis goes when a tensor is viewed with another shape
(:class:`ReshapeRule`), and how the target shape is made to follow the pruning.

The target size of a carried axis must follow: a literal is rewritten (a
:class:`~optcc.channels.SizeFixup`), -1 is inferred, 0 copies the input's dimension (valid
only for an axis that stays at the same index), and a size computed at run time must be
traced to the Shape of a carried tensor (:func:`runtime_size_follows`); any other run-time
size blocks the ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class ShapeTrace:
    """Where a run-time target size comes from (see :func:`trace_size`): ``end`` is
    ``"carried"`` (``Shape(x)`` on a dimension of ``x`` that carries ``ids``),
    ``"uncarried"`` (a dimension without ids, such as the batch), or ``"keep"`` (the -1 of
    ``expand(batch, -1, -1)``); ``factor`` multiplies it, through the Mul constant at
    ``literal`` (its step in ``path`` and input index) when there is one."""

    end: str
    ids: list[int] | None = None
    factor: int = 1
    path: list[int] = field(default_factory=list)
    literal: tuple[int, int] | None = None


def trace_size(node: gs.Node, axis: int, ctx: ChannelContext, shape_input: int = 1) -> ShapeTrace | None:
    """Trace element ``axis`` of ``node``'s target shape (input ``shape_input``) back
    through the ops exporters build shapes with: Concat (to the piece holding the element),
    Gather/Slice of a shape vector, Unsqueeze/Squeeze, Cast, Identity, a flattening
    Reshape, the ``Where(shape == -1, 1, shape)`` of expand, and multiplication by a
    constant. None when it goes anywhere else."""
    tensor, position = node.inputs[shape_input], axis
    trace = ShapeTrace("")
    keep_if_minus_one = False  # inside Where(shape == -1, 1, shape): -1 keeps the input size
    for _ in range(32):
        producer = tensor.inputs[0] if tensor.inputs else None
        value = ctx.constant_value(tensor)
        if value is not None:
            flat = value.ravel()
            ok = keep_if_minus_one and position < flat.size and int(flat[position]) == -1
            return ShapeTrace("keep") if ok else None
        if producer is None:
            return None
        op = producer.op
        follow = 0
        if op == "Concat":
            found = concat_part_at(producer, position, ctx.shapes)
            if found is None:
                return None
            follow, position = producer.inputs.index(found[0]), found[1]
        elif op == "Where":
            follow = 2  # the "shape" branch of Where(shape == -1, 1, shape)
            keep_if_minus_one = node.op == "Expand"
        elif op == "Mul":
            const = [ctx.constant_value(t) for t in producer.inputs]
            index = 1 if const[1] is not None and const[1].size == 1 else 0
            if const[index] is None or const[index].size != 1:
                return None
            trace.factor *= int(const[index].ravel()[0])
            trace.literal = (len(trace.path), index)
            follow = 1 - index
        elif op == "Gather":
            index_value = ctx.constant_value(producer.inputs[1])
            if index_value is None:
                return None
            position = int(index_value.ravel()[position if index_value.size > 1 else 0])
        elif op == "Slice":
            starts, ends = (ctx.constant_value(t) for t in producer.inputs[1:3])
            steps = ctx.constant_value(producer.inputs[4]) if len(producer.inputs) > 4 else None
            length = (ctx.shape(producer.inputs[0]) or [0])[0]
            if starts is None or ends is None:
                return None
            step = int(steps.ravel()[0]) if steps is not None else 1
            picked = range(length)[slice(int(starts.ravel()[0]), int(ends.ravel()[0]), step)]
            if position >= len(picked):
                return None
            position = picked[position]
        elif op == "Shape":
            source = producer.inputs[0]
            rank = len(ctx.shape(source) or [])
            start = normalize_axis(int(producer.attrs.get("start", 0)), rank)
            trace.ids = ctx.ids(source).get(start + position)
            trace.end = "carried" if trace.ids is not None else "uncarried"
            return trace
        elif op not in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape"):
            return None
        trace.path.append(follow)
        tensor = producer.inputs[follow]
    return None


def runtime_size_follows(node: gs.Node, axis: int, ctx: ChannelContext, channel: list[int],
                         unit: int = 1, shape_input: int = 1) -> bool:
    """Whether the target size at ``axis`` of ``node`` (a Reshape or Expand; a
    ConstantOfShape with ``shape_input=0``), computed at run time, follows the pruning of
    ``channel`` (``unit`` positions per id), traced by :func:`trace_size`.

    It follows when it is ``unit`` times a dimension that carries the same number of ids
    (they are coupled with ``channel``), or, for an Expand, the -1 of ``expand(batch, -1,
    -1)`` (the input keeps its size). When it is a dimension without ids (the batch) times
    a literal equal to the channel count (``view(batch * heads, ...)``), the literal is
    rewritten on a private copy of the computation.
    """
    trace = trace_size(node, axis, ctx, shape_input)
    if trace is None:
        return False
    if trace.end == "keep":
        return True
    if trace.end == "carried":
        assert trace.ids is not None
        repeated = _repeated(trace.ids)
        if repeated is None or len(trace.ids) * trace.factor != len(channel) * unit:
            return False
        distinct, _ = repeated
        if len(distinct) != len(channel):
            return False
        if distinct != channel:
            ctx.couple(distinct, channel)
        return True
    if trace.literal is None or trace.factor != len(channel) * unit:
        return False
    writer = partial(_write_traced_literal, trace.path, trace.literal, shape_input)
    ctx.fixup(node, [channel], writer, unit=unit)
    return True


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


#: Reshapes of tensors with more elements than this (in the probe's shapes) are not
#: analysed position by position; their carried ids are blocked.
MAX_GRID = 20_000_000


def _fixed_size(node: gs.Node, axis: int, ctx: ChannelContext, carried_axes: set[int]) -> bool:
    """Whether the target size at ``axis`` stays what it is when channels go: a literal,
    -1, 0 copying an input axis that carries no ids, or a run-time size read from a
    dimension without ids."""
    slot = shape_slot(node, axis, ctx.shapes)
    if slot is None:
        trace = trace_size(node, axis, ctx)
        return trace is not None and trace.end == "uncarried" and trace.literal is None
    return isinstance(slot, tuple) or slot == "infer" or (slot == "copy" and axis not in carried_axes)


def _repeated(ids: list[int]) -> tuple[list[int], int] | None:
    """``ids`` as (distinct ids in order, r) when every id appears r times, else None."""
    distinct = list(dict.fromkeys(ids))
    r = len(ids) // len(distinct)
    counts = {i: 0 for i in distinct}
    for i in ids:
        counts[i] += 1
    return (distinct, r) if all(c == r for c in counts.values()) else None


class ReshapeRule(ChannelRule):
    """Reshape: where a carried axis goes, found position by position.

    The ids of the carried axis are laid out over the probe's input shape and reshaped
    like the data (row-major, as ONNX does). When they then vary along one output axis
    only, they move there: a plain move, a merge with other axes (each position takes the
    id of its coordinate: ``[.., heads, head_size] -> [.., hidden]``, GQA's ``[kv, rep] ->
    heads``, windows x heads in Swin, MobileViT's patch unfolding), or the undoing of one.
    When distinct ids spread over several output axes (``[.., hidden] -> [.., heads,
    head_size]``), the outermost axis whose positions hold disjoint sets of ids becomes the
    unit: the ids of each set are coupled (one head) and that axis carries one id per set.
    Anything else blocks the ids. The target size of the axis must follow the pruning (see
    :func:`target_follows`); the other target sizes must not depend on it.
    """

    ops: ClassVar[frozenset[str]] = frozenset({"Reshape"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        x, out = node.inputs[0], node.outputs[0]
        in_shape, out_shape = ctx.shapes.get(x.name), ctx.shapes.get(out.name)
        if in_shape is None or out_shape is None or int(np.prod(in_shape)) != int(np.prod(out_shape)):
            ctx.block_all(x, f"Reshape '{node.name}' with unknown shapes")
            return
        if int(np.prod(in_shape)) > MAX_GRID:
            ctx.block_all(x, f"Reshape '{node.name}' of a tensor too large to analyse")
            return
        ids = ctx.ids(x)
        out_ids: AxisIds = {}
        for axis, channel in ids.items():
            placed = self._place(node, ctx, axis, channel, set(ids), list(in_shape), list(out_shape))
            if placed is None:
                ctx.block(channel, f"Reshape '{node.name}' regroups their axis")
            elif isinstance(placed, str):
                ctx.block(channel, placed)
            else:
                out_ids.update(placed)
        ctx.set_ids(out, out_ids)

    @staticmethod
    def _place(node: gs.Node, ctx: ChannelContext, axis: int, channel: list[int],
               carried: set[int], in_shape: list[int], out_shape: list[int]) -> AxisIds | str | None:
        """The output ids of carried ``axis``; a reason string when its size cannot follow;
        None when the reshape regroups it beyond what the rule covers."""
        runtime = f"Reshape '{node.name}' computes their size at run time"
        index = [1] * len(in_shape)
        index[axis] = len(channel)
        grid = np.broadcast_to(np.array(channel).reshape(index), in_shape).reshape(out_shape)
        big = [b for b, d in enumerate(out_shape) if d != 1]
        for b in big:  # ids that vary along one output axis only: they move there
            along = np.moveaxis(grid, b, 0).reshape(out_shape[b], -1)
            if not (along == along[:, :1]).all():
                continue
            moved = [int(i) for i in along[:, 0]]
            repeated = _repeated(moved)
            if repeated is None:
                return None
            distinct, r = repeated
            same_place = b == axis and moved == channel
            if not target_follows(node, b, axis if same_place else None, ctx, distinct, unit=r):
                return runtime
            return {b: moved}
        if len(set(channel)) != len(channel):
            return None
        for b in big:  # distinct ids over several axes: the outermost disjoint split is the unit
            along = np.moveaxis(grid, b, 0).reshape(out_shape[b], -1)
            sets = [set(row.tolist()) for row in along]
            if sum(len(g) for g in sets) != len(channel) or len(set().union(*sets)) != len(channel):
                continue
            if not all(_fixed_size(node, o, ctx, carried) for o in big if o != b):
                return runtime
            per_unit = [int(row[0]) for row in along]
            if not target_follows(node, b, None, ctx, per_unit):
                return runtime
            for row in along:
                members = [int(i) for i in dict.fromkeys(row.tolist())]
                ctx.couple([members[0]] * (len(members) - 1), members[1:])
            return {b: per_unit}
        return None
