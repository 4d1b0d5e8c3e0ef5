"""Per-layer and whole-model statistics: parameters, bytes, FLOPs, sparsity, precision.

These numbers feed ``optcc inspect``, every pass's record in the build report, and the
benchmarks, so they are computed in one place.

FLOPs count one multiply-add as 2 operations, per sample: shapes are inferred with every
dynamic dimension set to 1 unless ``input_shapes`` gives concrete ones (a sequence length,
say), and totals are divided by the batch size (the first dimension of the first input).
A layer whose output shape cannot be inferred reports ``flops=None``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc.ir.model import Model

QUANTIZED_DTYPES = frozenset({"int8", "uint8", "int4", "uint4"})

# Integer layers written by quantizers (ONNX Runtime's dynamic format, QOperator format):
# op type -> (index of the constant weight input, the float op it computes).
INTEGER_LAYERS = {
    "MatMulInteger": (1, "MatMul"),
    "ConvInteger": (1, "Conv"),
    "QLinearMatMul": (3, "MatMul"),
    "QLinearConv": (3, "Conv"),
}


@dataclass
class LayerStats:
    """What one weighted layer (Conv, ConvTranspose, Gemm, MatMul with constant weight) holds."""

    name: str
    op: str
    weight: str
    weight_shape: list[int]
    params: int
    bytes: int
    sparsity: float
    flops: int | None
    precision: str
    int8: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelStats:
    """Whole-model totals plus the per-layer list."""

    params: int
    weight_bytes: int
    flops: int | None
    sparsity: float
    int8_coverage: float
    nodes: int
    op_histogram: dict[str, int]
    layers: list[LayerStats] = field(default_factory=list)

    def to_dict(self, *, layers: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not layers:
            out.pop("layers")
        else:
            out["layers"] = [layer.to_dict() for layer in self.layers]
        return out


def static_shapes(
    model: Model, input_shapes: dict[str, list[int]] | None
) -> tuple[dict[str, list[int]], int]:
    """A concrete shape per tensor, with dynamic input dimensions set to 1 (or as given);
    also the batch size those shapes stand for. Static inference first; where it gives up,
    one small ONNX Runtime run of the model fills in the rest."""
    proto = model.to_proto()
    del proto.graph.value_info[:]
    for inp in proto.graph.input:
        given = (input_shapes or {}).get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if given is not None and i < len(given):
                dim.Clear()
                dim.dim_value = int(given[i])
            elif not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = 1
    batch = 1
    if proto.graph.input and proto.graph.input[0].type.tensor_type.shape.dim:
        batch = max(1, proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        return {}, batch
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(
        inferred.graph.input
    ):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    produced = {o for node in proto.graph.node for o in node.output if o}
    if not produced <= set(shapes):
        # Static inference gives up on some exports (e.g. HF BERT's position-id Slice):
        # one tiny run of the model with every tensor as an output gives exact shapes.
        shapes.update(_runtime_shapes(proto, sorted(produced - set(shapes))))
    return shapes, batch


def _runtime_shapes(proto: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of ``names`` from running ``proto`` (inputs already concrete) on zeros-like
    inputs: integer inputs are 0 (valid ids), masks 1, floats random."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.add().name = name
    feeds = {}
    rng = np.random.default_rng(0)
    initializers = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np.dtype(dtype).kind == "f":
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif "mask" in inp.name.lower():
            feeds[inp.name] = np.ones(dims, dtype)
        else:
            feeds[inp.name] = np.zeros(dims, dtype)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = session.run(names, feeds)
    except Exception:
        return {}
    return {name: list(np.asarray(v).shape) for name, v in zip(names, outs, strict=True)}


def _layer_flops(node: gs.Node, weight: gs.Constant, shapes: dict[str, list[int]]) -> int | None:
    wshape = list(weight.shape)
    out = shapes.get(node.outputs[0].name)
    if node.op in INTEGER_LAYERS:
        if out is None:
            return None
        if INTEGER_LAYERS[node.op][1] == "Conv":
            return 2 * int(np.prod(out)) * int(np.prod(wshape[1:]))
        return 2 * int(np.prod(out)) * (wshape[-2] if len(wshape) >= 2 else wshape[0])
    if node.op == "Conv":
        if out is None:
            return None
        return 2 * int(np.prod(out)) * int(np.prod(wshape[1:]))
    if node.op == "ConvTranspose":
        inp = shapes.get(node.inputs[0].name)
        if inp is None:
            return None
        return 2 * int(np.prod(inp[:1] + inp[2:])) * wshape[0] * int(np.prod(wshape[1:]))
    if out is None:
        return None
    if node.op == "Gemm":
        trans_b = int(node.attrs.get("transB", 0))
        k = wshape[1] if trans_b else wshape[0]
        return 2 * int(np.prod(out)) * k
    if node.op == "MatMul":
        weight_first = constant_input_index(node) == 0
        k = wshape[-1] if weight_first else (wshape[-2] if len(wshape) >= 2 else wshape[0])
        return 2 * int(np.prod(out)) * k
    return None


def _per_sample(flops: int | None, batch: int) -> int | None:
    return None if flops is None else flops // batch


def constant_input_index(node: gs.Node) -> int:
    """1 when the weight is a MatMul's second operand (``x @ W``), 0 when it is the first."""
    from optcc.ir.model import _constant_through_dq

    return 1 if _constant_through_dq(node.inputs[1]) is not None else 0


