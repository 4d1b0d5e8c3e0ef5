"""The trainable torch view, distillation, BatchNorm recalibration, resume and DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_MODEL, StopAtEpoch

torch = pytest.importorskip("torch")

from optcc_plugins.distillation import (  # noqa: E402
    DistillOptions,
    DistillPass,
    RecalibrateBatchNormPass,
    train_distill,
)
from optcc_plugins.int8 import Int8QuantizePass  # noqa: E402
from optcc_plugins.lossless import FoldBatchNormPass  # noqa: E402
from optcc_plugins.pruning import StructuredPruningPass  # noqa: E402

from optcc.data import InputSpec  # noqa: E402
from optcc.data.builtin import DigitsOptions, DigitsSource  # noqa: E402
from optcc.errors import ModelError  # noqa: E402
from optcc.evaluate import Evaluator  # noqa: E402
from optcc.ir import Model  # noqa: E402
from optcc.passes import Capability, PassContext  # noqa: E402
from optcc.runtime import OrtRunner  # noqa: E402
from optcc.torchview import GraphModule  # noqa: E402

IMAGE = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]


def digits(split: str, batch: int = 64, limit: int | None = None) -> DigitsSource:
    return DigitsSource(DigitsOptions(split=split, batch_size=batch, limit=limit), inputs=IMAGE)


def ctx(original: Model, tmp_path: Path | None = None, limit: int | None = None) -> PassContext:
    return PassContext(
        data={"training": digits("train", limit=limit), "calibration": digits("train", limit=256)},
        original=original, cache_dir=tmp_path, seed=0,
        capabilities=frozenset({Capability.TRAINING_DATA, Capability.CALIBRATION_DATA, Capability.TORCH}),
    )


def run_view(model: Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return GraphModule(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()


@pytest.fixture(scope="module")
def demo() -> Model:
    return Model.load(DEMO_MODEL)


# ---------------------------------------------------------------- the view
def test_view_matches_onnxruntime_on_the_test_architectures() -> None:
    import nets  # noqa: F401  (tests/nets.py, found through the test folder)

    from optcc.frontend import export_torch

    here = Path(__file__).parent
    rng = np.random.default_rng(0)
    cases = [
        (Model.load(DEMO_MODEL), {"image": rng.random((4, 1, 8, 8), dtype=np.float32)}),
        (export_torch("nets:mobilenet_v2_style", inputs=[{"name": "x", "shape": ["batch", 3, 16, 16]}],
                      exporter="legacy", base_dir=here), {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}),
        (export_torch("nets:ConcatNet", inputs=[{"name": "x", "shape": ["batch", 3, 16, 16]}],
                      exporter="legacy", base_dir=here), {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}),
    ]
    tokens = [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
              {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"}]
    import importlib.util

    factories = ["nets:bert_style"]
    if importlib.util.find_spec("transformers") is not None:
        factories.append("hf_nets:hf_bert")  # a real transformers BertModel graph
    for factory in factories:
        for exporter in ("legacy", "dynamo"):
            bert = export_torch(factory, inputs=tokens, exporter=exporter, base_dir=here)
            mask = np.ones((3, 12), np.int64)
            mask[0, 7:] = 0
            cases.append((bert, {"input_ids": rng.integers(0, 100, (3, 12)), "attention_mask": mask}))
    for model, feeds in cases:
        np.testing.assert_allclose(run_view(model, feeds), OrtRunner(model).run(feeds)[0], rtol=1e-4, atol=1e-4)


def test_write_back_without_training_is_exact(demo: Model) -> None:
    view = GraphModule(demo)
    back = view.write_back()
    for name, tensor in demo.tensor_map().items():
        if hasattr(tensor, "values"):
            np.testing.assert_array_equal(np.asarray(back.tensor_map()[name].values), np.asarray(tensor.values))
    assert len(view.params) == 42  # 8 convs + 8 BN x 4 + fc weight and bias


def test_trained_weights_round_trip_into_the_onnx_file(demo: Model, tmp_path: Path) -> None:
    view = GraphModule(demo)
    with torch.no_grad():
        for p in view.params.values():
            if p.requires_grad:
                p.add_(0.01)
    saved = view.write_back().save(tmp_path / "trained.onnx")
    again = GraphModule(Model.load(saved))
    for key, p in view.params.items():
        torch.testing.assert_close(again.params[key], p, rtol=0, atol=0)


def test_unsupported_op_names_op_and_node() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"], name="weird_det")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(ModelError, match="cannot run op 'Det' \\(node 'weird_det'\\)"):
        GraphModule(model)


def test_int8_model_trains_quantization_aware_and_stays_int8(demo: Model) -> None:
    folded = FoldBatchNormPass()(demo.copy()).model
    quantized = Int8QuantizePass(format="tensorrt")(folded, ctx(demo)).model
    feeds = {"image": digits("test", 32).first_batch().inputs["image"]}
    view_out = run_view(quantized, feeds)
    ort_out = OrtRunner(quantized).run(feeds)[0]
    assert (view_out.argmax(1) == ort_out.argmax(1)).mean() > 0.95  # fake quant ~ real quant
    trained, stats = train_distill(quantized, demo, lambda: digits("train", limit=128).batches(),
                                   DistillOptions(epochs=1, learning_rate=1e-3))
    int8 = [t for t in trained.tensor_map().values() if hasattr(t, "values") and np.asarray(t.values).dtype == np.int8]
    assert len(int8) >= 7 * 2  # weights and zero points stay INT8
    before = {t.name: np.asarray(t.values) for t in quantized.tensor_map().values() if hasattr(t, "values")}
    changed = [t.name for t in int8 if t.name in before and not np.array_equal(before[t.name], np.asarray(t.values))]
    assert changed, "QAT must move some INT8 weights"


# ---------------------------------------------------------------- the passes
def test_distillation_recovers_a_half_pruned_model(demo: Model) -> None:
    """The issue's bar: 50 % of the channels pruned, within 1 point of the teacher."""
    evaluate = Evaluator(digits("test", 397), demo)
    teacher = evaluate(demo)["accuracy"]
    pruned = StructuredPruningPass(ratio=0.5)(demo.copy()).model
    one_shot = evaluate(pruned)["accuracy"]
    recal = RecalibrateBatchNormPass()(pruned, ctx(demo)).model
    result = DistillPass(epochs=8, learning_rate=0.002)(recal, ctx(demo))
    after = evaluate(result.model)["accuracy"]
    assert one_shot < 0.5 < after
    assert after >= teacher - 0.01, (teacher, one_shot, after)
    losses = result.stats["loss_per_epoch"]
    assert len(losses) == 8 and losses[-1] < losses[0] / 3


