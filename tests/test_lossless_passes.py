"""Built-in lossless passes: structure and numbers."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import DEMO_MODEL, conv_bn_model
from onnx import TensorProto, helper, numpy_helper
from optcc_plugins.lossless import EliminateDeadNodesPass, FoldBatchNormPass, FoldConstantsPass

from optcc.ir import Model, verify_model
from optcc.runtime import OrtRunner


def _outputs(model: Model, x: np.ndarray) -> np.ndarray:
    return OrtRunner(model).run({model.inputs[0].name: x})[0]


def test_fold_batchnorm_removes_bn_and_keeps_outputs() -> None:
    model = Model.from_proto(conv_bn_model(channels=16))
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    before = _outputs(model, x)
    result = FoldBatchNormPass()(model.copy())
    assert result.modified
    assert result.stats["folded"] == 1
    ops = [n.op for n in result.model.graph.nodes]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    verify_model(result.model)
    np.testing.assert_allclose(_outputs(result.model, x), before, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_on_the_demo_folds_all_eight() -> None:
    model = Model.load(DEMO_MODEL)
    result = FoldBatchNormPass()(model.copy())
    assert result.stats["folded"] == 8 and result.stats["skipped"] == {}
    x = np.random.default_rng(1).random((8, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_outputs(result.model, x), _outputs(model, x), rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_bn_without_conv_and_says_why() -> None:
    c = 4
    inits = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("g", "b", "m", "v")]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn")],
        "bn_only", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 2, 2])], inits,
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = FoldBatchNormPass()(model)
    assert not result.modified
    assert result.stats["skipped"] == {"bn": "input is not produced by a layer"}
    assert "could not be folded" in result.reason


def test_eliminate_dead_nodes_bypasses_identity_and_drops_unused() -> None:
    proto = conv_bn_model(with_identity=True)
    # An unused branch: Relu of the input that nobody reads.
    proto.graph.node.append(helper.make_node("Relu", ["x"], ["dead"], name="dead_relu"))
    model = Model.from_proto(proto)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = _outputs(model, x)
    result = EliminateDeadNodesPass()(model.copy())
    ops = [n.op for n in result.model.graph.nodes]
    assert "Identity" not in ops
    assert "dead_relu" not in [n.name for n in result.model.graph.nodes]
    assert result.stats == {"nodes_removed": 2, "bypassed": 1}
    np.testing.assert_array_equal(_outputs(result.model, x), before)


def test_eliminate_dead_nodes_keeps_graph_output_names() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Identity", ["r"], ["y"], name="id")],
        "id_out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = EliminateDeadNodesPass()(model)
    assert [n.op for n in result.model.graph.nodes] == ["Relu"]
    assert [t.name for t in result.model.outputs] == ["y"]


def test_eliminate_dead_nodes_reports_nothing_to_do() -> None:
    result = EliminateDeadNodesPass()(Model.from_proto(conv_bn_model()))
    assert not result.modified and result.reason


def test_fold_constants_precomputes_constant_subgraph() -> None:
    proto = conv_bn_model()
    # fc_w2 = Transpose(Transpose(fc_w)) computed at run time: foldable.
    proto.graph.node.insert(0, helper.make_node("Transpose", ["fc_w"], ["fc_wt"], name="t1", perm=[1, 0]))
    proto.graph.node.insert(1, helper.make_node("Transpose", ["fc_wt"], ["fc_w2"], name="t2", perm=[1, 0]))
    for node in proto.graph.node:
        if node.op_type == "Gemm":
            node.input[1] = "fc_w2"
    onnx.checker.check_model(proto)
    model = Model.from_proto(proto)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = _outputs(model, x)
    result = FoldConstantsPass()(model.copy())
    assert result.modified and result.stats["nodes_removed"] == 2
    assert "Transpose" not in [n.op for n in result.model.graph.nodes]
    np.testing.assert_allclose(_outputs(result.model, x), before, rtol=1e-6)


def test_fold_constants_size_threshold_blocks_large_results() -> None:
    graph = helper.make_graph(
        [helper.make_node("Expand", ["one", "shape"], ["big"], name="expand"),
         helper.make_node("Add", ["x", "big"], ["y"], name="add")],
        "expand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024, 1024])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one"),
         numpy_helper.from_array(np.array([1024, 1024], np.int64), "shape")],
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    kept = FoldConstantsPass(size_threshold_mib=1.0)(model.copy())
    assert "Expand" in [n.op for n in kept.model.graph.nodes] and not kept.modified
    folded = FoldConstantsPass(size_threshold_mib=None)(model.copy())
    assert "Expand" not in [n.op for n in folded.model.graph.nodes]
