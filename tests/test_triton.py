"""Triton model repository export, checked by parsing config.pbtxt with Triton's own
protobuf schema (tritonclient's model_config_pb2), not by comparing strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODEL, write_recipe
from onnx import TensorProto, helper, numpy_helper

from optcc.errors import OptccError
from optcc.triton import MARKER, export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype(name: str) -> int:
    return model_config_pb2.DataType.Value(name)


@pytest.fixture(scope="module")
def ort_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optcc.build import build

    folder = tmp_path_factory.mktemp("triton")
    recipe = write_recipe(folder, f"""version: 1
name: digits
model: {DEMO_MODEL}
target: {{backend: onnxruntime, batch_size: 32, runs: 2, warmup: 0}}
evaluate: none
passes: [fold-batchnorm]
output: {{path: out, triton: {{max_batch_size: 128, instance_kind: cpu, instance_count: 2}}}}
""")
    return build(recipe).output_dir


def test_build_writes_a_repository_triton_accepts(ort_output: Path) -> None:
    model_dir = ort_output / "triton" / "digits"
    config = parse(model_dir / "config.pbtxt")
    assert config.name == "digits"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 128
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", dtype("TYPE_FP32"), [1, 8, 8])]  # the batch axis is implicit
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", dtype("TYPE_FP32"), [10])]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    group = config.instance_group[0]
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (model_dir / "1" / "model.onnx").read_bytes() == (ort_output / "model.onnx").read_bytes()
    report = json.loads((ort_output / "report.json").read_text())
    assert report["triton"]["files"] == ["digits/config.pbtxt", "digits/1/model.onnx"]


def test_command_exports_again_and_never_replaces_a_foreign_model(ort_output: Path, tmp_path: Path, capsys) -> None:
    from optcc.cli import main

    repo = tmp_path / "repo"
    assert main(["triton", str(ort_output), "-r", str(repo), "--name", "dig its",
                 "--no-dynamic-batching"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = parse(repo / "dig_its" / "config.pbtxt")
    assert config.name == "dig_its" and config.max_batch_size == 32  # the target's batch_size
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (repo / "dig_its" / MARKER).is_file()
    # Exporting again replaces optcc's own folder...
    assert main(["triton", str(ort_output), "-r", str(repo), "--name", "dig its",
                 "--max-batch-size", "8"]) == 0
    assert parse(repo / "dig_its" / "config.pbtxt").max_batch_size == 8
    # ...but never one optcc did not write.
    (repo / "theirs").mkdir()
    (repo / "theirs" / "config.pbtxt").write_text("name: 'theirs'\n")
    assert main(["triton", str(ort_output), "-r", str(repo), "--name", "theirs"]) == 2
    assert "was not written by optcc" in capsys.readouterr().err
    assert (repo / "theirs" / "config.pbtxt").read_text() == "name: 'theirs'\n"


def test_tensorrt_export_needs_the_engine_and_uses_its_profile(tmp_path: Path) -> None:
    from optcc.backends.tensorrt import TensorRTBackend
    from optcc.build import build

    if TensorRTBackend.is_available()[0]:
        pytest.skip("TensorRT is available here")
    recipe = write_recipe(tmp_path, f"""version: 1
name: digits-trt
model: {DEMO_MODEL}
target: {{backend: tensorrt, opt_shapes: {{image: [16, 1, 8, 8]}}, max_shapes: {{image: [48, 1, 8, 8]}}}}
evaluate: none
output: out
""")
    out = build(recipe).output_dir
    with pytest.raises(OptccError, match=r"no TensorRT engine \(model.plan\) to export") as info:
        export_triton(out, tmp_path / "repo", backend="tensorrt")
    assert "build_engine.sh" in (info.value.hint or "")
    # The engine is built elsewhere and copied back; the exporter only copies the file.
    (out / "model.plan").write_bytes(b"engine bytes from the GPU machine")
    result = export_triton(out, tmp_path / "repo")
    assert result["backend"] == "tensorrt"
    config = parse(tmp_path / "repo" / "digits-trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.backend == "tensorrt"
    assert config.max_batch_size == 48  # the profile's largest batch
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo" / "digits-trt" / "1" / "model.plan").read_bytes() == b"engine bytes from the GPU machine"


def test_fixed_shapes_and_int64_inputs(tmp_path: Path) -> None:
    from optcc.triton import make_config

    path = tmp_path / "fixed.onnx"
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["emb"], name="g")], "fixed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, "sequence"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, "sequence", 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    config = text_format.Parse(make_config(path, name="fixed", backend="onnxruntime").to_pbtxt(),
                               model_config_pb2.ModelConfig())
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, -1] and config.input[0].data_type == dtype("TYPE_INT64")
    assert list(config.output[0].dims) == [2, -1, 4]
    with pytest.raises(OptccError, match="needs a dynamic first"):
        make_config(path, name="fixed", backend="onnxruntime", max_batch_size=8)
