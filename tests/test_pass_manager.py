"""The pass manager: verification, tolerance, errors that name plugin and pass, reproducers,
instrumentation hooks."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import conv_bn_model
from optcc_plugins.lossless import FoldBatchNormPass

from optcc import hookimpl
from optcc.errors import PassError, PreconditionError, ToleranceError, VerificationError
from optcc.ir import Model
from optcc.passes import Capability, Pass, PassContext, PassResult, Tolerance
from optcc.passes.manager import PassManager, ScheduledPass
from optcc.plugins import create_registry

FEEDS = {"x": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}


class ScaleWeightsPass(Pass):
    """Multiplies the first Conv weight: changes outputs (to test tolerances)."""

    name = "scale-weights"
    tolerance = Tolerance.float_rounding()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        node = model.node("conv")
        node.inputs[1].values = np.asarray(node.inputs[1].values) * 1.5
        return PassResult(model, True)


class BreakGraphPass(Pass):
    name = "break-graph"
    tolerance = Tolerance.lossy()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.node("fc").inputs[1].values = np.zeros((4, 5), np.float32)
        return PassResult(model, True)


class CrashPass(Pass):
    name = "crash"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("boom inside the pass")


class WrongReturnPass(Pass):
    name = "wrong-return"

    def run(self, model: Model, ctx: PassContext) -> Any:
        return model


class NeedsCalibrationPass(Pass):
    name = "needs-calibration"
    requires = frozenset({Capability.CALIBRATION_DATA})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(model, False, reason="test")


def _manager(passes: list[Pass], tmp_path: Path, plugin: str = "test-plugin", hook: Any = None) -> PassManager:
    registry = create_registry(entry_points=[], core=False)
    return PassManager(
        [ScheduledPass(p, i + 1, plugin=plugin, fragment=p.name) for i, p in enumerate(passes)],
        hook=hook or registry.hook,
        verification_feeds=FEEDS,
        failure_dir=tmp_path / "failed",
    )


def test_lossless_pass_within_tolerance_is_recorded(tmp_path: Path) -> None:
    model = Model.from_proto(conv_bn_model())
    final, records = _manager([FoldBatchNormPass()], tmp_path).run(model, PassContext())
    (record,) = records
    assert record["name"] == "fold-batchnorm" and record["modified"]
    assert 0 < record["max_abs_diff"] < 1e-4
    # Conv weight 8x3x3x3 + bias 8, fc 4x8 + 4: the 4 BN vectors are gone.
    assert record["params"] == 216 + 8 + 32 + 4
    assert final.meta.history[-1]["pass"] == "fold-batchnorm"
    assert not (tmp_path / "failed").exists()


def test_tolerance_violation_names_pass_and_writes_reproducer(tmp_path: Path) -> None:
    model = Model.from_proto(conv_bn_model())
    with pytest.raises(ToleranceError) as info:
        _manager([FoldBatchNormPass(), ScaleWeightsPass()], tmp_path).run(model, PassContext())
    err = info.value
    assert "pass #2 'scale-weights' (plugin 'test-plugin')" in str(err)
    assert "changed the outputs by up to" in str(err) and "atol=1e-05" in str(err)
    assert err.ran_before == ["fold-batchnorm"]
    repro = tmp_path / "failed" / "pass-02-scale-weights"
    assert err.reproducer == repro
    # The reproducer holds the model *before* the failing pass (BN already folded).
    before = Model.load(repro / "model_before.onnx")
    assert "BatchNormalization" not in [n.op for n in before.graph.nodes]
    assert "scale-weights" in (repro / "recipe.yaml").read_text()
    assert "changed the outputs" in (repro / "error.txt").read_text()


def test_recipe_tolerance_override_allows_the_change(tmp_path: Path) -> None:
    model = Model.from_proto(conv_bn_model())
    loose = ScaleWeightsPass(tolerance={"atol": 1e3, "rtol": 0})
    _, records = _manager([loose], tmp_path).run(model, PassContext())
    assert records[0]["tolerance"] == "atol=1000, rtol=0"


def test_invalid_model_is_a_verification_error(tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="pass #1 'break-graph'.*failed verification"):
        _manager([BreakGraphPass()], tmp_path).run(Model.from_proto(conv_bn_model()), PassContext())


def test_exception_in_pass_names_plugin_and_chains_cause(tmp_path: Path) -> None:
    with pytest.raises(PassError) as info:
        _manager([CrashPass()], tmp_path, plugin="acme").run(
            Model.from_proto(conv_bn_model()), PassContext()
        )
    assert str(info.value) == (
        "pass #1 'crash' (plugin 'acme'): raised ZeroDivisionError: boom inside the pass"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "ZeroDivisionError" in (tmp_path / "failed" / "pass-01-crash" / "error.txt").read_text()


def test_wrong_return_type_is_reported(tmp_path: Path) -> None:
    with pytest.raises(PassError, match="returned Model, expected PassResult"):
        _manager([WrongReturnPass()], tmp_path).run(Model.from_proto(conv_bn_model()), PassContext())


def test_missing_capability_is_a_precondition_error(tmp_path: Path) -> None:
    with pytest.raises(PreconditionError, match="needs calibration-data"):
        _manager([NeedsCalibrationPass()], tmp_path).run(Model.from_proto(conv_bn_model()), PassContext())
    ctx = PassContext(capabilities=frozenset({Capability.CALIBRATION_DATA}))
    _, records = _manager([NeedsCalibrationPass()], tmp_path).run(Model.from_proto(conv_bn_model()), ctx)
    assert records[0]["reason"] == "test" and not records[0]["modified"]


def test_instrumentation_hooks_are_called_in_order(tmp_path: Path) -> None:
    calls: list[tuple[str, str, int]] = []

    class Recorder:
        @hookimpl
        def optcc_before_pass(self, pass_, position):
            calls.append(("before", pass_.name, position))

        @hookimpl
        def optcc_after_pass(self, pass_, record, position):
            calls.append(("after", pass_.name, position))
            record["recorder"] = True

        @hookimpl
        def optcc_pass_failed(self, pass_, error, reproducer):
            calls.append(("failed", pass_.name, int(reproducer is not None)))

    registry = create_registry(entry_points=[], core=False, extra_plugins=[("recorder", Recorder())])
    manager = _manager([FoldBatchNormPass(), CrashPass()], tmp_path, hook=registry.hook)
    with pytest.raises(PassError):
        manager.run(Model.from_proto(conv_bn_model()), PassContext())
    assert calls == [
        ("before", "fold-batchnorm", 1), ("after", "fold-batchnorm", 1),
        ("before", "crash", 2), ("failed", "crash", 1),
    ]
    assert manager.records[0]["recorder"] is True


def test_the_input_model_object_is_not_modified(tmp_path: Path) -> None:
    model = Model.from_proto(conv_bn_model())
    ops = [n.op for n in model.graph.nodes]
    _manager([FoldBatchNormPass()], tmp_path).run(model, PassContext())
    assert [n.op for n in model.graph.nodes] == ops


def test_hook_module_plugins_register(tmp_path: Path) -> None:
    module = types.ModuleType("tmp_plugin")
    module.optcc_passes = hookimpl(lambda: [CrashPass])  # type: ignore[attr-defined]
    registry = create_registry(entry_points=[], core=False, extra_plugins=[("tmp", module)])
    assert registry.passes == {"crash": CrashPass}
    assert registry.pass_owner("crash") == "tmp"
