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
- **Operators** are the ``op_<OpType>`` methods of :class:`optcc.torchops.OnnxOps`, which
  this module mixes in. Unsupported ops raise :class:`optcc.ModelError` naming the op and
  the node, before any training starts.

Why not onnx2torch: it drops initializer names (weights cannot be mapped back), has no Q/DQ
fake quantization and no masks, and its module tree differs per op; optcc needs all three.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.errors import ModelError
from optcc.ir.model import Model
from optcc.torchops import QRANGE as _QRANGE
from optcc.torchops import OnnxOps, fake_quantize

try:  # torch is an optional dependency: import errors surface when a view is created
    import torch
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


# A replacement implementation of a node: reads tensors from the environment (tensor name ->
# value) and returns the tensors it computes, by name.
NodeOverride = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class GraphModule(OnnxOps, _Base):
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
