"""Q/DQ placement: which layers run in INT8 and how the nodes are written per target.

One calibration serves two formats:

- **tensorrt**: signed int8, symmetric, zero point exactly 0. Activations are per-tensor
  (scale ``t / 127``); weights are per-channel on the output-channel axis (Conv axis 0,
  Gemm axis 0 with ``transB=1`` else 1, MatMul the last axis) with scale ``max|W_c| / 127``.
  Q/DQ goes on the *inputs* of the selected layers, never on their outputs. One Q/DQ pair
  per tensor is shared by all its quantized readers. A residual ``Add`` that reads the
  output of a quantized layer gets Q/DQ on its other inputs too, so TensorRT can fuse
  conv + add and keep the sum in INT8.
- **onnxruntime**: unsigned 8-bit asymmetric activations and signed per-channel weights,
  the only pair ONNX Runtime's x86 kernels run fast (FACTS.md: 3.2× vs none for signed).
  Nodes are placed by ONNX Runtime's own QDQ quantizer, so its fusions (QLinearConv,
  QLinearMatMul, Relu removal) match; optcc supplies the ranges from its own calibration
  and decides which layers to quantize.
"""

from __future__ import annotations

import fnmatch
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc import Model

from .calibrate import Calibration

FORMATS = ("tensorrt", "onnxruntime")
ACTIVATION_OPS = ("Relu", "Clip", "Add", "GlobalAveragePool", "MaxPool", "AveragePool")


@dataclass
class Layer:
    """A weighted layer that may be quantized."""

    name: str
    op: str
    weight: str
    activation: str
    axis: int
    skip_reason: str | None = None
    mode: str = "static"  # static (calibrated scales) or dynamic (per-batch scales, ORT)


def candidate_layers(
    model: Model, op_types: list[str], exclude: list[str], min_channels: int,
    unfolded: dict[str, str] | None = None,
) -> list[Layer]:
    """Every weighted layer of the chosen op types, with a reason when it is skipped
    (``unfolded``: layers whose constant weight subgraph could not be evaluated)."""
    layers = []
    for node in model.graph.nodes:
        if node.op not in op_types:
            continue
        if unfolded and node.name in unfolded:
            layers.append(Layer(node.name, node.op, node.inputs[1].name, node.inputs[0].name, 0,
                                unfolded[node.name]))
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(weight, gs.Constant):
            if node.op == "MatMul" and isinstance(node.inputs[0], gs.Constant):
                layers.append(Layer(node.name, node.op, node.inputs[0].name, node.inputs[1].name,
                                    0, "weight is the first MatMul operand"))
            elif weight is not None and node.op != "MatMul" and weight.name:
                layers.append(Layer(node.name, node.op, weight.name, node.inputs[0].name, 0,
                                    "weight is computed at run time, not a constant"))
            continue  # activation x activation MatMul (attention): not a weighted layer
        w = np.asarray(weight.values)
        if node.op == "Conv":
            axis = 0
            groups = int(node.attrs.get("group", 1))
            out_ch, in_ch = w.shape[0], w.shape[1] * groups
        elif node.op == "Gemm":
            axis = 0 if int(node.attrs.get("transB", 0)) else 1
            out_ch, in_ch = w.shape[axis], w.shape[1 - axis]
        else:  # MatMul x @ W
            if w.ndim < 2:
                continue
            axis = w.ndim - 1
            out_ch, in_ch = w.shape[-1], w.shape[-2]
        layer = Layer(node.name, node.op, weight.name, node.inputs[0].name, axis)
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            layer.skip_reason = "Gemm with transA"
        elif any(fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.op, p) for p in exclude):
            layer.skip_reason = "excluded by the recipe"
        elif out_ch < min_channels or in_ch < min_channels:
            layer.skip_reason = (
                f"too small for INT8 to pay off ({in_ch} in, {out_ch} out < {min_channels})"
            )
        if w.dtype != np.float32 and layer.skip_reason is None:
            layer.skip_reason = f"weight is {w.dtype.name}, not float32"
        layers.append(layer)
    return layers


