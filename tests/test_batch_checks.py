"""Batch checks of the pass manager: a pass must keep the model running at batch 1 and odd
sizes, and must not let a sample's output depend on its batch-mates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_bn_model
from onnx import TensorProto, helper, numpy_helper
from optcc_plugins.int8 import Int8QuantizePass
from optcc_plugins.lossless import EliminateDeadNodesPass, FoldBatchNormPass

from optcc.errors import VerificationError
from optcc.ir import Model
from optcc.passes import Pass, PassContext, PassResult, Tolerance
from optcc.passes.batch import COUPLING_LIMIT, make_probes
from optcc.passes.manager import PassManager, ScheduledPass
from optcc.plugins import create_registry

HEADS, WIDTH = 2, 8


def heads_model(batch: int | str = "batch") -> onnx.ModelProto:
    """x[B, 2, 8] → Reshape[-1, 2, 8] → Softmax over the heads → Reshape[-1, 16] → MatMul.

    A miniature of attention after head pruning: the Reshape's target carries the head
    count, so a pass that leaves the old count behind hard-codes the batch."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([-1, HEADS, WIDTH], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([-1, HEADS * WIDTH], np.int64), "flat_shape"),
        numpy_helper.from_array(rng.standard_normal((HEADS * WIDTH, 5)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "heads_shape"], ["h"], name="split_heads"),
        helper.make_node("Softmax", ["h"], ["s"], name="softmax", axis=1),
        helper.make_node("Reshape", ["s", "flat_shape"], ["f"], name="merge_heads"),
        helper.make_node("MatMul", ["f", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, HEADS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class StaleHeadCountPass(Pass):
    """The Whisper-dynamo pruning defect: the Reshape keeps 4 heads where 2 are left, so
    pairs of samples are merged into one at batch 8 and batch 1 or 3 cannot run."""

    name = "stale-head-count"
    tolerance = Tolerance.lossy()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.node("split_heads").inputs[1].values = np.array([-1, 2 * HEADS, WIDTH], np.int64)
        return PassResult(model, True)


class BatchMeanPass(Pass):
    """Subtracts the batch mean from the output: runs at every size, mixes samples."""

    name = "batch-mean"
    tolerance = Tolerance.lossy()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        import onnx_graphsurgeon as gs

        graph = model.graph
        y = graph.outputs[0]
        raw = gs.Variable("y_raw", dtype=y.dtype)
        y.inputs[0].outputs = [raw]
        mean = gs.Variable("y_mean", dtype=y.dtype)
        graph.nodes.append(gs.Node("ReduceMean", "batch_mean", {"axes": [0], "keepdims": 1},
                                   inputs=[raw], outputs=[mean]))
        graph.nodes.append(gs.Node("Sub", "centre", inputs=[raw, mean], outputs=[y]))
        return PassResult(model, True)


class DeclaredCouplingPass(BatchMeanPass):
    name = "declared-coupling"

    @classmethod
    def couples_samples(cls, options: object) -> bool:
        return True


class NoOpPass(Pass):
    name = "no-op"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(model, False, reason="nothing to do")


def run_manager(model: onnx.ModelProto, passes: list[Pass], feeds: dict[str, np.ndarray],
                tmp_path: Path) -> tuple[PassManager, list[dict]]:
    registry = create_registry(entry_points=[], core=False)
    manager = PassManager(
        [ScheduledPass(p, i + 1, plugin="test-plugin", fragment=p.name) for i, p in enumerate(passes)],
        hook=registry.hook, verification_feeds=feeds, failure_dir=tmp_path / "failed",
    )
    _, records = manager.run(Model.from_proto(model), PassContext())
    return manager, records


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, HEADS, WIDTH)).astype(np.float32)}


def test_probes_are_batch_1_and_an_odd_size_built_from_the_verification_batch() -> None:
    assert [(p.label, p.rows) for p in make_probes(8, False)] == [
        ("batch size 1", [0]), ("batch size 3", [1, 2, 3])]
    assert [p.rows for p in make_probes(3, False)] == [[0], [1, 2, 0, 1, 2]]
    assert [p.rows for p in make_probes(1, False)] == [[0, 0, 0]]
    (mates,) = make_probes(4, True)
    assert mates.rows == [0, 0, 1, 2] and "static batch" in mates.label
    assert make_probes(1, True) == []


def test_correct_model_passes_at_batch_1_and_odd_sizes(tmp_path: Path) -> None:
    manager, records = run_manager(conv_bn_model(), [FoldBatchNormPass(), EliminateDeadNodesPass()],
                                   {"x": np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)},
                                   tmp_path)
    for record in records:
        assert set(record["batch_coupling"]) == {"batch size 1", "batch size 3"}
        assert all(v <= COUPLING_LIMIT for v in record["batch_coupling"].values())
    assert manager.batch_checks is not None
    assert manager.batch_checks.summary() == {
        "probes": ["batch size 1", "batch size 3"], "independence": True, "skipped": {}}


