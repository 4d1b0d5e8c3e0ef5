"""ONNX operators in torch, for the trainable view (:mod:`optcc.torchview`).

:class:`OnnxOps` holds one method per ONNX operator, ``op_<OpType>(node, *inputs)``, taking
the node (for its attributes) and its inputs as torch tensors (``None`` for an omitted
optional input), and returning one tensor or a tuple, one per output. Float math stays
differentiable; integer tensors (shapes, axes, indices) are computed exactly. An operator
without a method here is one the view cannot run: :class:`optcc.GraphModule` names it before
any training starts.

Each operator follows the ONNX specification across the opsets exporters use: inputs that
moved from attributes to inputs (``axes`` of the reductions and Squeeze/Unsqueeze, ``split``)
are read from either place. ``tests/test_torchview_ops.py`` checks every one against ONNX
Runtime, gradients included.

Quantization: ``QuantizeLinear → DequantizeLinear`` becomes fake quantization with a
straight-through estimator (:func:`fake_quantize`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.errors import ModelError

try:  # torch is optional: the view reports its absence when it is created
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]


def _ints(t: Any) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _pads(node: gs.Node, rank: int) -> list[int]:
    pads = list(node.attrs.get("pads", [0] * (2 * rank)))
    return pads


def _explicit_pads(node: gs.Node, spatial: list[int], kernel: list[int]) -> list[int]:
    """The node's pads as ``[begin..., end...]``, with ``auto_pad`` SAME_UPPER/SAME_LOWER
    resolved: output size ceil(in / stride), the odd pixel at the end (UPPER) or start."""
    nd = len(kernel)
    mode = node.attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", "VALID"):
        return _pads(node, nd) if mode == "NOTSET" else [0] * (2 * nd)
    strides = list(node.attrs.get("strides", [1] * nd))
    dilations = list(node.attrs.get("dilations", [1] * nd))
    begin, end = [], []
    for size, k, st, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((-(-size // st) - 1) * st + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - small if mode == "SAME_UPPER" else small)
    return begin + end


class RoundSTE(torch.autograd.Function if torch is not None else object):  # type: ignore[misc]
    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:  # noqa: D102
        return grad


def fake_quantize(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int, axis: int | None) -> Any:
    """Quantize-dequantize with a straight-through estimator (gradient 1 inside the range)."""
    scale, zero_point = scale.to(x.device), zero_point.to(x.device)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = RoundSTE.apply(x / scale) + zero_point
    q = torch.clamp(q, qmin, qmax)
    return (q - zero_point) * scale


QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


class OnnxOps:
    """ONNX operators as torch code; mixed into :class:`optcc.GraphModule`."""

    training: bool
    update_batchnorm: bool

    def op_Identity(self, node: gs.Node, x: Any) -> Any:
        return x

    def op_Dropout(self, node: gs.Node, x: Any, *rest: Any) -> Any:
        return x, torch.ones(x.shape, dtype=torch.bool)  # inference: nothing dropped

    def op_Constant(self, node: gs.Node) -> Any:
        attrs = node.attrs
        if "value" in attrs:
            value = np.asarray(attrs["value"].values)
        elif "value_float" in attrs or "value_floats" in attrs:
            value = np.asarray(attrs.get("value_float", attrs.get("value_floats")), np.float32)
        elif "value_int" in attrs or "value_ints" in attrs:
            value = np.asarray(attrs.get("value_int", attrs.get("value_ints")), np.int64)
        else:
            raise ModelError(f"node '{node.name}' (Constant): only tensor, float and int values are supported")
        return torch.from_numpy(np.array(value))

    def op_Relu(self, node: gs.Node, x: Any) -> Any:
        return torch.relu(x)

    def op_LeakyRelu(self, node: gs.Node, x: Any) -> Any:
        return F.leaky_relu(x, float(node.attrs.get("alpha", 0.01)))

    def op_Sigmoid(self, node: gs.Node, x: Any) -> Any:
        return torch.sigmoid(x)

    def op_HardSigmoid(self, node: gs.Node, x: Any) -> Any:
        return torch.clamp(x * float(node.attrs.get("alpha", 0.2)) + float(node.attrs.get("beta", 0.5)), 0, 1)

    def op_HardSwish(self, node: gs.Node, x: Any) -> Any:
        return F.hardswish(x)

    def op_Tanh(self, node: gs.Node, x: Any) -> Any:
        return torch.tanh(x)

    def op_Erf(self, node: gs.Node, x: Any) -> Any:
        return torch.erf(x)

    def op_Gelu(self, node: gs.Node, x: Any) -> Any:
        approx = node.attrs.get("approximate", "none")
        return F.gelu(x, approximate="tanh" if approx in ("tanh", b"tanh") else "none")

    def op_Softplus(self, node: gs.Node, x: Any) -> Any:
        return F.softplus(x)

    def op_Sqrt(self, node: gs.Node, x: Any) -> Any:
        return torch.sqrt(x)

    def op_Exp(self, node: gs.Node, x: Any) -> Any:
        return torch.exp(x)

    def op_Log(self, node: gs.Node, x: Any) -> Any:
        return torch.log(x)

    def op_Neg(self, node: gs.Node, x: Any) -> Any:
        return -x

    def op_Abs(self, node: gs.Node, x: Any) -> Any:
        return torch.abs(x)

    def op_Reciprocal(self, node: gs.Node, x: Any) -> Any:
        return 1.0 / x

    def op_Clip(self, node: gs.Node, x: Any, lo: Any = None, hi: Any = None) -> Any:
        # bounds are inputs from opset 11, attributes before
        lo = node.attrs.get("min", lo) if lo is None else lo
        hi = node.attrs.get("max", hi) if hi is None else hi
        if lo is not None:
            x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
        if hi is not None:
            x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
        return x

    def op_Add(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a + b

    def op_Sub(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a - b

    def op_Mul(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a * b

    def op_Div(self, node: gs.Node, a: Any, b: Any) -> Any:
        if not a.is_floating_point() and not b.is_floating_point():
            return torch.div(a, b, rounding_mode="trunc")
        return a / b

    def op_Pow(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.pow(a, b)

    def op_Max(self, node: gs.Node, *xs: Any) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = torch.maximum(out, x)
        return out

    def op_Min(self, node: gs.Node, *xs: Any) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = torch.minimum(out, x)
        return out

    def op_Sum(self, node: gs.Node, *xs: Any) -> Any:
        return sum(xs[1:], xs[0])

    def op_Equal(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a == b

    def op_Less(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a < b

    def op_Greater(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a > b

    def op_Not(self, node: gs.Node, a: Any) -> Any:
        return ~a

    def op_Where(self, node: gs.Node, c: Any, a: Any, b: Any) -> Any:
        return torch.where(c, a, b)

    def op_Cast(self, node: gs.Node, x: Any) -> Any:
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
        return x.to(torch.from_numpy(np.zeros(0, dtype)).dtype)

    def op_Conv(self, node: gs.Node, x: Any, w: Any, b: Any = None) -> Any:
        nd = w.ndim - 2
        pads = _explicit_pads(node, list(x.shape[2:]), list(w.shape[2:]))
        stride = node.attrs.get("strides", [1] * nd)
        dilation = node.attrs.get("dilations", [1] * nd)
        group = int(node.attrs.get("group", 1))
        if pads[:nd] != pads[nd:]:
            pad = [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]
            x, pads = F.pad(x, pad), [0] * (2 * nd)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        return conv(x, w, b, stride, pads[:nd], dilation, group)

    def op_ConvTranspose(self, node: gs.Node, x: Any, w: Any, b: Any = None) -> Any:
        nd = w.ndim - 2
        pads = _pads(node, nd)
        if pads[:nd] != pads[nd:]:
            raise ModelError(f"node '{node.name}': asymmetric ConvTranspose padding is not supported")
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        return conv(x, w, b, node.attrs.get("strides", [1] * nd), pads[:nd],
                    node.attrs.get("output_padding", [0] * nd), int(node.attrs.get("group", 1)),
                    node.attrs.get("dilations", [1] * nd))

    def op_Gemm(self, node: gs.Node, a: Any, b: Any, c: Any = None) -> Any:
        if int(node.attrs.get("transA", 0)):
            a = a.t()
        if int(node.attrs.get("transB", 0)):
            b = b.t()
        out = float(node.attrs.get("alpha", 1.0)) * (a @ b)
        if c is not None:
            out = out + float(node.attrs.get("beta", 1.0)) * c
        return out

    def op_MatMul(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.matmul(a, b)

    def op_BatchNormalization(self, node: gs.Node, x: Any, g: Any, b: Any, m: Any, v: Any) -> Any:
        # In training mode with update_batchnorm, batch statistics normalise and the running
        # statistics follow them (momentum 0.1, as torch.nn.BatchNorm does).
        training = self.training and self.update_batchnorm
        return F.batch_norm(x, m, v, g, b, training, 0.1, float(node.attrs.get("epsilon", 1e-5)))

    def op_LayerNormalization(self, node: gs.Node, x: Any, g: Any, b: Any = None) -> Any:
        # y = (x - mean) / sqrt(var + eps) * g + b over the axes from `axis` on; optional
        # outputs: the mean and 1 / sqrt(var + eps), with the reduced axes kept as 1.
        axis = int(node.attrs.get("axis", -1))
        axis = axis + x.ndim if axis < 0 else axis
        eps = float(node.attrs.get("epsilon", 1e-5))
        if len(node.outputs) == 1 and tuple(g.shape) == tuple(x.shape[axis:]) and (
                b is None or tuple(b.shape) == tuple(x.shape[axis:])):
            return F.layer_norm(x, x.shape[axis:], g, b, eps)
        dims = tuple(range(axis, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        inv_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
        y = (x - mean) * inv_std * g
        return (y if b is None else y + b), mean, inv_std

    def op_RMSNormalization(self, node: gs.Node, x: Any, g: Any) -> Any:
        # opset 23: y = x / sqrt(mean(x^2) + eps) * g over the axes from `axis` on
        axis = int(node.attrs.get("axis", -1))
        axis = axis + x.ndim if axis < 0 else axis
        dims = tuple(range(axis, x.ndim))
        eps = float(node.attrs.get("epsilon", 1e-5))
        return x * torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + eps) * g

    def op_InstanceNormalization(self, node: gs.Node, x: Any, g: Any, b: Any) -> Any:
        return F.instance_norm(x, weight=g, bias=b, eps=float(node.attrs.get("epsilon", 1e-5)))

    def op_GroupNormalization(self, node: gs.Node, x: Any, g: Any, b: Any) -> Any:
        # Scale and bias are per group in opset 18 and per channel from opset 21 (the two
        # agree when there are as many groups as channels).
        groups = int(node.attrs["num_groups"])
        channels = x.shape[1]
        if g.numel() == groups and groups != channels:
            g, b = g.repeat_interleave(channels // groups), b.repeat_interleave(channels // groups)
        return F.group_norm(x, groups, g, b, float(node.attrs.get("epsilon", 1e-5)))

    def op_Softmax(self, node: gs.Node, x: Any) -> Any:
        return torch.softmax(x, int(node.attrs.get("axis", -1)))

    def op_LogSoftmax(self, node: gs.Node, x: Any) -> Any:
        return torch.log_softmax(x, int(node.attrs.get("axis", -1)))

    def _pool(self, node: gs.Node, x: Any, kind: str) -> Any:
        k = node.attrs["kernel_shape"]
        nd = len(k)
        pads = _explicit_pads(node, list(x.shape[2:]), list(k))
        stride = node.attrs.get("strides", [1] * nd)
        if pads[:nd] != pads[nd:]:
            pad = [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]
            x = F.pad(x, pad, value=-math.inf if kind == "max" else 0.0)
            pads = [0] * (2 * nd)
        ceil = bool(node.attrs.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, k, stride, pads[:nd], node.attrs.get("dilations", [1] * nd), ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(x, k, stride, pads[:nd], ceil, bool(node.attrs.get("count_include_pad", 0)))

    def op_MaxPool(self, node: gs.Node, x: Any) -> Any:
        return self._pool(node, x, "max")

    def op_AveragePool(self, node: gs.Node, x: Any) -> Any:
        return self._pool(node, x, "avg")

    def op_GlobalAveragePool(self, node: gs.Node, x: Any) -> Any:
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)

    def op_GlobalMaxPool(self, node: gs.Node, x: Any) -> Any:
        return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)

    def op_Flatten(self, node: gs.Node, x: Any) -> Any:
        axis = int(node.attrs.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)

    def op_Reshape(self, node: gs.Node, x: Any, shape: Any) -> Any:
        dims = _ints(shape)
        if not int(node.attrs.get("allowzero", 0)):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    def op_Transpose(self, node: gs.Node, x: Any) -> Any:
        perm = node.attrs.get("perm") or list(reversed(range(x.ndim)))
        return x.permute(*perm)

    def op_Shape(self, node: gs.Node, x: Any) -> Any:
        shape = list(x.shape)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
        return torch.tensor(shape[start:end], dtype=torch.int64)

    def op_Gather(self, node: gs.Node, x: Any, idx: Any) -> Any:
        axis = int(node.attrs.get("axis", 0))
        axis = axis + x.ndim if axis < 0 else axis
        idx = idx.long()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        out = torch.index_select(x, axis, idx.reshape(-1))
        return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))

    def op_GatherElements(self, node: gs.Node, x: Any, idx: Any) -> Any:
        axis = int(node.attrs.get("axis", 0))
        axis = axis + x.ndim if axis < 0 else axis
        idx = idx.long()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        return torch.gather(x, axis, idx)

    def op_GatherND(self, node: gs.Node, x: Any, idx: Any) -> Any:
        batch_dims = int(node.attrs.get("batch_dims", 0))
        idx = idx.long()
        depth = idx.shape[-1]
        if batch_dims:
            lead = x.shape[:batch_dims]
            flat_x = x.reshape(-1, *x.shape[batch_dims:])
            flat_i = idx.reshape(-1, *idx.shape[batch_dims:])
            outs = [xi[tuple(ii.reshape(-1, depth).t())].reshape(*ii.shape[:-1], *xi.shape[depth:])
                    for xi, ii in zip(flat_x, flat_i, strict=True)]
            return torch.stack(outs).reshape(*lead, *outs[0].shape)
        picked = x[tuple(idx.reshape(-1, depth).t())]
        return picked.reshape(*idx.shape[:-1], *x.shape[depth:])

    def op_IsNaN(self, node: gs.Node, x: Any) -> Any:
        return torch.isnan(x)

    def op_IsInf(self, node: gs.Node, x: Any) -> Any:
        return torch.isinf(x)

    def op_And(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.logical_and(a, b)

    def op_Or(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.logical_or(a, b)

    def op_LessOrEqual(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a <= b

    def op_GreaterOrEqual(self, node: gs.Node, a: Any, b: Any) -> Any:
        return a >= b

    def op_Floor(self, node: gs.Node, x: Any) -> Any:
        return torch.floor(x)

    def op_Unsqueeze(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        axes_list = _ints(axes) if axes is not None else list(node.attrs["axes"])
        rank = x.ndim + len(axes_list)
        for a in sorted(a + rank if a < 0 else a for a in axes_list):
            x = x.unsqueeze(a)
        return x

    def op_Squeeze(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        if axes is None and "axes" not in node.attrs:
            return x.squeeze()
        axes_list = _ints(axes) if axes is not None else list(node.attrs["axes"])
        for a in sorted((a + x.ndim if a < 0 else a for a in axes_list), reverse=True):
            x = x.squeeze(a)
        return x

    def op_Concat(self, node: gs.Node, *xs: Any) -> Any:
        return torch.cat([x for x in xs if x is not None], dim=int(node.attrs["axis"]))

    def op_Split(self, node: gs.Node, x: Any, split: Any = None) -> Any:
        # sizes from the input (opset 13+), the attribute (before 13), or equal parts:
        # num_outputs (opset 18, the last part may be smaller) or one per output.
        axis = int(node.attrs.get("axis", 0))
        sizes = _ints(split) if split is not None else node.attrs.get("split")
        if sizes is None:
            n = int(node.attrs.get("num_outputs", len(node.outputs)))
            size = x.shape[axis]
            part = -(-size // n)
            sizes = [min(part, size - i * part) for i in range(n)]
        return tuple(torch.split(x, list(sizes), dim=axis))

    def op_Slice(self, node: gs.Node, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
        starts_l, ends_l = _ints(starts), _ints(ends)
        axes_l = _ints(axes) if axes is not None else list(range(len(starts_l)))
        steps_l = _ints(steps) if steps is not None else [1] * len(starts_l)
        index: list[Any] = [slice(None)] * x.ndim
        reversed_axes: list[tuple[int, int, int, int]] = []
        for s, e, a, st in zip(starts_l, ends_l, axes_l, steps_l, strict=True):
            a = a + x.ndim if a < 0 else a
            size = x.shape[a]
            s = s + size if s < 0 else s
            e = e + size if e < 0 else e
            if st > 0:
                index[a] = slice(max(min(s, size), 0), max(min(e, size), 0), st)
            else:  # ONNX clamps to [0, size-1] and [-1, size-1]; torch has no negative steps
                reversed_axes.append((a, max(min(s, size - 1), -1), max(min(e, size - 1), -1), st))
        x = x[tuple(index)]
        for a, s, e, st in reversed_axes:
            x = x.index_select(a, torch.arange(s, e, st, dtype=torch.long, device=x.device))
        return x

    def op_Expand(self, node: gs.Node, x: Any, shape: Any) -> Any:
        # Bidirectional broadcast: a 1 in the target keeps x's size, and the target may
        # have fewer dimensions than x.
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))

    def op_Tile(self, node: gs.Node, x: Any, repeats: Any) -> Any:
        return x.repeat(*_ints(repeats))

    def op_Range(self, node: gs.Node, start: Any, limit: Any, delta: Any) -> Any:
        # ONNX: n = max(ceil((limit - start) / delta), 0) elements start + i * delta
        first, last, step = start.item(), limit.item(), delta.item()
        n = max(math.ceil((last - first) / step), 0)
        return (torch.arange(n, dtype=torch.float64) * step + first).to(start.dtype)

    def op_ConstantOfShape(self, node: gs.Node, shape: Any) -> Any:
        value = node.attrs.get("value")
        fill = np.asarray(value.values).reshape(-1)[0] if value is not None else np.float32(0)
        return torch.full(_ints(shape), fill.item(), dtype=torch.from_numpy(np.zeros(0, fill.dtype)).dtype)

    def _reduce(self, node: gs.Node, x: Any, axes: Any, fn: Any, each: Any = None) -> Any:
        """Reduce over ``axes``: an input from opset 18 (13 for ReduceSum), an attribute
        before. No axes means all of them; with ``noop_with_empty_axes`` nothing is reduced
        and only the element-wise part (``each``: |x|, x², log) applies."""
        axes_l = _ints(axes) if axes is not None else list(node.attrs.get("axes") or [])
        keep = bool(node.attrs.get("keepdims", 1))
        if not axes_l:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                return x if each is None else each(x)
            axes_l = list(range(x.ndim))
        dims = tuple(sorted(a + x.ndim if a < 0 else a for a in axes_l))
        if x.ndim == 0:
            return fn(x, dims=(), keep=keep)
        return fn(x, dims=dims, keep=keep)

    def op_ReduceMean(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep))

    def op_ReduceSum(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.sum(x, dim=dims, keepdim=keep))

    def op_ReduceMax(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.amax(x, dim=dims, keepdim=keep))

    def op_ReduceMin(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.amin(x, dim=dims, keepdim=keep))

    def op_ReduceProd(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        def prod(x: Any, dims: tuple[int, ...], keep: bool) -> Any:
            for d in sorted(dims, reverse=True):
                x = torch.prod(x, dim=d, keepdim=keep)
            return x
        return self._reduce(node, x, axes, prod)

    def op_ReduceL1(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.sum(torch.abs(x), dim=dims, keepdim=keep),
                            torch.abs)

    def op_ReduceL2(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        # vector_norm's gradient at an all-zero slice is 0, not NaN (F.normalize of zeros).
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.linalg.vector_norm(
            x, 2, dim=dims, keepdim=keep), torch.abs)

    def op_ReduceSumSquare(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.sum(x * x, dim=dims, keepdim=keep),
                            lambda x: x * x)

    def op_ReduceLogSum(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.log(torch.sum(x, dim=dims, keepdim=keep)),
                            torch.log)

    def op_ReduceLogSumExp(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep))

    def _arg(self, node: gs.Node, x: Any, fn: Any) -> Any:
        axis = int(node.attrs.get("axis", 0))
        axis = axis + x.ndim if axis < 0 else axis
        keep = bool(node.attrs.get("keepdims", 1))
        if int(node.attrs.get("select_last_index", 0)):
            flipped = fn(torch.flip(x, dims=(axis,)), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    def op_ArgMax(self, node: gs.Node, x: Any) -> Any:
        return self._arg(node, x, torch.argmax)

    def op_ArgMin(self, node: gs.Node, x: Any) -> Any:
        return self._arg(node, x, torch.argmin)

    # ------------------------------------------------------------- more elementwise
    def op_Sin(self, node: gs.Node, x: Any) -> Any:
        return torch.sin(x)

    def op_Cos(self, node: gs.Node, x: Any) -> Any:
        return torch.cos(x)

    def op_Tan(self, node: gs.Node, x: Any) -> Any:
        return torch.tan(x)

    def op_Atan(self, node: gs.Node, x: Any) -> Any:
        return torch.atan(x)

    def op_Sinh(self, node: gs.Node, x: Any) -> Any:
        return torch.sinh(x)

    def op_Cosh(self, node: gs.Node, x: Any) -> Any:
        return torch.cosh(x)

    def op_Ceil(self, node: gs.Node, x: Any) -> Any:
        return torch.ceil(x)

    def op_Round(self, node: gs.Node, x: Any) -> Any:
        return torch.round(x)  # half to even, as ONNX

    def op_Sign(self, node: gs.Node, x: Any) -> Any:
        return torch.sign(x)

    def op_Elu(self, node: gs.Node, x: Any) -> Any:
        return F.elu(x, float(node.attrs.get("alpha", 1.0)))

    def op_Selu(self, node: gs.Node, x: Any) -> Any:
        alpha = float(node.attrs.get("alpha", 1.67326319217681884765625))
        gamma = float(node.attrs.get("gamma", 1.05070102214813232421875))
        return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))

    def op_Celu(self, node: gs.Node, x: Any) -> Any:
        return F.celu(x, float(node.attrs.get("alpha", 1.0)))

    def op_Mish(self, node: gs.Node, x: Any) -> Any:
        return F.mish(x)

    def op_Softsign(self, node: gs.Node, x: Any) -> Any:
        return F.softsign(x)

    def op_ThresholdedRelu(self, node: gs.Node, x: Any) -> Any:
        return torch.where(x > float(node.attrs.get("alpha", 1.0)), x, torch.zeros_like(x))

    def op_PRelu(self, node: gs.Node, x: Any, slope: Any) -> Any:
        return torch.where(x < 0, x * slope, x)

    def op_Mean(self, node: gs.Node, *xs: Any) -> Any:
        return sum(xs[1:], xs[0]) / len(xs)

    def op_Mod(self, node: gs.Node, a: Any, b: Any) -> Any:
        # fmod=0 (integers only): the remainder takes the divisor's sign, as Python's %
        return torch.fmod(a, b) if int(node.attrs.get("fmod", 0)) else torch.remainder(a, b)

    def op_Xor(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.logical_xor(a, b)

    def op_BitwiseAnd(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.bitwise_and(a, b)

    def op_BitwiseOr(self, node: gs.Node, a: Any, b: Any) -> Any:
        return torch.bitwise_or(a, b)

    def op_BitwiseNot(self, node: gs.Node, a: Any) -> Any:
        return torch.bitwise_not(a)

    def op_CastLike(self, node: gs.Node, x: Any, like: Any) -> Any:
        return x.to(like.dtype)

    def op_Size(self, node: gs.Node, x: Any) -> Any:
        return torch.tensor(x.numel(), dtype=torch.int64)

    def op_NonZero(self, node: gs.Node, x: Any) -> Any:
        return torch.nonzero(x).t().contiguous()

    # ------------------------------------------------------------- tensor ops
    def op_Einsum(self, node: gs.Node, *xs: Any) -> Any:
        equation = node.attrs["equation"]
        equation = equation.decode() if isinstance(equation, bytes) else equation
        return torch.einsum(equation.replace(" ", ""), *xs)

    def op_CumSum(self, node: gs.Node, x: Any, axis: Any) -> Any:
        dim = int(axis.reshape(-1)[0])
        if int(node.attrs.get("reverse", 0)):
            x = torch.flip(x, dims=(dim,))
        out = torch.cumsum(x, dim=dim)
        if int(node.attrs.get("exclusive", 0)):  # shift by one: the first sum is 0
            out = out - x
        if int(node.attrs.get("reverse", 0)):
            out = torch.flip(out, dims=(dim,))
        return out

    def op_Trilu(self, node: gs.Node, x: Any, k: Any = None) -> Any:
        diagonal = int(k.reshape(-1)[0]) if k is not None else 0
        return torch.triu(x, diagonal) if int(node.attrs.get("upper", 1)) else torch.tril(x, diagonal)

    def op_ScatterND(self, node: gs.Node, data: Any, indices: Any, updates: Any) -> Any:
        # data[indices[i]] = updates[i] (or combined with `reduction`), over the first
        # k = indices.shape[-1] axes of data.
        reduction = node.attrs.get("reduction", "none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        k = indices.shape[-1]
        lead = data.shape[:k]
        flat = indices.long().reshape(-1, k)
        flat = torch.where(flat < 0, flat + torch.tensor(lead, dtype=torch.long, device=flat.device), flat)
        strides = torch.tensor([math.prod(lead[i + 1:]) for i in range(k)], dtype=torch.long,
                               device=flat.device)
        rows = (flat * strides).sum(dim=1)
        table = data.reshape(math.prod(lead), *data.shape[k:])
        values = updates.reshape(-1, *data.shape[k:])
        if reduction == "none":
            out = table.index_put((rows,), values)
        elif reduction == "add":
            out = table.index_put((rows,), values, accumulate=True)
        else:
            how = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
            index = rows.reshape(-1, *[1] * (values.ndim - 1)).expand_as(values)
            out = table.scatter_reduce(0, index, values, how, include_self=True)
        return out.reshape(data.shape)

    def op_ScatterElements(self, node: gs.Node, data: Any, indices: Any, updates: Any) -> Any:
        axis = int(node.attrs.get("axis", 0))
        axis = axis + data.ndim if axis < 0 else axis
        idx = indices.long()
        idx = torch.where(idx < 0, idx + data.shape[axis], idx)
        reduction = node.attrs.get("reduction", "none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction == "none":
            return torch.scatter(data, axis, idx, updates)
        how = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
        return torch.scatter_reduce(data, axis, idx, updates, how, include_self=True)

    def op_Pad(self, node: gs.Node, x: Any, pads: Any = None, value: Any = None, axes: Any = None) -> Any:
        # pads: [begin..., end...] for `axes` (all axes by default); an input from opset 11
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads_l = _ints(pads) if pads is not None else list(node.attrs.get("pads", []))
        axes_l = _ints(axes) if axes is not None else list(range(x.ndim))
        axes_l = [a + x.ndim if a < 0 else a for a in axes_l]
        n = len(axes_l)
        begin = dict(zip(axes_l, pads_l[:n], strict=True))
        end = dict(zip(axes_l, pads_l[n:], strict=True))
        torch_pads: list[int] = []
        for axis in reversed(range(x.ndim)):  # torch wants the last axis first
            torch_pads += [begin.get(axis, 0), end.get(axis, 0)]
        while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:
            torch_pads = torch_pads[:-2]
        if mode == "constant":
            fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
            return F.pad(x, torch_pads, mode="constant", value=fill)
        torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
        if torch_mode is None or len(torch_pads) // 2 > min(3, x.ndim - 1):
            raise ModelError(f"node '{node.name}' (Pad): mode '{mode}' on these axes is not "
                             "supported by the torch view")
        if x.ndim - len(torch_pads) // 2 < 1 or not x.is_floating_point():
            raise ModelError(f"node '{node.name}' (Pad): mode '{mode}' needs a float tensor "
                             "with leading unpadded axes")
        return F.pad(x, torch_pads, mode=torch_mode)

    def op_Resize(self, node: gs.Node, x: Any, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
        # nearest (asymmetric, floor) and (bi/tri)linear (half_pixel, pytorch_half_pixel,
        # align_corners) on the spatial axes: what torch's interpolate computes.
        attr = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in node.attrs.items()}
        mode = attr.get("mode", "nearest")
        transform = attr.get("coordinate_transformation_mode", "half_pixel")
        if sizes is not None and sizes.numel():
            out = _ints(sizes)[-(x.ndim - 2):]
        else:
            factors = [float(v) for v in scales.reshape(-1).tolist()]
            if factors[:2] != [1.0, 1.0]:
                raise ModelError(f"node '{node.name}' (Resize): only spatial axes can be resized")
            out = [int(math.floor(d * f)) for d, f in zip(x.shape[2:], factors[2:], strict=True)]
        if mode == "nearest" and transform == "asymmetric" and attr.get("nearest_mode", "round_prefer_floor") == "floor":
            return F.interpolate(x, size=out, mode="nearest")
        if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            kind = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
            return F.interpolate(x, size=out, mode=kind, align_corners=transform == "align_corners")
        raise ModelError(f"node '{node.name}' (Resize): mode '{mode}' with coordinate transformation "
                         f"'{transform}' is not supported by the torch view")

    def op_Attention(self, node: gs.Node, q: Any, k: Any, v: Any, mask: Any = None,
                     past_key: Any = None, past_value: Any = None, *rest: Any) -> Any:
        """ONNX Attention (opset 23): softmax(Q·Kᵀ · scale + bias) · V per head.

        Q, K, V are [batch, heads, seq, size] or [batch, seq, heads·size] (with
        ``q_num_heads``/``kv_num_heads``); fewer K/V heads than Q heads are shared by groups
        (GQA); ``attn_mask`` is boolean (True attends) or added; ``is_causal`` masks keys
        after each query; ``softcap`` applies c·tanh(x / c) to the scores. Outputs: Y,
        the present key and value (past concatenated with the new), and the scores."""
        attrs = node.attrs
        three_d = q.ndim == 3
        if three_d:
            batch = q.shape[0]
            qh, kvh = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
            q = q.reshape(batch, q.shape[1], qh, -1).transpose(1, 2)
            k = k.reshape(batch, k.shape[1], kvh, -1).transpose(1, 2)
            v = v.reshape(batch, v.shape[1], kvh, -1).transpose(1, 2)
        if past_key is not None:
            k = torch.cat([past_key, k], dim=2)
        if past_value is not None:
            v = torch.cat([past_value, v], dim=2)
        present_key, present_value = k, v
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scale = float(attrs["scale"]) if "scale" in attrs else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        q_len, kv_len = scores.shape[-2:]
        bias = torch.zeros((q_len, kv_len), dtype=scores.dtype, device=scores.device)
        if int(attrs.get("is_causal", 0)):
            offset = past_key.shape[2] if past_key is not None else 0
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(offset)
            bias = bias.masked_fill(~allowed, -math.inf)
        if mask is not None:
            if mask.shape[-1] < kv_len:  # a short mask: the rest is masked out
                pad = [0, kv_len - mask.shape[-1]]
                mask = F.pad(mask, pad, value=False if mask.dtype == torch.bool else -math.inf)
            if mask.dtype == torch.bool:
                bias = bias.masked_fill(~mask, -math.inf)
            else:
                bias = bias + mask
        scores = scores + bias
        softcap = float(attrs.get("softcap", 0.0))
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        # A fully masked row attends to nothing (zeros, as ONNX), without NaN in the
        # forward or backward pass.
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
        y = torch.matmul(probs, v)
        if three_d:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
        return y, present_key, present_value, scores

    def op_RotaryEmbedding(self, node: gs.Node, x: Any, cos: Any, sin: Any, position_ids: Any = None) -> Any:
        """ONNX RotaryEmbedding (opset 23): rotate pairs of features by position-dependent
        angles. x is [batch, heads, seq, size] or [batch, seq, heads·size] (``num_heads``);
        the first ``rotary_embedding_dim`` features rotate (all by default), as two halves
        or, with ``interleaved``, as even/odd pairs; caches are [batch, seq, dim/2], or
        [positions, dim/2] indexed by ``position_ids``."""
        shape = x.shape
        if x.ndim == 4:
            x = x.transpose(1, 2)  # [batch, seq, heads, size]
        else:
            x = x.reshape(shape[0], shape[1], int(node.attrs["num_heads"]), -1)
        dim = int(node.attrs.get("rotary_embedding_dim", 0)) or x.shape[-1]
        if position_ids is not None:
            cos, sin = cos[position_ids.long()], sin[position_ids.long()]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        rotate, keep = x[..., :dim], x[..., dim:]
        interleaved = int(node.attrs.get("interleaved", 0))
        if interleaved:
            x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
        else:
            x1, x2 = rotate[..., : dim // 2], rotate[..., dim // 2:]
        real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
        rotated = torch.stack([real, imag], dim=-1).flatten(-2) if interleaved else torch.cat([real, imag], dim=-1)
        out = torch.cat([rotated, keep], dim=-1)
        return out.transpose(1, 2) if len(shape) == 4 else out.reshape(shape)

    def op_QuantizeLinear(self, node: gs.Node, x: Any, scale: Any, zp: Any = None) -> Any:
        # Fake quantization: keep float values on the integer grid (dequantized next).
        dtype = np.asarray(node.inputs[2].values).dtype if len(node.inputs) > 2 and isinstance(
            node.inputs[2], gs.Constant) else np.dtype(np.uint8)
        qmin, qmax = QRANGE[dtype]
        zp_f = zp.to(torch.float32) if zp is not None else torch.zeros_like(scale)
        axis = int(node.attrs.get("axis", 1)) if scale.ndim == 1 and scale.numel() > 1 else None
        if axis is not None:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp_f = scale.reshape(shape), zp_f.reshape(shape)
        return torch.clamp(RoundSTE.apply(x / scale) + zp_f, qmin, qmax)

    def op_DequantizeLinear(self, node: gs.Node, q: Any, scale: Any, zp: Any = None) -> Any:
        zp_f = zp.to(torch.float32) if zp is not None else torch.zeros_like(scale)
        axis = int(node.attrs.get("axis", 1)) if scale.ndim == 1 and scale.numel() > 1 else None
        if axis is not None:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp_f = scale.reshape(shape), zp_f.reshape(shape)
        return (q.to(torch.float32) - zp_f) * scale
