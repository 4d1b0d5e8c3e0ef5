"""End-to-end builds through the Python API: reports, atomic output, failures, interrupts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, StopAtEpoch, sha256, write_recipe

from optcc import hookimpl
from optcc.build import build
from optcc.errors import BuildInterrupted, DataError, PassError, ToleranceError
from optcc.ir import Model
from optcc.passes import Pass, PassResult, Tolerance
from optcc.plugins import create_registry
from optcc.runtime import OrtRunner


def recipe_text(model: Path, passes: str = "  - fold-batchnorm\n", extra: str = "") -> str:
    return (
        f"version: 1\nname: test\nmodel: {model}\n"
        "target: {backend: onnxruntime, threads: 1, runs: 3, warmup: 1}\n"
        "data:\n  evaluation: {source: digits, split: test, batch_size: 128}\n"
        f"{extra}passes:\n{passes}output: out\n"
    )


class DoubleLogitsPass(Pass):
    """Scales the classifier weight by 2: argmax unchanged, outputs changed."""

    name = "double-logits"
    tolerance = Tolerance.float_rounding()

    def run(self, model, ctx):
        for node, weight, _ in model.weighted_layers():
            if node.op == "Gemm":
                weight.values = np.asarray(weight.values) * 2
        return PassResult(model, True)


class InterruptPass(Pass):
    name = "interrupt"

    def run(self, model, ctx):
        raise KeyboardInterrupt


class TestPlugin:
    @hookimpl
    def optcc_passes(self):
        return [DoubleLogitsPass, InterruptPass]


@pytest.fixture(scope="module")
def registry_with_test_passes():
    return create_registry(extra_plugins=[("test-passes", TestPlugin())])


def test_demo_build_report_and_artifact(tmp_path: Path, demo_copy: Path) -> None:
    before = sha256(demo_copy)
    recipe = write_recipe(tmp_path, recipe_text(
        demo_copy, "  - fold-constants\n  - fold-batchnorm\n  - eliminate-dead-nodes\n"))
    result = build(recipe)
    assert sha256(demo_copy) == before, "the input model must never be modified"
    out = tmp_path / "out"
    assert result.output_dir == out
    files = ["layers.png", "model.onnx", "report.json", "report.md"]
    assert sorted(p.name for p in out.iterdir()) == [".optcc-output", *files]
    marker = json.loads((out / ".optcc-output").read_text())
    assert marker["kind"] == "output" and marker["files"] == files  # what optcc may replace
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["schema"] == 1
    assert [p["name"] for p in report["passes"]] == ["fold-constants", "fold-batchnorm", "eliminate-dead-nodes"]
    assert report["metric"] == {"name": "accuracy", "data": "digits:test"}
    assert report["original"]["metric"]["accuracy"] == pytest.approx(0.995, abs=0.005)
    assert report["final"]["metric"]["accuracy"] == report["original"]["metric"]["accuracy"]
    bn = report["passes"][1]
    assert bn["modified"] and bn["stats"]["folded"] == 8
    # 8 BatchNorms of 64/64/64/64/64/128/128/128 channels, 4 vectors each, become 8 biases.
    assert report["original"]["params"] - bn["params"] == 3 * (5 * 64 + 3 * 128)
    assert report["final"]["latency"]["median_ms"] > 0 and report["final"]["latency"]["threads"] == 1
    assert report["final"]["latency"]["batch_size"] == 128
    assert len(report["layers"]["final"]) == 9
    md = (out / "report.md").read_text()
    assert "| 2 | fold-batchnorm |" in md and "![per-layer statistics](layers.png)" in md
    final = Model.load(out / "model.onnx")
    assert [h["pass"] for h in final.meta.history] == [
        "fold-constants", "fold-batchnorm", "eliminate-dead-nodes"]
    assert "BatchNormalization" not in [n.op for n in final.graph.nodes]


def test_failed_build_keeps_previous_output_and_writes_reproducer(
    tmp_path: Path, demo_copy: Path, registry_with_test_passes
) -> None:
    good = write_recipe(tmp_path, recipe_text(demo_copy), name="good.yaml")
    build(good, registry=registry_with_test_passes)
    out = tmp_path / "out"
    good_model = sha256(out / "model.onnx")
    bad = write_recipe(tmp_path, recipe_text(demo_copy, "  - fold-batchnorm\n  - double-logits\n"), name="bad.yaml")
    with pytest.raises(ToleranceError) as info:
        build(bad, registry=registry_with_test_passes)
    assert "pass #2 'double-logits' (plugin 'test-passes')" in str(info.value)
    assert sha256(out / "model.onnx") == good_model  # previous good output untouched
    failed = tmp_path / "out.failed"
    report = json.loads((failed / "report.json").read_text())
    assert report["status"] == "failed" and report["error"]["type"] == "ToleranceError"
    assert [p["name"] for p in report["passes"]] == ["fold-batchnorm"]
    repro = failed / "reproducer" / "pass-02-double-logits"
    assert info.value.reproducer == repro
    assert f"reproducer: {repro}" in info.value.hint
    assert not list(tmp_path.glob(".out.*"))
    # The reproducer is a runnable recipe that fails the same way.
    with pytest.raises(ToleranceError, match="pass #1 'double-logits'"):
        build(repro / "recipe.yaml", registry=registry_with_test_passes)


def test_interrupted_build_leaves_nothing_behind(tmp_path: Path, demo_copy: Path, registry_with_test_passes) -> None:
    out = tmp_path / "out"
    build(write_recipe(tmp_path, recipe_text(demo_copy), name="good.yaml"))
    previous = sha256(out / "model.onnx")
    recipe = write_recipe(tmp_path, recipe_text(demo_copy, "  - fold-batchnorm\n  - interrupt\n"))
    with pytest.raises(BuildInterrupted, match="left as it was"):
        build(recipe, registry=registry_with_test_passes)
    assert sha256(out / "model.onnx") == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_cnn.onnx", "good.yaml", "out", "recipe.yaml"]


def test_data_that_does_not_fit_fails_before_any_pass(tmp_path: Path, demo_copy: Path) -> None:
    np.savez(tmp_path / "wrong.npz", image=np.zeros((4, 64), np.float32))
    text = recipe_text(demo_copy).replace(
        "{source: digits, split: test, batch_size: 128}", "{source: npz, path: wrong.npz}")
    with pytest.raises(DataError, match=r"data 'evaluation' \(npz:wrong.npz\): input 'image' expects 4 dimensions"):
        build(write_recipe(tmp_path, text))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.failed").exists()


def test_third_party_plugin_pass_in_a_recipe(tmp_path: Path, demo_copy: Path) -> None:
    """The pip-installed sample plugin (tests/sample_plugin) runs like a built-in."""
    import optcc_sample_plugin

    recipe = write_recipe(tmp_path, recipe_text(
        demo_copy, "  - fold-batchnorm\n  - zero-small-weights: {threshold: 0.02}\n"))
    report = build(recipe).report
    record = report["passes"][1]
    assert record["plugin"] == "sample" and record["modified"]
    assert record["sample_plugin"] == {"seen": True}  # its after-pass hook ran
    assert record["sparsity"] > 0.2
    assert report["final"]["sparsity"] == record["sparsity"]
    assert ("zero-small-weights", 2) in optcc_sample_plugin.SEEN


def test_agreement_metric_without_labels(tmp_path: Path, demo_copy: Path) -> None:
    text = recipe_text(demo_copy).replace(
        "{source: digits, split: test, batch_size: 128}", "{source: random, samples: 32}")
    report = build(write_recipe(tmp_path, text)).report
    assert report["metric"]["name"] == "agreement"
    assert report["final"]["metric"]["agreement"] == pytest.approx(1.0, abs=1e-6)
    assert report["final"]["metric"]["top1_agreement"] == 1.0


def test_keep_stages(tmp_path: Path, demo_copy: Path) -> None:
    text = recipe_text(demo_copy, "  - fold-batchnorm\n  - eliminate-dead-nodes\n").replace(
        "output: out\n", "output: {path: out, keep_stages: true}\n")
    build(write_recipe(tmp_path, text))
    stages = sorted(p.name for p in (tmp_path / "out" / "stages").iterdir())
    assert stages == ["01-fold-batchnorm.onnx", "02-eliminate-dead-nodes.onnx"]


TORCH_FACTORY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, hidden)
        self.out = nn.Linear(hidden, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.out(torch.relu(self.fc(x)))

def make(hidden=32):
    torch.manual_seed(0)
    net = Net(hidden)
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    return net
"""


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torch_frontend_exports_with_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    torch = pytest.importorskip("torch")
    (tmp_path / "netdef.py").write_text(TORCH_FACTORY)
    text = (
        "version: 1\nmodel:\n  torch: netdef.py:make\n  kwargs: {hidden: 16}\n"
        f"  exporter: {exporter}\n"
        "  inputs: [{name: x, shape: [batch, 3, 8, 8]}]\n  outputs: [scores]\n"
        "target: {backend: onnxruntime, runs: 2, warmup: 0}\n"
        "passes:\n  - fold-constants\n  - eliminate-dead-nodes\noutput: out\n"
    )
    result = build(write_recipe(tmp_path, text))
    model_path = tmp_path / "out" / "model.onnx"
    runner = OrtRunner(str(model_path))
    assert [s.name for s in runner.input_specs] == ["x"] and runner.output_names == ["scores"]
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    import importlib.util

    spec = importlib.util.spec_from_file_location("netdef_check", tmp_path / "netdef.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.no_grad():
        expected = module.make(16).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run({"x": x})[0], expected, rtol=1e-4, atol=1e-5)
    assert result.report["model"]["source"] == "torch:netdef.py:make"


