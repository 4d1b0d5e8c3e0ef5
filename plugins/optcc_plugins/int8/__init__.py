"""INT8 post-training quantization with explicit Q/DQ (see calibrate.py and qdq.py)."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcc import (
    Capability,
    Model,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Tolerance,
    hookimpl,
    verify_model,
)

from .calibrate import Calibration, collect
from .qdq import (
    ACTIVATION_OPS,
    Layer,
    candidate_layers,
    quantize_dynamic,
    quantize_onnxruntime,
    quantize_tensorrt,
    tensors_to_calibrate,
    write_calibration_cache,
)

logger = logging.getLogger(__name__)


class Int8Options(PassOptions):
    mode: Literal["static", "dynamic"] = Field(
        "static",
        description="static: calibrated activation ranges (both targets). dynamic: weights "
        "INT8 ahead of time, activation ranges computed per batch at run time by ONNX Runtime "
        "(onnxruntime target only; needs no calibration data; best for encoders on CPU).",
    )
    method: Literal["max", "percentile", "entropy", "mse"] = Field(
        "entropy", description="Calibration method for activation ranges."
    )
    percentile: float = Field(
        99.99, gt=50.0, lt=100.0, description="Percentile of |x| kept (method: percentile)."
    )
    bins: int = Field(2048, ge=256, le=65536, description="Histogram bins per tensor.")
    format: Literal["auto", "tensorrt", "onnxruntime"] = Field(
        "auto",
        description="Q/DQ format: tensorrt (signed symmetric), onnxruntime (unsigned "
        "activations, fast on x86 CPUs), or auto (from the recipe's target).",
    )
    op_types: list[Literal["Conv", "Gemm", "MatMul"]] = Field(
        default_factory=lambda: ["Conv", "Gemm", "MatMul"],
        description="Weighted op types to quantize.",
    )
    activation_ops: list[Literal["Relu", "Clip", "Add", "GlobalAveragePool", "MaxPool", "AveragePool"]] = Field(
        default_factory=lambda: list(ACTIVATION_OPS),
        description="onnxruntime format: follow-on ops kept in INT8 where all their inputs are "
        "INT8 already (a residual Add of two quantized branches becomes QLinearAdd).",
    )
    quantized_outputs: list[Literal["Conv", "Gemm", "MatMul"]] = Field(
        default_factory=lambda: ["Conv"],
        description="onnxruntime format: layer types whose outputs are quantized too (Conv: "
        "needed for QLinearConv); MatMul/Gemm outputs stay float, which keeps encoders accurate.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Node-name or op-type patterns (fnmatch) kept in float."
    )
    min_channels: int | None = Field(
        None, ge=1,
        description="Layers with fewer input or output channels stay in float. Default: 16 for "
        "the tensorrt format (TensorRT runs tiny layers faster in float), 1 for onnxruntime "
        "(its INT8 kernels gain even on small layers).",
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Largest allowed metric drop (0.005 = 0.5 points) against the pass's input; "
        "the most sensitive layers are kept in float until it holds. Needs evaluation data.",
    )
    sensitivity: bool = Field(
        False, description="Rank every layer's sensitivity even without a budget."
    )
    calibration_cache: bool = Field(
        True, description="Also write a TensorRT-style calibration cache (calibration.cache)."
    )


def _primary(metric: dict[str, float]) -> tuple[str, float]:
    for key in ("accuracy", "agreement"):
        if key in metric:
            return key, float(metric[key])
    key = next(iter(metric))
    return key, float(metric[key])


class Int8QuantizePass(Pass):
    """Calibrate activation ranges on the calibration data and insert INT8 Q/DQ.

    The inputs of Conv, Gemm and MatMul-with-constant-weight layers are quantized
    (activations per tensor from calibration, weights per output channel); layers with
    fewer than ``min_channels`` channels, excluded names and MatMuls between two
    activations stay in float. The format follows the target (see qdq.py). With
    ``max_accuracy_drop``, each layer's sensitivity is its output error when it alone is
    quantized (relative MSE of the model's output on a calibration batch); the most
    sensitive layers go back to float, found by binary search on their count, until the
    metric drop is within the budget. The pass always returns the best model it found and
    says so when the budget cannot be met with any INT8 layer.
    """

    name = "quantize-int8"
    summary = "Calibrated INT8 post-training quantization with explicit Q/DQ nodes."
    Options = Int8Options
    requires = frozenset({Capability.CALIBRATION_DATA})
    tolerance = Tolerance.lossy()

    @classmethod
    def required_for(cls, options: Any) -> frozenset[Capability]:
        needs = set(cls.requires) if options.mode == "static" else set()
        if options.max_accuracy_drop is not None:
            needs.add(Capability.EVALUATION_DATA)
        return frozenset(needs)

    @classmethod
    def couples_samples(cls, options: Any) -> bool:
        # DynamicQuantizeLinear takes one scale over the whole batch.
        return bool(options.mode == "dynamic")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        fmt = opts.format
        if fmt == "auto":
            fmt = "tensorrt" if ctx.target == "tensorrt" else "onnxruntime"
        if model.opset < 13:
            return PassResult(model, False, reason=f"opset {model.opset} < 13: per-channel "
                              "Q/DQ needs opset 13 or newer; re-export the model")
        proto = verify_model(model)
        min_channels = opts.min_channels or (16 if fmt == "tensorrt" else 1)
        candidates = candidate_layers(model, opts.op_types, opts.exclude, min_channels)
        layers = [c for c in candidates if c.skip_reason is None]
        if not layers:
            return PassResult(model, False, {"layers": _layer_rows(candidates, [], {})},
                              reason="no layer qualifies for INT8")
        if opts.mode == "dynamic":
            if fmt == "tensorrt":
                raise ValueError(
                    "mode: dynamic is an ONNX Runtime feature; TensorRT needs static Q/DQ "
                    "(use mode: static, or format: onnxruntime)"
                )
            quantized = quantize_dynamic(model, proto, layers)
            for layer in candidates:
                quantized.meta.node(layer.name)["precision"] = (
                    {"dtype": "float32", "reason": layer.skip_reason} if layer.skip_reason
                    else {"dtype": "int8", "reason": "dynamic: weights INT8, activations per batch"}
                )
            return PassResult(quantized, True, {
                "format": fmt, "mode": "dynamic", "quantized_layers": len(layers),
                "layers": _layer_rows(candidates, [], {}),
            })
        start = time.perf_counter()
        calib = collect(
            proto, lambda: ctx.batches("calibration"), method=opts.method, bins=opts.bins,
            percentile=opts.percentile, progress=ctx.progress,
            tensors=tensors_to_calibrate(
                proto, layers, fmt, opts.activation_ops, opts.quantized_outputs
            ),
            unsigned=fmt == "onnxruntime",
        )
        calibration_seconds = time.perf_counter() - start

        def quantize(selected: list[Layer]) -> Model:
            if fmt == "tensorrt":
                return quantize_tensorrt(model.copy(), selected, calib)
            return quantize_onnxruntime(
                model, proto, selected, [], calib, opts.activation_ops, opts.quantized_outputs
            )

        stats: dict[str, Any] = {
            "format": fmt, "method": opts.method, "calibration_seconds": round(calibration_seconds, 3),
            "calibration_batches": calib.batches,
        }
        sensitivity: dict[str, float] = {}
        if opts.sensitivity or opts.max_accuracy_drop is not None:
            sensitivity = self._sensitivity(model, layers, quantize, ctx)
        kept_float: list[str] = []
        best = quantize(layers)
        if opts.max_accuracy_drop is not None:
            if ctx.evaluate is None:
                raise RuntimeError("max_accuracy_drop needs evaluation data")
            best, kept_float, budget_stats = self._meet_budget(
                model, layers, sensitivity, quantize, best, ctx, opts.max_accuracy_drop
            )
            stats.update(budget_stats)
        chosen = [layer for layer in layers if layer.name not in kept_float]
        if not chosen:
            stats["layers"] = _layer_rows(candidates, kept_float, sensitivity)
            return PassResult(model, False, stats, reason=stats.get("budget_message"))

        self._annotate(best, candidates, kept_float, sensitivity, calib, fmt)
        if opts.calibration_cache and ctx.output_dir is not None:
            cache = ctx.output_dir / "calibration.cache"
            write_calibration_cache(cache, calib, sorted({layer.activation for layer in chosen}))
        stats["quantized_layers"] = len(chosen)
        stats["layers"] = _layer_rows(candidates, kept_float, sensitivity)
        return PassResult(best, True, stats)

    def _sensitivity(
        self, model: Model, layers: list[Layer], quantize: Any, ctx: PassContext
    ) -> dict[str, float]:
        """Relative output MSE on one calibration batch with only that layer quantized."""
        from optcc import OrtRunner

        batch = next(iter(ctx.batches("calibration")))
        reference = OrtRunner(model).run(batch.inputs)[0].astype(np.float64)
        power = float(np.mean(reference**2)) or 1.0
        result = {}
        for layer in ctx.progress.track(layers, description="INT8 sensitivity", total=len(layers)):
            out = OrtRunner(quantize([layer])).run(batch.inputs)[0].astype(np.float64)
            result[layer.name] = float(np.mean((out - reference) ** 2) / power)
        return result

    def _meet_budget(
        self,
        model: Model,
        layers: list[Layer],
        sensitivity: dict[str, float],
        quantize: Any,
        full: Model,
        ctx: PassContext,
        budget: float,
    ) -> tuple[Model, list[str], dict[str, Any]]:
        assert ctx.evaluate is not None
        name, base = _primary(ctx.evaluate(model, "INT8 budget: float reference"))
        ranked = sorted(layers, key=lambda layer: sensitivity[layer.name], reverse=True)
        tried: dict[int, tuple[float, Model]] = {}

        def drop_with(k: int) -> float:
            if k not in tried:
                candidate = full if k == 0 else quantize(ranked[k:])
                _, value = _primary(ctx.evaluate(candidate, f"INT8 budget: {k} layer(s) in float"))
                tried[k] = (base - value, candidate)
            return tried[k][0]

        stats: dict[str, Any] = {"metric": name, "metric_float": base, "budget": budget}
        if drop_with(0) <= budget:
            stats.update(metric_int8=base - tried[0][0], kept_float=0)
            return full, [], stats
        lo, hi = 1, len(ranked)  # find the smallest k whose drop is within the budget
        while lo < hi:
            mid = (lo + hi) // 2
            if mid < len(ranked) and drop_with(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        k = lo
        if k >= len(ranked):
            best_k = min(tried, key=lambda i: tried[i][0])
            stats["budget_message"] = (
                f"no INT8 configuration keeps the {name} drop within {budget:g}: the best, with "
                f"{best_k} layer(s) in float, dropped {tried[best_k][0]:.4f}; the model stays in float"
            )
            stats.update(kept_float=len(ranked), metric_int8=base)
            return model, [layer.name for layer in ranked], stats
        drop_with(k)
        stats.update(metric_int8=base - tried[k][0], kept_float=k, evaluations=len(tried))
        return tried[k][1], [layer.name for layer in ranked[:k]], stats

    @staticmethod
    def _annotate(
        model: Model,
        candidates: list[Layer],
        kept_float: list[str],
        sensitivity: dict[str, float],
        calib: Calibration,
        fmt: str,
    ) -> None:
        for layer in candidates:
            if layer.skip_reason:
                decision = {"dtype": "float32", "reason": layer.skip_reason}
            elif layer.name in kept_float:
                decision = {"dtype": "float32", "reason": "kept in float to meet the accuracy budget"}
            else:
                decision = {"dtype": "int8", "reason": f"calibrated ({calib.method}), {fmt} format"}
            if layer.name in sensitivity:
                decision["sensitivity"] = sensitivity[layer.name]
            model.meta.node(layer.name)["precision"] = decision
        for name, threshold in calib.thresholds.items():
            model.meta.tensor(name)["int8_range"] = list(calib.asymmetric_range(name)) + [threshold]


def _layer_rows(
    candidates: list[Layer], kept_float: list[str], sensitivity: dict[str, float]
) -> list[dict[str, Any]]:
    rows = []
    for layer in candidates:
        if layer.skip_reason:
            precision, reason = "float32", layer.skip_reason
        elif layer.name in kept_float:
            precision, reason = "float32", "kept in float to meet the accuracy budget"
        else:
            precision, reason = "int8", "quantized"
        rows.append({
            "name": layer.name, "op": layer.op, "precision": precision, "reason": reason,
            "sensitivity": sensitivity.get(layer.name),
        })
    return rows


@hookimpl
def optcc_passes() -> list[type[Pass]]:
    return [Int8QuantizePass]
