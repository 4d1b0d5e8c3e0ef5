"""Structured pruning: optcc against Torch-Pruning at the same channel ratio.

optcc prunes the exported ONNX graph; Torch-Pruning (DepGraph) prunes the torch module,
which is then exported the same way. Both use group-summed L2 magnitude, ratio 0.5, kept
channels rounded to multiples of 8, and leave the classifier's outputs alone. Reported:
parameters and FLOPs per sample (optcc's counter on both ONNX files), ONNX Runtime latency
(1 thread, round-robin timing), accuracy right after pruning, and accuracy after the same
distillation fine-tune (optcc's `distill`, 6 epochs) for both.

    python bench/pruning.py        # writes bench/results/pruning.json and prints the table
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import models  # noqa: E402

OUT = models.CACHE / "pruning"
RATIO = 0.5


def latency(path: Path, feeds: dict, rounds: int = 3) -> float:
    """Best of ``rounds`` 20-run medians at 1 thread."""
    return min(models.median_latency(path, feeds, threads=1) for _ in range(rounds))


def prune_with_optcc(original: Path, out: Path) -> tuple[Path, float]:
    from optcc_plugins.pruning import StructuredPruningPass

    from optcc.ir import Model

    start = time.perf_counter()
    pruned = StructuredPruningPass(ratio=RATIO, round_to=8)(Model.load(original)).model
    seconds = time.perf_counter() - start
    return pruned.save(out), seconds


def accuracy(path_or_model, images: np.ndarray, labels: np.ndarray) -> float:
    from optcc.runtime import OrtRunner

    runner = OrtRunner(path_or_model if isinstance(path_or_model, str) else path_or_model)
    return float((runner.run({"image": images})[0].argmax(1) == labels).mean())


def finetune(model_path: Path, teacher_path: Path, data: dict, out: Path) -> Path:
    from optcc_plugins.distillation import DistillOptions, train_distill

    from optcc.data import Batch
    from optcc.ir import Model

    x, y = data["images"][data["train_index"]], data["labels"][data["train_index"]]

    def batches():
        for i in range(0, len(x), 64):
            yield Batch({"image": x[i:i + 64]}, y[i:i + 64])

    trained, _ = train_distill(Model.load(model_path), Model.load(teacher_path), batches,
                               DistillOptions(epochs=6, learning_rate=0.002), seed=0)
    return trained.save(out)


def resnet_case() -> list[dict]:
    import torch
    import torch_pruning as tp

    from optcc.ir import Model, model_stats

    data = models.digits(16)
    test_x, test_y = data["images"][data["test_index"]], data["labels"][data["test_index"]]
    net = models.resnet_style_module()
    original = models.export(net, OUT / "resnet_fp32.onnx", (torch.zeros(4, 1, 16, 16),))

    optcc_path, optcc_seconds = prune_with_optcc(original, OUT / "resnet_optcc.onnx")

    start = time.perf_counter()
    tp_net = copy.deepcopy(net)
    pruner = tp.pruner.MetaPruner(
        tp_net, torch.zeros(1, 1, 16, 16), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=RATIO, ignored_layers=[tp_net[-1]], round_to=8,
    )
    pruner.step()
    tp_seconds = time.perf_counter() - start
    tp_path = models.export(tp_net, OUT / "resnet_torch_pruning.onnx", (torch.zeros(4, 1, 16, 16),))

    feeds = {"image": test_x[:64]}
    rows = []
    for tool, path, seconds in (("fp32", original, None), ("optcc", optcc_path, optcc_seconds),
                                ("Torch-Pruning", tp_path, tp_seconds)):
        stats = model_stats(Model.load(path))
        row = {"model": "resnet-style", "tool": tool, "prune_s": seconds, "params": stats.params,
               "flops": stats.flops, "ms_1t": latency(path, feeds),
               "acc_oneshot": accuracy(str(path), test_x, test_y)}
        if tool != "fp32":
            tuned = finetune(path, original, data, OUT / f"resnet_{tool}_tuned.onnx")
            row["acc_finetuned"] = accuracy(str(tuned), test_x, test_y)
        else:
            row["acc_finetuned"] = row["acc_oneshot"]
        rows.append(row)
    return rows


def bert_case() -> list[dict]:
    import nets
    import torch
    import torch_pruning as tp

    from optcc.evaluate import centred_cosine
    from optcc.ir import Model, model_stats
    from optcc.runtime import OrtRunner

    torch.manual_seed(0)
    net = nets.BertStyle(vocab=1000, hidden=256, heads=8, ffn=1024).eval()
    ids = torch.randint(0, 1000, (8, 48))
    mask = torch.ones(8, 48, dtype=torch.long)
    names, outs = ("input_ids", "attention_mask"), ("hidden",)
    original = models.export(net, OUT / "bert_fp32.onnx", (ids, mask), names, outs)

    optcc_path, optcc_seconds = prune_with_optcc(original, OUT / "bert_optcc.onnx")

    start = time.perf_counter()
    tp_net = copy.deepcopy(net)
    heads = {}
    for layer in tp_net.layers:
        att = layer.attention
        for lin in (att.query, att.key, att.value):
            heads[lin] = att.heads
    pruner = tp.pruner.MetaPruner(
        tp_net, (ids[:1], mask[:1]), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=RATIO, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=RATIO, round_to=8,
    )
    pruner.step()
    for layer in tp_net.layers:  # Torch-Pruning leaves the module's own head count to us
        att = layer.attention
        att.heads = pruner.num_heads[att.query]
    tp_seconds = time.perf_counter() - start
    tp_path = models.export(tp_net, OUT / "bert_torch_pruning.onnx", (ids, mask), names, outs)

    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    reference = OrtRunner(str(original)).run(feeds)[0]
    rows = []
    for tool, path, seconds in (("fp32", original, None), ("optcc", optcc_path, optcc_seconds),
                                ("Torch-Pruning", tp_path, tp_seconds)):
        stats = model_stats(Model.load(path), {"input_ids": [1, 48], "attention_mask": [1, 48]})
        out = OrtRunner(str(path)).run(feeds)[0]
        agreement = float(centred_cosine(out, reference).mean()) if out.shape == reference.shape else None
        rows.append({"model": "bert-style (random)", "tool": tool, "prune_s": seconds,
                     "params": stats.params, "flops": stats.flops, "ms_1t": latency(path, feeds),
                     "acc_oneshot": agreement, "acc_finetuned": None,
                     "hidden": int(out.shape[-1])})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | prune s | params | FLOPs/sample | ms (1 thread) | speed-up | quality one-shot | after fine-tune |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if r["tool"] == "fp32":
            base[r["model"]] = r
        b = base[r["model"]]
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['tool']} | {fmt(r['prune_s'], '.2f')} | {r['params']:,} ({r['params'] / b['params']:.2f}×) | "
            f"{r['flops'] / 1e6:.1f} M ({r['flops'] / b['flops']:.2f}×) | {r['ms_1t']:.2f} | {b['ms_1t'] / r['ms_1t']:.2f}× | "
            f"{fmt(r['acc_oneshot'], '.4f')} | {fmt(r['acc_finetuned'], '.4f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = resnet_case() + bert_case()
    models.save_results("pruning", rows)
    print(table(rows))


if __name__ == "__main__":
    main()
