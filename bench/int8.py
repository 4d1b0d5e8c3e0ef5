"""INT8 post-training quantization: optcc against ONNX Runtime's quantization tool.

Same fp32 model, same calibration samples, same machine, same run. For each model and tool:
quantization wall time (calibration included), peak memory of the process doing it,
ONNX Runtime CPU latency at 1 and 2 threads, and accuracy (classifiers, test split) or
embedding agreement with fp32 (encoder: cosine of mask-mean-pooled sentence embeddings).

Each quantization runs in its own subprocess so peak memory is its own.

    python bench/int8.py            # all models; writes bench/results/int8.json and prints a table
    python bench/int8.py demo       # one model

NNCF runs from its own virtual environment, so its dependencies never touch optcc's:
``python3 -m venv /tmp/nncf && /tmp/nncf/bin/pip install torch==2.13.0 nncf onnx onnxruntime``,
then ``NNCF_PYTHON=/tmp/nncf/bin/python python bench/int8.py``.
"""

from __future__ import annotations

import json
import os
import resource
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


def case_data(case: str) -> dict:
    """fp32 model path, calibration feeds, evaluation feeds and labels, latency feeds."""
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
            "evaluation": {"image": images[test]},
            "labels": data["labels"][test],
            "latency": {"image": images[test][: 256 if case == "demo" else 64]},
        }
    model, data_path = models.minilm(models.CACHE / "minilm.onnx", models.CACHE / "sentences.npz")
    with np.load(data_path) as d:
        feeds = {k: d[k] for k in d.files}
    return {
        "model": model,
        "calibration": {k: v[:128] for k, v in feeds.items()},
        "evaluation": {k: v[256:] for k, v in feeds.items()},
        "labels": None,
        "latency": {k: v[256:272] for k, v in feeds.items()},
    }


# ---------------------------------------------------------------- workers (one per process)
def _batches(feeds: dict, size: int = 32):
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        yield {k: v[i : i + size] for k, v in feeds.items()}


def work_optcc(case: str, out: Path, method: str) -> None:
    from optcc_plugins.int8 import Int8QuantizePass

    from optcc.data.builtin import NpzOptions, NpzSource
    from optcc.ir import Model
    from optcc.passes import Capability, PassContext
    from optcc.runtime import OrtRunner

    data = case_data(case)
    np.savez(out.with_suffix(".calib.npz"), **data["calibration"])
    model = Model.load(data["model"])
    specs = OrtRunner(model).input_specs
    source = NpzSource(NpzOptions(path=str(out.with_suffix(".calib.npz")), batch_size=32), inputs=specs)
    ctx = PassContext(data={"calibration": source},
                      capabilities=frozenset({Capability.CALIBRATION_DATA}))
    start = time.perf_counter()
    if method == "dynamic":
        result = Int8QuantizePass(mode="dynamic")(model, ctx)
    else:
        result = Int8QuantizePass(method=method, calibration_cache=False)(model, ctx)
    result.model.save(out)
    report(start)