def test_masks_stay_exactly_zero(demo: Model) -> None:
    from optcc_sample_plugin import ZeroSmallWeightsPass

    sparse = ZeroSmallWeightsPass(threshold=0.03)(FoldBatchNormPass()(demo.copy()).model).model
    zeros = {t.name: np.asarray(t.values) == 0 for t in sparse.tensor_map().values()
             if hasattr(t, "values") and np.asarray(t.values).dtype == np.float32 and np.asarray(t.values).ndim == 4}
    assert sum(z.sum() for z in zeros.values()) > 1000
    trained, _ = train_distill(sparse, demo, lambda: digits("train", limit=128).batches(),
                               DistillOptions(epochs=1, learning_rate=0.01))
    for name, zero in zeros.items():
        values = np.asarray(trained.tensor_map()[name].values)
        assert np.all(values[zero] == 0), name
        assert not np.array_equal(values, np.asarray(sparse.tensor_map()[name].values)), "weights must train"


def test_metadata_masks_are_honoured(demo: Model) -> None:
    model = FoldBatchNormPass()(demo.copy()).model
    weight = model.node("/stage2/conv1/Conv").inputs[1]
    mask = np.random.default_rng(0).random(np.asarray(weight.values).shape) > 0.5
    model.meta.tensor(weight.name)["mask"] = mask
    trained, _ = train_distill(model, demo, lambda: digits("train", limit=64).batches(),
                               DistillOptions(epochs=1, keep_zeros=False))
    values = np.asarray(trained.tensor_map()[weight.name].values)
    assert np.all(values[~mask] == 0) and np.count_nonzero(values) == mask.sum()