def _bias_params(node: gs.Node) -> int:
    if node.op in {"Conv", "ConvTranspose", "Gemm"} and len(node.inputs) > 2:
        bias = node.inputs[2]
        if isinstance(bias, gs.Constant):
            return int(np.prod(bias.shape or [1]))
    return 0


def _integer_layers(model: Model) -> list[tuple[gs.Node, gs.Constant, str]]:
    """Layers that already run as integer ops (MatMulInteger, ConvInteger, QLinear*), with
    their constant integer weight: :meth:`Model.weighted_layers` sees only float op types."""
    found = []
    for node in model.graph.nodes:
        index = INTEGER_LAYERS.get(node.op, (None, None))[0]
        if index is None or len(node.inputs) <= index:
            continue
        weight = node.inputs[index]
        if isinstance(weight, gs.Constant):
            found.append((node, weight, np.dtype(weight.dtype).name))
    return found


def _activation_quantized(node: gs.Node) -> bool:
    if node.op in INTEGER_LAYERS:
        return True  # an integer op reads integer activations by definition
    data = node.inputs[1 - constant_input_index(node)] if node.op == "MatMul" else node.inputs[0]
    return bool(data.inputs) and data.inputs[0].op == "DequantizeLinear"


def _is_parameter(tensor: gs.Constant) -> bool:
    """Weights, biases and scales count as parameters; int64 shape/axes constants do not."""
    dtype = np.dtype(tensor.dtype)
    return dtype.kind == "f" or dtype.name in QUANTIZED_DTYPES


def model_stats(model: Model, input_shapes: dict[str, list[int]] | None = None) -> ModelStats:
    """Compute :class:`ModelStats` for ``model`` (does not modify it)."""
    shapes, batch = static_shapes(model, input_shapes)
    layers: list[LayerStats] = []
    for node, weight, precision in [*model.weighted_layers(), *_integer_layers(model)]:
        values = np.asarray(weight.values)
        params = int(values.size) + _bias_params(node)
        zeros = int(values.size - np.count_nonzero(values))
        layers.append(
            LayerStats(
                name=node.name,
                op=node.op,
                weight=weight.name,
                weight_shape=[int(d) for d in values.shape],
                params=params,
                bytes=int(values.nbytes),
                sparsity=zeros / values.size if values.size else 0.0,
                flops=_per_sample(_layer_flops(node, weight, shapes), batch),
                precision=precision,
                int8=precision in QUANTIZED_DTYPES and _activation_quantized(node),
            )
        )
    params = 0
    weight_bytes = 0
    for tensor in model.tensor_map().values():
        if isinstance(tensor, gs.Constant) and _is_parameter(tensor):
            size = int(np.prod(tensor.shape or [1]))
            params += size
            weight_bytes += size * np.dtype(tensor.dtype).itemsize
    known = [layer.flops for layer in layers]
    flops = sum(f for f in known if f is not None) if layers and all(
        f is not None for f in known
    ) else None
    weights = [layer.flops if flops is not None else layer.params for layer in layers]
    total_w = sum(w or 0 for w in weights)
    int8_w = sum((w or 0) for w, layer in zip(weights, layers, strict=True) if layer.int8)
    total_weights = sum(int(np.prod(layer.weight_shape)) for layer in layers)
    zero_weights = sum(
        layer.sparsity * int(np.prod(layer.weight_shape)) for layer in layers
    )
    return ModelStats(
        params=params,
        weight_bytes=weight_bytes,
        flops=flops,
        sparsity=zero_weights / total_weights if total_weights else 0.0,
        int8_coverage=int8_w / total_w if total_w else 0.0,
        nodes=len(model.graph.nodes),
        op_histogram=dict(Counter(node.op for node in model.graph.nodes).most_common()),
        layers=layers,
    )
