"""The cuda backend's dispatch planning (CPU only): which layers go to the sparse kernels,
which nodes each kernel absorbs, with which epilogue, and why the others stay in torch."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sparse_nets import magnitude_2to4, onnx_mlp

from optcc import Model
from optcc.backends.cuda_plan import plan_model

RNG = np.random.default_rng(0)


def sparse_kn(k: int, n: int) -> np.ndarray:
    """A MatMul weight [K, N], 2:4 along K for every output column."""
    return magnitude_2to4(RNG.standard_normal((n, k)).astype(np.float32)).T.copy()


def build(nodes: list, inits: list, inputs: list, outputs: list, opset: int = 17) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return Model.from_proto(onnx.shape_inference.infer_shapes(proto))


def tensor(name: str, shape: list, dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, value: np.ndarray):
    return numpy_helper.from_array(np.asarray(value), name)


def layers_by_node(plan):
    return {layer.node: layer for layer in plan.layers}


def test_mlp_chains_bias_activation_and_residual() -> None:
    plan = plan_model(onnx_mlp())
    layers = layers_by_node(plan)
    assert set(layers) == {"fc1", "fc2"} and not plan.skipped
    fc1, fc2 = layers["fc1"], layers["fc2"]
    assert fc1.nodes == ["fc1", "fc1_bias", "act"]
    assert (fc1.bias, fc1.activation, fc1.residual, fc1.output) == ("b1", "relu", None, "a")
    assert (fc1.m, fc1.k, fc1.weight_layout, fc1.precision) == (128, 64, "km", "float16")
    assert fc2.nodes == ["fc2", "fc2_bias", "residual"]
    assert (fc2.bias, fc2.residual, fc2.residual_after_activation) == ("b2", "x", False)
    assert fc2.input == "a" and fc2.output == "y"
    json.dumps(plan.to_dict())  # the artifact's cuda_plan.json
    assert plan.summary().startswith("2 layer(s) on the sparse kernels (6 nodes fused)")


def _relu_layer_then_add(other: str, name: str, batch: int) -> Model:
    """x -> MatMul(w, 2:4) -> Add(b) -> Relu -> Add(other) -> y, with other "r" (an input)
    or a tensor of the chain."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("Add", ["a", other], ["y"], name=name),
    ]
    inits = [init("w", sparse_kn(64, 64)), init("b", np.zeros(64, np.float32))]
    inputs = [tensor("x", [batch, 64])] + ([tensor("r", [batch, 64])] if other == "r" else [])
    return build(nodes, inits, inputs, [tensor("y", [batch, 64])])


def test_residual_after_activation_and_bfloat16() -> None:
    model = _relu_layer_then_add("r", "res", 4)
    layer = plan_model(model, precision="bfloat16").layers[0]
    assert layer.nodes == ["fc", "bias", "act", "res"]
    assert layer.residual == "r" and layer.residual_after_activation
    assert layer.precision == layer.output_dtype == "bfloat16"


def test_dense_and_misshapen_layers_stay_in_torch_with_reasons() -> None:
    dense = RNG.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "dense"], ["a"], name="dense_fc"),
        helper.make_node("MatMul", ["a", "narrow"], ["b"], name="narrow_fc"),
        helper.make_node("MatMul", ["b", "odd_k"], ["y"], name="odd_fc"),
    ]
    inits = [init("dense", dense), init("narrow", sparse_kn(64, 40)),
             init("odd_k", sparse_kn(40, 64))]
    model = build(nodes, inits, [tensor("x", [2, 64])], [tensor("y", [2, 64])])
    plan = plan_model(model)
    assert not plan.layers
    reasons = {s.node: s.reason for s in plan.skipped}
    assert "not 2:4 sparse" in reasons["dense_fc"]
    assert "64x40" not in reasons["narrow_fc"] and "40x64" in reasons["narrow_fc"]
    assert "64x40" in reasons["odd_fc"]


def test_a_tensor_read_twice_ends_the_chain() -> None:
    model = _relu_layer_then_add("hb", "uses_hb_again", 2)
    layer = plan_model(model).layers[0]
    assert layer.nodes == ["fc", "bias"] and layer.output == "hb" and layer.activation == "none"


