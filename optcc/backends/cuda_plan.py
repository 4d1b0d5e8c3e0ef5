"""Which layers of a model the sparse GPU kernels run, and with which fused epilogue.

Planning is pure graph analysis (no torch, no GPU), so it is tested on CPU and its result is
written next to the artifact (``cuda_plan.json``) for the report.

A candidate is a GEMM layer with a constant weight:

- ``MatMul(x, W)``, ``W`` of shape ``[K, N]`` (the kernel's sparse operand is ``W^T``);
- ``Gemm(x, W, C)`` with ``transA = 0`` (``transB`` either way; ``alpha`` and ``beta * C``
  fold into the epilogue);
- a 1x1 ``Conv`` without padding, dilation or groups (a GEMM over pixels; strides subsample
  the input first).

The weight may sit behind ``DequantizeLinear`` (INT8). The layer is dispatched when its
weight, as ``[M = output channels, K]``, is 2:4 sparse along ``K`` and the shape fits the
kernels (M a multiple of 32, K of 64; of 128 for INT8). The planner then grows a chain
along the output, each intermediate tensor having exactly one reader and not being a graph
output:

``GEMM -> [Add bias] -> [Add residual] -> [activation] -> [Add residual] -> [QuantizeLinear]``

with activations ``Relu``, ``Clip`` with constant bounds, ``Gelu`` and the exported
``x * 0.5 * (1 + erf(x / sqrt 2))`` pattern. The kernel computes the whole chain and writes
the last tensor; the other nodes are skipped.

INT8: when the layer's input is ``DequantizeLinear(QuantizeLinear(x))`` with a signed
per-tensor scale and zero point 0 (the TensorRT format) and its weight is signed INT8 with
zero points 0, the kernel multiplies INT8 by INT8 and dequantizes in the epilogue with
``alpha[m] = s_x * s_w[m]``; a trailing ``QuantizeLinear`` of the same kind is fused as
requantization (``out_scale = 1 / s_y``). Other quantized layers (ONNX Runtime's unsigned
format) run in float16 on the dequantized weight, their activation Q/DQ left to torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from optcc.ir.model import Model
from optcc.sparse.packing import is_2to4

Precision = Literal["float16", "bfloat16"]


@dataclass
class SparseLayerPlan:
    """One layer the kernels run: what to read, what to fuse, what to write."""

    node: str                      # the GEMM / Conv node
    op: str
    nodes: list[str]               # every node the kernel stands for (node first)
    input: str                     # activation tensor read (int8 path: the Q output)
    output: str                    # the tensor the kernel writes
    weight: str                    # weight initializer
    m: int                         # output channels
    k: int                         # reduction size
    precision: str                 # float16 | bfloat16 | int8
    output_dtype: str              # float16 | bfloat16 | int8
    weight_layout: str             # "mk" (W is [M, K]) or "km" (W is [K, M]) or "conv"
    weight_scale: str | None = None        # DequantizeLinear scale of the weight
    weight_zero_point: str | None = None
    weight_scale_axis: int | None = None
    input_scale: float | None = None       # int8 path: s_x
    alpha: float = 1.0                     # Gemm alpha
    bias: str | None = None                # constant [M] (Gemm C, Conv B or an Add)
    bias_scale: float = 1.0                # Gemm beta
    activation: str = "none"
    clip: tuple[float, float] | None = None
    residual: str | None = None
    residual_after_activation: bool = False
    output_scale: float | None = None      # fused QuantizeLinear: out = q(v / s_y)
    conv_strides: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass
class DispatchPlan:
    layers: list[SparseLayerPlan]
    skipped: list[SkippedLayer]
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def summary(self) -> str:
        fused = sum(len(layer.nodes) for layer in self.layers)
        return (f"{len(self.layers)} layer(s) on the sparse kernels ({fused} nodes fused), "
                f"{len(self.skipped)} left to torch")


# ----------------------------------------------------------------------------- helpers
def _const(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node), else None."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if value is not None:
            return np.asarray(value.values)
    return None


def _scalar(tensor: gs.Tensor | None) -> float | None:
    value = _const(tensor)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


def _only_reader(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The single node reading ``tensor``, if it has exactly one and is not a graph output."""
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is tensor and b is not tensor:
        return b
    if b is tensor and a is not tensor:
        return a
    return None


