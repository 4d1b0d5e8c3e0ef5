"""Whole models through the cuda backend (GPU) against ONNX Runtime on the CPU: the bundled
demo, 2:4 MLPs in float16/bfloat16/INT8, a BERT-style encoder, pointwise-conv CNN blocks,
both kernel families, and the real all-MiniLM-L6-v2 made 2:4 (when bench/gpu_models.py
prepared it: .gpu/ or $OPTCC_MINILM_2TO4)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto
from sparse_nets import onnx_mlp, sparse_bert_onnx
from test_cuda_backend import HERE, bottleneck_net
from test_cuda_plan import _qdq_model

from optcc import Model
from optcc.runtime import OrtRunner

pytestmark = pytest.mark.gpu
REPO = HERE.parent


@pytest.fixture(scope="module")
def cuda():  # type: ignore[no-untyped-def]
    from optcc.backends.cuda import CudaBackend

    ok, reason = CudaBackend.is_available()
    if not ok:
        pytest.skip(reason)
    import torch

    return torch.cuda.get_device_capability()[0]


def _archs(major: int) -> list[str]:
    return ["sm80", "sm90"] if major == 9 else ["sm80"]


def _run(model: Model, feeds: dict[str, np.ndarray], **options):  # type: ignore[no-untyped-def]
    from optcc.backends.cuda import CudaOptions, CudaRunner

    runner = CudaRunner(model, CudaOptions(**options))
    return runner, runner.run(feeds)


def _close(got: np.ndarray, expected: np.ndarray, rel: float) -> None:
    assert np.isfinite(got).all()
    err = float(np.abs(got.astype(np.float64) - expected).max())
    assert err <= rel * float(np.abs(expected).max()), err


def test_demo_matches_onnxruntime(cuda) -> None:  # type: ignore[no-untyped-def]
    from conftest import DEMO_MODEL

    model = Model.load(DEMO_MODEL)
    with np.load(REPO / "optcc" / "demo" / "digits.npz") as data:
        images = (data["images"][:256].astype(np.float32) / 16.0)[:, None]
    expected = OrtRunner(model).run({"image": images})[0]
    runner, (got,) = _run(model, {"image": images})
    assert not runner.layers  # 3x3 convolutions and a 10-way head: nothing for the kernels
    assert {s.op for s in runner.plan.skipped} == {"Conv", "Gemm"}
    _close(got, expected, 2e-2)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_mlp_on_both_kernel_families(cuda, precision: str) -> None:  # type: ignore[no-untyped-def]
    model = onnx_mlp()
    x = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    for arch in _archs(cuda):
        runner, (got,) = _run(model, {"x": x}, precision=precision, arch=arch)
        assert len(runner.layers) == 2
        _close(got, expected, 1e-2 if precision == "float16" else 4e-2)


def test_int8_tensorrt_format_layer(cuda) -> None:  # type: ignore[no-untyped-def]
    model = _qdq_model(TensorProto.INT8)
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    for arch in _archs(cuda):
        runner, (got,) = _run(model, {"x": x}, arch=arch)
        assert runner.layers[0].plan.precision == "int8"
        assert np.abs(got - expected).max() <= 0.05 + 1e-6


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_style_encoder(cuda, exporter: str) -> None:  # type: ignore[no-untyped-def]
    model, feeds = sparse_bert_onnx(exporter)
    expected = OrtRunner(model).run(feeds)[0]
    runner, (got,) = _run(model, feeds)
    assert len(runner.layers) == 12
    _close(got, expected, 3e-2)


def test_pointwise_conv_blocks(cuda) -> None:  # type: ignore[no-untyped-def]
    from optcc.frontend import export_torch

    model = export_torch("test_cuda_backend:bottleneck_net",
                         inputs=[{"name": "x", "shape": ["batch", 64, 8, 8]}], exporter="legacy",
                         base_dir=HERE)
    x = np.random.default_rng(3).standard_normal((3, 64, 8, 8)).astype(np.float32)
    expected = OrtRunner(model).run({"x": x})[0]
    runner, (got,) = _run(model, {"x": x})
    assert len(runner.layers) == 6
    _close(got, expected, 2e-2)
    bottleneck_net  # noqa: B018  (the factory the export names)


def _minilm_path() -> Path | None:
    from bench.gpu_models import unpack_minilm

    explicit = os.environ.get("OPTCC_MINILM_2TO4")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    return unpack_minilm(REPO / ".gpu")


def test_real_minilm_2to4_matches_onnxruntime(cuda) -> None:  # type: ignore[no-untyped-def]
    path = _minilm_path()
    if path is None:
        pytest.skip("the 2:4 MiniLM is not prepared (python bench/gpu_models.py .gpu)")
    model = Model.load(path)
    with np.load(path.with_name("minilm_2to4_inputs.npz")) as data:
        feeds = {k: data[k][:16] for k in data.files}
    expected = OrtRunner(model).run(feeds)[0]
    runner, (got,) = _run(model, feeds)
    assert len(runner.layers) >= 36  # 6 layers x (Q, K, V, output, FFN up, FFN down)
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    pooled = lambda h: (h * mask).sum(1) / mask.sum(1)  # noqa: E731
    a, b = pooled(got), pooled(expected)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.999, cosine.min()
    _close(got, expected, 5e-2)


def test_backend_compiles_and_times_on_the_card(cuda, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    import torch

    from optcc.backends.cuda import CudaBackend, CudaOptions

    backend = CudaBackend(CudaOptions(warmup=3, runs=10, tuning_cache=str(tmp_path / "tune.json")))
    artifact = backend.compile(onnx_mlp(), tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "cuda_plan.json").read_text())
    assert len(plan["layers"]) == 2 and artifact.info["sparse_layers"] == 2
    feeds = {"x": np.random.default_rng(4).standard_normal((256, 64)).astype(np.float32)}
    latency = backend.measure_latency(artifact, feeds)
    assert latency.device == torch.cuda.get_device_name() and latency.median_ms > 0
    tuned = json.loads((tmp_path / "tune.json").read_text())["entries"]
    assert tuned and all(key.startswith(torch.cuda.get_device_name()) for key in tuned)


def test_recipe_build_and_predict_on_the_gpu(cuda, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A recipe with target cuda: the report compares the GPU run with ONNX Runtime and
    times it on the card; optcc.load(folder).predict runs the same kernels."""
    import json

    import torch
    from conftest import write_recipe

    import optcc

    onnx_mlp().save(tmp_path / "mlp.onnx")
    recipe = write_recipe(tmp_path, (
        "version: 1\nmodel: mlp.onnx\n"
        "target: {backend: cuda, warmup: 2, runs: 5, batch_size: 64}\n"
        "data:\n  evaluation: {source: random, samples: 64, batch_size: 32}\n"
        "passes:\n  - fold-constants\noutput: out\n"))
    optcc.build(recipe)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert json.loads((tmp_path / "out" / "cuda_plan.json").read_text())["layers"]
    text = json.dumps(report)
    assert torch.cuda.get_device_name() in text
    assert '"passed": true' in text  # the artifact check against ONNX Runtime
    x = np.random.default_rng(6).standard_normal((70, 64)).astype(np.float32)
    got = optcc.load(tmp_path / "out").predict({"x": x})["y"]
    _close(got, OrtRunner(onnx_mlp()).run({"x": x})[0], 1e-2)
