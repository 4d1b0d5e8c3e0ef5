"""The torch frontend: BatchNorm survives export with both exporters, the exporters' chatter
goes to the log, and a torch-module CNN recipe prunes, recalibrates BatchNorm and recovers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import write_recipe

pytest.importorskip("torch")

from optcc.build import build  # noqa: E402
from optcc.frontend import export_torch  # noqa: E402

IMAGE = [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_export_keeps_batchnorm_and_logs_exporter_output(
    exporter: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="optcc.frontend")
    model = export_torch("optcc.demo.train:build_net", inputs=IMAGE, exporter=exporter,
                         kwargs={"width": 8}, outputs=["logits"])
    ops = [node.op for node in model.graph.nodes]
    # build_net has 8 Conv → BatchNorm pairs; none may be folded away by the exporter.
    assert ops.count("BatchNormalization") == 8 and ops.count("Conv") == 8
    assert [t.name for t in model.outputs] == ["logits"]
    out, err = capfd.readouterr()
    assert out == "" and err == "", "exporter output must go to the log, not the terminal"
    assert any(r.getMessage().startswith(f"torch.onnx ({exporter})") for r in caplog.records)


RECIPE = """\
version: 1
model:
  torch: optcc.demo.train:pretrained_net
  exporter: {exporter}
  inputs: [{{name: image, shape: [batch, 1, 8, 8], dtype: float32}}]
target: {{backend: onnxruntime, threads: 1, runs: 2, warmup: 0}}
data:
  calibration: {{source: digits, split: train, batch_size: 128, limit: 512}}
  evaluation: {{source: digits, split: test, batch_size: 256}}
passes:
  - prune-channels: {{ratio: 0.5}}
  - recalibrate-batchnorm
  - fold-batchnorm
output: out
"""


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torch_module_cnn_prunes_recalibrates_batchnorm_and_recovers(
    tmp_path: Path, exporter: str
) -> None:
    result = build(write_recipe(tmp_path, RECIPE.format(exporter=exporter)))
    report = result.report
    original = report["original"]["metric"]["accuracy"]
    pruned, recalibrated, folded = (rec["metric"]["accuracy"] for rec in report["passes"])
    assert original > 0.98  # the trained demo weights came through the export
    assert report["passes"][1]["modified"], report["passes"][1]["reason"]
    # Pruning half the channels breaks the statistics; recalibration takes most of it back.
    assert pruned < 0.4 and recalibrated > pruned + 0.3
    assert report["passes"][2]["modified"] and folded == pytest.approx(recalibrated, abs=0.005)
    ops = [node.op for node in result.model.graph.nodes]
    assert "BatchNormalization" not in ops
    assert report["final"]["params"] < 0.3 * report["original"]["params"]


def test_recalibrate_batchnorm_says_why_it_did_not_apply(conv_bn_path: Path) -> None:
    from optcc import Model, PassContext
    from optcc.plugins import get_registry

    recalibrate = get_registry().passes["recalibrate-batchnorm"]()
    folded = get_registry().passes["fold-batchnorm"]()(Model.load(conv_bn_path)).model
    after_fold = recalibrate(folded.copy(), PassContext(stages={"fold-batchnorm": folded}))
    assert not after_fold.modified and "fold-batchnorm ran earlier" in after_fold.reason
    never_had = recalibrate(folded.copy(), PassContext())
    assert not never_had.modified and "no BatchNormalization nodes" in never_had.reason
    assert "fold-batchnorm" not in never_had.reason


def test_reported_build_time_includes_the_torch_export(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(
        "import time\nfrom optcc.demo.train import build_net\n\n"
        "def make():\n    time.sleep(1.5)  # a factory that loads weights, say\n"
        "    return build_net(4)\n"
    )
    recipe = write_recipe(tmp_path, (
        "version: 1\nmodel:\n  torch: slow.py:make\n  exporter: legacy\n"
        "  inputs: [{name: image, shape: [batch, 1, 8, 8]}]\n"
        "target: {backend: onnxruntime, runs: 1, rounds: 1, warmup: 0}\noutput: out\n"
    ))
    report = build(recipe).report
    assert report["seconds"] >= 1.5


def test_exporter_output_lands_in_build_log_not_on_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from optcc.cli import main

    recipe = write_recipe(tmp_path, (
        "version: 1\nmodel:\n  torch: optcc.demo.train:build_net\n  kwargs: {width: 4}\n"
        "  exporter: legacy\n  inputs: [{name: image, shape: [batch, 1, 8, 8]}]\n"
        "target: {backend: onnxruntime, runs: 1, rounds: 1, warmup: 0}\noutput: out\n"
    ))
    assert main(["build", str(recipe), "--json"]) == 0
    out, err = capfd.readouterr()
    report = json.loads(out)  # nothing but the report on stdout
    assert "build.log" in report["files"] and "DeprecationWarning" not in err
    log = (tmp_path / "out" / "build.log").read_text()
    assert "optcc.frontend: torch.onnx (legacy): DeprecationWarning" in log