def _symmetric_int8(scale: gs.Tensor | None, zero_point: gs.Tensor | None) -> float | None:
    """The scale of a per-tensor, signed, zero-point-0 quantization, else None."""
    s = _scalar(scale)
    if s is None or not s > 0:
        return None
    if zero_point is not None and zero_point.name:
        zp = _const(zero_point)
        if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
            return None
    else:
        return None  # no zero point means uint8 in ONNX
    return s


def _weight(node: gs.Node) -> tuple[np.ndarray, gs.Constant, gs.Node | None] | None:
    """(float-or-int weight values, the constant, its DequantizeLinear) of a GEMM node."""
    if len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if isinstance(w, gs.Constant):
        return np.asarray(w.values), w, None
    if w.inputs and w.inputs[0].op == "DequantizeLinear":
        dq = w.inputs[0]
        if isinstance(dq.inputs[0], gs.Constant):
            return np.asarray(dq.inputs[0].values), dq.inputs[0], dq
    return None


def _gemm_matrix(node: gs.Node, values: np.ndarray) -> tuple[np.ndarray, str, str | None]:
    """The weight as [M, K], its layout tag, or a reason it is not a GEMM weight."""
    if node.op == "MatMul":
        if values.ndim != 2:
            return values, "", f"MatMul weight has rank {values.ndim} (a 2-D weight is needed)"
        return values.T, "km", None
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return values, "", "Gemm with transA=1"
        if int(node.attrs.get("transB", 0)):
            return values, "mk", None
        return values.T, "km", None
    # Conv
    if values.ndim != 4 or values.shape[2:] != (1, 1):
        return values, "", (f"convolution with a {'x'.join(map(str, values.shape[2:]))} kernel "
                            "(only 1x1 convolutions map onto the GEMM kernels)")
    if int(node.attrs.get("group", 1)) != 1:
        return values, "", "grouped convolution"
    if any(int(p) for p in node.attrs.get("pads", [])):
        return values, "", "padded 1x1 convolution"
    if any(int(d) != 1 for d in node.attrs.get("dilations", [])):
        return values, "", "dilated convolution"
    pad = node.attrs.get("auto_pad", "NOTSET")
    if pad not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        return values, "", f"auto_pad={pad}"
    return values.reshape(values.shape[0], values.shape[1]), "conv", None


def _gelu_erf(x: gs.Tensor, graph_outputs: set[str]) -> list[gs.Node] | None:
    """Match ``0.5 * x * (1 + erf(x / sqrt 2))`` (any operand order) reading ``x``.

    x must be read by exactly two nodes: the scaling (Div by sqrt 2 or Mul by 1/sqrt 2)
    and the Mul by x. Returns the pattern's nodes, the last one producing GELU(x).
    """
    readers = list(x.outputs)
    if x.name in graph_outputs or len(readers) != 2:
        return None
    for start in readers:
        nodes = _gelu_erf_from(start, x, graph_outputs)
        if nodes is not None and all(any(r is n for n in nodes) for r in readers):
            return nodes
    return None


def _gelu_erf_from(start: gs.Node, x: gs.Tensor, graph_outputs: set[str]) -> list[gs.Node] | None:
    scale = None
    if start.op == "Div" and start.inputs[0] is x:
        divisor = _scalar(start.inputs[1])
        scale = 1.0 / divisor if divisor else None
    elif start.op == "Mul":
        scale = _scalar(_other_input(start, x))
    if scale is None or not math.isclose(scale, 1 / math.sqrt(2), rel_tol=1e-3):
        return None
    erf = _only_reader(start.outputs[0], graph_outputs)
    if erf is None or erf.op != "Erf":
        return None
    add = _only_reader(erf.outputs[0], graph_outputs)
    if add is None or add.op != "Add" or not math.isclose(
            _scalar(_other_input(add, erf.outputs[0])) or 0.0, 1.0, rel_tol=1e-6):
        return None
    first = _only_reader(add.outputs[0], graph_outputs)
    if first is None or first.op != "Mul":
        return None
    last = _only_reader(first.outputs[0], graph_outputs)
    if last is None or last.op != "Mul":
        return None
    other, final = _other_input(first, add.outputs[0]), _other_input(last, first.outputs[0])
    half = 0.5
    if other is x and math.isclose(_scalar(final) or 0.0, half, rel_tol=1e-6):
        return [start, erf, add, first, last]   # ((1 + erf) * x) * 0.5
    if final is x and math.isclose(_scalar(other) or 0.0, half, rel_tol=1e-6):
        return [start, erf, add, first, last]   # ((1 + erf) * 0.5) * x
    return None