def test_graph_output_is_not_absorbed() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = build(nodes, [init("w", sparse_kn(64, 64))], [tensor("x", [2, 64])],
                  [tensor("h", [2, 64]), tensor("y", [2, 64])])
    layer = plan_model(model).layers[0]
    assert layer.nodes == ["fc"] and layer.output == "h"


def test_gemm_folds_alpha_beta_and_c() -> None:
    w = magnitude_2to4(RNG.standard_normal((96, 128)).astype(np.float32))  # [N, K]
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1,
                              alpha=0.5, beta=2.0),
             helper.make_node("Gemm", ["x", "w"], ["z"], name="gemm_ta", transA=1, transB=1)]
    model = build(nodes, [init("w", w), init("c", np.ones(96, np.float32))],
                  [tensor("x", [128, 128])], [tensor("y", [128, 96]), tensor("z", [128, 96])])
    plan = plan_model(model)
    layer = plan.layers[0]
    assert (layer.node, layer.weight_layout, layer.m, layer.k) == ("gemm", "mk", 96, 128)
    assert (layer.alpha, layer.bias, layer.bias_scale) == (0.5, "c", 2.0)
    assert plan.skipped[0].reason == "Gemm with transA=1"


def test_pointwise_conv_with_stride_bias_and_relu6() -> None:
    w = magnitude_2to4(RNG.standard_normal((64, 128)).astype(np.float32)).reshape(64, 128, 1, 1)
    k3 = RNG.standard_normal((64, 64, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="pw", strides=[2, 2]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["a"], name="relu6"),
        helper.make_node("Conv", ["a", "k3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    inits = [init("w", w), init("b", np.zeros(64, np.float32)), init("k3", k3),
             init("lo", np.float32(0)), init("hi", np.float32(6))]
    model = build(nodes, inits, [tensor("x", [1, 128, 8, 8])], [tensor("y", [1, 64, 4, 4])])
    plan = plan_model(model)
    layer = plan.layers[0]
    assert (layer.node, layer.weight_layout, layer.conv_strides) == ("pw", "conv", (2, 2))
    assert (layer.bias, layer.activation, layer.clip) == ("b", "clip", (0.0, 6.0))
    assert layer.nodes == ["pw", "relu6"]
    assert "3x3 kernel" in plan.skipped[0].reason


@pytest.mark.parametrize("form", ["div_mul_x_half", "mul_half_then_x", "gelu_op", "gelu_tanh"])
def test_gelu_forms(form: str) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "b"], ["t"], name="bias")]
    inits = [init("w", sparse_kn(64, 64)), init("b", np.zeros(64, np.float32)),
             init("sqrt2", np.float32(math.sqrt(2))), init("inv_sqrt2", np.float32(1 / math.sqrt(2))),
             init("one", np.float32(1)), init("half", np.float32(0.5))]
    if form == "div_mul_x_half":  # legacy exporter: x * 0.5 * (1 + erf(x / sqrt2)) reordered
        nodes += [helper.make_node("Div", ["t", "sqrt2"], ["d"], name="g1"),
                  helper.make_node("Erf", ["d"], ["e"], name="g2"),
                  helper.make_node("Add", ["e", "one"], ["p"], name="g3"),
                  helper.make_node("Mul", ["t", "p"], ["q"], name="g4"),
                  helper.make_node("Mul", ["q", "half"], ["y"], name="g5")]
        opset = 17
    elif form == "mul_half_then_x":
        nodes += [helper.make_node("Mul", ["t", "inv_sqrt2"], ["d"], name="g1"),
                  helper.make_node("Erf", ["d"], ["e"], name="g2"),
                  helper.make_node("Add", ["one", "e"], ["p"], name="g3"),
                  helper.make_node("Mul", ["half", "p"], ["q"], name="g4"),
                  helper.make_node("Mul", ["q", "t"], ["y"], name="g5")]
        opset = 17
    else:
        attrs = {"approximate": "tanh"} if form == "gelu_tanh" else {}
        nodes += [helper.make_node("Gelu", ["t"], ["y"], name="g1", **attrs)]
        opset = 20
    model = build(nodes, inits, [tensor("x", [2, 64])], [tensor("y", [2, 64])], opset=opset)
    layer = plan_model(model).layers[0]
    assert layer.activation == ("gelu_tanh" if form == "gelu_tanh" else "gelu")
    assert layer.output == "y"
    assert layer.nodes[:2] == ["fc", "bias"] and layer.nodes[-1] in ("g5", "g1")


