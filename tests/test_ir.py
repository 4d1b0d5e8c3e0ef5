"""The IR: loading, saving (incl. external data), metadata round trips, queries, stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_bn_model

from optcc.errors import ModelError
from optcc.ir import Model, model_stats, verify_model
from optcc.runtime import OrtRunner


def test_load_names_every_node_and_exposes_queries(conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    names = [n.name for n in model.graph.nodes]
    assert len(set(names)) == len(names) and all(names)
    assert model.opset == 17
    conv = model.node("conv")
    assert [n.name for n in model.consumers_of(conv.outputs[0])] == ["bn"]
    assert model.producer_of("bn").name == "bn"
    assert model.producer_of("x") is None
    layers = [(n.name, w.name, p) for n, w, p in model.weighted_layers()]
    assert layers == [("conv", "W", "float32"), ("fc", "fc_w", "float32")]


def test_metadata_survives_save_and_load(tmp_path: Path, conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    mask = np.random.default_rng(0).random((8, 3, 3, 3)) > 0.5
    model.meta.tensor("W")["mask"] = mask
    model.meta.tensor("W")["range"] = np.array([-1.5, 2.25], dtype=np.float32)
    model.meta.node("conv")["precision"] = {"dtype": "int8", "reason": "sensitivity 0.01"}
    model.meta.history.append({"pass": "test", "modified": True})
    out = model.save(tmp_path / "m.onnx")
    again = Model.load(out)
    assert np.array_equal(again.meta.tensor("W")["mask"], mask)
    assert again.meta.tensor("W")["mask"].dtype == bool
    np.testing.assert_array_equal(again.meta.tensor("W")["range"], [-1.5, 2.25])
    assert again.meta.node("conv")["precision"]["reason"] == "sensitivity 0.01"
    assert again.meta.history == [{"pass": "test", "modified": True}]


def test_metadata_of_removed_tensors_is_dropped(tmp_path: Path, conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    model.meta.tensor("no_such_tensor")["x"] = 1
    again = Model.load(model.save(tmp_path / "m.onnx"))
    assert "no_such_tensor" not in again.meta.tensors


def test_external_data_round_trip(tmp_path: Path) -> None:
    model = Model.from_proto(conv_bn_model(channels=64))  # weights above the 1 KiB threshold
    out = model.save(tmp_path / "ext" / "m.onnx", external_data=True)
    data_file = out.with_name("m.onnx.data")
    assert data_file.exists() and data_file.stat().st_size > 0
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    again = Model.load(out)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(OrtRunner(again).run({"x": x})[0], OrtRunner(model).run({"x": x})[0])


def test_missing_external_data_is_a_clear_error(tmp_path: Path) -> None:
    out = Model.from_proto(conv_bn_model(channels=64)).save(tmp_path / "m.onnx", external_data=True)
    out.with_name("m.onnx.data").unlink()
    with pytest.raises(ModelError, match="external data"):
        Model.load(out)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path, conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    model.save(tmp_path / "m.onnx")
    model.save(tmp_path / "ext.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx", "ext.onnx", "m.onnx"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not protobuf at all \x00\xff", "not a valid ONNX model"),
        (None, "not a valid ONNX model"),  # truncated below
    ],
)
def test_corrupt_and_truncated_files(tmp_path: Path, conv_bn_path: Path, content, message) -> None:
    path = tmp_path / "bad.onnx"
    if content is None:
        data = conv_bn_path.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message) as info:
        Model.load(path)
    assert str(path) in str(info.value)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        Model.load(tmp_path / "nope.onnx")


def test_stats_count_params_flops_and_sparsity(conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    conv = model.node("conv")
    w = np.asarray(conv.inputs[1].values).copy()
    w[:4] = 0  # half the output channels
    conv.inputs[1].values = w
    stats = model_stats(model)
    by_name = {layer.name: layer for layer in stats.layers}
    # Conv 3->8, 3x3, output 8x8: 2 * 8*8*8 * 3*3*3 FLOPs; params 8*3*3*3 + 8 bias.
    assert by_name["conv"].flops == 2 * 8 * 64 * 27
    assert by_name["conv"].params == 8 * 27 + 8
    assert by_name["conv"].sparsity == pytest.approx(0.5)
    assert by_name["fc"].flops == 2 * 4 * 8
    # all float initializers: W, B, 4 BN vectors, fc_w, fc_b
    assert stats.params == 8 * 27 + 8 + 4 * 8 + 4 * 8 + 4
    assert stats.op_histogram["Conv"] == 1
    assert stats.int8_coverage == 0.0


def test_stats_read_output_channels_from_each_weight_layout() -> None:
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, *shape: int):
        return numpy_helper.from_array(np.ones(shape, np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "wt"], ["a"], name="gemm_t", transB=1),  # [out, in]
        helper.make_node("Gemm", ["x", "w"], ["b"], name="gemm"),  # [in, out]
        helper.make_node("MatMul", ["x", "w"], ["c"], name="right"),  # x @ W: W's columns
        helper.make_node("MatMul", ["wl", "xt"], ["d"], name="left"),  # W @ x: W's rows
        helper.make_node("ConvTranspose", ["img", "wc"], ["e"], name="deconv", group=2),
    ]
    graph = helper.make_graph(
        nodes, "layouts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
         helper.make_tensor_value_info("xt", TensorProto.FLOAT, [6, 2]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
         zip("abcde", ([2, 5], [2, 7], [2, 7], [3, 2], [1, 6, 6, 6]), strict=True)],
        [const("wt", 5, 6), const("w", 6, 7), const("wl", 3, 6), const("wc", 4, 3, 2, 2)],
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    out = {layer.name: layer.out_channels for layer in model_stats(model).layers}
    assert out == {"gemm_t": 5, "gemm": 7, "right": 7, "left": 3, "deconv": 6}


def test_flops_use_given_sequence_length() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((16, 32), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 32])], [w],
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model_stats(model).flops == 2 * 1 * 32 * 16  # dynamic dims default to 1
    assert model_stats(model, {"x": [8, 128, 16]}).flops == 2 * 128 * 32 * 16  # per sample


def test_int8_layers_are_recognised_behind_dequantize(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 8), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w, scale, zp],
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    stats = model_stats(model)
    assert stats.layers[0].precision == "int8" and stats.layers[0].int8
    assert stats.int8_coverage == 1.0


def test_verify_reports_broken_graphs(conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    verify_model(model)  # valid
    fc = model.node("fc")
    fc.inputs[1].values = np.zeros((4, 5), np.float32)  # K=5 cannot multiply 8 features
    with pytest.raises(ModelError, match="failed verification"):
        verify_model(model)


def test_copy_is_deep(conv_bn_path: Path) -> None:
    model = Model.load(conv_bn_path)
    clone = model.copy()
    clone.node("conv").inputs[1].values = np.zeros((8, 3, 3, 3), np.float32)
    clone.meta.history.append({"pass": "x"})
    assert np.abs(np.asarray(model.node("conv").inputs[1].values)).sum() > 0
    assert model.meta.history == []


def test_round_trip_preserves_outputs(tmp_path: Path) -> None:
    proto = conv_bn_model(with_identity=True)
    model = Model.from_proto(proto)
    path = model.save(tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(
        OrtRunner(str(path)).run({"x": x})[0], OrtRunner(Model.from_proto(proto)).run({"x": x})[0]
    )


@pytest.mark.slow
def test_model_over_2gib_saves_loads_and_runs_with_external_data(tmp_path: Path) -> None:
    """Weights beyond protobuf's 2 GiB message limit (four 560 MB tables, like the layers of
    a large model): saved and loaded with external data, verified and run by path, never
    serialised as one message. (A *single* tensor over 2 GiB cannot exist in an ONNX proto.)"""
    import onnx_graphsurgeon as gs

    rows, dim, tables = 2**17 + 2**15, 1024, 4  # 4 x 671 MB = 2.7 GB of float32
    ids = gs.Variable("ids", dtype=np.int64, shape=["batch"])
    nodes, partial = [], []
    for t in range(tables):
        table = np.zeros((rows, dim), np.float32)
        table[:, 0] = t + 1
        table[-1, 1] = 7.0
        out = gs.Variable(f"emb{t}", dtype=np.float32, shape=["batch", dim])
        nodes.append(gs.Node("Gather", inputs=[gs.Constant(f"table{t}", table), ids], outputs=[out]))
        partial.append(out)
    total = gs.Variable("total", dtype=np.float32, shape=["batch", dim])
    nodes.append(gs.Node("Sum", inputs=partial, outputs=[total]))
    model = Model(gs.Graph(nodes=nodes, inputs=[ids], outputs=[total], opset=17))
    assert model.needs_external_data()
    path = model.save(tmp_path / "big.onnx")
    assert path.stat().st_size < 2**20
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    del model, nodes, partial
    again = Model.load(path)
    verify_model(again)
    result = OrtRunner(again).run({"ids": np.array([0, rows - 1], np.int64)})[0]
    np.testing.assert_array_equal(result[:, :2], [[10.0, 0.0], [10.0, 28.0]])


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_int8_keeps_parameter_counts_and_counts_scales_apart(target: str) -> None:
    """Quantizing stores weights in 8 bits (int32 biases on ONNX Runtime) behind
    DequantizeLinear: the parameter count stays, per-layer counts keep the bias, and scales
    and zero points are counted as quant_params."""
    from conftest import DEMO_MODEL
    from optcc_plugins.int8 import Int8QuantizePass
    from optcc_plugins.lossless import FoldBatchNormPass

    from optcc.data import InputSpec
    from optcc.data.builtin import DigitsOptions, DigitsSource
    from optcc.passes import Capability, PassContext

    folded = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    spec = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]
    ctx = PassContext(target=target, capabilities=frozenset({Capability.CALIBRATION_DATA}),
                      data={"calibration": DigitsSource(DigitsOptions(limit=64), inputs=spec)})
    quantized = Int8QuantizePass(method="max", min_channels=1)(folded.copy(), ctx).model
    before, after = model_stats(folded), model_stats(quantized)
    assert after.params == before.params and before.quant_params == 0
    assert after.quant_params > 0 and after.weight_bytes < before.weight_bytes / 3
    by_name = {layer.name: layer for layer in before.layers}
    for layer in after.layers:
        assert layer.params == by_name[layer.name].params, layer.name
    fc = next(layer for layer in after.layers if layer.op == "Gemm")
    assert fc.params == 10 * 128 + 10  # weight and bias
