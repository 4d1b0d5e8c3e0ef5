"""The TensorRT plugin rewrite (CPU): 2:4 GEMM chains become optcc SparseGemm plugin nodes.

TensorRT is not installable here, so the rewritten graph is run with ONNX's reference
evaluator and a numpy implementation of the plugin's documented semantics (unpack the
weight, GEMM, epilogue), and compared with ONNX Runtime on the original model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from sparse_nets import onnx_mlp
from test_cuda_plan import _qdq_model

from optcc import Model
from optcc.backends.trt_plugin import (
    PLUGIN_DOMAIN,
    PLUGIN_NAME,
    PLUGIN_NAME_RESIDUAL,
    insert_sparse_plugins,
    select_measured_faster,
)
from optcc.runtime import OrtRunner
from optcc.sparse.packing import PackedWeight, unpack


def _sparse_gemm(x, values, meta, alpha, bias, residual, m, k, arch, activation,
                 residual_after_activation, clip_min, clip_max, out_scale):  # type: ignore[no-untyped-def]
    """The plugin's math (kernels/optcc_kernels.h), in float64."""
    packed = PackedWeight(values=values, meta=meta.view(np.uint8), shape=(m, k),
                          format="sm90" if arch == 90 else "sm80")
    weight = unpack(packed).astype(np.float64)
    rows = x.reshape(-1, k).astype(np.float64)
    v = rows @ weight.T * alpha + bias
    r = 0.0 if residual is None else residual.reshape(-1, m).astype(np.float64)
    if not residual_after_activation:
        v = v + r
    v = {0: v, 1: np.maximum(v, 0), 4: np.clip(v, clip_min, clip_max)}[activation]
    if residual_after_activation:
        v = v + r
    v = v * out_scale
    if x.dtype == np.int8 and out_scale != 1.0:
        out = np.clip(np.rint(v), -128, 127).astype(np.int8)
    else:
        out = v.astype(np.float16)
    return out.reshape(*x.shape[:-1], m)


class SparseGemm(OpRun):
    op_domain = PLUGIN_DOMAIN

    def _run(self, x, values, meta, alpha, bias, **attrs):  # type: ignore[no-untyped-def]
        return (_sparse_gemm(x, values, meta, alpha, bias, None, **_plugin_attrs(attrs)),)


class SparseGemmResidual(OpRun):
    op_domain = PLUGIN_DOMAIN

    def _run(self, x, values, meta, alpha, bias, residual, **attrs):  # type: ignore[no-untyped-def]
        return (_sparse_gemm(x, values, meta, alpha, bias, residual, **_plugin_attrs(attrs)),)


def _plugin_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in ("plugin_namespace", "plugin_version")}