def _activation(node: gs.Node, y: gs.Tensor, graph_outputs: set[str]
                ) -> tuple[str, tuple[float, float] | None, list[gs.Node]] | None:
    """An epilogue activation starting at ``node`` (which reads ``y``)."""
    if node.op == "Relu":
        return "relu", None, [node]
    if node.op == "Gelu":
        approx = node.attrs.get("approximate", "none")
        kind = "gelu_tanh" if approx in ("tanh", b"tanh") else "gelu"
        return kind, None, [node]
    if node.op == "Clip":
        lo = node.attrs.get("min") if len(node.inputs) < 2 else _scalar(node.inputs[1])
        hi = node.attrs.get("max") if len(node.inputs) < 3 else _scalar(node.inputs[2])
        if len(node.inputs) >= 2 and node.inputs[1].name and lo is None:
            return None  # non-constant bound
        if len(node.inputs) >= 3 and node.inputs[2].name and hi is None:
            return None
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        return "clip", (lo, hi), [node]
    return None


def _per_channel(values: np.ndarray | None, m: int) -> bool:
    return values is not None and values.size in (1, m)


# ----------------------------------------------------------------------------- planning
def plan_model(model: Model, *, precision: Precision = "float16", int8: bool = True
               ) -> DispatchPlan:
    """Plan the sparse-kernel dispatch of every GEMM-like layer of ``model``."""
    graph = model.graph
    graph.toposort()
    graph_outputs = {t.name for t in graph.outputs}
    layers: list[SparseLayerPlan] = []
    skipped: list[SkippedLayer] = []
    claimed: set[str] = set()
    for node in list(graph.nodes):
        if node.op not in ("MatMul", "Gemm", "Conv") or node.name in claimed:
            continue
        result = _plan_layer(node, graph_outputs, claimed, precision=precision, int8=int8)
        if isinstance(result, str):
            skipped.append(SkippedLayer(node.name, node.op, result))
            continue
        if claimed.intersection(result.nodes):
            skipped.append(SkippedLayer(node.name, node.op, "overlaps another fused layer"))
            continue
        claimed.update(result.nodes)
        layers.append(result)
    return DispatchPlan(layers=layers, skipped=skipped, precision=precision)


def _plan_layer(node: gs.Node, graph_outputs: set[str], claimed: set[str], *, precision: str,
                int8: bool) -> SparseLayerPlan | str:
    found = _weight(node)
    if found is None:
        return "no constant weight"
    values, weight, weight_dq = found
    matrix, layout, reason = _gemm_matrix(node, values)
    if reason:
        return reason
    m, k = matrix.shape
    if not is_2to4(matrix):
        return "weight is not 2:4 sparse along its input channels"
    x = node.inputs[0]
    notes: list[str] = []
    # INT8 path: symmetric int8 weight and activation Q/DQ in the TensorRT format.
    quantized_input = None
    if weight_dq is not None:
        w_scale = _const(weight_dq.inputs[1])
        w_zp = _const(weight_dq.inputs[2]) if len(weight_dq.inputs) > 2 else None
        signed_weight = values.dtype == np.int8 and (w_zp is None or not np.any(w_zp != 0))
        x_dq = x.inputs[0] if x.inputs and x.inputs[0].op == "DequantizeLinear" else None
        x_q = (x_dq.inputs[0].inputs[0] if x_dq is not None and x_dq.inputs[0].inputs
               and x_dq.inputs[0].inputs[0].op == "QuantizeLinear" else None)
        s_x = None
        if x_dq is not None and x_q is not None:
            s_x = _symmetric_int8(x_dq.inputs[1], x_dq.inputs[2] if len(x_dq.inputs) > 2 else None)
        if not _per_channel(w_scale, m):
            return "weight DequantizeLinear scale is neither per-tensor nor per-output-channel"
        if int8 and signed_weight and s_x is not None and _only_reader(x, graph_outputs) is node:
            quantized_input = (x_dq, s_x)
        elif int8:
            notes.append("INT8 layer runs in float on the dequantized weight "
                         "(activations are not symmetric signed INT8)")
    kernel_precision = "int8" if quantized_input else precision
    k_multiple = 128 if kernel_precision == "int8" else 64
    if m % 32 or k % k_multiple:
        return (f"shape {m}x{k} (output x input channels) does not fit the kernels "
                f"(needs multiples of 32 x {k_multiple})")
    chain: list[gs.Node] = [node]
    if weight_dq is not None and _only_reader(weight_dq.outputs[0], graph_outputs) is node:
        chain.insert(0, weight_dq)
    layer = SparseLayerPlan(
        node=node.name, op=node.op, nodes=[], input=x.name, output=node.outputs[0].name,
        weight=weight.name, m=m, k=k, precision=kernel_precision,
        output_dtype="float16" if kernel_precision == "int8" else precision,
        weight_layout=layout, notes=notes,
    )
    if weight_dq is not None:
        layer.weight_scale = weight_dq.inputs[1].name
        layer.weight_zero_point = (weight_dq.inputs[2].name if len(weight_dq.inputs) > 2
                                   else None)
        layer.weight_scale_axis = int(weight_dq.attrs.get("axis", 1))
    if quantized_input is not None:
        x_dq, s_x = quantized_input
        layer.input = x_dq.inputs[0].name  # the INT8 tensor itself
        layer.input_scale = s_x
        chain.insert(0, x_dq)
    if node.op == "Gemm":
        layer.alpha = float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = _const(node.inputs[2])
            if c is None or c.size != m or (c.ndim == 2 and c.shape[0] != 1):
                return "Gemm C is not a constant per-output-channel bias"
            layer.bias, layer.bias_scale = node.inputs[2].name, float(node.attrs.get("beta", 1.0))
    if node.op == "Conv":
        layer.conv_strides = tuple(int(s) for s in node.attrs.get("strides", [1, 1]))
        if len(node.inputs) > 2 and node.inputs[2].name:
            layer.bias = node.inputs[2].name
    _grow_epilogue(layer, chain, graph_outputs, claimed)
    layer.nodes = [n.name for n in chain]
    return layer


