"""Structured pruning: the model really shrinks, and equals the original with the removed
channels zeroed, on ResNet-, MobileNetV2-, BERT-style and Concat models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_MODEL, write_recipe
from optcc_plugins.lossless import FoldBatchNormPass
from optcc_plugins.pruning import StructuredPruningPass, zeroed_reference

from optcc.data import InputSpec
from optcc.data.builtin import DigitsOptions, DigitsSource
from optcc.ir import Model, model_stats, verify_model
from optcc.passes import Capability, PassContext
from optcc.runtime import OrtRunner

torch = pytest.importorskip("torch")

from optcc.frontend import export_torch  # noqa: E402


def _export(factory: str, inputs: list[dict], exporter: str = "legacy") -> Model:
    return export_torch(factory, inputs=inputs, exporter=exporter, base_dir=Path(__file__).parent)


IMAGE16 = [{"name": "x", "shape": ["batch", 3, 16, 16]}]
TOKENS = [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
          {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"}]


def _feeds(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in OrtRunner(model).input_specs:
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 100, (3, 12)).astype(np.int64)
        elif spec.name == "attention_mask":
            mask = np.ones((3, 12), np.int64)
            mask[1, 8:] = 0
            feeds[spec.name] = mask
        else:
            shape = [3 if not isinstance(d, int) else d for d in spec.shape]
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def check_equals_zeroed(model: Model, **options) -> tuple[Model, dict]:
    """Prune, verify, and compare with the zeroed original; return the pruned model."""
    pass_ = StructuredPruningPass(**options)
    reference = zeroed_reference(model, pass_)
    result = pass_(model.copy())
    assert result.modified, result.reason
    verify_model(result.model)
    feeds = _feeds(model)
    pruned_out = OrtRunner(result.model).run(feeds)[0]
    reference_out = OrtRunner(reference).run(feeds)[0]
    original_out = OrtRunner(model).run(feeds)[0]
    scale = float(np.abs(reference_out).max())
    np.testing.assert_allclose(pruned_out, reference_out, atol=1e-4 * max(scale, 1.0), rtol=1e-4)
    assert not np.allclose(pruned_out, original_out, atol=1e-3), "pruning must change something"
    return result.model, result.stats


def test_resnet_style_demo_with_residuals() -> None:
    for model in (Model.load(DEMO_MODEL), FoldBatchNormPass()(Model.load(DEMO_MODEL)).model):
        pruned, stats = check_equals_zeroed(model, ratio=0.5)
        groups = {tuple(g["layers"]): g for g in stats["groups"]}
        residual = ("/stage1/stage1.0/conv2/Conv", "/stage1/stage1.1/conv2/Conv", "/stem/stem.0/Conv")
        assert groups[residual]["units_before"] == 64 and groups[residual]["units_after"] == 32
        assert stats["blocked"] == {"/fc/Gemm": "reaches the graph output 'logits'"}
        before, after = model_stats(model), model_stats(pruned)
        assert after.params < 0.3 * before.params and after.flops < 0.3 * before.flops
        shapes = {layer.name: layer.weight_shape for layer in after.layers}
        assert shapes["/stage2/conv1/Conv"] == [64, 64, 3, 3] and shapes["/fc/Gemm"] == [10, 64]


def test_lossless_when_pruned_channels_are_already_zero() -> None:
    model = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    pass_ = StructuredPruningPass(ratio=0.5)
    zeroed = zeroed_reference(model, pass_)  # these channels are now exactly zero...
    result = StructuredPruningPass(ratio=0.5, importance="l1")(zeroed.copy())  # ...so L1 picks them
    feeds = _feeds(model)
    np.testing.assert_allclose(OrtRunner(result.model).run(feeds)[0], OrtRunner(zeroed).run(feeds)[0],
                               rtol=1e-5, atol=1e-5)
    assert model_stats(result.model).params < model_stats(zeroed).params * 0.3


def test_mobilenet_v2_style_depthwise_and_inverted_residuals() -> None:
    model = _export("nets:mobilenet_v2_style", IMAGE16)
    pruned, stats = check_equals_zeroed(model, ratio=0.5)
    convs = [n for n in pruned.graph.nodes if n.op == "Conv"]
    depthwise = [n for n in convs if int(n.attrs.get("group", 1)) > 1]
    assert depthwise, "depthwise convs must survive"
    for node in depthwise:  # a depthwise conv keeps group == channels after pruning
        w = np.asarray(node.inputs[1].values)
        assert node.attrs["group"] == w.shape[0] and w.shape[1] == 1
    assert model_stats(pruned).params < 0.5 * model_stats(model).params


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_style_heads_and_ffn(exporter: str) -> None:
    model = _export("nets:bert_style", TOKENS, exporter)
    pruned, stats = check_equals_zeroed(model, ratio=0.5, round_to=1, min_channels=1)
    units = {g["unit_channels"]: g for g in stats["groups"]}
    assert 16 in units, "heads (4 x 16 channels) must form prunable units"
    heads = [g for g in stats["groups"] if g["unit_channels"] == 16]
    ffn = [g for g in stats["groups"] if g["unit_channels"] == 1]
    assert len(heads) == 2 and all(g["units_before"] == 4 and g["units_after"] == 2 for g in heads)
    assert len(ffn) == 2 and all(g["units_before"] == 128 and g["units_after"] == 64 for g in ffn)
    # hidden size 64 is tied to LayerNorm and the residual stream: never pruned
    assert any("LayerNormalization" in r or "combines them" in r or "graph output" in r
               for r in stats["blocked"].values())
    assert model_stats(pruned).params < model_stats(model).params


def test_concat_split_and_flatten_gemm() -> None:
    model = _export("nets:ConcatNet", IMAGE16)
    pruned, stats = check_equals_zeroed(model, ratio=0.5, round_to=4, min_channels=4)
    fcs = [n for n in pruned.graph.nodes if n.op == "Gemm"]
    widths = sorted(np.asarray(n.inputs[1].values).shape[1] for n in fcs)
    assert widths == [8 * 16, 8 * 16]  # Flatten -> Gemm columns follow the kept channels
    split = next(n for n in pruned.graph.nodes if n.op == "Split")
    sizes = split.attrs.get("split") or list(np.asarray(split.inputs[1].values))
    assert list(sizes) == [8, 8]


def test_rounding_and_minimum(tmp_path) -> None:
    model = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    result = StructuredPruningPass(ratio=0.9, round_to=16, min_channels=24)(model.copy())
    for layer in model_stats(result.model).layers:
        if layer.op == "Conv" and layer.name != "/stem/stem.0/Conv":
            assert layer.weight_shape[0] % 16 == 0 and layer.weight_shape[0] >= 24


def test_overrides_and_exclude() -> None:
    model = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    result = StructuredPruningPass(ratio=0.5, overrides={"/stage2/*": 0.25},
                                   exclude=["/stage1/stage1.1/*"])(model.copy())
    shapes = {layer.name: layer.weight_shape[0] for layer in model_stats(result.model).layers}
    assert shapes["/stage2/conv1/Conv"] == 96  # 128 * (1 - 0.25)
    assert shapes["/stage1/stage1.1/conv1/Conv"] == 64  # excluded
    assert shapes["/stage1/stage1.0/conv1/Conv"] == 32
    groups = {g["group"]: g for g in result.stats["groups"]}
    assert groups["/stage1/stage1.1/conv1/Conv"]["skipped"] == "excluded by the recipe"


@pytest.mark.parametrize("target", ["params", "flops"])
def test_params_and_flops_targets(target: str) -> None:
    model = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    result = StructuredPruningPass(target=target, ratio=0.5, round_to=1, min_channels=1)(model.copy())
    before, after = getattr(model_stats(model), target), getattr(model_stats(result.model), target)
    assert 0.5 <= 1 - after / before < 0.6


@pytest.mark.parametrize("importance", ["l1", "bn-scale", "activation"])
def test_importance_criteria(importance: str) -> None:
    model = Model.load(DEMO_MODEL)  # BatchNorm still present for bn-scale
    ctx = PassContext(
        data={"calibration": DigitsSource(DigitsOptions(split="train", batch_size=64, limit=128),
                                          inputs=[InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))])},
        capabilities=frozenset({Capability.CALIBRATION_DATA}),
    )
    result = StructuredPruningPass(ratio=0.25, importance=importance)(model.copy(), ctx)
    assert result.modified
    l2 = StructuredPruningPass(ratio=0.25)(model.copy())
    if importance != "l1":  # a different criterion picks (at least partly) different channels
        a = np.asarray(result.model.node("/stage2/conv1/Conv").inputs[1].values)
        b = np.asarray(l2.model.node("/stage2/conv1/Conv").inputs[1].values)
        assert a.shape == b.shape and not np.allclose(a, b)


def test_recipe_and_report(tmp_path) -> None:
    from optcc.build import build

    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\n"
                          "target: {backend: onnxruntime, threads: 1, runs: 3, warmup: 1}\n"
                          "data:\n  evaluation: {source: digits, batch_size: 256}\n"
                          "passes:\n  - fold-batchnorm\n  - prune-channels: {ratio: 0.5}\noutput: out\n")
    report = build(recipe).report
    record = report["passes"][1]
    assert record["modified"] and record["stats"]["params_removed"] > 0.7
    assert report["final"]["file_bytes"] < 0.35 * report["original"]["file_bytes"]
    rows = {r["name"]: r for r in record["stats"]["layers"]}
    assert rows["/stage2/conv1/Conv"]["out_before"] == 128 and rows["/stage2/conv1/Conv"]["out_after"] == 64
    assert rows["/fc/Gemm"]["out_before"] == rows["/fc/Gemm"]["out_after"] == 10  # the classes stay


def test_nothing_prunable_is_a_reason_not_an_error() -> None:
    from conftest import conv_bn_model

    model = Model.from_proto(conv_bn_model(channels=8))
    result = StructuredPruningPass(ratio=0.5)(model)
    assert not result.modified
    assert "nothing to prune" in result.reason or result.stats["groups"]


def test_global_scope_prunes_layers_unevenly() -> None:
    model = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    result = StructuredPruningPass(ratio=0.5, scope="global", round_to=1, min_channels=1)(model.copy())
    groups = result.stats["groups"]
    kept = [g["units_after"] / g["units_before"] for g in groups]
    removed = sum(g["units_before"] - g["units_after"] for g in groups)
    total = sum(g["units_before"] for g in groups)
    assert removed == int(0.5 * total)  # the global budget is exact with round_to 1
    assert max(kept) - min(kept) > 0.1  # ...and spread unevenly across groups
    reference = zeroed_reference(model, StructuredPruningPass(ratio=0.5, scope="global", round_to=1, min_channels=1))
    feeds = _feeds(model)
    np.testing.assert_allclose(OrtRunner(result.model).run(feeds)[0], OrtRunner(reference).run(feeds)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_hugging_face_bert_heads_and_ffn(exporter: str) -> None:
    """A real transformers BertModel graph (tiny, random): heads of Q/K/V prune together,
    FFN neurons prune, the hidden size stays, and the result equals the zeroed original."""
    pytest.importorskip("transformers")
    model = _export("hf_nets:hf_bert", TOKENS, exporter)
    pruned, stats = check_equals_zeroed(model, ratio=0.5, round_to=1, min_channels=1)
    heads = [g for g in stats["groups"] if g["unit_channels"] == 16]
    ffn = [g for g in stats["groups"] if g["unit_channels"] == 1]
    assert len(heads) == 2 and all(len(g["layers"]) == 3 and g["units_after"] == 2 for g in heads)
    assert len(ffn) == 2 and all(g["units_before"] == 128 and g["units_after"] == 64 for g in ffn)
    out = OrtRunner(pruned).run(_feeds(model))[0]
    assert out.shape[-1] == 64  # the encoder's interface is unchanged
