"""INT8 post-training quantization: optcc against ONNX Runtime's tools and NNCF.

Same fp32 model, same calibration samples, same machine, same run. For each model and tool:
quantization wall time, peak memory of the process doing it, file size, ONNX Runtime CPU
latency (1 thread at batch 1 and 16/32/128 tokens for encoders, and all threads), and
quality: accuracy on the test split (CNNs); for the sentence encoder, the cosine between
mask-mean-pooled INT8 and fp32 sentence embeddings, the share of sentences whose nearest
neighbour is the same as with fp32, and the share whose nearest neighbour has the same topic.

Each quantization runs in its own subprocess, so peak memory is its own. Latency is timed
round robin: every model is timed in each round, the best round counts, so a burst of load
on a shared machine hits all of them alike. Run it alone, under the machine's lock:

    flock /tmp/optcc-cpu.lock python bench/int8.py              # every case
    flock /tmp/optcc-cpu.lock python bench/int8.py minilm       # one case

Cases: ``minilm`` (the real all-MiniLM-L6-v2), ``bert-base`` (a random-weight BERT-base-
sized encoder, for speed), ``demo`` and ``resnet`` (trained CNNs). Results go to
bench/results/int8.json (a run of some cases keeps the others' rows) and a table is printed.

NNCF runs from its own virtual environment, so its dependencies never touch optcc's:
``python3 -m venv /tmp/nncf && /tmp/nncf/bin/pip install torch==2.13.0 nncf onnx onnxruntime``,
then ``NNCF_PYTHON=/tmp/nncf/bin/python python bench/int8.py``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402

CALIBRATION_SAMPLES = 256
OUT = models.CACHE / "int8"
LENGTHS = (16, 32, 128)
# optcc's prune + distill recipe on the encoder (overridable for experiments).
PRUNE_RATIO = float(os.environ.get("PRUNE_RATIO", "0.5"))
DISTILL_EPOCHS = int(os.environ.get("DISTILL_EPOCHS", "3"))
DISTILL_LR = float(os.environ.get("DISTILL_LR", "0.0005"))
TRAIN_SENTENCES = int(os.environ.get("TRAIN_SENTENCES", "1024"))
TRAIN_TOKENS = 32
ENCODERS = {"minilm": (12, 384), "bert-base": (12, 768)}  # heads, hidden (ORT's optimizer)


def case_data(case: str) -> dict:
    """fp32 model path, calibration feeds, evaluation feeds, labels or topics, latency feeds."""
    if case in ("demo", "resnet"):
        data = models.digits(8 if case == "demo" else 16)
        if case == "demo":
            path = OUT / "demo_folded.onnx"
            if not path.exists():
                from optcc_plugins.lossless import FoldBatchNormPass

                from optcc.ir import Model

                OUT.mkdir(parents=True, exist_ok=True)
                FoldBatchNormPass()(Model.load(models.DIGITS.with_name("digits_cnn.onnx"))).model.save(path)
        else:
            path = models.resnet_style(models.CACHE / "resnet_style.onnx")
        train, test = data["train_index"], data["test_index"]
        images = data["images"]
        return {
            "model": path,
            "calibration": {"image": images[train][:CALIBRATION_SAMPLES]},
            "training": {"image": images[train]},
            "evaluation": {"image": images[test]},
            "labels": data["labels"][test],
            "latency": {"batch 1": {"image": images[test][:1]},
                        "batch 64": {"image": images[test][:64]}},
        }
    model_path, data_path = models.minilm(models.CACHE / "minilm.onnx", models.CACHE / "sentences.npz")
    if case == "bert-base":
        model_path = models.bert_base(models.CACHE / "bert_base.onnx")
    with np.load(data_path) as d:
        feeds = {k: d[k] for k in d.files if k != "topic"}
        topics = d["topic"]
    calibration = 32 if case == "bert-base" else 128  # ORT's static calibrator keeps everything
    return {
        "model": model_path,
        "calibration": {k: v[:calibration] for k, v in feeds.items()},
        "training": {k: np.concatenate([v[:256], v[512:]]) for k, v in feeds.items()},
        "evaluation": {k: v[256:512] for k, v in feeds.items()},
        "labels": None,
        "topics": topics[256:512],
        "latency": {f"batch 1 × {n}": _tokens(feeds, n) for n in LENGTHS},
    }


def _tokens(feeds: dict, length: int) -> dict:
    """One sentence at ``length`` tokens: its real tokens, repeated to fill (no padding)."""
    n = int(feeds["attention_mask"][256].sum())
    ids = np.resize(feeds["input_ids"][256][:n], length)[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}


# ---------------------------------------------------------------- workers (one per process)
def _batches(feeds: dict, size: int = 32):
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield {k: v[i : i + size] for k, v in feeds.items()}


def _npz_source(path: Path, arrays: dict, model, batch_size: int = 32):  # type: ignore[no-untyped-def]
    from optcc.data.builtin import NpzOptions, NpzSource
    from optcc.runtime import OrtRunner

    np.savez(path, **arrays)
    return NpzSource(NpzOptions(path=str(path), batch_size=batch_size), inputs=OrtRunner(model).input_specs)


def work_optcc(case: str, out: Path, method: str) -> None:
    """optcc's quantize-int8: ``default``, ``static``, ``dynamic-nosq`` (no SmoothQuant)."""
    from optcc_plugins.int8 import Int8QuantizePass

    from optcc.ir import Model
    from optcc.passes import Capability, PassContext

    data = case_data(case)
    model = Model.load(data["model"])
    source = _npz_source(out.with_suffix(".calib.npz"), data["calibration"], model)
    ctx = PassContext(data={"calibration": source},
                      capabilities=frozenset({Capability.CALIBRATION_DATA}))
    options = {"default": {}, "static": {"mode": "static"},
               "dynamic-nosq": {"mode": "dynamic", "smoothquant": "off"}}[method]
    start = time.perf_counter()
    result = Int8QuantizePass(calibration_cache=False, **options)(model, ctx)
    result.model.save(out)
    report(start, {"quantized_layers": result.stats.get("quantized_layers"),
                   "reason": result.reason})