def _bias_of(layer: SparseLayerPlan, add: gs.Node, y: gs.Tensor) -> gs.Tensor | None:
    """The constant operand of ``add`` if it is a per-output-channel bias for ``layer``."""
    other = _other_input(add, y)
    value = _const(other)
    if other is None or value is None or value.size != layer.m:
        return None
    if layer.op == "Conv":  # [C], [C, 1, 1] or [1, C, 1, 1]
        ok = value.ndim <= 1 or (value.shape[-2:] == (1, 1) and value.shape[-3] == layer.m)
    else:  # broadcast along the last axis
        ok = value.shape[-1] == layer.m
    return other if ok else None


def _grow_epilogue(layer: SparseLayerPlan, chain: list[gs.Node], graph_outputs: set[str],
                   claimed: set[str]) -> None:
    """Extend ``chain`` along the layer's output (see the module docstring); nodes another
    layer already absorbed (a residual Add shared by two branches) end it."""
    y = chain[-1].outputs[0]
    stage = "bias" if layer.bias is None else "residual"
    while True:
        if stage in ("bias", "residual", "activation") and layer.activation == "none":
            gelu = _gelu_erf(y, graph_outputs)
            if gelu is not None and not claimed.intersection(n.name for n in gelu):
                layer.activation = "gelu"
                chain.extend(gelu)
                y = gelu[-1].outputs[0]
                stage = "post-residual" if layer.residual is None else "quantize"
                continue
        reader = _only_reader(y, graph_outputs)
        if reader is None or reader.name in claimed:
            break
        if reader.op == "Add" and stage == "bias":
            bias = _bias_of(layer, reader, y)
            if bias is not None:
                layer.bias = bias.name
                chain.append(reader)
                y, stage = reader.outputs[0], "residual"
                continue
        if reader.op == "Add" and stage in ("bias", "residual", "post-residual"):
            other = _other_input(reader, y)
            if other is not None and _const(other) is None and layer.residual is None:
                layer.residual = other.name
                layer.residual_after_activation = stage == "post-residual"
                chain.append(reader)
                y, stage = reader.outputs[0], ("activation" if stage != "post-residual"
                                               else "quantize")
                continue
        if stage in ("bias", "residual", "activation") and layer.activation == "none":
            found = _activation(reader, y, graph_outputs)
            if found is not None:
                layer.activation, layer.clip, nodes = found
                chain.extend(nodes)
                y = nodes[-1].outputs[0]
                stage = "post-residual" if layer.residual is None else "quantize"
                continue
        if reader.op == "QuantizeLinear" and layer.precision == "int8":
            s_y = _symmetric_int8(reader.inputs[1],
                                  reader.inputs[2] if len(reader.inputs) > 2 else None)
            if s_y is not None:
                layer.output_scale = s_y
                layer.output_dtype = "int8"
                chain.append(reader)
                y = reader.outputs[0]
        break
    layer.output = y.name
