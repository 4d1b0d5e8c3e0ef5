"""GPU benchmark of optcc's 2:4 sparse kernels against cuBLAS and cuSPARSELt, in one run.

    python bench/kernels.py --out DIR            # on a GPU machine (bench/gpu.sh runs it)
    python bench/kernels.py --dry-run            # anywhere: list what would be measured

Measured, each with CUDA events (warm-up, then the median and p90 of timed runs, same
operands for every method, methods interleaved per shape):

Each GEMM timing puts CUDA events around 10 back-to-back calls, so it measures the GPU,
not the host's launch overhead (which optcc's launch cache and torch keep to microseconds).

1. **GEMMs** at the shapes of real layers: BERT-base and BERT-large (4096 tokens: batch 32
   x 128), ResNet-50's 1x1 and 3x3 (as implicit GEMM, K = 9 x C_in) convolutions at batch
   32, and 4096^3; float16 and INT8. Methods: optcc (the fastest of its tile
   configurations, what the tuner keeps), dense ``torch.matmul`` (cuBLAS; ``torch._int_mm``
   for INT8), and torch's semi-structured sparse tensors (``to_sparse_semi_structured``:
   cuSPARSELt, and torch's own CUTLASS kernels) where this torch build has them.
2. **Fused epilogue**: bias + GELU fused into optcc's kernel, against optcc without
   epilogue plus torch ops, cuSPARSELt with bias plus GELU, and cuBLAS ``addmm`` plus GELU.
3. **End to end**: the real all-MiniLM-L6-v2 encoder made 2:4 (prepared by
   ``bench/gpu_models.py``) and a ResNet-50-shaped CNN (random weights, 1x1 convolutions
   2:4), dense vs sparse through optcc's ``cuda`` backend.

Writes ``kernels.json`` (every number) and ``kernels.md`` (the tables) into ``--out``.
Shapes follow ``D[N, M] = X[N, K] W[M, K]^T``: M output channels, K input channels, N tokens
(or pixels). Ratios are speed-ups (>1: optcc faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKENS = 32 * 128
GEMM_SHAPES: list[tuple[str, int, int, int]] = [  # (label, M, K, N)
    ("bert-base attention proj", 768, 768, TOKENS),
    ("bert-base ffn up", 3072, 768, TOKENS),
    ("bert-base ffn down", 768, 3072, TOKENS),
    ("bert-large attention proj", 1024, 1024, TOKENS),
    ("bert-large ffn up", 4096, 1024, TOKENS),
    ("bert-large ffn down", 1024, 4096, TOKENS),
    ("resnet50 conv2 1x1 reduce", 64, 256, 32 * 56 * 56),
    ("resnet50 conv2 1x1 expand", 256, 64, 32 * 56 * 56),
    ("resnet50 conv2 3x3", 64, 576, 32 * 56 * 56),
    ("resnet50 conv3 1x1 expand", 512, 128, 32 * 28 * 28),
    ("resnet50 conv3 3x3", 128, 1152, 32 * 28 * 28),
    ("resnet50 conv4 1x1 reduce", 256, 1024, 32 * 14 * 14),
    ("resnet50 conv4 3x3", 256, 2304, 32 * 14 * 14),
    ("resnet50 conv5 1x1 expand", 2048, 512, 32 * 7 * 7),
    ("resnet50 conv5 3x3", 512, 4608, 32 * 7 * 7),
    ("square 4096", 4096, 4096, 4096),
]
EPILOGUE_SHAPES = [("bert-base ffn up + GELU", 3072, 768, TOKENS),
                   ("bert-large ffn up + GELU", 4096, 1024, TOKENS)]


# ----------------------------------------------------------------------------- timing
def time_cuda(fn: Any, *, warmup: int = 5, runs: int = 30, inner: int = 10) -> dict[str, float]:
    """Median and p90 ms of one call of ``fn``: CUDA events around ``inner`` back-to-back
    calls (so the GPU, not the host's launch overhead, sets the pace), ``runs`` times,
    after ``warmup`` untimed rounds."""
    from optcc.backends.cuda import cuda_event_times

    def repeated() -> None:
        for _ in range(inner):
            fn()

    times = [t / inner for t in cuda_event_times(repeated, warmup=warmup, runs=runs)]
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90))}


def _attempt(results: dict[str, Any], name: str, make: Any, **timing: int) -> None:
    """Time ``make()`` (which returns the callable to time); record the error if it fails."""
    try:
        fn = make()
        results[name] = time_cuda(fn, **timing)
    except Exception as exc:  # noqa: BLE001  (a peer missing from this torch build)
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}


# ----------------------------------------------------------------------------- operands
def sparse_weight(m: int, k: int, dtype: Any, seed: int) -> Any:
    """A random [M, K] weight made 2:4 by magnitude (two largest of every 4 along K)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int16).float()
    else:
        w = torch.randn(m, k, generator=gen)
    groups = w.reshape(m, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return torch.where(keep, groups, torch.zeros_like(groups)).reshape(m, k).to(dtype)


class OptccGemm:
    """One sparse GEMM through liboptcc_kernels.so with preallocated operands."""

    def __init__(self, library: Any, weight: Any, x: Any, out_dtype: Any, arch: int,
                 bias: Any = None, activation: str = "none", alpha: Any = None) -> None:
        import torch

        from optcc.kernels import ACTIVATIONS, DTYPE_CODES
        from optcc.sparse.packing import pack

        m, k = weight.shape
        fmt = "sm90" if arch == 90 else "sm80"
        if weight.dtype == torch.int8:
            packed = pack(weight.numpy(), fmt)
            values = torch.from_numpy(packed.values)
        else:
            packed = pack(weight.view(torch.int16).numpy().view(np.float16), fmt)
            values = torch.from_numpy(packed.values.view(np.int16)).view(weight.dtype)
        self.values = values.cuda()
        self.meta = torch.from_numpy(packed.meta.reshape(-1).view(np.uint8)).cuda()
        self.x = x
        self.out = torch.empty(x.shape[0], m, dtype=out_dtype, device="cuda")
        self.library = library
        self.keep = [t for t in (bias, alpha) if t is not None]
        args = library.new_args()
        args.m, args.n, args.k, args.arch = m, x.shape[0], k, arch
        args.ab_dtype = DTYPE_CODES[str(weight.dtype).replace("torch.", "")]
        args.d_dtype = DTYPE_CODES[str(out_dtype).replace("torch.", "")]
        args.a_values, args.a_meta = self.values.data_ptr(), self.meta.data_ptr()
        args.b, args.d = x.data_ptr(), self.out.data_ptr()
        if bias is not None:
            args.bias = bias.data_ptr()
        if alpha is not None:
            args.alpha = alpha.data_ptr()
        args.activation = ACTIVATIONS[activation]
        self.args = args
        self.names = library.configs(arch, str(weight.dtype).replace("torch.", ""),
                                     str(out_dtype).replace("torch.", ""))
        self.stream = torch.cuda.current_stream().cuda_stream

    def run(self, config: int) -> Any:
        self.args.config = config
        self.library.gemm(self.args, self.stream)
        return self.out

    def best(self, **timing: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Time every configuration that accepts the shape; return the fastest and all."""
        per_config: dict[str, Any] = {}
        for index, name in enumerate(self.names):
            self.args.config = index
            reason = self.library.check(self.args)
            if reason:
                per_config[name] = {"error": reason}
                continue
            per_config[name] = time_cuda(lambda i=index: self.run(i), **timing)
        timed = {n: r for n, r in per_config.items() if "median_ms" in r}
        if not timed:
            raise RuntimeError(f"no configuration ran: {per_config}")
        best = min(timed, key=lambda n: timed[n]["median_ms"])
        return {**timed[best], "config": best}, per_config


# ----------------------------------------------------------------------------- benches
def bench_gemm(library: Any, arch: int, label: str, m: int, k: int, n: int, dtype_name: str,
               seed: int, timing: dict[str, int]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    weight = sparse_weight(m, k, dtype, seed)
    if dtype == torch.int8:
        x = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    else:
        x = torch.randn(n, k, device="cuda").to(dtype)
    w_dev = weight.cuda()
    row: dict[str, Any] = {"shape": label, "M": m, "K": k, "N": n, "dtype": dtype_name,
                           "methods": {}}
    methods = row["methods"]
    out_dtype = torch.float16 if dtype == torch.int8 else dtype
    alpha = torch.full((m,), 1e-3, device="cuda") if dtype == torch.int8 else None

    def ours() -> Any:
        gemm = OptccGemm(library, weight, x, out_dtype, arch, alpha=alpha)
        best, per_config = gemm.best(**timing)
        row["optcc_configs"] = per_config
        return best

    try:
        methods["optcc"] = ours()
    except Exception as exc:  # noqa: BLE001
        methods["optcc"] = {"error": f"{type(exc).__name__}: {exc}"}
    if dtype == torch.int8:
        _attempt(methods, "cuBLAS dense (torch._int_mm)",
                 lambda: (lambda: torch._int_mm(x, w_dev.t())), **timing)
        _attempt(methods, "cuSPARSELt (torch._cslt_sparse_mm)",
                 lambda: _cslt(torch, w_dev, x, torch.int32), **timing)
    else:
        _attempt(methods, "cuBLAS dense (torch.matmul)",
                 lambda: (lambda: torch.matmul(x, w_dev.t())), **timing)
        _attempt(methods, "cuSPARSELt (to_sparse_semi_structured)",
                 lambda: _semi_structured(torch, F, w_dev, x, cutlass=False), **timing)
        _attempt(methods, "torch CUTLASS (to_sparse_semi_structured)",
                 lambda: _semi_structured(torch, F, w_dev, x, cutlass=True), **timing)
    return row


def _semi_structured(torch: Any, F: Any, weight: Any, x: Any, *, cutlass: bool, bias: Any = None
                     ) -> Any:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        sparse = to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
    F.linear(x, sparse, bias)  # fail here, not inside the timing loop
    return lambda: F.linear(x, sparse, bias)


def _cslt(torch: Any, weight: Any, x: Any, out_dtype: Any) -> Any:
    compressed = torch._cslt_compress(weight)
    torch._cslt_sparse_mm(compressed, x.t(), out_dtype=out_dtype, transpose_result=True)
    return lambda: torch._cslt_sparse_mm(compressed, x.t(), out_dtype=out_dtype,
                                         transpose_result=True)


def bench_epilogue(library: Any, arch: int, label: str, m: int, k: int, n: int, seed: int,
                   timing: dict[str, int]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    weight = sparse_weight(m, k, torch.float16, seed)
    w_dev = weight.cuda()
    x = torch.randn(n, k, device="cuda").half()
    bias32 = torch.randn(m, device="cuda")
    bias16 = bias32.half()
    row: dict[str, Any] = {"shape": label, "M": m, "K": k, "N": n, "dtype": "float16",
                           "methods": {}}
    methods = row["methods"]

    def fused() -> Any:
        gemm = OptccGemm(library, weight, x, torch.float16, arch, bias=bias32, activation="gelu")
        best, _ = gemm.best(**timing)
        row["fused_config"] = best["config"]
        return best

    try:
        methods["optcc fused bias+GELU"] = fused()
    except Exception as exc:  # noqa: BLE001
        methods["optcc fused bias+GELU"] = {"error": f"{type(exc).__name__}: {exc}"}

    def unfused() -> Any:
        gemm = OptccGemm(library, weight, x, torch.float16, arch)
        config = gemm.names.index(row["fused_config"]) if "fused_config" in row else 0
        return lambda: F.gelu(gemm.run(config) + bias16)

    _attempt(methods, "optcc GEMM + torch bias, GELU", unfused, **timing)
    _attempt(methods, "cuSPARSELt linear(bias) + GELU",
             lambda: _then_gelu(F, _semi_structured(torch, F, w_dev, x, cutlass=False, bias=bias16)),
             **timing)
    _attempt(methods, "cuBLAS addmm + GELU",
             lambda: (lambda: F.gelu(torch.addmm(bias16, x, w_dev.t()))), **timing)
    return row


def _then_gelu(F: Any, linear: Any) -> Any:
    return lambda: F.gelu(linear())


def bench_end_to_end(models_dir: Path, timing: dict[str, int]) -> list[dict[str, Any]]:
    """Dense vs sparse latency of whole models through optcc's cuda backend."""
    import torch

    from bench.gpu_models import unpack_minilm
    from optcc import Model
    from optcc.backends.cuda import CudaOptions, CudaRunner

    rows = []
    cases = []
    minilm = unpack_minilm(models_dir) or models_dir / "minilm_2to4.onnx"
    if minilm.is_file():
        data = np.load(models_dir / "minilm_2to4_inputs.npz")
        reps = -(-32 // data["input_ids"].shape[0])
        feeds = {k: np.tile(data[k], (reps, 1))[:32] for k in data.files}
        cases.append(("all-MiniLM-L6-v2 2:4 (batch 32 x 128 tokens)", Model.load(minilm), feeds))
    else:
        rows.append({"model": "all-MiniLM-L6-v2", "error": f"{minilm} not prepared"})
    try:
        from bench.gpu_models import resnet50_style_model

        cases.append(("ResNet-50-style CNN, 1x1 convs 2:4 (batch 32 x 224)",
                      resnet50_style_model(), {"x": np.random.default_rng(0).standard_normal(
                          (32, 3, 224, 224)).astype(np.float32)}))
    except Exception as exc:  # noqa: BLE001
        rows.append({"model": "ResNet-50-style", "error": f"{type(exc).__name__}: {exc}"})
    for label, model, feeds in cases:
        row: dict[str, Any] = {"model": label}
        for name, sparse in (("dense (torch, cuBLAS/cuDNN)", False), ("sparse (optcc kernels)", True)):
            try:
                runner = CudaRunner(model, CudaOptions(sparse_kernels=sparse))
                row.setdefault("sparse_layers", len(runner.layers))
                times = runner.latency(feeds, warmup=timing["warmup"], runs=timing["runs"])
                row[name] = {"median_ms": statistics.median(times),
                             "p90_ms": float(np.percentile(times, 90))}
                del runner
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report
def _ms(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    return f"{entry['median_ms']:.4f}" if "median_ms" in entry else "n/a"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or "median_ms" not in a or "median_ms" not in b:
        return "–"
    return f"{b['median_ms'] / a['median_ms']:.2f}×"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"GPU: {result['device']} (driver {result.get('driver', '?')}), torch "
             f"{result['torch']}, CUDA {result['cuda']}, optcc kernels {result['kernels']}, "
             f"kernel family sm{result['arch']}; {result['date']}.", ""]
    lines += ["| shape | dtype | M | K | N | optcc ms (config) | cuBLAS ms | cuSPARSELt ms | "
              "torch CUTLASS ms | vs cuBLAS | vs cuSPARSELt |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["gemm"]:
        methods = row["methods"]
        ours = methods.get("optcc")
        dense = next((v for k, v in methods.items() if k.startswith("cuBLAS")), None)
        cslt = next((v for k, v in methods.items() if k.startswith("cuSPARSELt")), None)
        cutlass = methods.get("torch CUTLASS (to_sparse_semi_structured)")
        config = f" ({ours['config']})" if ours and "config" in ours else ""
        lines.append(f"| {row['shape']} | {row['dtype']} | {row['M']} | {row['K']} | {row['N']} | "
                     f"{_ms(ours)}{config} | {_ms(dense)} | {_ms(cslt)} | {_ms(cutlass)} | "
                     f"{_ratio(ours, dense)} | {_ratio(ours, cslt)} |")
    lines += ["", "| fused epilogue | " + " | ".join(
        ["optcc fused bias+GELU", "optcc GEMM + torch bias, GELU", "cuSPARSELt linear(bias) + GELU",
         "cuBLAS addmm + GELU"]) + " | fused vs cuSPARSELt+GELU |", "|---|---|---|---|---|---|"]
    for row in result["epilogue"]:
        m = row["methods"]
        lines.append(f"| {row['shape']} | " + " | ".join(_ms(m.get(k)) for k in (
            "optcc fused bias+GELU", "optcc GEMM + torch bias, GELU", "cuSPARSELt linear(bias) + GELU",
            "cuBLAS addmm + GELU")) + f" | {_ratio(m.get('optcc fused bias+GELU'), m.get('cuSPARSELt linear(bias) + GELU'))} |")
    lines += ["", "| model | sparse layers | dense ms (p90) | sparse ms (p90) | speed-up |",
              "|---|---|---|---|---|"]
    for row in result["end_to_end"]:
        dense, sparse = row.get("dense (torch, cuBLAS/cuDNN)"), row.get("sparse (optcc kernels)")
        if "error" in row:
            lines.append(f"| {row['model']} | – | {row['error']} | | |")
            continue
        fmt = lambda e: f"{_ms(e)} ({e['p90_ms']:.3f})" if e and "p90_ms" in e else _ms(e)  # noqa: E731
        lines.append(f"| {row['model']} | {row.get('sparse_layers', '–')} | {fmt(dense)} | "
                     f"{fmt(sparse)} | {_ratio(sparse, dense)} |")
    errors = [f"- {row['shape']} / {name}: {entry['error']}" for row in result["gemm"] + result["epilogue"]
              for name, entry in row["methods"].items() if "error" in entry]
    if errors:
        lines += ["", "Methods that did not run:", *errors]
    if result.get("skipped"):
        lines += ["", "Not measured (over the time budget): " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--models", type=Path, default=REPO / ".gpu",
                        help="folder with the prepared models (bench/gpu_models.py)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="stop starting new measurements after this many seconds")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        for label, m, k, n in GEMM_SHAPES:
            print(f"gemm {label}: M={m} K={k} N={n} float16, int8")
        for label, m, k, n in EPILOGUE_SHAPES:
            print(f"epilogue {label}: M={m} K={k} N={n}")
        packed = args.models / "minilm_2to4.onnx.xz"
        print(f"end to end: {packed} ({'present' if packed.is_file() else 'missing'}), "
              "ResNet-50-style CNN")
        return 0
    import torch

    from optcc.kernels import load

    started = time.monotonic()
    library = load()
    major, _ = torch.cuda.get_device_capability()
    arch = 90 if major == 9 else 80
    timing = {"warmup": 5, "runs": args.runs}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "arch": arch, "date": time.strftime("%Y-%m-%d"),
        "kernels": f"CUTLASS {library.build_info['cutlass']}, nvcc {library.build_info['nvcc']}",
        "gemm": [], "epilogue": [], "end_to_end": [], "skipped": [],
    }
    try:
        import subprocess

        result["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass

    def save() -> str:
        """Write what is measured so far: a run stopped by its time limit keeps its rows."""
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
        table = markdown(result)
        (args.out / "kernels.md").write_text(table)
        return table

    def over_budget(what: str) -> bool:
        if time.monotonic() - started > args.budget_s:
            result["skipped"].append(what)
            return True
        return False

    for seed, (label, m, k, n) in enumerate(GEMM_SHAPES):
        for dtype in ("float16", "int8"):
            if over_budget(f"gemm {label} {dtype}"):
                continue
            result["gemm"].append(bench_gemm(library, arch, label, m, k, n, dtype, seed, timing))
            print(f"[{time.monotonic() - started:6.1f}s] {label} {dtype}: "
                  f"{ {k2: _ms(v) for k2, v in result['gemm'][-1]['methods'].items()} }", flush=True)
            save()
    for seed, (label, m, k, n) in enumerate(EPILOGUE_SHAPES):
        if not over_budget(f"epilogue {label}"):
            result["epilogue"].append(bench_epilogue(library, arch, label, m, k, n, seed, timing))
            save()
    if not over_budget("end to end"):
        result["end_to_end"] = bench_end_to_end(args.models, {"warmup": 5, "runs": 20})
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
