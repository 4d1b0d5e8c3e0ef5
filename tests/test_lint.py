"""The TensorRT Q/DQ lint flags every rule violation in hand-made models."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
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


# --------------------------------------------------------------------------- parser rules
def graph_model(nodes, inputs, outputs, inits=(), opset=17, domains=()):
    """A hand-made model: (name, type, shape) inputs and outputs, nodes, initializers."""
    graph = helper.make_graph(
        list(nodes), "parser",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    # Imported without ONNX's checker: the lint reads files the checker would reject too.
    return Model(gs.import_onnx(helper.make_model(graph, opset_imports=opsets)))


FLOAT_X = [("x", TensorProto.FLOAT, [2, 4, 8, 8])]


def unary(op, out_type=TensorProto.FLOAT, out_shape=None, *, extra_inputs=(), inits=(), **attrs):
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], name="n", **attrs)
    return graph_model([node], FLOAT_X, [("y", out_type, out_shape)], inits)


def test_parser_op_unsupported_unlisted_plugin_and_newer() -> None:
    node = helper.make_node("Det", ["x"], ["y"], name="det")
    assert rules(graph_model([node], [("x", TensorProto.FLOAT, [3, 3])], [("y", TensorProto.FLOAT, [])])) == [
        ("parser-op", "det")]
    found = lint_tensorrt(unary("Celu2"))  # not an ONNX op TensorRT lists
    assert [(f.rule, f.severity) for f in found] == [("parser-op", "warning")]
    plugin = helper.make_node("FastRelu", ["x"], ["y"], name="plugin", domain="trt.plugins",
                              plugin_namespace="optcc", plugin_version="1")
    found = lint_tensorrt(graph_model([plugin], FLOAT_X, [("y", TensorProto.FLOAT, None)],
                                      domains=["trt.plugins"]))
    assert [(f.rule, f.severity) for f in found] == [("parser-op", "info")]
    assert "plugin named 'FastRelu' (namespace 'optcc')" in found[0].message
    attention = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")
    qkv = [(n, TensorProto.FLOAT, [1, 2, 4, 8]) for n in "qkv"]
    found = lint_tensorrt(graph_model([attention], qkv, [("y", TensorProto.FLOAT, None)], opset=23))
    assert ("parser-op", "info", "attn") in {(f.rule, f.severity, f.node) for f in found}
    assert ("parser-opset", "warning", "(model)") in {(f.rule, f.severity, f.node) for f in found}


def test_parser_opset_below_the_parser_range() -> None:
    model = unary("Relu")
    model.graph.opset = 8
    assert ("parser-opset", "(model)") in rules(model)


def test_parser_dtype_of_the_data_input() -> None:
    ids = [("a", TensorProto.INT64, [2, 3]), ("b", TensorProto.INT64, [3, 2])]
    matmul = helper.make_node("MatMul", ["a", "b"], ["c"], name="int_matmul")
    assert rules(graph_model([matmul], ids, [("c", TensorProto.INT64, [2, 2])])) == [
        ("parser-dtype", "int_matmul")]
    relu = helper.make_node("Relu", ["m"], ["r"], name="bool_relu")
    found = lint_tensorrt(graph_model([relu], [("m", TensorProto.BOOL, [4])], [("r", TensorProto.BOOL, [4])]))
    assert ("parser-dtype", "bool_relu") in {(f.rule, f.node) for f in found}
    assert "Relu on float32/float16/bfloat16, int32/int64 only" in found[0].message
    # Where checks its value input, not the bool condition; int64 Add is fine.
    where = helper.make_node("Where", ["m", "x", "x"], ["y"], name="where")
    ok = graph_model([where], [("m", TensorProto.BOOL, [4]), ("x", TensorProto.FLOAT, [4])],
                     [("y", TensorProto.FLOAT, [4])])
    assert rules(ok) == []


def test_double_tensors_are_cast_to_float() -> None:
    cast = helper.make_node("Cast", ["x"], ["y"], name="to_double", to=TensorProto.DOUBLE)
    found = rules(graph_model([cast], FLOAT_X, [("y", TensorProto.DOUBLE, None)]))
    assert found == [("double", "y")]


def test_uint8_only_at_the_network_boundary() -> None:
    nodes = [helper.make_node("Cast", ["x"], ["u"], name="to_u8", to=TensorProto.UINT8),
             helper.make_node("Cast", ["u"], ["y"], name="back", to=TensorProto.FLOAT)]
    assert rules(graph_model(nodes, FLOAT_X, [("y", TensorProto.FLOAT, None)])) == [("uint8-tensor", "u")]
    # A uint8 network output is allowed.
    assert rules(graph_model(nodes[:1], FLOAT_X, [("u", TensorProto.UINT8, None)])) == []


def test_int64_inputs_and_wide_constants_are_noted() -> None:
    big = numpy_helper.from_array(np.array([2**40], np.int64), "big")
    add = helper.make_node("Add", ["ids", "big"], ["out"], name="add")
    found = lint_tensorrt(graph_model([add], [("ids", TensorProto.INT64, [1])],
                                      [("out", TensorProto.INT64, [1])], [big]))
    assert sorted((f.rule, f.severity, f.node) for f in found) == [
        ("int64", "info", "big"), ("int64", "info", "ids"), ("int64", "info", "out")]


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype), name)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: unary("Resize", extra_inputs=["", "scales"], inits=[const("scales", [1, 1, 2, 2], np.float32)],
                       coordinate_transformation_mode="tf_crop_and_resize"),
         "coordinate_transformation_mode 'tf_crop_and_resize' is not supported"),
        (lambda: unary("Resize", extra_inputs=["", "scales"], inits=[const("scales", [1, 1, 2, 2], np.float32)],
                       antialias=1), "antialias is not supported"),
        (lambda: unary("MaxPool", kernel_shape=[2, 2], dilations=[2, 2]), "dilations [2, 2]"),
        (lambda: graph_model([helper.make_node("MaxPool", ["x"], ["y", "idx"], name="n", kernel_shape=[2, 2])],
                             FLOAT_X, [("y", TensorProto.FLOAT, None), ("idx", TensorProto.INT64, None)]),
         "the Indices output is not supported"),
        (lambda: unary("BatchNormalization", extra_inputs=["s", "b", "m", "v"], training_mode=1,
                       inits=[const(n, [1.0] * 4, np.float32) for n in "sbmv"]),
         "training_mode 1 is not supported"),
        (lambda: unary("Dropout", extra_inputs=["r", "t"],
                       inits=[const("r", 0.5, np.float32), const("t", True, np.bool_)]),
         "training mode is not supported"),
        (lambda: unary("LpNormalization", p=3), "only L1 and L2"),
        (lambda: unary("TopK", TensorProto.FLOAT, extra_inputs=["k"], inits=[const("k", [4000])]),
         "K=4000; TensorRT needs K below 3840"),
        (lambda: unary("TopK", extra_inputs=["k"], inits=[const("k", [2])], sorted=0), "sorted must be 1"),
        (lambda: graph_model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="n", reduction="none")],
                             [("x", TensorProto.FLOAT, [4]), ("u", TensorProto.FLOAT, [1])],
                             [("y", TensorProto.FLOAT, [4])], [const("i", [[1]])], opset=18),
         "the reduction attribute is not supported"),
        (lambda: graph_model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="n")],
                             [*FLOAT_X, ("axes", TensorProto.INT64, [1])], [("y", TensorProto.FLOAT, None)],
                             opset=18), "'axes' (input 1) must be a constant"),
        (lambda: graph_model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="n")],
                             FLOAT_X, [("y", TensorProto.FLOAT, None), ("mean", TensorProto.FLOAT, None)],
                             [const("g", [1.0] * 8, np.float32)]),
         "only the first output (Y) is supported"),
    ],
    ids=["resize-transform", "resize-antialias", "pool-dilations", "maxpool-indices",
         "batchnorm-training", "dropout-training", "lpnorm-p", "topk-k", "topk-sorted",
         "scatternd-reduction", "reduce-axes", "layernorm-outputs"],
)
def test_parser_attribute_restrictions(model, message) -> None:
    found = [f for f in lint_tensorrt(model()) if f.rule == "parser-attribute"]
    assert len(found) == 1 and found[0].node == "n" and message in found[0].message, found
    assert found[0].severity == "error"


def tokens_model():
    relu = helper.make_node("Relu", ["x"], ["y"], name="r")
    return graph_model([relu], [("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
                       [("y", TensorProto.FLOAT, ["batch", "sequence", 8])])


def test_dynamic_shapes_need_profiles() -> None:
    from optcc.backends.trt_build import ShapeProfile

    found = [f for f in lint_tensorrt(tokens_model()) if f.rule == "dynamic-shape"]
    assert [(f.severity, f.node) for f in found] == [("warning", "x")]  # beyond the batch axis
    other = ShapeProfile("z", [1], [1], [1])
    found = [f for f in lint_tensorrt(tokens_model(), profiles=[other]) if f.rule == "dynamic-shape"]
    assert [(f.severity, f.node) for f in found] == [("error", "x")]
    good = ShapeProfile("x", [1, 4, 8], [8, 16, 8], [32, 64, 8])
    assert rules(tokens_model(), profiles=[good]) == []


def test_profiles_must_fit_their_inputs() -> None:
    from optcc.backends.trt_build import ShapeProfile

    found = lint_tensorrt(tokens_model(), profiles=[
        ShapeProfile("x", [1, 4, 8], [8, 16, 8], [32, 64, 9]),
        ShapeProfile("z", [1], [2], [3]),
    ])
    messages = sorted((f.rule, f.node, f.message) for f in found if f.rule == "profile")
    assert [m[:2] for m in messages] == [("profile", "x"), ("profile", "z")]
    assert "max shape [32, 64, 9] does not fit" in messages[0][2]
    assert "names 'z', which is not a model input" in messages[1][2]
    bad_order = lint_tensorrt(tokens_model(), profiles=[ShapeProfile("x", [8, 16, 8], [1, 4, 8], [32, 64, 8])])
    assert any("needs min <= opt <= max" in f.message for f in bad_order)


def test_cli_lint_takes_trtexec_style_profiles(tmp_path, capsys) -> None:
    from optcc.cli import main

    path = tmp_path / "tokens.onnx"
    tokens_model().save(path)
    assert main(["lint", str(path), "--opt-shapes", "y:8x16x8"]) == 1  # a profile for no input
    assert "[dynamic-shape] x:" in capsys.readouterr().out
    code = main(["lint", str(path), "--min-shapes", "x:1x4x8", "--opt-shapes", "x:8x16x8",
                 "--max-shapes", "x:32x64x8"])
    assert code == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out
    assert main(["lint", str(path), "--opt-shapes", "x:8by16"]) == 2
    assert "expected NAME:D1xD2x..." in capsys.readouterr().err
