"""Single layers on real activations: the error a quantization choice causes where it acts.

The ``auto`` calibration method needs, for each candidate threshold of a tensor, how far the
outputs of the layers that read it move once that tensor and their weights are INT8. Each
layer is rebuilt as a one-node ONNX model (the same op, attributes, weight and bias) and run
by ONNX Runtime on the activation samples calibration kept: float input and float weight
give the reference, the fake-quantized input and the per-channel INT8 weight give the
quantized output. Any layer type ONNX Runtime runs (Conv with groups and strides, Gemm,
MatMul) is handled the same way.

The error of a tensor is the relative squared error ``Σ‖y_q − y‖² / Σ‖y‖²`` summed over
its readers.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc import Model

from .calibrate import Calibration
from .qdq import Layer

logger = logging.getLogger(__name__)


def fake_quant_weight(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric per-channel INT8 round trip of a weight along ``axis``."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    scale = np.maximum(amax, 1e-12) / 127.0
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def fake_quant_activation(
    x: np.ndarray, lo: float, hi: float, unsigned: bool
) -> np.ndarray:
    """Per-tensor INT8 round trip: unsigned asymmetric over ``[lo, hi]`` (ONNX Runtime's
    format) or signed symmetric over ``[-hi, hi]`` (TensorRT's)."""
    if unsigned:
        scale = (hi - lo) / 255.0 or 1.0
        zero = float(np.clip(np.round(-lo / scale), 0, 255))
        q = np.clip(np.round(x / scale) + zero, 0, 255)
        return ((q - zero) * scale).astype(np.float32)
    scale = hi / 127.0 or 1.0
    return (np.clip(np.round(x / scale), -127, 127) * scale).astype(np.float32)


class _SingleLayer:
    """One layer as its own ONNX Runtime session, with the weight as an input."""

    def __init__(self, node: gs.Node, layer: Layer, opset: int) -> None:
        import onnxruntime as ort

        weight = np.asarray(node.inputs[1].values, dtype=np.float32)
        self.weight = weight
        self.weight_q = fake_quant_weight(weight, layer.axis)
        inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
                  onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, weight.shape)]
        names = ["x", "w"]
        initializers = []
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            initializers.append(onnx.numpy_helper.from_array(
                np.asarray(node.inputs[2].values, dtype=np.float32), "b"))
            names.append("b")
        attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, gs.Tensor)}
        proto = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node(node.op, names, ["y"], **attrs)], "layer", inputs,
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                initializers,
            ),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(proto.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        self.reference: np.ndarray | None = None

    def run(self, x: np.ndarray, quantized: bool) -> np.ndarray:
        w = self.weight_q if quantized else self.weight
        return self.session.run(None, {"x": x, "w": w})[0].astype(np.float64)


class LayerProbe:
    """``error(tensor, threshold)`` for :func:`calibrate.auto_thresholds`."""

    def __init__(self, model: Model, layers: list[Layer], calib: Calibration, unsigned: bool) -> None:
        nodes = {n.name: n for n in model.graph.nodes}
        self.calib = calib
        self.unsigned = unsigned
        self.readers: dict[str, list[_SingleLayer]] = {}
        for layer in layers:
            if layer.activation not in calib.activations:
                continue
            try:
                single = _SingleLayer(nodes[layer.name], layer, model.opset)
            except Exception as exc:  # a layer ORT cannot rebuild alone is not scored
                logger.debug("no probe for %s: %s", layer.name, exc)
                continue
            self.readers.setdefault(layer.activation, []).append(single)

    def error(self, name: str, threshold: float) -> float:
        readers = self.readers.get(name)
        x = self.calib.activations.get(name)
        if not readers or x is None:
            return 0.0
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        s = self.calib.stats[name]
        if self.unsigned:
            lo, hi = min(max(s.lo, -threshold), 0.0), max(min(s.hi, threshold), 0.0)
        else:
            lo, hi = -threshold, threshold
        xq = fake_quant_activation(x, lo, hi, self.unsigned)
        num = den = 0.0
        for single in readers:
            if single.reference is None:
                single.reference = single.run(x, quantized=False)
            out = single.run(xq, quantized=True)
            num += float(np.sum((out - single.reference) ** 2))
            den += float(np.sum(single.reference**2))
        return num / den if den > 0 else num


def auto_summary(calib: Calibration) -> dict[str, Any]:
    """How many tensors took each method under ``auto``."""
    counts: dict[str, int] = {}
    for method in calib.chosen.values():
        counts[method] = counts.get(method, 0) + 1
    return counts