def int8_followers(
    proto: onnx.ModelProto, layers: list[Layer], activation_ops: list[str],
    quantized_outputs: list[str],
) -> tuple[list[str], list[str]]:
    """onnxruntime format: the follow-on ops to quantize, and every tensor that is INT8.

    A follow-on op (Relu, Clip, Add, pooling) is quantized only when *all* its non-constant
    inputs are already INT8 tensors: a residual ``Add`` of two quantized branches becomes
    QLinearAdd, while an Add with a float input (an attention mask, a residual stream before
    LayerNorm) stays float. Walks the graph in order, so chains (Conv → Add → Relu → pool)
    stay INT8 end to end.
    """
    selected = {layer.name for layer in layers}
    initializers = {t.name for t in proto.graph.initializer}
    int8: set[str] = set()
    followers: list[str] = []
    for node in proto.graph.node:  # ONNX graphs are stored in topological order
        if node.name in selected and node.op_type in quantized_outputs:
            int8.update(node.output)
        elif node.op_type in activation_ops:
            data = [i for i in node.input if i and i not in initializers]
            if node.op_type == "Clip":
                data = data[:1]
            if data and all(i in int8 for i in data):
                followers.append(node.name)
                int8.update(node.output)
    return followers, sorted(int8)


def tensors_to_calibrate(
    proto: onnx.ModelProto, layers: list[Layer], fmt: str, activation_ops: list[str],
    quantized_outputs: list[str],
) -> list[str]:
    """The activations a format quantizes, so calibration touches nothing else.

    tensorrt: the data inputs of the layers plus the other inputs of residual Adds that read
    a layer's output. onnxruntime: the data inputs plus every INT8 tensor of
    :func:`int8_followers` (quantized layer outputs and the follow-on ops' outputs).
    """
    selected = {layer.name for layer in layers}
    layer_outputs = {o for n in proto.graph.node if n.name in selected for o in n.output}
    initializers = {t.name for t in proto.graph.initializer}
    wanted = [layer.activation for layer in layers]
    if fmt == "onnxruntime":
        wanted += int8_followers(proto, layers, activation_ops, quantized_outputs)[1]
    for node in proto.graph.node:
        if fmt == "tensorrt" and node.op_type == "Add" and any(i in layer_outputs for i in node.input):
            wanted += [i for i in node.input if i not in layer_outputs and i not in initializers]
    return list(dict.fromkeys(wanted))


def _scalar(name: str, value: Any, dtype: Any) -> gs.Constant:
    return gs.Constant(name, np.array(value, dtype=dtype))


def quantize_tensorrt(model: Model, layers: list[Layer], calib: Calibration) -> Model:
    """Insert TensorRT-style Q/DQ for ``layers`` (modifies and returns ``model``)."""
    graph = model.graph
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    dq_of: dict[str, gs.Variable] = {}
    weight_dq: dict[str, gs.Variable] = {}

    def activation_dq(tensor: gs.Tensor) -> gs.Variable | None:
        if tensor.name in dq_of:
            return dq_of[tensor.name]
        if tensor.name not in calib.thresholds:
            return None
        scale = max(calib.thresholds[tensor.name], 1e-8) / 127.0
        s = _scalar(f"{tensor.name}_scale", scale, np.float32)
        zp = _scalar(f"{tensor.name}_zero_point", 0, np.int8)
        q = gs.Variable(f"{tensor.name}_quantized", dtype=np.int8, shape=tensor.shape)
        dq = gs.Variable(f"{tensor.name}_dequantized", dtype=np.float32, shape=tensor.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{tensor.name}_Q", inputs=[tensor, s, zp], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", f"{tensor.name}_DQ", inputs=[q, s, zp], outputs=[dq]))
        dq_of[tensor.name] = dq
        return dq

    quantized_outputs = set()
    for layer in layers:
        node = nodes[layer.name]
        data_index = 0
        dq = activation_dq(node.inputs[data_index])
        if dq is None:
            continue
        node.inputs[data_index] = dq
        weight = node.inputs[1]
        if weight.name not in weight_dq:
            w = np.asarray(weight.values, dtype=np.float32)
            reduce_axes = tuple(i for i in range(w.ndim) if i != layer.axis)
            amax = np.max(np.abs(w), axis=reduce_axes)
            scale = np.maximum(amax, 1e-12) / 127.0
            shape = [1] * w.ndim
            shape[layer.axis] = -1
            wq = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            wq_c = gs.Constant(f"{weight.name}_int8", wq)
            s = gs.Constant(f"{weight.name}_scale", scale.astype(np.float32))
            zp = gs.Constant(f"{weight.name}_zero_point", np.zeros(scale.shape, np.int8))
            out = gs.Variable(f"{weight.name}_dequantized", dtype=np.float32, shape=list(w.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", f"{weight.name}_DQ",
                                       attrs={"axis": layer.axis}, inputs=[wq_c, s, zp], outputs=[out]))
            weight_dq[weight.name] = out
        node.inputs[1] = weight_dq[weight.name]
        quantized_outputs.add(node.outputs[0].name)

    # Residual adds: quantize the other input so conv + add fuses in INT8.
    for node in list(graph.nodes):
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        names = [t.name for t in node.inputs]
        if not any(n in quantized_outputs for n in names):
            continue
        for i, tensor in enumerate(node.inputs):
            if tensor.name in quantized_outputs or isinstance(tensor, gs.Constant):
                continue
            dq = activation_dq(tensors.get(tensor.name, tensor))
            if dq is not None:
                node.inputs[i] = dq
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return model


