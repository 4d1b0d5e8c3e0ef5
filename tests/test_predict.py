"""optcc.load(folder).predict(feeds) and `optcc predict`: the build's outputs reproduced at
batch 1, odd batch sizes and inputs longer than one batch; one clear error per bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODEL, int8_demo_recipe, write_recipe
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.cli import EXIT_USER_ERROR, main
from optcc.errors import OptccError
from optcc.predict import OrtPredictor, PredictError
from optcc.runtime import OrtRunner


@pytest.fixture(scope="module")
def ort_build(tmp_path_factory: pytest.TempPathFactory):
    from optcc.build import build

    folder = tmp_path_factory.mktemp("predict")
    recipe = write_recipe(folder, int8_demo_recipe("{backend: onnxruntime, batch_size: 16, runs: 2, warmup: 0}"))
    return build(recipe)


def digits(n: int, seed: int = 0) -> np.ndarray:
    with np.load(Path(optcc.__file__).parent / "demo" / "digits.npz") as data:
        return data["images"][seed:seed + n].astype(np.float32)[:, None] / 16.0


def test_predictions_reproduce_the_build_at_any_batch_size(ort_build) -> None:
    reference = OrtRunner(ort_build.model)  # the build's final model, in memory
    predictor = optcc.load(ort_build.output_dir)
    assert predictor.backend == "onnxruntime" and predictor.batch_size == 16
    assert predictor.output_names == ["logits"]
    for n in (1, 7, 13, 16, 37):  # batch 1, odd sizes, and more than two batches of 16
        images = digits(n, seed=n)
        got = predictor.predict({"image": images})
        expected = reference.run({"image": images})[0]
        assert got["logits"].shape == (n, 10)
        np.testing.assert_allclose(got["logits"], expected, rtol=1e-5, atol=1e-5)
    images = digits(37)
    small = predictor.predict({"image": images}, batch_size=5)["logits"]
    np.testing.assert_allclose(small, predictor.predict({"image": images})["logits"], rtol=1e-5, atol=1e-5)


def test_cli_predict_writes_the_same_outputs(ort_build, tmp_path: Path, capsys) -> None:
    images = digits(11)
    np.savez(tmp_path / "in.npz", image=images)
    out = tmp_path / "out.npz"
    code = main(["predict", str(ort_build.output_dir), "--input", str(tmp_path / "in.npz"),
                 "-o", str(out), "--batch-size", "4"])
    assert code == 0
    assert "11 sample(s) on onnxruntime: logits[11, 10] float32; wrote" in capsys.readouterr().out
    with np.load(out) as saved:
        expected = OrtRunner(ort_build.model).run({"image": images})[0]
        np.testing.assert_allclose(saved["logits"], expected, rtol=1e-5, atol=1e-5)
    code = main(["predict", str(ort_build.output_dir), "-i", str(tmp_path / "in.npz"), "-o", str(out)])
    assert code == EXIT_USER_ERROR
    assert "exists; it is left as it is" in capsys.readouterr().err
    # The console script, in a new process, as a user runs it.
    exe = Path(sys.executable).with_name("optcc")
    done = subprocess.run([str(exe), "predict", str(ort_build.output_dir), "-i",
                           str(tmp_path / "in.npz"), "-o", str(out), "--overwrite", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["logits"]["shape"] == [11, 10]


@pytest.mark.parametrize(
    ("feeds", "message", "hint"),
    [
        ({"imag": digits(2)}, "unknown input 'imag'; the model's inputs are: image",
         "did you mean 'image'?"),
        ({}, "missing input(s) 'image'; the model's inputs are: image[batch,1,8,8] float32", None),
        ({"image": digits(2).astype(np.float64)},
         "input 'image' has dtype float64; the model takes float32", None),
        ({"image": digits(2).astype(np.int32)},
         "input 'image' has dtype int32; the model takes float32", None),
        ({"image": digits(2)[:, 0]},
         "input 'image' has 3 dimension(s) [2, 8, 8]; the model takes 4: [batch, 1, 8, 8]", None),
        ({"image": np.zeros((2, 1, 8, 9), np.float32)},
         "input 'image' has size 9 on axis 3; the model needs 8 there", None),
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "the inputs hold no samples", None),
        ({"image": np.array([["a"]])}, "input 'image' has dtype <U1, not a numeric array", None),
    ],
)
def test_bad_inputs_get_one_clear_error(ort_build, feeds, message, hint) -> None:
    predictor = optcc.load(ort_build.output_dir)
    with pytest.raises(PredictError) as info:
        predictor.predict(feeds)
    assert str(info.value).startswith(message)
    assert info.value.hint == hint


def test_bad_folders_and_files_get_one_clear_error(ort_build, tmp_path: Path, capsys) -> None:
    with pytest.raises(OptccError, match="no such folder"):
        optcc.load(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OptccError, match="not a folder"):
        optcc.load(tmp_path / "file.txt")
    (tmp_path / "plain").mkdir()
    with pytest.raises(OptccError, match=r"not an optcc output folder \(it has no report.json\)"):
        optcc.load(tmp_path / "plain")
    (tmp_path / "plain" / "report.json").write_text("{not json")
    with pytest.raises(OptccError, match="cannot be read as JSON"):
        optcc.load(tmp_path / "plain")
    report = json.loads((ort_build.output_dir / "report.json").read_text())
    (tmp_path / "plain" / "report.json").write_text(json.dumps({**report, "status": "failed"}))
    with pytest.raises(OptccError, match="did not finish"):
        optcc.load(tmp_path / "plain")
    with pytest.raises(OptccError, match="backend 'tensorrtt' is not installed") as info:
        optcc.load(ort_build.output_dir, backend="tensorrtt")
    assert info.value.hint == "did you mean 'tensorrt'?"
    with pytest.raises(PredictError, match="feeds must be a mapping"):
        optcc.load(ort_build.output_dir).predict(digits(2))  # type: ignore[arg-type]
    # The command line: missing and unreadable input files.
    code = main(["predict", str(ort_build.output_dir), "-i", str(tmp_path / "none.npz")])
    assert code == EXIT_USER_ERROR and "input file not found" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    code = main(["predict", str(ort_build.output_dir), "-i", str(tmp_path / "bad.npz")])
    assert code == EXIT_USER_ERROR and "not a readable .npz file" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", pixels=digits(1))
    code = main(["predict", str(ort_build.output_dir), "-i", str(tmp_path / "wrong.npz")])
    assert code == EXIT_USER_ERROR and "unknown input 'pixels'" in capsys.readouterr().err


def fixed_batch_model(path: Path, batch: int) -> Path:
    """y[batch, 4] = x[batch, 3] @ W: a model whose batch dimension is fixed."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_fixed_batch_model_runs_any_number_of_samples(tmp_path: Path) -> None:
    predictor = OrtPredictor(fixed_batch_model(tmp_path / "fixed3.onnx", 3))
    assert predictor.fixed_batch == 3 and predictor.batch_size == 3
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    y = predictor.predict({"x": x})["y"]  # batches of 3, 3 and 2 (padded to 3)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-6)
    single = OrtPredictor(fixed_batch_model(tmp_path / "fixed1.onnx", 1))
    np.testing.assert_allclose(single.predict({"x": x[:5]})["y"], x[:5] @ w, rtol=1e-5, atol=1e-6)