def _run_rewritten(model: Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = model.to_proto()
    return ReferenceEvaluator(proto, new_ops=[SparseGemm, SparseGemmResidual]).run(None, feeds)


@pytest.mark.parametrize("arch", [90, 80])
def test_mlp_becomes_two_plugin_nodes_with_the_same_outputs(arch: int) -> None:
    model = onnx_mlp()
    rewritten, stats = insert_sparse_plugins(model, arch=arch)
    assert set(stats["rewritten"]) == {"fc1", "fc2"}
    assert stats["rewritten"]["fc2"] == ["fc2", "fc2_bias", "residual"]
    plugins = [n for n in rewritten.graph.nodes if n.domain == PLUGIN_DOMAIN]
    assert sorted(n.op for n in plugins) == [PLUGIN_NAME, PLUGIN_NAME_RESIDUAL]
    for node in plugins:
        assert node.attrs["plugin_namespace"] == "optcc" and node.attrs["plugin_version"] == "1"
        assert node.attrs["arch"] == arch
    ops = [n.op for n in rewritten.graph.nodes]
    assert "MatMul" not in ops and "Relu" not in ops and ops.count("Cast") == 5
    proto = rewritten.to_proto()
    assert any(o.domain == PLUGIN_DOMAIN for o in proto.opset_import)
    onnx.checker.check_model(proto)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    got = _run_rewritten(rewritten, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


def test_packed_weight_initializers_restore_the_weight() -> None:
    model = onnx_mlp()
    rewritten, _ = insert_sparse_plugins(model, arch=90)
    tensors = rewritten.tensor_map()
    packed = PackedWeight(values=np.asarray(tensors["fc1/optcc_sparse/values"].values),
                          meta=np.asarray(tensors["fc1/optcc_sparse/meta"].values).view(np.uint8),
                          format="sm90", shape=(128, 64))
    w1 = np.asarray(model.tensor_map()["w1"].values)
    np.testing.assert_array_equal(unpack(packed), w1.T.astype(np.float16))


def test_only_selected_layers_are_rewritten() -> None:
    select = select_measured_faster({"fc1": {"optcc_ms": 0.1, "tensorrt_ms": 0.2},
                                     "fc2": {"optcc_ms": 0.3, "tensorrt_ms": 0.2}})
    rewritten, stats = insert_sparse_plugins(onnx_mlp(), select=select)
    assert list(stats["rewritten"]) == ["fc1"]
    assert "not selected" in stats["left_to_tensorrt"]["fc2"]
    assert "MatMul" in [n.op for n in rewritten.graph.nodes]


def test_nothing_selected_leaves_the_model_unchanged() -> None:
    model = onnx_mlp()
    rewritten, stats = insert_sparse_plugins(model, select=lambda layer: False)
    assert not stats["rewritten"]
    assert [n.op for n in rewritten.graph.nodes] == [n.op for n in model.graph.nodes]


def test_int8_layer_reads_and_writes_int8() -> None:
    model = _qdq_model(onnx.TensorProto.INT8, opset=19)  # the reference evaluator's DQ
    rewritten, stats = insert_sparse_plugins(model)
    plugin = next(n for n in rewritten.graph.nodes if n.domain == PLUGIN_DOMAIN)
    assert plugin.inputs[0].name == "xq" and plugin.outputs[0].name == "yq"
    assert "Cast" not in [n.op for n in rewritten.graph.nodes]
    alpha = np.asarray(plugin.inputs[3].values)
    np.testing.assert_allclose(alpha, 0.02 * 0.01, rtol=1e-6)
    assert plugin.attrs["out_scale"] == pytest.approx(1 / 0.05)
    x = np.random.default_rng(2).standard_normal((4, 128)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    got = _run_rewritten(rewritten, {"x": x})[0]
    # INT8 output grid of 0.05: at most one step apart (fp rounding at .5 boundaries)
    assert np.abs(got - expected).max() <= 0.05 + 1e-6


def test_convolutions_stay_with_tensorrt() -> None:
    from onnx import TensorProto, helper, numpy_helper
    from sparse_nets import magnitude_2to4

    w = magnitude_2to4(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="pw")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])],
        [numpy_helper.from_array(w.reshape(64, 64, 1, 1), "w")])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    _, stats = insert_sparse_plugins(model)
    assert not stats["rewritten"] and "convolution" in stats["left_to_tensorrt"]["pw"]


def test_tensorrt_lowering_applies_the_rewrite_only_when_named(tmp_path) -> None:
    """Wired into the tensorrt backend's lowering: opt-in, the portable model untouched."""
    from optcc.backends.tensorrt import TensorRTBackend, TensorRTOptions

    default = TensorRTBackend(TensorRTOptions(engine="skip")).compile(onnx_mlp(), tmp_path / "a")
    record = next(r for r in default.info["rewrites"] if r["name"] == "optcc-sparse-gemm")
    assert not record["modified"] and "opt-in" in record["reason"]
    assert default.info["build"]["onnx"] == "model.onnx"
    named = TensorRTBackend(TensorRTOptions(engine="skip", rewrites=["optcc-sparse-gemm"])).compile(
        onnx_mlp(), tmp_path / "b")
    record = named.info["rewrites"][0]
    assert record["modified"] and set(record["stats"]["rewritten"]) == {"fc1", "fc2"}
    assert named.info["build"]["onnx"] == "model.tensorrt.onnx"
    lowered = Model.load(tmp_path / "b" / "model.tensorrt.onnx")
    assert {n.op for n in lowered.graph.nodes} >= {PLUGIN_NAME, PLUGIN_NAME_RESIDUAL}
    portable = Model.load(tmp_path / "b" / "model.onnx")
    assert "MatMul" in {n.op for n in portable.graph.nodes}
