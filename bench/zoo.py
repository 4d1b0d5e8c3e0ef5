"""Structured pruning across the model zoo (tests/zoo.py): what each architecture loses,
and what it gains on ONNX Runtime.

For every zoo model (small random-init Hugging Face configs, both exporters) three prunings
at ratio 0.5 (the pass's defaults otherwise: L2 importance, kept counts rounded to 8):

- ``prune``: channels, attention heads and FFN neurons; the hidden size stays;
- ``+hidden kept``: also the residual width (``hidden_size: true``), LayerNorm normalizing
  over the kept channels (the fused op stays);
- ``+hidden exact``: the same with ``norm_statistics: original`` (statistics over the
  original width, as in the zeroed original).

and two INT8 variants (``quantize-int8`` with its defaults: static, calibrated on 4 random
samples, ONNX Runtime's Q/DQ format): ``int8`` on the original and ``prune + int8`` after
``prune``. Both run through the pass manager, so they are verified and batch-checked as in
a build.

Reported per variant: what was pruned (units before -> after, summed per kind), parameters
and FLOPs per sample against the original, ONNX Runtime latency against the original (1
thread, round-robin, best of 3 rounds of 20-run medians), and the *deviation* from the
original with the same channels zeroed: ``||pruned - zeroed|| / ||zeroed||`` over the
outputs, and their centred cosine (0 and 1 mean exactly the zeroed original; the rest is
what normalizing over the kept channels changes). Random weights: the deviation says how far
the statistics move, not what accuracy a trained model keeps.

    python bench/zoo.py [NAME ...]      # writes bench/results/zoo.json and prints the table
    python bench/zoo.py --table         # the tables of the saved results (and the summary)

"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import models  # noqa: E402
import zoo  # noqa: E402
from conftest import run_pipeline  # noqa: E402

if TYPE_CHECKING:
    from optcc.ir import Model

OUT = models.CACHE / "zoo"
BATCH = 16
SIZES = {"sequence": 16}
VARIANTS = {
    "prune": {},
    "+hidden kept": {"hidden_size": True, "norm_statistics": "kept"},
    "+hidden exact": {"hidden_size": True, "norm_statistics": "original"},
}
INT8 = {"int8": "original", "prune + int8": "prune"}  # variant -> the model it quantizes


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).astype(np.float64)) / (np.linalg.norm(b.astype(np.float64)) + 1e-30))


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine of the outputs centred over the batch; None when they do not vary."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float((a * b).sum() / norms) if norms > 1e-20 else None


def pruned_units(groups: list[dict]) -> str:
    """'heads 8->4, neurons 256->128' (units summed per kind, only kinds that lost some)."""
    total: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for g in groups:
        if g["units_after"] < g["units_before"]:
            total[g["kind"]][0] += g["units_before"]
            total[g["kind"]][1] += g["units_after"]
    return ", ".join(f"{k} {b}->{a}" for k, (b, a) in sorted(total.items())) or "nothing"


def quantize(model: Model, feeds: dict, sizes: dict) -> tuple[Model, int]:
    """``quantize-int8`` (defaults) through the pass manager; the quantized model and
    the layers it reports quantized."""
    from optcc_plugins.int8 import Int8QuantizePass

    ctx, (record,) = run_pipeline(model, [Int8QuantizePass()], feeds, sizes)
    return ctx.stages["quantize-int8"], record["stats"].get("quantized_layers", 0)


def case(name: str, exporter: str) -> list[dict]:
    from optcc_plugins.pruning import StructuredPruningPass, zeroed_reference

    from optcc.ir import Model, model_stats
    from optcc.runtime import OrtRunner

    spec = zoo.spec(name)
    original_path = zoo.export(name, exporter, OUT)
    original = Model.load(original_path)
    feeds = spec.feeds(batch=BATCH, **{k: v for k, v in SIZES.items() if k in spec.sizes})
    base = model_stats(original)
    paths = {"original": original_path}
    rows = {"original": {"model": name, "exporter": exporter, "variant": "original",
                         "pruned": "", "params": base.params, "flops": base.flops,
                         "params_ratio": 1.0, "flops_ratio": 1.0, "bytes_ratio": 1.0,
                         "deviation": 0.0, "cosine": 1.0}}
    models_by_variant = {"original": original}
    references = {"original": original}
    sizes = {k: v for k, v in SIZES.items() if k in spec.sizes}

    def record(variant: str, model: Model, reference: Model, pruned: str) -> None:
        after = model_stats(model)
        paths[variant] = model.save(OUT / f"{name}-{exporter}-{variant.replace(' ', '_')}.onnx")
        models_by_variant[variant], references[variant] = model, reference
        out, ref = OrtRunner(model).run(feeds)[0], OrtRunner(reference).run(feeds)[0]
        rows[variant] = {
            "model": name, "exporter": exporter, "variant": variant, "pruned": pruned,
            "params": after.params, "flops": after.flops,
            "params_ratio": after.params / base.params,
            "flops_ratio": after.flops / base.flops if after.flops and base.flops else None,
            "bytes_ratio": after.weight_bytes / base.weight_bytes,
            "deviation": relative_error(out, ref), "cosine": centred_cosine(out, ref),
        }

    for variant, options in VARIANTS.items():
        pass_ = StructuredPruningPass(ratio=0.5, **options)
        result = pass_(original.copy())
        record(variant, result.model, zeroed_reference(original, pass_),
               pruned_units(result.stats.get("groups", [])) if result.modified else "nothing")
    for variant, source in INT8.items():
        quantized, layers = quantize(models_by_variant[source], feeds, sizes)
        record(variant, quantized, references[source], f"{rows[source]['pruned'] or 'nothing'}; "
               f"{layers} layers INT8")
    best: dict[str, float] = {}
    for _ in range(3):  # round-robin: every variant sees the same machine state
        for variant, path in paths.items():
            ms = models.median_latency(path, feeds, threads=1)
            best[variant] = min(best.get(variant, ms), ms)
    for variant, row in rows.items():
        row["ms_1_thread"] = best[variant]
        row["speedup"] = best["original"] / best[variant]
    return list(rows.values())


def table(rows: list[dict], exporter: str = "dynamo") -> str:
    lines = ["| model | variant | pruned (units before -> after) | params | FLOPs | weight bytes "
             "| ms (1 thread) | speed-up | deviation | cosine |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exporter"] != exporter:
            continue
        flops = f"{r['flops_ratio']:.2f}×" if r["flops_ratio"] is not None else "–"
        cosine = f"{r['cosine']:.4f}" if r["cosine"] is not None else "–"
        lines.append(f"| {r['model']} | {r['variant']} | {r['pruned'] or '–'} | {r['params_ratio']:.2f}× | "
                     f"{flops} | {r.get('bytes_ratio', 1.0):.2f}× | {r['ms_1_thread']:.2f} | "
                     f"{r['speedup']:.2f}× | {r['deviation']:.1e} | {cosine} |")
    return "\n".join(lines)


def summary(rows: list[dict], exporter: str = "dynamo") -> str:
    """One line per architecture, as bench/README.md shows it."""
    by = {(r["model"], r["variant"]): r for r in rows if r["exporter"] == exporter}
    lines = ["| architecture | pruned (ratio 0.5) | params | FLOPs | speed-up | + hidden size | params "
             "| speed-up `kept` | deviation `kept` | speed-up `original` | INT8: layers, weight bytes, "
             "speed-up, deviation | prune + INT8: weight bytes, speed-up |", "|---" * 12 + "|"]
    for name in zoo.NAMES:
        if (name, "original") not in by:
            continue
        p, kept, exact = by[name, "prune"], by[name, "+hidden kept"], by[name, "+hidden exact"]
        q, pq = by.get((name, "int8")), by.get((name, "prune + int8"))
        hidden = [u for u in kept["pruned"].split(", ") if u.startswith("hidden")]
        flops = f"{p['flops_ratio']:.2f}×" if p["flops_ratio"] is not None else "–"
        int8 = (f"{q['pruned'].split('; ')[-1].split()[0]}, {q['bytes_ratio']:.2f}×, {q['speedup']:.2f}×, "
                f"{q['deviation']:.3f}" if q else "")
        both = f"{pq['bytes_ratio']:.2f}×, {pq['speedup']:.2f}×" if pq else ""
        lines.append(
            f"| {name} | {p['pruned'].replace('->', '→')} | {p['params_ratio']:.2f}× | {flops} | "
            f"{p['speedup']:.2f}× | {', '.join(hidden).replace('->', '→') or '–'} | "
            f"{kept['params_ratio']:.2f}× | {kept['speedup']:.2f}× | {kept['deviation']:.2f} | "
            f"{exact['speedup']:.2f}× | {int8} | {both} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--table"]:  # print the tables of the saved results
        rows = json.loads((models.RESULTS / "zoo.json").read_text())
        for exporter in zoo.EXPORTERS:
            print(f"\n{exporter} export\n")
            print(table(rows, exporter))
            print(f"\n{exporter} export, one line per architecture\n")
            print(summary(rows, exporter))
        return
    names = sys.argv[1:] or list(zoo.NAMES)
    previous = models.RESULTS / "zoo.json"
    rows = []
    if sys.argv[1:] and previous.exists():  # a subset run replaces only its models' rows
        rows = [r for r in json.loads(previous.read_text()) if r["model"] not in names]
    for name in names:
        for exporter in zoo.EXPORTERS:
            print(f"{name} ({exporter})", file=sys.stderr, flush=True)
            rows += case(name, exporter)
    order = {n: i for i, n in enumerate(zoo.NAMES)}
    variants = ["original", *VARIANTS, *INT8]
    rows.sort(key=lambda r: (order[r["model"]], r["exporter"], variants.index(r["variant"])))
    models.save_results("zoo", rows)
    for exporter in zoo.EXPORTERS:
        print(f"\n{exporter} export\n")
        print(table(rows, exporter))


if __name__ == "__main__":
    main()