def test_torch_factory_errors(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from optcc.errors import ModelError

    (tmp_path / "netdef.py").write_text("def make():\n    return 42\n")
    base = "version: 1\nmodel:\n  torch: {spec}\n  inputs: [{{name: x, shape: [batch, 3]}}]\n"
    with pytest.raises(ModelError, match="returned int, expected a torch.nn.Module"):
        build(write_recipe(tmp_path, base.format(spec="netdef.py:make")))
    with pytest.raises(ModelError, match="'netdef.py' has no attribute 'nope'"):
        build(write_recipe(tmp_path, base.format(spec="netdef.py:nope")))


def test_bundled_quickstart_recipe_builds(tmp_path: Path) -> None:
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / "optcc" / "demo").mkdir(parents=True)
    shutil.copy(REPO / "optcc" / "demo" / "digits_cnn.onnx", tmp_path / "optcc" / "demo")
    result = build(tmp_path / "recipes" / "quickstart.yaml")
    assert result.output_dir == (tmp_path / "out" / "quickstart").resolve()
    assert result.report["final"]["metric"]["accuracy"] >= 0.98


def test_pass_error_from_plugin_is_user_facing(tmp_path: Path, demo_copy: Path) -> None:
    class Boom(Pass):
        name = "boom"

        def run(self, model, ctx):
            raise ValueError("bad axis")

    class P:
        @hookimpl
        def optcc_passes(self):
            return [Boom]

    registry = create_registry(extra_plugins=[("acme-plugin", P())])
    with pytest.raises(PassError) as info:
        build(write_recipe(tmp_path, recipe_text(demo_copy, "  - boom\n")), registry=registry)
    assert str(info.value) == "pass #1 'boom' (plugin 'acme-plugin'): raised ValueError: bad axis"