def quantize_onnxruntime(
    model: Model,
    proto: onnx.ModelProto,
    layers: list[Layer],
    excluded: list[str],
    calib: Calibration,
    activation_ops: list[str],
    quantized_outputs: list[str],
) -> Model:
    """ONNX Runtime's QDQ format via its quantizer, with optcc's ranges and layer choice.

    ``proto`` is the model with inferred shapes; ``excluded`` names the weighted layers to
    keep in float. Follow-on ops (Relu, Clip, Add, pooling) are quantized only where all
    their inputs are already INT8 (:func:`int8_followers`). Outputs are quantized only
    for the op types in ``quantized_outputs`` (Conv by default: QLinearConv needs it); a
    MatMul/Gemm output left in float still runs as an integer matmul
    (MatMulIntegerToFloat) and keeps encoders accurate (FACTS.md: 0.94 → 0.98 cosine).
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    selected = {layer.name for layer in layers}
    followers = set(int8_followers(proto, layers, activation_ops, quantized_outputs)[0])
    exclude = list(excluded)
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.name not in selected:
            exclude.append(node.name)
        if node.op_type in activation_ops and node.name not in followers:
            exclude.append(node.name)
    ranges = {
        name: TensorData(
            lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32)
        )
        for name in calib.thresholds
        for lo, hi in [calib.asymmetric_range(name)]
    }
    quantizer = QDQQuantizer(
        proto,
        True,  # per-channel weights
        False,  # no reduce_range: VNNI/AMX CPUs accumulate without saturation
        QuantType.QInt8,
        QuantType.QUInt8,
        TensorsData(CalibrationMethod.MinMax, ranges),
        None,
        sorted(set(exclude)),
        ["Conv", "Gemm", "MatMul", *activation_ops],
        {
            "OpTypesToExcludeOutputQuantization": [
                op for op in ("Conv", "Gemm", "MatMul") if op not in quantized_outputs
            ],
            "MatMulConstBOnly": True,
        },
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    quantized = Model.from_proto(quantizer.model.model, source=model.source)
    _float_readers_read_float(quantized, selected | followers)
    quantized.meta = model.meta.copy()
    quantized.extra_metadata = dict(model.extra_metadata)
    return quantized


def _float_readers_read_float(model: Model, quantized_nodes: set[str]) -> None:
    """Nodes that stay float read the original tensor, not its INT8 round trip.

    ONNX Runtime's QDQ quantizer makes every reader of a quantized tensor read the
    DequantizeLinear output: in a post-norm transformer that puts the rounding error of the
    LayerNorm output into the residual stream, and costs one more DequantizeLinear per layer.
    """
    changed = False
    for node in list(model.graph.nodes):
        if node.op != "DequantizeLinear" or isinstance(node.inputs[0], gs.Constant):
            continue
        q = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if q is None or q.op != "QuantizeLinear":
            continue
        original = q.inputs[0]
        for reader in list(node.outputs[0].outputs):
            if reader.name in quantized_nodes or reader.op in ("QuantizeLinear",
                                                              "DequantizeLinear"):
                continue
            for i, t in enumerate(reader.inputs):
                if t is node.outputs[0]:
                    reader.inputs[i] = original
                    changed = True
    if changed:
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()


def gemm_to_matmul(model: Model, names: set[str]) -> None:
    """Rewrite the named Gemm nodes (``transA = 0``) as ``MatMul`` (+ ``Add``), in place.

    ONNX Runtime's dynamic quantizer does this rewrite itself and then quantizes only the op
    types it was asked for, so Gemm layers silently stayed float. Doing it first keeps the
    layer's name on the MatMul, so what was quantized can be read back from the model.
    """
    from .graph import namer

    graph = model.graph
    fresh = namer(graph)
    for node in list(graph.nodes):
        if node.op != "Gemm" or node.name not in names or int(node.attrs.get("transA", 0)):
            continue
        w = np.asarray(node.inputs[1].values, dtype=np.float32)
        if int(node.attrs.get("transB", 0)):
            w = w.T
        w = w * float(node.attrs.get("alpha", 1.0))
        out = node.outputs[0]
        weight = gs.Constant(fresh(f"{node.inputs[1].name}_matmul"), np.ascontiguousarray(w))
        product = gs.Variable(fresh(f"{node.name}_product"), dtype=np.float32) \
            if len(node.inputs) > 2 else out
        node.outputs = []
        graph.nodes.append(gs.Node("MatMul", node.name, inputs=[node.inputs[0], weight],
                                   outputs=[product]))
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = node.inputs[2]
            beta = float(node.attrs.get("beta", 1.0))
            if beta != 1.0 and isinstance(bias, gs.Constant):
                bias = gs.Constant(fresh(f"{bias.name}_beta"), np.asarray(bias.values) * beta)
            graph.nodes.append(gs.Node("Add", f"{node.name}_bias", inputs=[product, bias],
                                       outputs=[out]))
        node.inputs = []
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def quantize_dynamic(model: Model, layers: list[Layer]) -> Model:
    """ONNX Runtime dynamic quantization of ``layers``: INT8 weights (per channel), activation
    ranges computed per batch at run time (DynamicQuantizeLinear → MatMulInteger / ConvInteger,
    which ONNX Runtime fuses into one DynamicQuantizeMatMul kernel). Gemm layers are turned
    into MatMul first (:func:`gemm_to_matmul`). A CPU-only format: TensorRT does not run it
    (``optcc lint`` says so)."""
    import tempfile

    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    from .graph import typed_proto

    work = model.copy()
    gemms = {layer.name for layer in layers if layer.op == "Gemm"}
    if gemms:
        gemm_to_matmul(work, gemms)
    selected = {layer.name for layer in layers}
    proto = typed_proto(work)
    op_types = sorted({"Conv" if layer.op == "Conv" else "MatMul" for layer in layers})
    exclude = [n.name for n in proto.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in selected]
    exclude += [f"{n.name}_MatMul" for n in proto.graph.node if n.op_type == "Gemm"]  # its rename
    with tempfile.TemporaryDirectory(prefix="optcc-dynamic-") as tmp:
        out = Path(tmp) / "dynamic.onnx"
        ort_quantize_dynamic(
            proto, str(out), op_types_to_quantize=op_types,
            per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            extra_options={"MatMulConstBOnly": True,
                           "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        quantized = Model.load(out)
    quantized.meta = model.meta.copy()
    quantized.extra_metadata = dict(model.extra_metadata)
    quantized.source = model.source
    return quantized


def actual_precision(model: Model, layers: list[Layer]) -> dict[str, str]:
    """What each layer *is* in ``model``, read from the graph (never from intentions):
    ``int8-static`` (Q/DQ on input and weight), ``int8-dynamic`` (an integer op fed by
    DynamicQuantizeLinear), ``int8`` (another integer op), or ``float32``."""
    by_name = {n.name: n for n in model.graph.nodes}
    result: dict[str, str] = {}
    for layer in layers:
        node = by_name.get(layer.name)
        integer = by_name.get(f"{layer.name}_quant")
        if integer is not None and integer.op in ("MatMulInteger", "ConvInteger"):
            feeder = integer.inputs[0].inputs[0] if integer.inputs[0].inputs else None
            dynamic = feeder is not None and feeder.op == "DynamicQuantizeLinear"
            result[layer.name] = "int8-dynamic" if dynamic else "int8"
        elif node is not None and node.op in ("QLinearConv", "QLinearMatMul", "MatMulInteger",
                                              "ConvInteger"):
            result[layer.name] = "int8"
        elif node is not None and len(node.inputs) > 1 and all(
            _fed_by_dq(t) for t in node.inputs[:2]
        ):
            result[layer.name] = "int8-static"
        else:
            result[layer.name] = "float32"
    return result


def _fed_by_dq(tensor: gs.Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def write_calibration_cache(path: Path, calib: Calibration, tensors: list[str]) -> None:
    """A TensorRT-style calibration cache: a header line, then ``name: hex`` per tensor,
    where hex is the big-endian IEEE-754 bit pattern of the float32 scale ``t / 127``."""
    lines = [f"TRT-8600-{'Entropy' if calib.method == 'entropy' else 'MinMax'}Calibration2"]
    for name in tensors:
        scale = max(calib.thresholds[name], 1e-8) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    path.write_text("\n".join(lines) + "\n")


def read_calibration_cache(path: Path) -> dict[str, float]:
    """Scales by tensor name from a TensorRT-style calibration cache."""
    scales = {}
    for line in path.read_text().splitlines()[1:]:
        name, _, value = line.rpartition(": ")
        if name:
            scales[name] = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
    return scales
