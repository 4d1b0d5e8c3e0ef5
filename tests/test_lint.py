"""The TensorRT Q/DQ lint flags every rule violation in hand-made models."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from optcc.ir import Model
from optcc.lint import lint_tensorrt

C = 16


def build(
    *,
    act_zp_dtype=np.int8,
    act_zp=0,
    act_scale=0.05,
    weight_axis=0,
    weight_scale_sign=1.0,
    quantize_activation=True,
    quantize_weight=True,
    output_qdq=False,
    residual=False,
    residual_quantized=True,
    q_feeds_relu=False,
    extra_nodes=(),
    opset=17,
    per_channel_activation=False,
):
    """x[N,16,4,4] -> Q/DQ -> Conv(W via per-channel DQ) -> Relu (-> Add x) -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-127, 127, (C, C, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array((np.full(C, 0.01) * weight_scale_sign).astype(np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(C, np.int8), "w_zp"),
        numpy_helper.from_array(np.full(C, 0.1, np.float32), "bias"),
        numpy_helper.from_array(np.array(np.full(C, act_scale) if per_channel_activation else act_scale, np.float32), "x_s"),
        numpy_helper.from_array(np.array(np.full(C, act_zp) if per_channel_activation else act_zp, act_zp_dtype), "x_zp"),
    ]
    nodes = []
    conv_in = "x"
    if quantize_activation:
        q_attrs = {"axis": 1} if per_channel_activation else {}
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="x_Q", **q_attrs),
                  helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="x_DQ", **q_attrs)]
        conv_in = "x_dq"
        if q_feeds_relu:
            nodes.append(helper.make_node("Relu", ["x_q"], ["stray"], name="stray_relu"))
    if quantize_weight:
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_DQ", axis=weight_axis))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((C, C, 3, 3)).astype(np.float32), "w"))
    nodes.append(helper.make_node("Conv", [conv_in, "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]))
    relu_in = "c"
    if output_qdq:
        nodes += [helper.make_node("QuantizeLinear", ["c", "x_s", "x_zp"], ["c_q"], name="c_Q"),
                  helper.make_node("DequantizeLinear", ["c_q", "x_s", "x_zp"], ["c_dq"], name="c_DQ")]
        nodes.append(helper.make_node("Sigmoid", ["c"], ["c_sig"], name="sig"))
        relu_in = "c_dq"
    nodes.append(helper.make_node("Relu", [relu_in], ["r"], name="relu"))
    out = "r"
    if residual:
        nodes = [n for n in nodes if n.name != "relu"]
        skip = "x_dq" if residual_quantized else "x"
        nodes.append(helper.make_node("Add", ["c", skip], ["y"], name="residual_add"))
        out = "y"
    nodes.extend(extra_nodes)
    # Extra nodes (stray readers, unsupported ops) may dangle: the lint reads every node.
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", C, 4, 4])]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, 4, 4])], outputs, inits
    )
    return Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def rules(model: Model, **kwargs) -> list[tuple[str, str]]:
    """(rule, node) of every error and warning; notes (info) are left out."""
    return sorted({(f.rule, f.node) for f in lint_tensorrt(model, **kwargs) if f.severity != "info"})


def test_a_correct_model_has_no_findings() -> None:
    assert rules(build()) == []
    assert rules(build(residual=True)) == []
    # Only a note: the dynamic batch axis has no profile (optcc's builds fill one in).
    assert [(f.rule, f.severity) for f in lint_tensorrt(build())] == [("dynamic-shape", "info")]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"act_zp_dtype": np.uint8, "act_zp": 128}, [("unsigned", "x_DQ"), ("unsigned", "x_Q")]),
        ({"act_zp": 3}, [("zero-point", "x_DQ"), ("zero-point", "x_Q")]),
        ({"act_scale": -0.05}, [("scale", "x_DQ"), ("scale", "x_Q")]),
        ({"weight_scale_sign": -1.0}, [("scale", "w_DQ")]),
        ({"weight_axis": 1}, [("weight-axis", "w_DQ")]),
        ({"per_channel_activation": True}, [("activation-per-channel", "x_Q")]),
        ({"quantize_activation": False}, [("mixed-precision-layer", "conv")]),
        ({"quantize_weight": False}, [("mixed-precision-layer", "conv")]),
        ({"output_qdq": True}, [("output-qdq", "c_Q")]),
        ({"residual": True, "residual_quantized": False}, [("residual-add", "residual_add")]),
        # The stray Relu reads the int8 tensor itself, which TensorRT's parser also rejects.
        ({"q_feeds_relu": True}, [("parser-dtype", "stray_relu"), ("unpaired-q", "x_Q")]),
    ],
    ids=["unsigned", "zero-point", "negative-act-scale", "negative-weight-scale", "weight-axis",
         "per-channel-activation", "float-activation", "float-weight", "output-qdq",
         "float-residual", "unpaired-q"],
)
def test_each_rule_is_flagged(kwargs, expected) -> None:
    assert rules(build(**kwargs)) == expected


def test_unsupported_integer_ops() -> None:
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["dq_y", "dq_s", "dq_zp"], name="dyn")
    found = rules(build(extra_nodes=[node]))
    assert found == [("unsupported-op", "dyn")]


def test_opset_12_per_channel() -> None:
    # Opset 12 has no 'axis' on DequantizeLinear: a per-channel scale needs opset 13.
    found = rules(build(opset=13))
    assert found == []
    model = build(opset=13)
    model.graph.opset = 12
    assert ("opset", "w_DQ") in rules(model)


def test_cli_lint_exit_codes(tmp_path, capsys) -> None:
    from optcc.cli import main

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    build().save(good)
    build(act_zp=5).save(bad)
    assert main(["lint", str(good)]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out
    assert main(["lint", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error: [zero-point] x_Q: zero point must be 0 (symmetric quantization)" in out
