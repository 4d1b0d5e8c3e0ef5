"""Index mapping: from channel classes to edits of constants, attributes and shapes.

Given a :class:`~optcc.channels.ChannelAnalysis`, these functions change the graph it was
computed on:

- :func:`slice_channels` removes classes: every recorded constant keeps the positions
  whose id's class survives (``np.take`` along the recorded axis), and every
  :class:`~optcc.channels.SizeFixup` writes the new sizes;
- :func:`zero_channels` sets the removed classes' slices to zero instead (the reference a
  sliced model must equal);
- :func:`permute_channels` moves classes to other classes' positions, in every coupled
  constant at once (a lossless reordering, for layouts such as 2:4 sparsity).

Reshape targets are found by :func:`shape_slot`, which follows a target shape to the
constant that holds one of its dimensions, through a ``Concat`` of pieces when the exporter
assembled the shape at run time (:func:`concat_part_at`, the one walk over Concat offsets).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.analysis import ChannelAnalysis
from optcc.ir.model import Model

#: Where one dimension of a Reshape or Expand target shape lives: ``(part, index)`` for a
#: literal — element ``index`` of the constant that is the target itself (``part == -1``)
#: or input ``part`` of the ``Concat`` that assembles it; ``"infer"`` (-1: Reshape infers
#: it); ``"copy"`` (0: Reshape copies the input's dimension at the same index); or None
#: when it is computed at run time.
ShapeSlot = tuple[int, int] | str | None


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or a ``Constant`` node's output."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None


def concat_part_at(
    concat: gs.Node, position: int, shapes: Mapping[str, list[int]] | None = None
) -> tuple[gs.Tensor, int] | None:
    """The input of a 1-D ``Concat`` that holds element ``position`` of its output, and the
    element's index inside that input; None when ``position`` is past the end.

    Each input's length comes from its constant value, else from ``shapes`` (the analysis'
    concrete shapes), else from its declared shape; an input of unknown length counts as
    one element (shape Concats are built from single dimensions).
    """
    offset = 0
    for part in concat.inputs:
        value = constant_value(part)
        if value is not None:
            length = int(value.size)
        elif shapes is not None and part.name in shapes:
            length = int(np.prod(shapes[part.name]))
        elif part.shape is not None and all(isinstance(d, int) for d in part.shape):
            length = int(np.prod(part.shape))
        else:
            length = 1
        if offset <= position < offset + length:
            return part, position - offset
        offset += length
    return None


def _slot_in(value: np.ndarray, part: int, index: int) -> ShapeSlot:
    dim = int(value.ravel()[index])
    return "infer" if dim == -1 else "copy" if dim == 0 else (part, index)


def shape_slot(
    node: gs.Node, axis: int, shapes: Mapping[str, list[int]] | None = None
) -> ShapeSlot:
    """Where the target size for ``axis`` of a Reshape or Expand (its second input) lives
    (see :data:`ShapeSlot`)."""
    shape = node.inputs[1]
    value = constant_value(shape)
    if value is not None:
        return _slot_in(value, -1, axis)
    producer = shape.inputs[0] if shape.inputs else None
    if producer is None or producer.op != "Concat":
        return None
    found = concat_part_at(producer, axis, shapes)
    if found is None:
        return None
    part, index = found
    value = constant_value(part)
    if value is None:
        return None
    return _slot_in(value, producer.inputs.index(part), index)


def _slot_holder(model: Model, node: gs.Node, slot: tuple[int, int], own: bool) -> tuple[gs.Node, int]:
    """The node and input position holding a literal slot of ``node``'s target shape. With
    ``own``, a Concat that other nodes read too is first copied for ``node`` alone."""
    part, _ = slot
    if part < 0:
        return node, 1
    target = node.inputs[1]
    concat = target.inputs[0]
    if own and len(target.outputs) > 1:
        private = gs.Variable(f"{target.name}_{node.name}", dtype=target.dtype, shape=target.shape)
        concat = gs.Node("Concat", f"{concat.name}_{node.name}", dict(concat.attrs),
                         list(concat.inputs), [private])
        model.graph.nodes.append(concat)
        node.inputs[1] = private
    return concat, part


def slot_value(node: gs.Node, slot: tuple[int, int]) -> int:
    """The number a literal :data:`ShapeSlot` of ``node`` holds."""
    part, index = slot
    holder = node.inputs[1] if part < 0 else node.inputs[1].inputs[0].inputs[part]
    value = constant_value(holder)
    assert value is not None
    return int(value.ravel()[index])


def set_shape_dim(model: Model, node: gs.Node, slot: ShapeSlot, size: int) -> None:
    """Write ``size`` into the target-shape slot ``slot`` of ``node`` (a Reshape or Expand).

    The constant holding it is replaced, for this node only, by an edited copy (exporters
    share shape constants, and whole shape Concats, between nodes that are pruned
    differently; the same constant can even appear twice in one Concat). Slots that follow
    the input by themselves (``"infer"``, ``"copy"``) need nothing.
    """
    if slot is None:
        raise ValueError(f"{node.op} '{node.name}': the target shape is computed at run time")
    if isinstance(slot, str):
        return
    reader, position = _slot_holder(model, node, slot, own=True)
    current = constant_value(reader.inputs[position])
    assert current is not None
    values = current.copy()
    values.reshape(-1)[slot[1]] = size
    reader.inputs[position] = gs.Constant(f"{reader.name}_shape{position}_{node.name}_{slot[1]}", values)


def materialize_constant_aliases(model: Model) -> int:
    """Turn constant aliases into real constants, so every weight and bias can be sliced.

    The legacy exporter deduplicates identical initializers through Identity nodes (fresh
    zero biases of different layers become ``Identity(first_bias)``), and graphs carry
    ``Constant`` nodes. Each reader gets its own constant (the graph computes the same
    function). Returns how many uses were replaced.
    """
    outputs = {id(t) for t in model.graph.outputs}
    replaced = 0
    for node in list(model.graph.nodes):
        if node.op == "Identity" and isinstance(node.inputs[0], gs.Constant):
            values = np.asarray(node.inputs[0].values)
        elif node.op == "Constant" and "value" in node.attrs:
            values = np.asarray(node.attrs["value"].values)
        else:
            continue
        out = node.outputs[0]
        if id(out) in outputs:
            continue
        for reader in list(out.outputs):
            copy = gs.Constant(f"{out.name}__{reader.name}", np.array(values))
            replaced += model.replace_all_uses(out, copy, nodes=[reader])
        node.outputs.clear()
    if replaced:
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return replaced


def unshare_conflicting_constants(model: Model, analysis: ChannelAnalysis) -> None:
    """Give a node its own copy of a constant that another node reads unsliced or slices
    differently.

    Exporters deduplicate identical initializers (freshly initialised biases are all zero),
    so one tensor can feed layers whose channels are edited differently. Readers that do not
    slice (a LayerNorm sharing a deduplicated zero bias) keep the original; the slicing
    nodes get one copy between them, and a node slicing it with other ids its own copy.
    """
    slicers: dict[int, set[int]] = defaultdict(set)
    for s in analysis.slices:
        if s.node is not None:
            slicers[id(s.tensor)].add(id(s.node))
    private: dict[int, gs.Constant] = {}
    for s in analysis.slices:
        tensor = s.tensor
        if id(tensor) in private:
            s.tensor = private[id(tensor)]
            continue
        readers = {id(n) for n in tensor.outputs}
        if s.node is not None and readers - slicers[id(tensor)]:
            clone = gs.Constant(f"{tensor.name}_pruned", np.array(tensor.values))
            slicing = [o.node for o in analysis.slices if o.tensor is tensor and o.node is not None]
            model.replace_all_uses(tensor, clone, nodes=slicing)
            private[id(tensor)] = clone
            s.tensor = clone
    for s in analysis.slices:
        if id(s.tensor) in private:
            s.tensor = private[id(s.tensor)]
    seen: dict[tuple[int, int], list[int]] = {}
    clones: dict[tuple[int, int], gs.Constant] = {}
    for s in analysis.slices:
        key = (id(s.tensor), s.axis)
        first = seen.setdefault(key, s.ids)
        if first is s.ids or first == s.ids or s.node is None:
            continue
        clone_key = (id(s.tensor), id(s.node))
        if clone_key not in clones:
            clone = gs.Constant(f"{s.tensor.name}_for_{s.node.name}", np.array(s.tensor.values))
            model.replace_all_uses(s.tensor, clone, nodes=[s.node])
            clones[clone_key] = clone
        s.tensor = clones[clone_key]


def _per_constant(
    model: Model, analysis: ChannelAnalysis
) -> list[tuple[gs.Constant, dict[int, list[int]]]]:
    """Per constant (by identity): the ids along each of its sliced axes."""
    unshare_conflicting_constants(model, analysis)
    out: dict[int, tuple[gs.Constant, dict[int, list[int]]]] = {}
    for s in analysis.slices:
        _, axes = out.setdefault(id(s.tensor), (s.tensor, {}))
        axes.setdefault(s.axis, s.ids)
    return list(out.values())


def slice_channels(model: Model, analysis: ChannelAnalysis, removed: set[int]) -> None:
    """Remove the classes ``removed`` (root ids) from ``model``, the analysed model: slice
    every recorded constant, apply every size fixup, and clear stale intermediate shapes
    (ONNX's checker rejects them; shape inference recomputes them)."""
    find = analysis.find
    for tensor, axes in _per_constant(model, analysis):
        values = np.asarray(tensor.values)
        for axis, ids in axes.items():
            keep = [i for i, cid in enumerate(ids) if find(cid) not in removed]
            if len(keep) < values.shape[axis]:
                values = np.take(values, keep, axis=axis)
        tensor.values = np.ascontiguousarray(values)
    for fixup in analysis.fixups:
        fixup.apply(model, lambda cid: find(cid) not in removed)
    model.graph.toposort()  # fixups may have inserted nodes
    clear_intermediate_shapes(model)


def clear_intermediate_shapes(model: Model) -> None:
    """Forget the shapes of every tensor but the graph's inputs and outputs."""
    ends = {id(t) for t in model.graph.inputs} | {id(t) for t in model.graph.outputs}
    for tensor in model.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in ends:
            tensor.shape = None


def zero_channels(model: Model, analysis: ChannelAnalysis, removed: set[int]) -> None:
    """Set every slice of the classes ``removed`` to zero in ``model`` (the analysed model):
    the reference a model edited by :func:`slice_channels` must equal."""
    find = analysis.find
    for tensor, axes in _per_constant(model, analysis):
        values = np.asarray(tensor.values).copy()
        for axis, ids in axes.items():
            drop = [i for i, cid in enumerate(ids) if find(cid) in removed]
            if drop:
                index: list[Any] = [slice(None)] * values.ndim
                index[axis] = drop
                values[tuple(index)] = 0
        tensor.values = values


def permute_channels(model: Model, analysis: ChannelAnalysis, moves: Mapping[int, int]) -> None:
    """Reorder channels losslessly: ``moves[a] = b`` puts class ``b``'s slices where class
    ``a``'s were, in every coupled constant at once. ``moves`` must be a permutation of
    its keys (its values are the same set of root ids), and the classes it exchanges must
    occupy equally many positions in every constant (classes of one
    :class:`~optcc.channels.ChannelGroup` do). The model computes the same function after
    the call; only the order of channels inside the layers changes.
    """
    find = analysis.find
    moves = {find(a): find(b) for a, b in moves.items()}
    if sorted(moves) != sorted(moves.values()):
        raise ValueError("permute_channels: the moves are not a permutation of their classes")
    for tensor, axes in _per_constant(model, analysis):
        values = np.asarray(tensor.values)
        for axis, ids in axes.items():
            positions: dict[int, list[int]] = defaultdict(list)
            for i, cid in enumerate(ids):
                positions[find(cid)].append(i)
            order = list(range(len(ids)))
            for dest, src in moves.items():
                if dest == src or dest not in positions and src not in positions:
                    continue
                if len(positions.get(dest, [])) != len(positions.get(src, [])):
                    raise ValueError(
                        f"permute_channels: classes {dest} and {src} occupy different numbers "
                        f"of positions in '{tensor.name}'"
                    )
                for d, s in zip(positions[dest], positions[src], strict=True):
                    order[d] = s
            if order != list(range(len(ids))):
                values = np.take(values, order, axis=axis)
        tensor.values = np.ascontiguousarray(values)