def test_recalibration_sets_the_true_statistics(demo: Model) -> None:
    pruned = StructuredPruningPass(ratio=0.5)(demo.copy()).model
    result = RecalibrateBatchNormPass()(pruned.copy(), ctx(demo))
    bn = next(n for n in result.model.graph.nodes if n.name == "/stage2/bn1/BatchNormalization")
    probe = OrtRunner(result.model, extra_outputs=[bn.inputs[0].name])
    x = np.concatenate([probe.run(b.inputs)[-1] for b in digits("train", limit=256).batches()])
    np.testing.assert_allclose(np.asarray(bn.inputs[3].values), x.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.inputs[4].values), x.var(axis=(0, 2, 3)), rtol=1e-3, atol=1e-5)
    folded = FoldBatchNormPass()(demo.copy()).model
    assert not RecalibrateBatchNormPass()(folded, ctx(demo)).modified


def test_interrupted_run_resumes_from_its_checkpoint(demo: Model, tmp_path: Path) -> None:
    pruned = StructuredPruningPass(ratio=0.5)(demo.copy()).model
    options = DistillOptions(epochs=3, learning_rate=0.002)
    data = lambda: digits("train", limit=256).batches()  # noqa: E731
    uninterrupted, _ = train_distill(pruned, demo, data, options, seed=0)
    checkpoint = tmp_path / "ckpt.json"
    with pytest.raises(KeyboardInterrupt):
        train_distill(pruned, demo, data, options, seed=0, progress=StopAtEpoch(2), checkpoint=checkpoint)
    assert checkpoint.exists() and [p.name for p in tmp_path.glob("ckpt-epoch*.pt")] == ["ckpt-epoch00001.pt"]
    resumed, stats = train_distill(pruned, demo, data, options, seed=0, checkpoint=checkpoint)
    assert stats["resumed_from_epoch"] == 1 and len(stats["loss_per_epoch"]) == 3
    for name, tensor in uninterrupted.tensor_map().items():
        if hasattr(tensor, "values"):
            np.testing.assert_array_equal(np.asarray(resumed.tensor_map()[name].values), np.asarray(tensor.values))


def test_training_is_deterministic(demo: Model) -> None:
    pruned = StructuredPruningPass(ratio=0.5)(demo.copy()).model
    data = lambda: digits("train", limit=128).batches()  # noqa: E731
    a, _ = train_distill(pruned, demo, data, DistillOptions(epochs=1), seed=3)
    b, _ = train_distill(pruned, demo, data, DistillOptions(epochs=1), seed=3)
    for name, tensor in a.tensor_map().items():
        if hasattr(tensor, "values"):
            np.testing.assert_array_equal(np.asarray(b.tensor_map()[name].values), np.asarray(tensor.values))


def _ddp_worker(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = Model.load(model_path)
        pruned = StructuredPruningPass(ratio=0.5)(model.copy()).model
        trained, stats = train_distill(pruned, model, lambda: digits("train", limit=512).batches(),
                                       DistillOptions(epochs=2, learning_rate=0.002), seed=0)
        trained.save(Path(out) / f"rank{rank}.onnx")
        np.save(Path(out) / f"loss{rank}.npy", np.array(stats["loss_per_epoch"] + [stats["world_size"]]))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_on_cpu_with_gloo(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(DEMO_MODEL), str(tmp_path)), nprocs=2, join=True)
    a, b = Model.load(tmp_path / "rank0.onnx"), Model.load(tmp_path / "rank1.onnx")
    for name, tensor in a.tensor_map().items():
        if hasattr(tensor, "values"):  # DDP keeps the replicas identical
            np.testing.assert_array_equal(np.asarray(b.tensor_map()[name].values), np.asarray(tensor.values))
    loss = np.load(tmp_path / "loss0.npy")
    assert loss[-1] == 2 and loss[1] < loss[0]  # world size 2, and it learns


def test_torchrun_build_trains_with_ddp_and_rank0_publishes(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m optcc.cli build` works as is, with gloo on CPU."""
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {DEMO_MODEL}\n"
        "target: {backend: onnxruntime, threads: 1, runs: 2, warmup: 0}\n"
        "data:\n  training: {source: digits, split: train, batch_size: 64}\n"
        "  calibration: {source: digits, split: train, batch_size: 64, limit: 512}\n"
        "  evaluation: {source: digits, split: test, batch_size: 397}\n"
        "passes:\n  - prune-channels: {ratio: 0.5}\n  - recalibrate-batchnorm\n"
        "  - distill: {epochs: 3}\noutput: out\n"
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "optcc.cli",
         "build", str(recipe), "--json"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stats = report["passes"][2]["stats"]
    assert stats["world_size"] == 2
    assert report["final"]["metric"]["accuracy"] > 0.9
    # rank 0 alone published; the cache emptied by the finished distillation is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]