def work_optcc_pipeline(case: str, out: Path, method: str) -> None:
    """optcc's recipe: prune heads and FFN neurons (half), distill against the original
    (trained models: every layer's output matched, 3 epochs of 1024 sentences), then
    quantize-int8 with its defaults."""
    from optcc.build import build

    data = case_data(case)
    folder = out.with_suffix("")
    shutil.rmtree(folder, ignore_errors=True)  # this script's own scratch folder
    folder.mkdir(parents=True)
    np.savez(folder / "calib.npz", **data["calibration"])
    tokens = TRAIN_TOKENS if case in ENCODERS else None  # sentences average ~23 tokens
    np.savez(folder / "train.npz", **{k: v[:TRAIN_SENTENCES, :tokens] if tokens else v
                                      for k, v in data["training"].items()})
    distill = ""
    if case == "minilm":  # random weights have nothing to distill back
        # Match every encoder layer's output to the original's (the hidden width is kept).
        layers = [f"/bert/encoder/layer.{i}/output/LayerNorm/LayerNormalization_output_0"
                  for i in range(5)] + ["last_hidden_state"]
        features = ", ".join(f"'{name}': '{name}'" for name in layers)
        distill = (f"  - distill: {{epochs: {DISTILL_EPOCHS}, learning_rate: {DISTILL_LR}, "
                   f"kd_weight: 0.0, feature_mse: {{{features}}}}}\n")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {data['model']}\n"
        "data:\n"
        f"  calibration: {{source: npz, path: {folder / 'calib.npz'}, batch_size: 32}}\n"
        f"  training: {{source: npz, path: {folder / 'train.npz'}, batch_size: 16}}\n"
        "evaluate: none\n"
        "passes:\n"
        f"  - prune-channels: {{ratio: {PRUNE_RATIO}}}\n"
        f"{distill}"
        "  - quantize-int8: {calibration_cache: false}\n"
        f"output: {folder / 'out'}\n"
    )
    start = time.perf_counter()
    result = build(recipe)
    os.replace(result.artifact, out)
    report(start, {"params": result.report["final"]["params"]})


