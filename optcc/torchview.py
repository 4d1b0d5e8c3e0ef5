"""A trainable PyTorch view of an ONNX graph.

``GraphModule(model)`` is an ``nn.Module`` that runs the graph node by node with torch ops.
Float initializers become ``nn.Parameter``s named after (and written back to) the same
initializers; integer constants (shapes, axes, indices) stay fixed buffers. So a pass can
fine-tune *the ONNX model itself* — after pruning, after INT8 — and
:meth:`GraphModule.write_back` returns the model with trained weights, bit for bit what
the parameters hold, same graph, same names.

- **Masks.** A weight annotated with a ``mask`` in the model's metadata (or, with
  ``keep_zeros``, every exact zero of a weight) stays exactly zero: gradients are masked
  and weights re-masked after each step.
- **Quantization.** ``QuantizeLinear → DequantizeLinear`` becomes fake quantization with a
  straight-through estimator (round in the forward pass, identity gradient inside the
  range), so training after the INT8 pass is quantization-aware. A weight stored as INT8
  behind a DequantizeLinear trains as a float parameter (initialised to its dequantized
  value), fake-quantized with the same scale, and is requantized on write-back.
- **BatchNorm.** Frozen by default (running statistics used, not trained); with
  ``update_batchnorm`` and the module in training mode, batch statistics normalise and the
  running statistics follow them, and are written back.
- **Unsupported ops** raise :class:`optcc.ModelError` naming the op and the node, before any
  training starts.

Why not onnx2torch: it drops initializer names (weights cannot be mapped back), has no Q/DQ
fake quantization and no masks, and its module tree differs per op; optcc needs all three.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.errors import ModelError
from optcc.ir.model import Model

try:  # torch is an optional dependency: import errors surface when a view is created
    import torch
    import torch.nn.functional as F
    from torch import nn

    _Base: Any = nn.Module
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]
    _Base = object


def _safe(name: str) -> str:
    """The parameter key of initializer ``name``: readable, and made unique by a digest of
    the full name. The digest is hashlib's, not ``hash()``: keys are saved in checkpoints
    and shared by torchrun ranks, so they must be the same in every process."""
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return "p_" + "".join(c if c.isalnum() else "_" for c in name) + f"_{digest}"


def _ints(t: Any) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _pads(node: gs.Node, rank: int) -> list[int]:
    pads = list(node.attrs.get("pads", [0] * (2 * rank)))
    return pads


def _auto_pad(node: gs.Node) -> None:
    pad = node.attrs.get("auto_pad", "NOTSET")
    if pad not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        raise ModelError(f"node '{node.name}' ({node.op}): auto_pad={pad} is not supported by the torch view")


class _RoundSTE(torch.autograd.Function if torch is not None else object):  # type: ignore[misc]
    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:  # noqa: D102
        return grad


# Ops whose integer inputs are data (indices, zero points), not shapes.
_INTEGER_DATA_OPS = frozenset({"Gather", "GatherElements", "GatherND", "QuantizeLinear",
                               "DequantizeLinear"})


def _co_locate(op: str, inputs: list[Any]) -> list[Any]:
    """Put a node's tensors on one device when the graph runs on a GPU.

    Constants and tensors made on the host (shapes, masks built from them) meet GPU
    activations: data (float and bool tensors, Gather indices, zero points) moves to the
    device of the node's first GPU tensor; integer tensors that are shapes or axes stay on
    the host, where reading them costs no synchronization. 0-d tensors mix freely.
    """
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda), None)
    if device is None:
        return inputs
    moved = []
    for t in inputs:
        if (isinstance(t, torch.Tensor) and not t.is_cuda and t.ndim > 0
                and (t.is_floating_point() or t.dtype == torch.bool or op in _INTEGER_DATA_OPS)):
            t = t.to(device, non_blocking=True)
        moved.append(t)
    return moved


def fake_quantize(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int, axis: int | None) -> Any:
    """Quantize-dequantize with a straight-through estimator (gradient 1 inside the range)."""
    scale, zero_point = scale.to(x.device), zero_point.to(x.device)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = _RoundSTE.apply(x / scale) + zero_point
    q = torch.clamp(q, qmin, qmax)
    return (q - zero_point) * scale


_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}

# A replacement implementation of a node: reads tensors from the environment (tensor name ->
# value) and returns the tensors it computes, by name.
NodeOverride = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class GraphModule(_Base):
    """Run an ONNX graph with torch; float initializers are trainable parameters."""

    def __init__(
        self, model: Model, *, keep_zeros: bool = False, update_batchnorm: bool = False
    ) -> None:
        if torch is None:
            raise ModelError("the torch view needs torch", hint="pip install 'optcc[torch]'")
        super().__init__()
        self.model = model
        self.update_batchnorm = update_batchnorm
        graph = model.graph
        graph.toposort()
        self.nodes = list(graph.nodes)
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        self.params = nn.ParameterDict()
        self.param_of: dict[str, str] = {}  # initializer name -> parameter key
        self.consts: dict[str, Any] = {}
        self.masks: dict[str, Any] = {}
        self.int8_weights: dict[str, tuple[str, str, str, int | None]] = {}  # dq output -> info
        # INT8 weights behind a DequantizeLinear train as float (int32 biases stay fixed).
        dq_weight_inputs = {
            n.inputs[0].name
            for n in self.nodes
            if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)
            and np.asarray(n.inputs[0].values).dtype in _QRANGE
        }
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            values = np.asarray(tensor.values)
            if tensor.name in dq_weight_inputs:
                continue  # handled with its DequantizeLinear below
            if values.dtype.kind == "f" and values.size > 1:
                key = _safe(tensor.name)
                self.params[key] = nn.Parameter(torch.from_numpy(values.astype(np.float32).copy()))
                self.param_of[tensor.name] = key
                mask = model.meta.tensors.get(tensor.name, {}).get("mask")
                if mask is None and keep_zeros and np.any(values == 0):
                    mask = values != 0
                if mask is not None:
                    self.masks[key] = torch.from_numpy(np.asarray(mask, dtype=bool))
            else:
                self.consts[tensor.name] = torch.from_numpy(np.array(values))
        for node in self.nodes:
            if node.op == "DequantizeLinear" and node.inputs[0].name in dq_weight_inputs:
                q = np.asarray(node.inputs[0].values)
                scale = np.asarray(node.inputs[1].values, dtype=np.float32)
                zp = (np.asarray(node.inputs[2].values) if len(node.inputs) > 2
                      else np.zeros_like(scale, dtype=q.dtype))
                axis = int(node.attrs.get("axis", 1)) if scale.ndim == 1 and scale.size > 1 else None
                shape = [1] * q.ndim
                if axis is not None:
                    shape[axis] = -1
                real = (q.astype(np.float32) - zp.astype(np.float32).reshape(shape)) * scale.reshape(shape)
                key = _safe(node.inputs[0].name)
                self.params[key] = nn.Parameter(torch.from_numpy(real))
                self.param_of[node.inputs[0].name] = key
                # Sparsity survives QAT: a metadata mask, or the entries at the zero point
                # (with keep_zeros, or when the layer is marked N:M sparse) stay zero.
                mask = model.meta.tensors.get(node.inputs[0].name, {}).get("mask")
                at_zero = q == zp.astype(q.dtype).reshape(shape)
                sparse_layer = any("sparsity" in model.meta.nodes.get(c.name, {})
                                   for c in node.outputs[0].outputs)
                if mask is None and (keep_zeros or sparse_layer) and np.any(at_zero):
                    mask = ~at_zero
                if mask is not None:
                    self.masks[key] = torch.from_numpy(np.asarray(mask, dtype=bool))
                self.int8_weights[node.outputs[0].name] = (node.inputs[0].name, node.inputs[1].name,
                                                           node.inputs[2].name if len(node.inputs) > 2 else "", axis)
        for node in self.nodes:  # running statistics are state, not trainable weights
            if node.op == "BatchNormalization":
                for t in node.inputs[3:5]:
                    key = self.param_of.get(t.name)
                    if key is not None:
                        self.params[key].requires_grad_(False)
        self.node_overrides: dict[str, NodeOverride | None] = {}
        self._check_supported()

    def set_node_overrides(self, overrides: Mapping[str, NodeOverride | None]) -> None:
        """Run some nodes with other implementations (e.g. fused GPU kernels).

        ``overrides`` maps a node name to a callable that receives the environment (every
        tensor computed so far, by name) and returns the tensors it produces, by name; these
        may include outputs of other nodes, which is how one kernel stands for a chain of
        nodes. Mapping a node to None skips it (its work is done by an override elsewhere).
        The caller guarantees that every tensor a later node reads is still produced.
        """
        names = {node.name for node in self.nodes}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ModelError(f"node overrides name nodes not in the graph: {', '.join(unknown[:5])}")
        self.node_overrides = dict(overrides)

    def _check_supported(self) -> None:
        for node in self.nodes:
            if not hasattr(self, f"op_{node.op}"):
                raise ModelError(
                    f"the torch view cannot run op '{node.op}' (node '{node.name}')",
                    hint="exclude this model from training passes, or open an issue with the op",
                )

    # ----------------------------------------------------------------- running
    def value(self, env: dict[str, Any], tensor: gs.Tensor) -> Any:
        if tensor.name == "":
            return None
        if tensor.name in env:
            return env[tensor.name]
        key = self.param_of.get(tensor.name)
        if key is not None:
            return self.params[key]
        if tensor.name in self.consts:
            return self.consts[tensor.name]
        raise ModelError(f"tensor '{tensor.name}' has no value in the torch view")

    def forward(self, *args: Any, **feeds: Any) -> list[Any]:
        env: dict[str, Any] = dict(zip(self.input_names, args, strict=False))
        env.update(feeds)
        return self.run(env, self.output_names)

    def run(self, env: dict[str, Any], wanted: list[str]) -> list[Any]:
        """Run the graph from ``env`` (tensor name -> torch tensor); return ``wanted``."""
        for node in self.nodes:
            if node.name in self.node_overrides:
                override = self.node_overrides[node.name]
                if override is not None:
                    env.update(override(env))
                continue
            if node.op == "DequantizeLinear" and node.outputs[0].name in self.int8_weights:
                weight, _, _, axis = self.int8_weights[node.outputs[0].name]
                scale = self.value(env, node.inputs[1])
                zp = self.value(env, node.inputs[2]) if len(node.inputs) > 2 else torch.zeros_like(scale)
                dtype = np.asarray(node.inputs[0].values).dtype
                qmin, qmax = _QRANGE[dtype]
                env[node.outputs[0].name] = fake_quantize(
                    self.params[self.param_of[weight]], scale, zp.to(torch.float32), qmin + (dtype == np.int8), qmax, axis)
                continue
            inputs = _co_locate(node.op, [self.value(env, t) if t.name else None for t in node.inputs])
            try:
                outputs = getattr(self, f"op_{node.op}")(node, *inputs)
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(
                    f"the torch view failed on node '{node.name}' ({node.op}): {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(outputs, tuple):
                outputs = (outputs,)
            for t, v in zip(node.outputs, outputs, strict=False):
                env[t.name] = v
        return [env[name] for name in wanted]

    # ----------------------------------------------------------------- training helpers
    def apply_masks(self) -> None:
        """Zero masked weights (call after each optimizer step)."""
        with torch.no_grad():
            for key, mask in self.masks.items():
                self.params[key].mul_(mask.to(self.params[key].device))

    def mask_gradients(self) -> None:
        for key, mask in self.masks.items():
            grad = self.params[key].grad
            if grad is not None:
                grad.mul_(mask.to(grad.device))

    def write_back(self) -> Model:
        """A copy of the model with the trained parameter values in its initializers."""
        out = self.model.copy()
        for tensor in out.graph.tensors().values():
            key = self.param_of.get(tensor.name)
            if key is None or not isinstance(tensor, gs.Constant):
                continue
            trained = self.params[key].detach().cpu().numpy()
            original = np.asarray(tensor.values)
            if original.dtype.kind == "f":
                tensor.values = trained.astype(original.dtype)
        for node in out.graph.nodes:  # requantize INT8 weights behind DequantizeLinear
            info = self.int8_weights.get(node.outputs[0].name) if node.op == "DequantizeLinear" else None
            if info is None:
                continue
            weight = node.inputs[0]
            scale = np.asarray(node.inputs[1].values, dtype=np.float32)
            zp = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else np.zeros_like(scale, np.int8)
            axis = info[3]
            shape = [1] * np.asarray(weight.values).ndim
            if axis is not None:
                shape[axis] = -1
            dtype = np.asarray(weight.values).dtype
            qmin, qmax = _QRANGE[dtype]
            real = self.params[self.param_of[weight.name]].detach().cpu().numpy()
            q = np.round(real / scale.reshape(shape)) + zp.astype(np.float32).reshape(shape)
            weight.values = np.clip(q, qmin + (dtype == np.int8), qmax).astype(dtype)
        return out

    # ----------------------------------------------------------------- ops
    def op_Identity(self, node: gs.Node, x: Any) -> Any:
        return x

    def op_Dropout(self, node: gs.Node, x: Any, *rest: Any) -> Any:
        return x

    def op_Constant(self, node: gs.Node) -> Any:
        return torch.from_numpy(np.array(np.asarray(node.attrs["value"].values)))

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
        lo = node.attrs.get("min", lo) if lo is None else lo
        hi = node.attrs.get("max", hi) if hi is None else hi
        return torch.clamp(x, min=None if lo is None else float(lo), max=None if hi is None else float(hi))

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
        _auto_pad(node)
        nd = w.ndim - 2
        pads = _pads(node, nd)
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
        axis = int(node.attrs.get("axis", -1))
        axis = axis + x.ndim if axis < 0 else axis
        return F.layer_norm(x, x.shape[axis:], g, b, float(node.attrs.get("epsilon", 1e-5)))

    def op_Softmax(self, node: gs.Node, x: Any) -> Any:
        return torch.softmax(x, int(node.attrs.get("axis", -1)))

    def op_LogSoftmax(self, node: gs.Node, x: Any) -> Any:
        return torch.log_softmax(x, int(node.attrs.get("axis", -1)))

    def _pool(self, node: gs.Node, x: Any, kind: str) -> Any:
        _auto_pad(node)
        k = node.attrs["kernel_shape"]
        nd = len(k)
        pads = _pads(node, nd)
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
        axis = int(node.attrs.get("axis", 0))
        sizes = _ints(split) if split is not None else node.attrs.get("split")
        if sizes is None:
            n = len(node.outputs)
            sizes = [x.shape[axis] // n] * n
        return tuple(torch.split(x, list(sizes), dim=axis))

    def op_Slice(self, node: gs.Node, x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
        starts_l, ends_l = _ints(starts), _ints(ends)
        axes_l = _ints(axes) if axes is not None else list(range(len(starts_l)))
        steps_l = _ints(steps) if steps is not None else [1] * len(starts_l)
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts_l, ends_l, axes_l, steps_l, strict=True):
            size = x.shape[a]
            s = max(min(s + size if s < 0 else s, size), 0)
            e = max(min(e + size if e < 0 else e, size), 0)
            if st < 0:
                raise ModelError(f"node '{node.name}': negative Slice steps are not supported")
            index[a] = slice(s, e, st)
        return x[tuple(index)]

    def op_Expand(self, node: gs.Node, x: Any, shape: Any) -> Any:
        target = _ints(shape)
        return x * torch.ones(target, dtype=x.dtype, device=x.device) if len(target) >= x.ndim else x.expand(*target)

    def op_Range(self, node: gs.Node, start: Any, limit: Any, delta: Any) -> Any:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)

    def op_ConstantOfShape(self, node: gs.Node, shape: Any) -> Any:
        value = node.attrs.get("value")
        fill = np.asarray(value.values).reshape(-1)[0] if value is not None else np.float32(0)
        return torch.full(_ints(shape), fill.item(), dtype=torch.from_numpy(np.zeros(0, fill.dtype)).dtype)

    def _reduce(self, node: gs.Node, x: Any, axes: Any, fn: Any) -> Any:
        axes_l = _ints(axes) if axes is not None else node.attrs.get("axes")
        keep = bool(node.attrs.get("keepdims", 1))
        if not axes_l:
            axes_l = list(range(x.ndim))
        return fn(x, dim=tuple(axes_l), keepdim=keep)

    def op_ReduceMean(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, torch.mean)

    def op_ReduceSum(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, torch.sum)

    def op_ReduceMax(self, node: gs.Node, x: Any, axes: Any = None) -> Any:
        return self._reduce(node, x, axes, torch.amax)

    def op_QuantizeLinear(self, node: gs.Node, x: Any, scale: Any, zp: Any = None) -> Any:
        # Fake quantization: keep float values on the integer grid (dequantized next).
        dtype = np.asarray(node.inputs[2].values).dtype if len(node.inputs) > 2 and isinstance(
            node.inputs[2], gs.Constant) else np.dtype(np.uint8)
        qmin, qmax = _QRANGE[dtype]
        zp_f = zp.to(torch.float32) if zp is not None else torch.zeros_like(scale)
        axis = int(node.attrs.get("axis", 1)) if scale.ndim == 1 and scale.numel() > 1 else None
        if axis is not None:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp_f = scale.reshape(shape), zp_f.reshape(shape)
        return torch.clamp(_RoundSTE.apply(x / scale) + zp_f, qmin, qmax)

    def op_DequantizeLinear(self, node: gs.Node, q: Any, scale: Any, zp: Any = None) -> Any:
        zp_f = zp.to(torch.float32) if zp is not None else torch.zeros_like(scale)
        axis = int(node.attrs.get("axis", 1)) if scale.ndim == 1 and scale.numel() > 1 else None
        if axis is not None:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp_f = scale.reshape(shape), zp_f.reshape(shape)
        return (q.to(torch.float32) - zp_f) * scale
