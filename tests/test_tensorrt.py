"""TensorRT backend: availability reporting everywhere; engine builds on a GPU machine.

The `gpu` tests need an NVIDIA GPU and the tensorrt package; conftest skips them elsewhere.
They never create TensorRT or CUDA objects in a process without a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_MODEL, write_recipe

from optcc.backends.tensorrt import TensorRTBackend, gpu_present


def test_unavailable_backend_says_why_without_touching_cuda() -> None:
    ok, reason = TensorRTBackend.is_available()
    if importlib.util.find_spec("tensorrt") is None:
        assert not ok and reason == "the tensorrt Python package is not installed"
    elif not gpu_present()[0]:
        assert not ok and "GPU" in reason
    assert "optcc[tensorrt]" in (TensorRTBackend.install_hint or "")


def test_dynamic_dimensions_need_profile_shapes_in_recipes(tmp_path: Path) -> None:
    from optcc.recipe import load_recipe

    plan = load_recipe(write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\n"
                                    "target: {backend: tensorrt, opt_shapes: {image: [64, 1, 8, 8]}, workspace_mib: 512}\n"))
    assert plan.backend_options.opt_shapes == {"image": [64, 1, 8, 8]}
    assert plan.backend_options.workspace_mib == 512


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt not installed")
def test_int8_engine_matches_onnxruntime_and_is_timed(tmp_path: Path) -> None:
    from optcc.build import build
    from optcc.runtime import OrtRunner

    recipe = write_recipe(tmp_path, f"""version: 1
model: {DEMO_MODEL}
target: {{backend: tensorrt, batch_size: 256, runs: 50, opt_shapes: {{image: [256, 1, 8, 8]}},
          max_shapes: {{image: [512, 1, 8, 8]}}}}
data:
  calibration: {{source: digits, split: train, batch_size: 64, limit: 512}}
  evaluation: {{source: digits, split: test, batch_size: 256}}
passes:
  - fold-batchnorm
  - quantize-int8: {{method: entropy}}
output: out
""")
    result = build(recipe)
    report = result.report
    assert report["final"]["artifact"]["path"] == "model.plan"
    engine = report["final"]["artifact"]["info"]["engine"]
    assert engine["built"] and engine["layers"]["detailed"]
    assert engine["layers"]["precision_counts"].get("int8", 0) > 0  # the Q/DQ layers run in INT8
    check = report["final"]["artifact"]["check"]
    assert check["outputs"][0]["name"] == "logits" and check["outputs"][0]["max_abs_error"] < 1.0
    # The engine answers through the same predict API as ONNX Runtime, in batches.
    import optcc

    images = np.random.default_rng(1).random((700, 1, 8, 8), dtype=np.float32)
    engine_out = optcc.load(result.output_dir).predict({"image": images})["logits"]
    ort_out = optcc.load(result.output_dir, backend="onnxruntime").predict({"image": images})["logits"]
    assert (engine_out.argmax(1) == ort_out.argmax(1)).mean() >= 0.95
    assert report["final"]["latency"]["device"]  # the GPU's name
    assert report["final"]["latency"]["median_ms"] < report["original"]["latency"]["median_ms"] * 2
    # The engine computes what ONNX Runtime computes on the same Q/DQ model.
    import tensorrt as trt
    import torch

    onnx_out = OrtRunner(str(result.output_dir / "model.onnx"))
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((result.output_dir / "model.plan").read_bytes())
    context = engine.create_execution_context()
    inp = torch.from_numpy(x).cuda()
    out = torch.empty((8, 10), device="cuda")
    context.set_input_shape("image", tuple(x.shape))
    context.set_tensor_address("image", inp.data_ptr())
    context.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    expected = onnx_out.run({"image": x})[0]
    assert (out.cpu().numpy().argmax(1) == expected.argmax(1)).mean() >= 0.875