def work_ort(case: str, out: Path, method: str) -> None:
    """ONNX Runtime's tools: ``optimizer`` (transformer fusions alone), ``optimizer-dynamic``
    (its encoder recipe), ``dynamic`` (quant_pre_process + quantize_dynamic), ``minmax``
    (quantize_static, QDQ, per channel, u8 activations and s8 weights, default op types)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    data = case_data(case)
    os.chdir(out.parent)  # ORT's tools write temporary files into the working directory
    start = time.perf_counter()
    if method in ("optimizer", "optimizer-dynamic"):
        from onnxruntime.transformers import optimizer

        heads, hidden = ENCODERS[case]
        optimized = optimizer.optimize_model(str(data["model"]), model_type="bert",
                                             num_heads=heads, hidden_size=hidden, opt_level=0)
        if method == "optimizer":
            optimized.save_model_to_file(str(out))
        else:
            staged = out.with_suffix(".optimized.onnx")
            optimized.save_model_to_file(str(staged))
            quantize_dynamic(str(staged), str(out), per_channel=True, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    elif method == "dynamic":
        from onnxruntime.quantization.shape_inference import quant_pre_process

        staged = out.with_suffix(".pre.onnx")
        quant_pre_process(str(data["model"]), str(staged), skip_symbolic_shape=True)
        quantize_dynamic(str(staged), str(out), per_channel=True, weight_type=QuantType.QInt8)
    else:
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = _batches(data["calibration"])

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.it, None)

        quantize_static(
            str(data["model"]), str(out), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    report(start)


def work_nncf(case: str, out: Path, method: str) -> None:
    """NNCF's ONNX post-training quantization (its own venv: NNCF_PYTHON); encoders use its
    transformer model type, which applies SmoothQuant."""
    import nncf
    import onnx

    data = case_data(case)
    model = onnx.load(str(data["model"]))
    dataset = nncf.Dataset(list(_batches(data["calibration"])))
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if case in ENCODERS else {}
    start = time.perf_counter()
    quantized = nncf.quantize(model, dataset, subset_size=CALIBRATION_SAMPLES, **kwargs)
    onnx.save(quantized, str(out))
    report(start)


def report(start: float, extra: dict | None = None) -> None:
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak, **(extra or {})}))


# ---------------------------------------------------------------- measurement
TOOLS = {
    "ORT optimizer": ("ort", "optimizer"),
    "ORT optimizer + dynamic": ("ort", "optimizer-dynamic"),
    "ORT dynamic": ("ort", "dynamic"),
    "ORT static": ("ort", "minmax"),
    "NNCF PTQ": ("nncf", "default"),
    "optcc default": ("optcc", "default"),
    "optcc static": ("optcc", "static"),
    "optcc dynamic, no SmoothQuant": ("optcc", "dynamic-nosq"),
    "optcc prune + distill + INT8": ("pipeline", "default"),
    "optcc prune + INT8": ("pipeline", "default"),
}
CASE_TOOLS = {
    "minilm": ["ORT optimizer", "ORT optimizer + dynamic", "ORT dynamic", "ORT static",
               "NNCF PTQ", "optcc default", "optcc static", "optcc dynamic, no SmoothQuant",
               "optcc prune + distill + INT8"],
    "bert-base": ["ORT optimizer", "ORT optimizer + dynamic", "ORT dynamic", "ORT static",
                  "NNCF PTQ", "optcc default", "optcc static", "optcc prune + INT8"],
    "demo": ["optcc default", "ORT static", "NNCF PTQ"],
    "resnet": ["optcc default", "ORT static", "NNCF PTQ"],
}
CASES = list(CASE_TOOLS)


def _embed(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (out * m).sum(1) / m.sum(1)


def quality(path: Path, data: dict, reference: np.ndarray | None) -> dict:
    from optcc.runtime import OrtRunner

    runner = OrtRunner(str(path))
    out = np.concatenate([runner.run(b)[0] for b in _batches(data["evaluation"], 64)])
    if data["labels"] is not None:
        return {"accuracy": float((out.argmax(1) == data["labels"]).mean())}
    assert reference is not None
    mask = data["evaluation"]["attention_mask"]
    emb, ref = _embed(out, mask), _embed(reference, mask)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))

    def neighbours(e: np.ndarray) -> np.ndarray:
        unit = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    nn, nn_ref = neighbours(emb), neighbours(ref)
    topics = data["topics"]
    return {"cosine": float(cos.mean()), "nn_agreement": float((nn == nn_ref).mean()),
            "topic_nn": float((topics[nn] == topics).mean()),
            "topic_nn_fp32": float((topics[nn_ref] == topics).mean())}


def _time(runner, feeds: dict, runs: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.thread_time()
        runner.run(feeds)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def latency(rows: list[dict], shapes: dict, rounds: int = 3) -> None:
    """Round robin over models, per shape and thread count; best round's median."""
    from optcc.runtime import OrtRunner

    for threads in (1, os.cpu_count() or 1):
        for label, feeds in shapes.items():
            if threads > 1 and label not in ("batch 1 × 32", "batch 64"):
                continue
            runners = [OrtRunner(r["path"], threads=threads) for r in rows]
            for r in runners:
                for _ in range(2):
                    r.run(feeds)
            start = time.perf_counter()
            runners[0].run(feeds)
            runs = int(min(30, max(5, 0.5 / max(time.perf_counter() - start, 1e-4))))
            best = [(float("inf"), float("inf"))] * len(rows)
            for _ in range(rounds):
                for i, runner in enumerate(runners):
                    wall, cpu = _time(runner, feeds, runs)
                    best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
            for row, (wall, cpu) in zip(rows, best, strict=True):
                row.setdefault("latency_ms", {})[f"{threads}t {label}"] = wall
                if threads == 1:
                    row.setdefault("cpu_ms", {})[f"1t {label}"] = cpu