def work_ort(case: str, out: Path, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    data = case_data(case)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = _batches(data["calibration"])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    os.chdir(out.parent)  # ORT's tool writes temporary files into the working directory
    start = time.perf_counter()
    if method == "dynamic":
        quantize_dynamic(str(data["model"]), str(out), per_channel=True, weight_type=QuantType.QInt8)
    else:
        calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
        quantize_static(
            str(data["model"]), str(out), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=calib,
        )
    report(start)


def work_nncf(case: str, out: Path, method: str) -> None:
    """NNCF's ONNX post-training quantization (its own venv: NNCF_PYTHON)."""
    import nncf
    import onnx

    data = case_data(case)
    model = onnx.load(str(data["model"]))
    dataset = nncf.Dataset(list(_batches(data["calibration"])))
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if case == "minilm" else {}
    start = time.perf_counter()
    quantized = nncf.quantize(model, dataset, subset_size=CALIBRATION_SAMPLES, **kwargs)
    onnx.save(quantized, str(out))
    report(start)


def report(start: float) -> None:
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


# ---------------------------------------------------------------- measurement
TOOLS = {
    "optcc entropy": ("optcc", "entropy"),
    "optcc percentile": ("optcc", "percentile"),
    "optcc dynamic": ("optcc", "dynamic"),
    "ORT static MinMax": ("ort", "minmax"),
    "ORT static Entropy": ("ort", "entropy"),
    "ORT dynamic": ("ort", "dynamic"),
    "NNCF PTQ": ("nncf", "default"),
}
CASE_TOOLS = {
    "demo": ["optcc entropy", "optcc percentile", "ORT static MinMax", "ORT static Entropy", "NNCF PTQ"],
    "resnet": ["optcc entropy", "optcc percentile", "ORT static MinMax", "ORT static Entropy", "NNCF PTQ"],
    "minilm": ["optcc entropy", "optcc percentile", "optcc dynamic", "ORT static MinMax",
               "ORT static Entropy", "ORT dynamic", "NNCF PTQ"],
}


def quality(path: Path, data: dict, reference: np.ndarray | None) -> float:
    from optcc.runtime import OrtRunner

    runner = OrtRunner(str(path))
    outs = [runner.run(b)[0] for b in _batches(data["evaluation"], 64)]
    out = np.concatenate(outs)
    if data["labels"] is not None:
        return float((out.argmax(1) == data["labels"]).mean())
    mask = data["evaluation"]["attention_mask"][..., None].astype(np.float64)
    emb = (out * mask).sum(1) / mask.sum(1)
    ref = (reference * mask).sum(1) / mask.sum(1)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.mean())


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
        proc = subprocess.run(
            [python, __file__, "--worker", kind, case, str(out), method],
            capture_output=True, text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
            rows.append({"model": case, "tool": tool, "error": error})
            continue
        rows.append({"model": case, "tool": tool, **json.loads(line[7:]), "path": str(out)})
    measured = [r for r in rows if "error" not in r]
    for r in measured:
        r["quality"] = quality(Path(r["path"]), data, reference)
    # Round-robin timing: every model is timed in each round, so a burst of noise on the
    # shared machine hits all of them alike; each reports its best round's median.
    for threads in (1, 2):
        rounds: dict[str, list[float]] = {r["tool"]: [] for r in measured}
        for _ in range(3):
            for r in measured:
                rounds[r["tool"]].append(models.median_latency(Path(r["path"]), data["latency"], threads))
        for r in measured:
            r[f"ms_{threads}t"] = min(rounds[r["tool"]])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | quantize s | peak RSS MB | ms 1 thread | ms 2 threads | speed-up 1t | quality |",
             "|---|---|---|---|---|---|---|---|"]
    base: dict[str, float] = {}
    for r in rows:
        if r["tool"] == "fp32":
            base[r["model"]] = r["ms_1t"]
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['error']} | | | | | |")
            continue
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['tool']} | {fmt(r['seconds'], '.2f')} | {fmt(r['peak_rss_mb'], '.0f')} | "
            f"{r['ms_1t']:.2f} | {r['ms_2t']:.2f} | {base[r['model']] / r['ms_1t']:.2f}× | {r['quality']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, case, out, method = sys.argv[2:6]
        {"optcc": work_optcc, "ort": work_ort, "nncf": work_nncf}[kind](case, Path(out), method)
        return
    cases = sys.argv[1:] or ["demo", "resnet", "minilm"]
    rows = [row for case in cases for row in run_case(case)]
    previous = models.RESULTS / "int8.json"
    if previous.exists():  # a run of some models keeps the others' rows
        kept = [r for r in json.loads(previous.read_text()) if r["model"] not in cases]
        rows = sorted(kept + rows, key=lambda r: ["demo", "resnet", "minilm"].index(r["model"]))
    models.save_results("int8", rows)
    print(table(rows))


if __name__ == "__main__":
    main()
