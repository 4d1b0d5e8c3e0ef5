"""Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules.

Works on any ONNX file, not only optcc's. Each finding names a rule, a severity, the node
and what to do. ``error`` findings make TensorRT reject the model or compute something
else; ``warning`` findings build but cost speed or accuracy.

Rules (see FACTS.md, "TensorRT"):

- ``unsupported-op``: QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, QLinearAdd
  and DynamicQuantizeLinear are not supported — use Q/DQ pairs around float ops;
- ``opset``: per-channel ``axis`` on Q/DQ needs opset 13 or newer;
- ``unsigned``: zero points must be signed int8 (uint8 is the ONNX Runtime CPU format);
- ``zero-point``: zero points must be exactly 0 (symmetric);
- ``scale``: scales must be positive and finite;
- ``activation-per-channel``: activations are quantized per tensor only;
- ``weight-axis``: per-channel weight scales must be on the output-channel axis;
- ``unpaired-q``: every QuantizeLinear must feed DequantizeLinear nodes only;
- ``output-qdq``: Q/DQ on a Conv/Gemm/MatMul output that feeds an activation blocks
  the conv + activation fusion;
- ``mixed-precision-layer``: a weighted layer with only one of weight / activation
  quantized runs in float;
- ``residual-add``: an Add with one INT8 input (from a quantized layer) and one float input
  cannot be fused into the INT8 layer;
- ``sparse-nearly``: a layer whose weight *nearly* follows the 2:4 pattern (at least 90 % of
  its groups of 4 along the input channels hold at most 2 non-zeros, but not all): TensorRT
  only uses sparse tactics when every group complies, so the layer runs dense. The finding
  names the first offending groups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.ir.model import Model

UNSUPPORTED = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd",
    "QLinearMul", "DynamicQuantizeLinear", "QLinearGlobalAveragePool", "QLinearSigmoid",
}
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish"}


@dataclass
class Finding:
    rule: str
    severity: str
    node: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


def _const(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        value = t.inputs[0].attrs.get("value")
        return np.asarray(value.values) if value is not None else None
    return None


def _weight_axis(consumer: gs.Node, weight_input: int, ndim: int) -> int | None:
    if consumer.op == "Conv" and weight_input == 1:
        return 0
    if consumer.op == "ConvTranspose" and weight_input == 1:
        return 1
    if consumer.op == "Gemm" and weight_input == 1:
        return 0 if int(consumer.attrs.get("transB", 0)) else 1
    if consumer.op == "MatMul" and weight_input == 1:
        return ndim - 1
    return None


def _is_dq_output(t: gs.Tensor) -> bool:
    return bool(t.inputs) and t.inputs[0].op == "DequantizeLinear"


def lint_tensorrt(model: Model) -> list[Finding]:
    """All findings for ``model`` (empty when it follows every rule)."""
    findings: list[Finding] = []
    opset = model.opset

    def add(rule: str, severity: str, node: gs.Node, message: str) -> None:
        findings.append(Finding(rule, severity, node.name, message))

    for node in model.graph.nodes:
        if node.op in UNSUPPORTED:
            add("unsupported-op", "error", node,
                f"{node.op} is not supported by TensorRT; express it as Q/DQ around the float op")
            continue
        if node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        zp = _const(node.inputs[2]) if len(node.inputs) > 2 else None
        data = node.inputs[0]
        per_channel = scale is not None and scale.size > 1
        if per_channel and opset < 13:
            add("opset", "error", node, f"per-channel Q/DQ needs opset >= 13 (model has {opset})")
        if zp is not None:
            if zp.dtype == np.uint8:
                add("unsigned", "error", node,
                    "zero point is uint8; TensorRT needs signed int8 (this is the ONNX Runtime CPU format)")
            elif np.any(zp != 0):
                add("zero-point", "error", node, "zero point must be 0 (symmetric quantization)")
        elif node.op == "QuantizeLinear" and len(node.inputs) < 3:
            add("unsigned", "error", node,
                "no zero point: ONNX defaults to uint8; give an int8 zero point of 0")
        if scale is None:
            add("scale", "error", node, "scale is not a constant")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            add("scale", "error", node, "scales must be positive and finite")
        if node.op == "QuantizeLinear":
            readers = [c for o in node.outputs for c in o.outputs]
            if not readers or any(c.op != "DequantizeLinear" for c in readers):
                add("unpaired-q", "error", node,
                    "QuantizeLinear must feed DequantizeLinear nodes only")
            if per_channel and not isinstance(data, gs.Constant):
                add("activation-per-channel", "error", node,
                    "activations must be quantized per tensor (a scalar scale)")
            producer = data.inputs[0] if data.inputs else None
            if producer is not None and producer.op in ("Conv", "Gemm", "MatMul") and any(
                c.op in ACTIVATIONS for c in data.outputs
            ):
                add("output-qdq", "warning", node,
                    f"Q/DQ on the output of {producer.op} '{producer.name}', which also feeds an "
                    "activation: this blocks the layer + activation fusion; quantize inputs only")
        if node.op == "DequantizeLinear" and isinstance(data, gs.Constant) and per_channel:
            axis = int(node.attrs.get("axis", 1))
            for consumer in node.outputs[0].outputs:
                index = consumer.inputs.index(node.outputs[0])
                want = _weight_axis(consumer, index, len(data.shape))
                if want is not None and axis % len(data.shape) != want:
                    add("weight-axis", "error", node,
                        f"per-channel axis {axis} is not the output-channel axis {want} of "
                        f"{consumer.op} '{consumer.name}'")

    int8_outputs = set()
    for node in model.graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        w_q = _is_dq_output(weight)
        source = weight.inputs[0].inputs[0] if w_q else weight
        if not isinstance(source, gs.Constant):
            continue  # activation x activation MatMul: not a weighted layer
        a_q = _is_dq_output(node.inputs[0])
        if w_q and a_q:
            int8_outputs.add(node.outputs[0].name)
        elif w_q != a_q:
            which = "weight" if w_q else "input activation"
            add("mixed-precision-layer", "warning", node,
                f"only the {which} is quantized; TensorRT runs this layer in float")
    for node in model.graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        names = [t.name for t in node.inputs]
        if any(n in int8_outputs for n in names):
            other = [t for t in node.inputs if t.name not in int8_outputs]
            if other and not isinstance(other[0], gs.Constant) and not _is_dq_output(other[0]):
                add("residual-add", "warning", node,
                    f"residual input '{other[0].name}' is float: add Q/DQ on it so TensorRT can "
                    "fuse the add into the INT8 layer")
    findings.extend(_sparsity_findings(model))
    return findings


def _sparsity_findings(model: Model) -> list[Finding]:
    """``sparse-nearly``: layers a few groups short of the 2:4 pattern."""
    from optcc.sparse import layer_compliance

    findings = []
    for row in layer_compliance(model, "2:4"):
        if row["status"] != "nearly":
            continue
        where = ", ".join(str(v["index"]) for v in row["first_violations"])
        findings.append(Finding(
            "sparse-nearly", "warning", row["name"],
            f"{row['violating']} of {row['groups']} groups of 4 input channels hold more than 2 "
            f"non-zeros (first groups start at weight index {where}, running along axis "
            f"{row['axis']}); TensorRT runs the layer dense unless every group complies: zero "
            "those weights or re-run sparsify-2of4"))
    return findings
