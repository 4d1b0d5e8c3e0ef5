"""Normalization, Softmax and reductions: rules for ops that act across channels."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optcc.channels.graph import AxisIds, ChannelContext, normalize_axis
from optcc.channels.rules import ChannelRule
from optcc.ir.model import Model


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


class SoftmaxRule(ChannelRule):
    """Softmax normalises over its axis: ids there are blocked, others pass."""

    ops: ClassVar[frozenset[str]] = frozenset({"Softmax"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        axis = normalize_axis(int(node.attrs.get("axis", -1)), ctx.rank(node.inputs[0]) or 0)
        ids = ctx.ids(node.inputs[0])
        if axis in ids:
            ctx.block(ids[axis], f"Softmax '{node.name}' normalizes over them")
        ctx.set_ids(node.outputs[0], {k: v for k, v in ids.items() if k != axis})


def _const(name: str, value: float | list[int], dtype: type = np.float32) -> gs.Constant:
    return gs.Constant(name, np.array(value, dtype=dtype))


def _node(model: Model, op: str, name: str, inputs: list[gs.Tensor], attrs: dict | None = None,
          dtype: Any = np.float32) -> gs.Variable:
    out = gs.Variable(f"{name}_out", dtype=dtype)
    model.graph.nodes.append(gs.Node(op, name, attrs or {}, inputs, [out]))
    return out


def _reduce(model: Model, op: str, name: str, x: gs.Tensor, axes: list[int]) -> gs.Variable:
    if model.opset >= 18 or (op == "ReduceSum" and model.opset >= 13):
        return _node(model, op, name, [x, _const(f"{name}_axes", axes, np.int64)], {"keepdims": 1})
    return _node(model, op, name, [x], {"axes": axes, "keepdims": 1})


def _write_exact_layernorm(width: int, axis: int, model: Model, node: gs.Node, sizes: list[int]) -> None:
    """Replace a LayerNormalization over pruned channels by elementary ops whose statistics
    divide by the original width (what the zeroed original computes):
    ``mu = sum(x)/C``, ``var = sum(x^2)/C - mu^2``, ``y = (x - mu)/sqrt(var + eps)*g + b``."""
    if sizes[0] == width:
        return
    x, gamma = node.inputs[0], node.inputs[1]
    beta = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    eps = float(node.attrs.get("epsilon", 1e-5))
    name, y = node.name, node.outputs[0]
    inv = _const(f"{name}_inv_width", 1.0 / width)
    mean = _node(model, "Mul", f"{name}_mean", [_reduce(model, "ReduceSum", f"{name}_sum", x, [axis]), inv])
    square = _node(model, "Mul", f"{name}_sq", [x, x])
    second = _node(model, "Mul", f"{name}_m2", [_reduce(model, "ReduceSum", f"{name}_sum2", square, [axis]), inv])
    var = _node(model, "Sub", f"{name}_var", [second, _node(model, "Mul", f"{name}_mean2", [mean, mean])])
    std = _node(model, "Sqrt", f"{name}_std", [_node(model, "Add", f"{name}_eps", [var, _const(f"{name}_epsilon", eps)])])
    normed = _node(model, "Div", f"{name}_div", [_node(model, "Sub", f"{name}_center", [x, mean]), std])
    scaled = _node(model, "Mul", f"{name}_scale", [normed, gamma])
    node.outputs.clear()
    node.inputs.clear()
    model.graph.nodes.remove(node)
    if beta is not None:
        model.graph.nodes.append(gs.Node("Add", f"{name}_shift", inputs=[scaled, beta], outputs=[y]))
    else:
        model.graph.nodes.append(gs.Node("Identity", f"{name}_identity", inputs=[scaled], outputs=[y]))


class LayerNormRule(ChannelRule):
    """LayerNormalization normalizes over its trailing axes. Ids before them pass. Ids on
    the one normalized axis (the residual width) are blocked unless the analysis allows
    normalized channels (:class:`~optcc.channels.graph.ChannelOptions`); then the scale and
    bias are sliced, and with ``norm_statistics="original"`` the op is rewritten so its
    statistics still divide by the original width."""

    ops: ClassVar[frozenset[str]] = frozenset({"LayerNormalization"})

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        shape = ctx.shape(node.inputs[0]) or []
        axis = normalize_axis(int(node.attrs.get("axis", -1)), len(shape))
        out: AxisIds = {}
        for k, channel in ctx.ids(node.inputs[0]).items():
            if k < axis:
                out[k] = channel
                continue
            why = self._why_not(node, ctx, k, axis, shape)
            if why:
                ctx.block(channel, why)
                continue
            for param in node.inputs[1:3]:
                if isinstance(param, gs.Constant):
                    offset = len(shape) - len(param.shape)
                    if k - offset >= 0 and param.shape[k - offset] == len(channel):
                        ctx.slice(param, k - offset, channel, node)
            if ctx.options.norm_statistics == "original":
                ctx.fixup(node, [channel], partial(_write_exact_layernorm, len(channel), k))
            out[k] = channel
        ctx.set_ids(node.outputs[0], out)

    @staticmethod
    def _why_not(node: gs.Node, ctx: ChannelContext, k: int, axis: int, shape: list[int]) -> str | None:
        reason = f"LayerNormalization '{node.name}' normalizes over them"
        if not ctx.options.normalized:
            return reason
        if any(shape[a] != 1 for a in range(axis, len(shape)) if a != k):
            return reason + " together with other axes"
        if any(o.outputs for o in node.outputs[1:]):
            return reason + " and its statistics are read"
        params = [p for p in node.inputs[1:3] if p.name]
        if any(not isinstance(p, gs.Constant) for p in params):
            return reason + " with computed scale or bias"
        return None


#: Reductions that give the same result with pruned channels as with zeroed ones.
ZERO_EXACT = frozenset({"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare"})


def _write_mean_of_original_width(width: int, centered_mean: gs.Tensor | None, model: Model,
                                  node: gs.Node, sizes: list[int]) -> None:
    """Make a ReduceMean over pruned channels divide by the original width: scale by
    ``C'/C``. For the variance of a centered input, ``mean((x - mu)^2)``, the zeroed
    channels also contributed ``mu^2`` each: add ``(C - C')/C * mu^2``."""
    kept = sizes[0]
    if kept == width:
        return
    y = node.outputs[0]
    raw = gs.Variable(f"{y.name}_kept_mean", dtype=y.dtype)
    node.outputs[0] = raw
    ratio = _const(f"{node.name}_width_ratio", kept / width)
    if centered_mean is None:
        model.graph.nodes.append(gs.Node("Mul", f"{node.name}_rescale", inputs=[raw, ratio], outputs=[y]))
        return
    scaled = _node(model, "Mul", f"{node.name}_rescale", [raw, ratio])
    square = _node(model, "Mul", f"{node.name}_mu2", [centered_mean, centered_mean])
    missing = _node(model, "Mul", f"{node.name}_missing", [square, _const(f"{node.name}_missing_ratio", (width - kept) / width)])
    model.graph.nodes.append(gs.Node("Add", f"{node.name}_with_zeros", inputs=[scaled, missing], outputs=[y]))


def _centered_mean(x: gs.Tensor, axes: list[int], ctx: ChannelContext) -> gs.Tensor | None:
    """For ``x = (z - mu)^2`` (Pow 2 or a self-Mul) with ``mu`` a ReduceMean of ``z`` over
    the same axes: ``mu``. None otherwise."""
    producer = x.inputs[0] if x.inputs else None
    if producer is None:
        return None
    if producer.op == "Pow":
        exponent = ctx.constant_value(producer.inputs[1])
        if exponent is None or float(exponent.ravel()[0]) != 2.0:
            return None
        base = producer.inputs[0]
    elif producer.op == "Mul" and producer.inputs[0] is producer.inputs[1]:
        base = producer.inputs[0]
    else:
        return None
    sub = base.inputs[0] if base.inputs else None
    if sub is None or sub.op != "Sub":
        return None
    mean = sub.inputs[1]
    reduce = mean.inputs[0] if mean.inputs else None
    if reduce is None or reduce.op != "ReduceMean" or reduce.inputs[0] is not sub.inputs[0]:
        return None
    return mean if _reduce_axes(reduce, ctx) == axes else None


def _reduce_axes(node: gs.Node, ctx: ChannelContext) -> list[int] | None:
    rank = ctx.rank(node.inputs[0]) or 0
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.constant_value(node.inputs[1])
        if value is None:
            return None
        axes = [int(a) for a in value.ravel()]
    if not axes:
        return [] if int(node.attrs.get("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(normalize_axis(int(a), rank) for a in axes)


class ReduceRule(ChannelRule):
    """Reductions carry the ids of the axes they keep (keepdims aware). Over a carried
    axis: sums (ReduceSum, L1, L2, SumSquare) are exact with pruned channels and pass;
    ReduceMean is allowed when the analysis allows normalized channels (decomposed
    LayerNorm and RMSNorm), divided by the original width with
    ``norm_statistics="original"``; other reductions block."""

    ops: ClassVar[frozenset[str]] = frozenset({
        "ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL1", "ReduceL2",
        "ReduceSumSquare", "ReduceProd", "ReduceLogSumExp", "ReduceLogSum",
    })

    def propagate(self, node: gs.Node, ctx: ChannelContext) -> None:
        axes = _reduce_axes(node, ctx)
        if axes is None:
            ctx.block_all(node.inputs[0], f"{node.op} '{node.name}' over axes known only at run time")
            return
        keep = int(node.attrs.get("keepdims", 1))
        out: AxisIds = {}
        for axis, channel in ctx.ids(node.inputs[0]).items():
            if axis not in axes:
                out[axis if keep else axis - sum(a < axis for a in axes)] = channel
            elif node.op in ZERO_EXACT:
                continue
            elif node.op == "ReduceMean" and ctx.options.normalized:
                if ctx.options.norm_statistics == "original":
                    centered = _centered_mean(node.inputs[0], axes, ctx)
                    ctx.fixup(node, [channel], partial(_write_mean_of_original_width,
                                                       len(channel), centered))
            else:
                ctx.block(channel, f"{node.op} '{node.name}' reduces over them")
        ctx.set_ids(node.outputs[0], out)