def test_not_quite_gelu_is_left_alone() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="fc"),
             helper.make_node("Div", ["t", "three"], ["d"], name="g1"),
             helper.make_node("Erf", ["d"], ["e"], name="g2"),
             helper.make_node("Add", ["e", "one"], ["p"], name="g3"),
             helper.make_node("Mul", ["t", "p"], ["q"], name="g4"),
             helper.make_node("Mul", ["q", "half"], ["y"], name="g5")]
    inits = [init("w", sparse_kn(64, 64)), init("three", np.float32(3)),
             init("one", np.float32(1)), init("half", np.float32(0.5))]
    model = build(nodes, inits, [tensor("x", [2, 64])], [tensor("y", [2, 64])])
    layer = plan_model(model).layers[0]
    assert layer.nodes == ["fc"] and layer.activation == "none"


def _qdq_model(zero_point_dtype: int, opset: int = 17) -> Model:
    """x -> Q -> DQ -> MatMul(DQ(W int8, per channel)) -> Add(b) -> Q -> DQ -> y."""
    w = magnitude_2to4(RNG.integers(-127, 128, (128, 128)).astype(np.float32)).T  # [K, N]
    qtype = np.int8 if zero_point_dtype == TensorProto.INT8 else np.uint8
    zp = np.array(0 if qtype == np.int8 else 128, dtype=qtype)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("QuantizeLinear", ["hb", "sy", "zy"], ["yq"], name="qy"),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dqy"),
    ]
    inits = [init("sx", np.float32(0.02)), init("zx", zp), init("sy", np.float32(0.05)),
             init("zy", zp), init("wq", w.astype(np.int8)),
             init("sw", np.full(128, 0.01, np.float32)), init("zw", np.zeros(128, np.int8)),
             init("b", np.zeros(128, np.float32))]
    return build(nodes, inits, [tensor("x", [4, 128])], [tensor("y", [4, 128])], opset=opset)


def test_tensorrt_format_int8_layer_runs_int8_with_requantization() -> None:
    plan = plan_model(_qdq_model(TensorProto.INT8))
    layer = plan.layers[0]
    assert layer.precision == "int8"
    assert layer.input == "xq" and layer.input_scale == pytest.approx(0.02)
    assert layer.nodes == ["dqx", "dqw", "fc", "bias", "qy"]
    assert layer.output == "yq" and layer.output_dtype == "int8"
    assert layer.output_scale == pytest.approx(0.05)
    assert (layer.weight_scale, layer.weight_scale_axis) == ("sw", 1)


def test_unsigned_int8_layer_runs_float_on_dequantized_weight() -> None:
    layer = plan_model(_qdq_model(TensorProto.UINT8)).layers[0]
    assert layer.precision == "float16" and layer.input == "xd"
    assert layer.nodes == ["dqw", "fc", "bias"] and layer.output == "hb"
    assert layer.weight_scale == "sw" and "float" in layer.notes[0]


def test_int8_can_be_turned_off() -> None:
    layer = plan_model(_qdq_model(TensorProto.INT8), int8=False).layers[0]
    assert layer.precision == "float16" and "qy" not in layer.nodes


TOKENS = [{"name": "input_ids", "shape": ["batch", 16], "dtype": "int64"},
          {"name": "attention_mask", "shape": ["batch", 16], "dtype": "int64"}]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_exported_bert_style_encoder(exporter: str) -> None:
    from pathlib import Path

    from optcc.frontend import export_torch

    model = export_torch("sparse_nets:sparse_bert_style", inputs=TOKENS, exporter=exporter,
                         base_dir=Path(__file__).parent)
    plan = plan_model(model)
    # 2 layers x (query, key, value, out, up, down)
    assert len(plan.layers) == 12, plan.skipped
    assert sorted(layer.activation for layer in plan.layers).count("gelu") == 2
    with_residual = [layer for layer in plan.layers if layer.residual]
    assert len(with_residual) == 4  # attention output and FFN down projection, per layer
    assert all(layer.bias for layer in plan.layers)
