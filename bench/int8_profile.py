"""Where the time goes: ONNX Runtime's profiler per op type, fp32 against INT8 encoders.

Run after ``bench/int8.py minilm`` (it profiles the models that run wrote):

    flock /tmp/optcc-cpu.lock python bench/int8_profile.py

For the real all-MiniLM-L6-v2 as fp32, ONNX Runtime's encoder recipe (transformer
optimizer + dynamic INT8) and optcc's default INT8, at batch 1 and 8, 32 and 128 tokens,
1 thread: each op type's kernel time per run (the median over 30 profiled runs), the total
of kernel times, the run's CPU time and the number of nodes ONNX Runtime executes. The
difference between run time and kernel time is the runtime's own overhead per node.
Results go to bench/results/int8_profile.json and a table is printed.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402

MODELS = {
    "fp32": models.CACHE / "minilm.onnx",
    "ORT optimizer + dynamic": models.CACHE / "int8" / "minilm-ort-optimizer-dynamic.onnx",
    "optcc default": models.CACHE / "int8" / "minilm-optcc-default.onnx",
}
SHAPES = [(1, 32), (1, 128), (8, 32), (8, 128)]
RUNS = 30


def feeds(batch: int, length: int) -> dict[str, np.ndarray]:
    with np.load(models.CACHE / "sentences.npz") as d:
        ids = np.resize(d["input_ids"][256:256 + batch, :length], (batch, length))
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64),
            "token_type_ids": np.zeros_like(ids, dtype=np.int64)}


def profile(path: Path, batch: int, length: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = feeds(batch, length)
    for _ in range(5):
        session.run(None, x)
    cpu = []
    for _ in range(RUNS):
        start = time.thread_time()
        session.run(None, x)
        cpu.append(time.thread_time() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    run = -1
    nodes = 0
    for e in events:
        if e.get("cat") == "Session" and e["name"] == "model_run":
            run += 1
        elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_run[e["args"]["op_name"]][run] += e["dur"] / 1e3
            nodes += run == 5
    ops = {op: float(np.median([runs.get(i, 0.0) for i in range(5, 5 + RUNS)]))
           for op, runs in per_run.items()}
    return {"cpu_ms": float(np.median(cpu)) * 1e3, "kernel_ms": sum(ops.values()),
            "nodes": nodes, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    missing = [str(p) for p in MODELS.values() if not p.exists()]
    if missing:
        sys.exit(f"run 'python bench/int8.py minilm' first (missing: {', '.join(missing)})")
    results = {name: {f"{b}x{n}": profile(path, b, n) for b, n in SHAPES}
               for name, path in MODELS.items()}
    models.save_results("int8_profile", [results])
    for b, n in SHAPES:
        key = f"{b}x{n}"
        print(f"\n**batch {b} × {n} tokens, 1 thread** (ms per run)\n")
        print("| model | run (CPU) | kernels | nodes | largest op types (kernel ms) |")
        print("|---|---|---|---|---|")
        for name, per_shape in results.items():
            r = per_shape[key]
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(r["ops"].items())[:6])
            print(f"| {name} | {r['cpu_ms']:.2f} | {r['kernel_ms']:.2f} | {r['nodes']} | {top} |")


if __name__ == "__main__":
    main()