def test_interrupted_distillation_resumes_on_the_next_build(tmp_path: Path, demo_copy: Path) -> None:
    pytest.importorskip("torch")
    text = recipe_text(demo_copy, "  - prune-channels: {ratio: 0.5}\n  - distill: {epochs: 3}\n").replace(
        "data:\n", "data:\n  training: {source: digits, split: train, batch_size: 64, limit: 256}\n")
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(BuildInterrupted):
        build(recipe, progress=StopAtEpoch(2))
    assert not (tmp_path / "out").exists()
    checkpoints = list((tmp_path / "out.cache").glob("distill-*.json"))
    assert len(checkpoints) == 1  # epoch 1 survived the interrupt
    report = build(recipe).report
    stats = report["passes"][1]["stats"]
    assert stats["resumed_from_epoch"] == 1 and len(stats["loss_per_epoch"]) == 3
    assert not (tmp_path / "out.cache").exists()  # checkpoint and empty cache removed when done


def test_evaluate_final_only(tmp_path: Path, demo_copy: Path) -> None:
    text = recipe_text(demo_copy, "  - fold-batchnorm\n  - eliminate-dead-nodes\n").replace(
        "passes:", "evaluate: final\npasses:")
    report = build(write_recipe(tmp_path, text)).report
    assert [p["metric"] for p in report["passes"]] == [None, None]
    assert report["final"]["metric"]["accuracy"] == report["original"]["metric"]["accuracy"]


def test_backend_options_and_verification_source(tmp_path: Path, demo_copy: Path) -> None:
    text = recipe_text(demo_copy).replace(
        "target: {backend: onnxruntime, threads: 1, runs: 3, warmup: 1}",
        "target: {backend: onnxruntime, threads: 1, runs: 3, warmup: 1, save_optimized: true, batch_size: 32}",
    ).replace("data:\n", "data:\n  calibration: {source: digits, split: train, limit: 64}\n").replace(
        "passes:", "verification: {source: calibration, batch_size: 4}\npasses:")
    report = build(write_recipe(tmp_path, text)).report
    assert report["verification"] == {
        "batch_size": 4, "data": "calibration",
        "batch_checks": {"probes": ["batch size 1", "batch size 3"], "independence": True, "skipped": {}},
    }
    assert "model.ort-optimized.onnx" in report["final"]["artifact"]["files"]
    assert (tmp_path / "out" / "model.ort-optimized.onnx").exists()
    assert report["final"]["latency"]["batch_size"] == 32


def test_verification_source_missing_is_a_clear_error(tmp_path: Path, demo_copy: Path) -> None:
    text = recipe_text(demo_copy).replace("passes:", "verification: {source: training}\npasses:")
    with pytest.raises(DataError, match="verification.source is 'training', but the recipe has no data.training"):
        build(write_recipe(tmp_path, text))


def test_output_folder_holding_the_input_is_refused(tmp_path: Path, demo_copy: Path) -> None:
    from optcc.errors import OutputError

    folder = tmp_path / "work"
    folder.mkdir()
    model = folder / "net.onnx"
    model.write_bytes(demo_copy.read_bytes())
    recipe = write_recipe(tmp_path, recipe_text(model).replace("output: out", "output: work"))
    with pytest.raises(OutputError, match="contains the input .*net.onnx") as info:
        build(recipe)
    assert "choose another output" in info.value.hint
    assert model.exists() and sha256(model) == sha256(demo_copy)
