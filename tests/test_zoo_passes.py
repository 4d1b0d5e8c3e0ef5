"""Every built-in pass on every zoo model (both exporters), as a build runs them.

The lossless passes, recalibrate-batchnorm, 2:4 sparsity and static INT8 run as one
pipeline; static INT8 in TensorRT's format (linted) and dynamic INT8 on their own; each through the pass manager, so every pass is
verified (checker, shape inference, output tolerance, no new NaN) and batch-checked (batch
1, an odd size, samples independent). Pruning and distillation have their own zoo tests
(test_pruning_zoo.py, test_zoo_distill.py). The reports must describe the written model.
INT8 runs without its speed check, so that every model is really quantized (the check
keeps float what a timing on this machine finds slower; test_int8*.py cover it).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import zoo  # noqa: E402
from conftest import run_pipeline  # noqa: E402
from optcc_plugins.distillation import RecalibrateBatchNormPass  # noqa: E402
from optcc_plugins.int8 import Int8QuantizePass  # noqa: E402
from optcc_plugins.lossless import (  # noqa: E402
    EliminateDeadNodesPass,
    FoldBatchNormPass,
    FoldConstantsPass,
)
from optcc_plugins.sparsity import SparsifyPass  # noqa: E402

from optcc.backends.trt_build import ShapeProfile  # noqa: E402
from optcc.ir import Model  # noqa: E402
from optcc.lint import lint_tensorrt  # noqa: E402
from optcc.sparse.pattern import layer_compliance  # noqa: E402

CASES = [pytest.param(n, e, id=f"{n}-{e}") for n in zoo.NAMES for e in zoo.EXPORTERS]


def _check_sparsity_report(model: Model, record: dict) -> None:
    """Every layer the report calls sparsified holds a 2:4 weight in the written model."""
    claimed = {row["name"] for row in record["stats"].get("layers", []) if row["sparsified"]}
    assert record["modified"] == bool(claimed)
    if claimed:
        assert record["sparsity"] > 0
        status = {row["name"]: row["status"] for row in layer_compliance(model, "2:4")}
        assert all(status[name] == "complies" for name in claimed), status


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_every_pass_keeps_the_model_sound(zoo_export, name: str, exporter: str) -> None:
    entry = zoo.spec(name)
    model = Model.load(zoo_export(name, exporter))
    feeds = entry.feeds(batch=4)
    passes = [FoldConstantsPass(), EliminateDeadNodesPass(), FoldBatchNormPass(),
              RecalibrateBatchNormPass(), SparsifyPass(rules="portable"),
              Int8QuantizePass(method="max", speed_check=False)]
    ctx, records = run_pipeline(model, passes, feeds, entry.sizes)
    assert [r["name"] for r in records] == [p.name for p in passes]
    for record in records:
        assert record["batch_coupling"], record["name"]  # the batch checks ran
    sparse, int8 = records[4], records[5]
    _check_sparsity_report(ctx.stages["sparsify-2of4"], sparse)
    quantized = int8["stats"].get("quantized_layers", 0)
    assert int8["modified"] == bool(quantized)
    assert (int8["int8_coverage"] > 0) == bool(quantized)


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_int8_for_tensorrt_and_dynamic_int8(zoo_export, name: str, exporter: str) -> None:
    """Static INT8 in TensorRT's Q/DQ format adds no error or warning to what TensorRT's
    rules find in the original (a batch 1-8 profile; RoBERTa's integer CumSum is the
    model's own); dynamic INT8 (which couples batch-mates by design) still runs at
    batch 1 and an odd size."""
    entry = zoo.spec(name)
    model = Model.load(zoo_export(name, exporter))
    feeds = entry.feeds(batch=4)
    ctx, (record,) = run_pipeline(model, [Int8QuantizePass(method="max", format="tensorrt")],
                                  feeds, entry.sizes)
    assert record["batch_coupling"]
    profiles = [ShapeProfile(k, [1, *v.shape[1:]], list(v.shape), [8, *v.shape[1:]]) for k, v in feeds.items()]

    def problems(m: Model) -> set[tuple[str, str]]:
        return {(f.rule, f.node) for f in lint_tensorrt(m, profiles=profiles) if f.severity in ("error", "warning")}

    assert problems(ctx.stages["quantize-int8"]) <= problems(model)
    _, (record,) = run_pipeline(model, [Int8QuantizePass(mode="dynamic", speed_check=False)], feeds, entry.sizes)
    assert record["batch_coupling"]