def run_case(case: str) -> list[dict]:
    data = case_data(case)
    OUT.mkdir(parents=True, exist_ok=True)
    from optcc.runtime import OrtRunner

    reference = None
    if data["labels"] is None:
        ref_runner = OrtRunner(str(data["model"]))
        reference = np.concatenate([ref_runner.run(b)[0] for b in _batches(data["evaluation"], 64)])
    rows = [{"model": case, "tool": "fp32", "seconds": None, "peak_rss_mb": None,
             "path": str(data["model"])}]
    for tool in CASE_TOOLS[case]:
        kind, method = TOOLS[tool]
        out = OUT / f"{case}-{kind}-{method}.onnx"
        python = sys.executable
        if kind == "nncf":  # NNCF lives in its own environment (see the module docstring)
            python = os.environ.get("NNCF_PYTHON", "")
            if not python or not Path(python).exists():
                rows.append({"model": case, "tool": tool, "error": "skipped: set NNCF_PYTHON"})
                continue
        print(f"[{case}] {tool} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [python, __file__, "--worker", kind, case, str(out), method],
            capture_output=True, text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
            rows.append({"model": case, "tool": tool, "error": error})
            continue
        rows.append({"model": case, "tool": tool, **json.loads(line[7:]), "path": str(out)})
    measured = [r for r in rows if "error" not in r]
    for r in measured:
        r["quality"] = quality(Path(r["path"]), data, reference)
        r["megabytes"] = models.file_bytes(Path(r["path"])) / 1e6
    print(f"[{case}] timing {len(measured)} models", file=sys.stderr, flush=True)
    latency(measured, data["latency"])
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for case in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == case]
        fp32 = next((r for r in group if r["tool"] == "fp32" and "latency_ms" in r), None)
        if fp32 is None:
            continue
        shapes = list(fp32["latency_ms"])
        main = "1t batch 1 × 32" if "1t batch 1 × 32" in shapes else "1t batch 64"
        encoder = case in ENCODERS
        quality_cols = ["cosine", "same NN", "topic NN"] if case == "minilm" else (
            ["cosine (random weights)"] if encoder else ["accuracy"])
        header = ["tool", "quantize s", "peak RSS MB", "MB", *quality_cols,
                  *[f"ms {s}" for s in shapes], f"speed-up {main}", f"CPU-time speed-up {main}"]
        lines += [f"**{case}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in group:
            if "error" in r:
                lines.append(f"| {r['tool']} | failed: {r['error']} |" + " |" * (len(header) - 2))
                continue
            q = r["quality"]
            qcols = ([q["cosine"], q["nn_agreement"], q["topic_nn"]] if case == "minilm"
                     else [q["cosine"]] if encoder else [q["accuracy"]])
            fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
            cells = [r["tool"], fmt(r["seconds"], ".1f"), fmt(r["peak_rss_mb"], ".0f"),
                     f"{r['megabytes']:.3f}", *[f"{v:.4f}" for v in qcols],
                     *[f"{r['latency_ms'][s]:.2f}" for s in shapes],
                     f"{fp32['latency_ms'][main] / r['latency_ms'][main]:.2f}×",
                     f"{fp32['cpu_ms'][main] / r['cpu_ms'][main]:.2f}×"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, case, out, method = sys.argv[2:6]
        {"optcc": work_optcc, "ort": work_ort, "nncf": work_nncf,
         "pipeline": work_optcc_pipeline}[kind](case, Path(out), method)
        return
    cases = sys.argv[1:] or CASES
    rows = [row for case in cases for row in run_case(case)]
    previous = models.RESULTS / "int8.json"
    if previous.exists():  # a run of some models keeps the others' rows
        kept = [r for r in json.loads(previous.read_text()) if r["model"] not in cases
                and r["model"] in CASES]
        rows = sorted(kept + rows, key=lambda r: CASES.index(r["model"]))
    models.save_results("int8", rows)
    print(table(rows))


if __name__ == "__main__":
    main()