def test_reshape_that_hard_codes_the_batch_fails_naming_pass_and_batch(tmp_path: Path) -> None:
    # At the verification batch of 8 the stale Reshape runs (16 rows make 4 merged samples)...
    stale = Model.from_proto(heads_model())
    stale = StaleHeadCountPass()(stale).model
    from optcc.runtime import OrtRunner

    assert OrtRunner(stale).run(feeds(8))[0].shape == (8, 5)
    # ...so only the batch checks can see it.
    with pytest.raises(VerificationError) as info:
        run_manager(heads_model(), [NoOpPass(), StaleHeadCountPass()], feeds(8), tmp_path)
    message = str(info.value)
    assert message.startswith("pass #2 'stale-head-count' (plugin 'test-plugin'): ")
    assert "no longer runs at batch size 1" in message and "verification batch has 8" in message
    assert "Reshape" in message  # ONNX Runtime's own words, first line only
    assert info.value.reproducer == tmp_path / "failed" / "pass-02-stale-head-count"


def test_hard_coded_batch_with_an_even_verification_batch_of_2_still_fails(tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="no longer runs at batch size 1"):
        run_manager(heads_model(), [StaleHeadCountPass()], feeds(2), tmp_path)


def test_samples_that_influence_each_other_fail_naming_output_and_sample(tmp_path: Path) -> None:
    with pytest.raises(VerificationError) as info:
        run_manager(heads_model(), [BatchMeanPass()], feeds(8), tmp_path)
    message = str(info.value)
    assert "pass #1 'batch-mean'" in message
    assert "samples influence each other: at batch size 1, output 'y', sample 0 differs" in message
    assert "verification batch of 8" in message


def test_static_batch_is_not_a_bug_but_mixing_within_it_is(tmp_path: Path) -> None:
    manager, records = run_manager(heads_model(batch=4), [NoOpPass()], feeds(4), tmp_path)
    (label,) = records[0]["batch_coupling"]
    assert "new batch-mates" in label and records[0]["batch_coupling"][label] == 0.0
    with pytest.raises(VerificationError, match="samples influence each other: at a batch of 8 "
                       "with new batch-mates"):
        run_manager(heads_model(batch=8), [StaleHeadCountPass()], feeds(8), tmp_path)
    with pytest.raises(VerificationError, match="samples influence each other"):
        run_manager(heads_model(batch=4), [BatchMeanPass()], feeds(4), tmp_path)


def test_a_model_that_already_mixes_samples_is_held_only_to_running(tmp_path: Path) -> None:
    mixing = BatchMeanPass()(Model.from_proto(heads_model())).model.to_proto()
    manager, records = run_manager(mixing, [NoOpPass()], feeds(8), tmp_path)
    assert manager.batch_checks is not None
    assert manager.batch_checks.summary()["independence"] is False
    assert records[0]["batch_coupling"]["batch size 1"] > COUPLING_LIMIT


def test_declared_coupling_is_measured_and_later_passes_must_still_run_everywhere(tmp_path: Path) -> None:
    manager, records = run_manager(heads_model(), [DeclaredCouplingPass(), NoOpPass()], feeds(8), tmp_path)
    assert records[0]["batch_coupling"]["batch size 1"] > COUPLING_LIMIT
    assert manager.batch_checks is not None
    assert manager.batch_checks.summary()["coupled_since"] == "declared-coupling"
    with pytest.raises(VerificationError, match="no longer runs at batch size 1"):
        run_manager(heads_model(), [DeclaredCouplingPass(), StaleHeadCountPass()], feeds(8), tmp_path)


def test_a_loaded_model_that_cannot_run_at_batch_1_skips_that_probe(tmp_path: Path) -> None:
    stale = StaleHeadCountPass()(Model.from_proto(heads_model())).model.to_proto()
    manager, records = run_manager(stale, [NoOpPass()], feeds(8), tmp_path)
    assert manager.batch_checks is not None
    summary = manager.batch_checks.summary()
    assert summary["probes"] == [] and set(summary["skipped"]) == {"batch size 1", "batch size 3"}
    assert "does not run at batch size 1" in summary["skipped"]["batch size 1"]
    assert records[0]["batch_coupling"] == {}


def test_dynamic_int8_couples_samples_by_design_and_passes(tmp_path: Path) -> None:
    # A MatMul model: dynamic mode keeps convolutions float (ConvInteger is slow on ORT).
    manager, records = run_manager(
        heads_model(), [EliminateDeadNodesPass(), Int8QuantizePass(mode="dynamic", speed_check=False)],
        feeds(8), tmp_path)
    assert records[1]["modified"], records[1]
    assert set(records[1]["batch_coupling"]) == {"batch size 1", "batch size 3"}
