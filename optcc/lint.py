"""Check an ONNX model against TensorRT: its ONNX parser's limits and its Q/DQ rules.

Works on any ONNX file, not only optcc's. Each finding names a rule, a severity, the node
and what to do. ``error`` findings make TensorRT reject the model or compute something
else; ``warning`` findings build but cost speed or accuracy; ``info`` findings say what
TensorRT will do differently from ONNX Runtime without being wrong.

Parser rules (TensorRT 10's ONNX parser; the facts are in docs/tensorrt.md and the data in
:mod:`optcc.backends.tensorrt_support`):

- ``parser-op``: an operator the parser rejects, one it does not list, a custom-domain
  node (a plugin must implement it), or one that needs a newer TensorRT;
- ``parser-opset``: an opset outside the range the parser documents;
- ``parser-dtype``: an operator fed a data type the parser does not support for it, or a
  type TensorRT has no use for (strings, 16-bit integers, ...);
- ``double``: DOUBLE tensors, which the parser casts to FLOAT (clamping to ±FLT_MAX);
- ``uint8-tensor``: UINT8 anywhere but a network input or output;
- ``int64``: INT64 network inputs and outputs need INT64 bindings (TensorRT 9 and newer;
  8.x cast them to INT32) and INT64 constants beyond the INT32 range (clamped by 8.x);
- ``parser-attribute``: attribute and input restrictions (Resize modes, pooling dilations,
  training-mode BatchNormalization and Dropout, MaxPool indices, LSTM layout, TopK, ScatterND
  reduction, non-constant ``axes``, extra LayerNormalization outputs, ...);
- ``dynamic-shape``: a dynamic input without an optimization profile;
- ``profile``: a profile that names no input or does not fit the input's shape.

Q/DQ rules:

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

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.backends import tensorrt_support as trt_ops
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


def lint_tensorrt(model: Model, *, profiles: Sequence[Any] | None = None) -> list[Finding]:
    """All findings for ``model`` (empty when it follows every rule).

    ``profiles`` are the optimization profile entries the engine will be built with
    (objects with ``input``, ``min``, ``opt``, ``max``); None when unknown, which turns
    missing profiles into warnings (only the batch axis dynamic: a note) instead of errors.
    """
    findings = lint_tensorrt_parser(model, profiles=profiles)
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


# --------------------------------------------------------------------------- parser rules
def _onnx_types(model: Model) -> dict[str, str]:
    """ONNX type names (``FLOAT``, ``INT64``...) of every tensor whose type is known, after
    ONNX type inference."""
    import onnx

    proto = model.to_proto()
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is a help here, not a requirement
        pass
    graph = proto.graph
    types: dict[str, str] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem:
            types[value.name] = onnx.TensorProto.DataType.Name(elem)
    for init in graph.initializer:
        types[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and node.output:
                    types[node.output[0]] = onnx.TensorProto.DataType.Name(attr.t.data_type)
    return types


def _is_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) or bool(t.inputs and t.inputs[0].op == "Constant")


def _used(t: gs.Tensor, graph_outputs: set[str]) -> bool:
    return bool(t.name) and (bool(t.outputs) or t.name in graph_outputs)


def lint_tensorrt_parser(
    model: Model, *, profiles: Sequence[Any] | None = None
) -> list[Finding]:
    """The parser rules of the module docstring, node by node and input by input."""
    findings: list[Finding] = []
    graph = model.graph
    outputs = {t.name for t in graph.outputs}
    inputs = {t.name for t in graph.inputs}
    types = _onnx_types(model)

    def add(rule: str, severity: str, where: str, message: str) -> None:
        findings.append(Finding(rule, severity, where, message))

    opset = model.opset
    if not trt_ops.OPSET_MIN <= opset <= trt_ops.OPSET_MAX:
        severity = "error" if opset < trt_ops.OPSET_MIN else "warning"
        add("parser-opset", severity, "(model)",
            f"opset {opset} is outside the {trt_ops.OPSET_MIN}-{trt_ops.OPSET_MAX} range "
            "TensorRT 10's ONNX parser documents; re-export with another opset")

    for node in graph.nodes:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            namespace = node.attrs.get("plugin_namespace", "")
            add("parser-op", "info", node.name,
                f"{node.op} (domain '{domain}') is not an ONNX operator: TensorRT's parser "
                f"looks for a plugin named '{node.op}' (namespace '{namespace}'); its library "
                "must be loaded for the build")
            continue
        if node.op in UNSUPPORTED:
            continue  # reported by the Q/DQ rules as unsupported-op
        if node.op in trt_ops.UNSUPPORTED_OPS:
            add("parser-op", "error", node.name,
                f"{node.op} is not supported by TensorRT's ONNX parser")
            continue
        if node.op not in trt_ops.SUPPORTED_TYPES:
            add("parser-op", "warning", node.name,
                f"{node.op} is not in TensorRT 10's ONNX operator list: the parser rejects it "
                "unless a plugin of that name is loaded")
            continue
        if node.op in trt_ops.SINCE:
            add("parser-op", "info", node.name,
                f"{node.op} needs TensorRT {trt_ops.SINCE[node.op]} or newer")
        _check_node_types(node, types, add)
        _check_node_attributes(node, outputs, add)

    for name, onnx_type in sorted(types.items()):
        tensor = graph.tensors().get(name)
        if tensor is None:
            continue
        where = name
        if onnx_type == "DOUBLE":
            add("double", "warning", where,
                "DOUBLE tensor: TensorRT casts it to FLOAT (values beyond ±3.4e38 clamp)")
        elif onnx_type == "UINT8" and name not in inputs and name not in outputs:
            producer = tensor.inputs[0].op if tensor.inputs else None
            rejected = UNSUPPORTED | trt_ops.UNSUPPORTED_OPS  # reported on the node already
            if producer != "QuantizeLinear" and producer not in rejected and not isinstance(
                tensor, gs.Constant
            ):
                add("uint8-tensor", "error", where,
                    "UINT8 tensor inside the network: TensorRT allows UINT8 only as a network "
                    "input or output (cast to another type, or quantize to int8)")
        elif onnx_type == "INT64" and (name in inputs or name in outputs):
            kind = "input" if name in inputs else "output"
            add("int64", "info", where,
                f"INT64 network {kind}: TensorRT 9 and newer keep INT64 and need an int64 "
                "binding; TensorRT 8.x casts it to INT32")
        elif onnx_type == "INT64" and isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values)
            limit = np.iinfo(np.int32)
            if values.size and (values.max() > limit.max or values.min() < limit.min):
                add("int64", "info", where,
                    "INT64 constant beyond the INT32 range: TensorRT 8.x clamps it to "
                    "±2147483647 (harmless for Slice's 'to the end' markers)")

    findings.extend(_shape_findings(model, profiles))
    return findings


def _check_node_types(node: gs.Node, types: dict[str, str], add: Any) -> None:
    if node.op in trt_ops.TYPE_UNCHECKED:
        return
    index = trt_ops.DATA_INPUT.get(node.op, 0)
    if len(node.inputs) <= index or not node.inputs[index].name:
        return
    onnx_type = types.get(node.inputs[index].name)
    if onnx_type is None:
        return
    code = trt_ops.type_code(onnx_type)
    allowed = trt_ops.SUPPORTED_TYPES[node.op]
    if code is None or code not in allowed:
        names = {"F": "float32/float16/bfloat16", "I": "int32/int64", "B": "bool",
                 "U8": "uint8", "Q": "int8/fp8/int4"}
        add("parser-dtype", "error", node.name,
            f"{node.op} reads '{node.inputs[index].name}' as {onnx_type}; TensorRT supports "
            f"{node.op} on {', '.join(names[a] for a in sorted(allowed))} only")


def _attr(node: gs.Node, name: str, default: Any) -> Any:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _check_node_attributes(node: gs.Node, graph_outputs: set[str], add: Any) -> None:
    op = node.op

    def bad(message: str) -> None:
        add("parser-attribute", "error", node.name, f"{op}: {message}")

    if op == "Resize":
        transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if transform not in trt_ops.RESIZE_TRANSFORMS:
            bad(f"coordinate_transformation_mode '{transform}' is not supported (supported: "
                f"{', '.join(sorted(trt_ops.RESIZE_TRANSFORMS))})")
        if transform == "tf_half_pixel_for_nn" and _attr(node, "nearest_mode", "round_prefer_floor") != "round_prefer_floor":
            bad("tf_half_pixel_for_nn works only with nearest_mode round_prefer_floor")
        if int(_attr(node, "antialias", 0)):
            bad("antialias is not supported")
        if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            bad("only keep_aspect_ratio_policy 'stretch' is supported")
    if op in ("MaxPool", "AveragePool", "LpPool"):
        dilations = list(_attr(node, "dilations", []) or [])
        if any(d != 1 for d in dilations):
            bad(f"dilations {dilations} are not supported (only 1)")
    if op == "MaxPool" and len(node.outputs) > 1 and _used(node.outputs[1], graph_outputs):
        bad("the Indices output is not supported")
    if op == "BatchNormalization" and int(_attr(node, "training_mode", 0)):
        bad("training_mode 1 is not supported (export in eval mode)")
    if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
        mode = node.inputs[2]
        if not _is_constant(mode):
            bad("training_mode must be a constant (False)")
        elif bool(np.asarray(_const(mode)).any()):
            bad("training mode is not supported (export in eval mode)")
    if op == "LSTM" and (int(_attr(node, "input_forget", 0)) or int(_attr(node, "layout", 0))):
        bad("input_forget and layout must be 0")
    if op in ("LpNormalization", "LpPool") and int(_attr(node, "p", 2)) not in (1, 2):
        bad(f"p={_attr(node, 'p', 2)}; only L1 and L2 are supported")
    if op == "Constant" and any(k in node.attrs for k in ("sparse_value", "value_string", "value_strings")):
        bad("sparse and string constants are not supported")
    if op == "TopK":
        if int(_attr(node, "sorted", 1)) != 1:
            bad("sorted must be 1")
        k = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if k is not None and k.size and int(k.max()) >= trt_ops.TOPK_MAX_K:
            bad(f"K={int(k.max())}; TensorRT needs K below {trt_ops.TOPK_MAX_K}")
    if op == "ScatterND" and "reduction" in node.attrs:
        bad("the reduction attribute is not supported (not even 'none'); drop it")
    if op == "LayerNormalization" and any(_used(t, graph_outputs) for t in node.outputs[1:]):
        bad("only the first output (Y) is supported; Mean and InvStdDev must be unused")
    for index, what in trt_ops.CONSTANT_INPUTS.get(op, {}).items():
        if len(node.inputs) > index and node.inputs[index].name and not _is_constant(node.inputs[index]):
            bad(f"'{what}' (input {index}) must be a constant")
    if op == "GridSample" and node.inputs and node.inputs[0].shape is not None and len(node.inputs[0].shape) != 4:
        bad("only 4-D inputs are supported")
    if op == "EyeLike" and node.inputs and node.inputs[0].shape is not None and any(
        not isinstance(d, int) for d in node.inputs[0].shape
    ):
        bad("the input needs static dimensions")


def _shape_findings(model: Model, profiles: Sequence[Any] | None) -> list[Finding]:
    findings = []
    by_input = {p.input: p for p in (profiles or [])}
    shapes = {t.name: list(t.shape or []) for t in model.inputs}
    for name, profile in by_input.items():
        if name not in shapes:
            findings.append(Finding("profile", "error", name,
                                    f"the profile names '{name}', which is not a model input "
                                    f"(inputs: {', '.join(shapes)})"))
            continue
        dims = shapes[name]
        for which in ("min", "opt", "max"):
            shape = list(getattr(profile, which))
            if len(shape) != len(dims) or any(
                isinstance(d, int) and d >= 0 and d != s for d, s in zip(dims, shape, strict=False)
            ):
                findings.append(Finding("profile", "error", name,
                                        f"{which} shape {shape} does not fit the input's "
                                        f"dimensions {dims}"))
        if not all(lo <= mid <= hi for lo, mid, hi in zip(profile.min, profile.opt, profile.max, strict=False)):
            findings.append(Finding("profile", "error", name,
                                    f"needs min <= opt <= max: {profile.min}, {profile.opt}, "
                                    f"{profile.max}"))
    for name, dims in shapes.items():
        dynamic = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d >= 0)]
        if not dynamic or name in by_input:
            continue
        what = f"input '{name}' has dynamic dimensions {dims} and no optimization profile"
        if profiles is not None:
            severity = "error"
        else:
            severity = "info" if dynamic == [0] else "warning"
        findings.append(Finding("dynamic-shape", severity, name,
                                f"{what}: give min/opt/max shapes (recipe min_shapes/opt_shapes/"
                                "max_shapes, or --min-shapes/--opt-shapes/--max-shapes)"))
    return findings