def test_named_dimensions_must_agree_across_inputs(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"], name="add")], "pair",
        [helper.make_tensor_value_info("a", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("c", TensorProto.INT64, ["batch", "sequence"])])
    path = tmp_path / "pair.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    predictor = OrtPredictor(path)
    with pytest.raises(PredictError, match="dimension 'sequence' is 16 in input 'a' but 15 in input 'b'"):
        predictor.predict({"a": np.zeros((2, 16), np.int64), "b": np.zeros((2, 15), np.int64)})
    with pytest.raises(PredictError, match="inputs disagree on the number of samples"):
        predictor.predict({"a": np.zeros((2, 16), np.int64), "b": np.zeros((3, 16), np.int64)})
    # int32 token ids are widened to the model's int64 without loss.
    out = predictor.predict({"a": np.ones((2, 4), np.int32), "b": np.ones((2, 4), np.int64)})
    assert out["c"].dtype == np.int64 and (out["c"] == 2).all()


def test_a_tensorrt_output_without_engine_runs_its_onnx_on_request(tmp_path: Path) -> None:
    from optcc.backends.tensorrt import TensorRTBackend
    from optcc.build import build

    if TensorRTBackend.is_available()[0]:
        pytest.skip("TensorRT is available here: the engine is built")
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\n"
                          "target: {backend: tensorrt, batch_size: 8}\nevaluate: none\noutput: out\n")
    result = build(recipe)
    with pytest.raises(OptccError, match=r"no TensorRT engine \(model.plan\) in the folder") as info:
        optcc.load(result.output_dir)
    assert "backend='onnxruntime'" in (info.value.hint or "")
    predictor = optcc.load(result.output_dir, backend="onnxruntime")
    images = digits(9)
    expected = OrtRunner(result.model).run({"image": images})[0]
    np.testing.assert_allclose(predictor.predict({"image": images})["logits"], expected,
                               rtol=1e-5, atol=1e-5)
