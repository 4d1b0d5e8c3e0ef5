"""INT8 post-training quantization with explicit Q/DQ, and the passes that prepare for it.

Passes (each documented on its class):

- ``quantize-int8``: calibrated INT8 for ONNX Runtime or TensorRT (calibrate.py, qdq.py);
- ``smooth-quant``: SmoothQuant on its own (smoothquant.py); ``quantize-int8`` runs it by
  default;
- ``fuse-attention``: exported attention → ONNX Runtime's MultiHeadAttention (attention.py);
  ``quantize-int8`` runs it by default on the ONNX Runtime target.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcc import (
    Capability,
    Model,
    OrtRunner,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Tolerance,
    hookimpl,
)

from .attention import fuse_attention
from .calibrate import Calibration, auto_thresholds, collect
from .embedding import quantize_embeddings
from .graph import (
    drop_intermediate_shapes,
    fold_weight_subgraphs,
    synthetic_feeds,
    tensor_ranks,
    typed_proto,
)
from .passes import FuseAttentionPass, SmoothQuantPass, run_smoothquant
from .probe import LayerProbe, auto_summary
from .qdq import (
    ACTIVATION_OPS,
    Layer,
    actual_precision,
    candidate_layers,
    gemm_to_matmul,
    quantize_dynamic,
    quantize_onnxruntime,
    quantize_tensorrt,
    tensors_to_calibrate,
    write_calibration_cache,
)
from .speed import compare, shapes_to_time

logger = logging.getLogger(__name__)

WEIGHTED = ("Conv", "Gemm", "MatMul")


class Int8Options(PassOptions):
    mode: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="auto: the fastest accurate choice per layer for the target — on ONNX "
        "Runtime, layers that read sequences (MatMul/Gemm on 3-D activations: transformers) "
        "use per-batch (dynamic) activation scales, convolutions and 2-D Gemm layers "
        "calibrated (static) ones; on TensorRT everything is static. static: calibrated "
        "activation ranges everywhere. dynamic: ONNX Runtime only; weights INT8 ahead of time, "
        "activation ranges computed per batch; convolutions stay float (ConvInteger is slower "
        "than float convolution on x86).",
    )
    method: Literal["auto", "max", "percentile", "entropy", "mse"] = Field(
        "auto",
        description="Calibration method for static activation ranges. auto: per tensor, the "
        "method whose quantized layer output is closest to the float one on calibration data, "
        "and never a worse model than any single method (checked on calibration data).",
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
    smoothquant: Literal["auto", "off"] | float = Field(
        "auto",
        description="SmoothQuant before quantizing MatMul/Gemm layers: auto searches the "
        "migration strength alpha per tensor on calibration data (and leaves a tensor alone "
        "where smoothing does not help); a number in [0, 1] uses that alpha everywhere; off.",
    )
    fuse_attention: bool = Field(
        True,
        description="onnxruntime format: fuse exported multi-head attention into ONNX Runtime's "
        "MultiHeadAttention kernel and pack the Q/K/V projections into one GEMM first "
        "(checked to change outputs only by rounding).",
    )
    embeddings: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Store large embedding tables (Gather on a constant) as INT8 with one scale "
        "per row. auto: on for the onnxruntime format.",
    )
    embedding_min_bytes: int = Field(
        65536, ge=1, description="Smallest float table (bytes) that embeddings quantize."
    )
    speed_check: bool = Field(
        True,
        description="onnxruntime: time float and INT8 at batch 1 (served shape and "
        "latency_lengths) and keep float what INT8 makes slower.",
    )
    min_speedup: float = Field(
        1.0, gt=0.0,
        description="speed_check: INT8 must be at least this many times faster than float at "
        "a served shape to be kept (1.0: merely not slower).",
    )
    latency_lengths: list[int] = Field(
        default_factory=lambda: [16, 32, 128],
        description="Sequence lengths at which the speed report times models that have a "
        "sequence axis.",
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


def _first_batch(ctx: PassContext, model: Model) -> dict[str, np.ndarray]:
    if "calibration" in ctx.data:
        return dict(next(iter(ctx.batches("calibration"))).inputs)
    return synthetic_feeds(model)


def _relative_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    num = den = 0.0
    for x, y in zip(a, b, strict=True):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        keep = np.isfinite(y64)
        num += float(np.sum((x64[keep] - y64[keep]) ** 2))
        den += float(np.sum(y64[keep] ** 2))
    return num / den if den else num


@dataclass
class _State:
    """The pass's working copy and what it decided so far."""

    work: Model
    stats: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    candidates: list[Layer] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)


class _Quantizer:
    """``quantize(layers)``: a new model with ``layers`` INT8 (static ones with ``calib`` or
    the calibration given), every other layer float."""

    def __init__(self, work: Model, proto: Any, fmt: str, activation_ops: list[str],
                 quantized_outputs: list[str], static: list[Layer]) -> None:
        self.work, self.proto, self.fmt = work, proto, fmt
        self.activation_ops, self.quantized_outputs = activation_ops, quantized_outputs
        self.static = static
        self.calib: Calibration | None = None

    def __call__(self, selected: list[Layer], calibration: Calibration | None = None) -> Model:
        calibration = calibration or self.calib
        chosen = {layer.name for layer in selected}
        static = [layer for layer in self.static if layer.name in chosen]
        dynamic = [layer for layer in selected if layer.mode == "dynamic"]
        out = self.work
        if static:
            assert calibration is not None
            if self.fmt == "tensorrt":
                out = quantize_tensorrt(self.work.copy(), static, calibration)
            else:
                out = quantize_onnxruntime(self.work, self.proto, static, [], calibration,
                                           self.activation_ops, self.quantized_outputs)
        if dynamic:
            out = quantize_dynamic(out, dynamic)
        return out if out is not self.work else self.work.copy()


class Int8QuantizePass(Pass):
    """Calibrate activation ranges and quantize the weighted layers to INT8.

    The inputs of Conv, Gemm and MatMul-with-constant-weight layers are quantized (weights
    per output channel; activations per tensor, with calibrated or per-batch scales); layers
    with fewer than ``min_channels`` channels, excluded names and MatMuls between two
    activations stay in float. In order, on a private copy:

    1. constant subgraphs that compute a weight (``Transpose(W)`` in raw exports) are folded;
    2. onnxruntime: attention blocks are fused (attention.py), verified against the input,
       and embedding tables become INT8 per row (embedding.py);
    3. SmoothQuant migrates activation outliers into the weights (smoothquant.py);
    4. each layer gets per-batch (dynamic) or calibrated (static) activation scales
       (``mode``); static layers are calibrated (calibrate.py; ``auto`` picks the range per
       tensor by its layer's output error, then checks the whole model against every single
       method) and Q/DQ is written in the target's format (qdq.py);
    5. onnxruntime: float and INT8 are timed, and INT8 that is not faster is not shipped.

    With ``max_accuracy_drop``, each layer's sensitivity is its output error when it alone is
    quantized (relative MSE on a calibration batch); the most sensitive layers go back to
    float, found by binary search on their count, until the metric drop is within the
    budget. The report is read back from the model written, never from intentions.
    """

    name = "quantize-int8"
    summary = "Calibrated INT8 post-training quantization with explicit Q/DQ nodes."
    Options = Int8Options
    requires = frozenset({Capability.CALIBRATION_DATA})
    tolerance = Tolerance.lossy()

    @classmethod
    def required_for(cls, options: Any) -> frozenset[Capability]:
        needs = set(cls.requires) if options.mode != "dynamic" else set()
        if options.max_accuracy_drop is not None:
            needs.add(Capability.EVALUATION_DATA)
        return frozenset(needs)

    @classmethod
    def couples_samples(cls, options: Any) -> bool:
        # DynamicQuantizeLinear takes one scale over the whole batch; mode auto gives layers
        # on sequences dynamic scales on ONNX Runtime (any format but an explicit tensorrt).
        return bool(options.mode == "dynamic"
                    or (options.mode == "auto" and options.format != "tensorrt"))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        fmt = opts.format
        if fmt == "auto":
            fmt = "tensorrt" if ctx.target == "tensorrt" else "onnxruntime"
        if model.opset < 13:
            return PassResult(model, False, reason=f"opset {model.opset} < 13: per-channel "
                              "Q/DQ needs opset 13 or newer; re-export the model")
        if opts.mode == "dynamic" and fmt == "tensorrt":
            raise ValueError(
                "mode: dynamic is an ONNX Runtime feature; TensorRT needs static Q/DQ "
                "(use mode: static, or format: onnxruntime)"
            )
        state = self._prepare(model, ctx, fmt)
        if not state.layers:
            state.stats["layers"] = _rows(state.candidates, {}, {}, {})
            return PassResult(model, False, state.stats,
                              reason=_nothing_qualifies(state.candidates))
        quantize = self._quantizer(state, fmt, ctx)
        sensitivity: dict[str, float] = {}
        if opts.sensitivity or opts.max_accuracy_drop is not None:
            sensitivity = self._sensitivity(state.work, state.layers, quantize, ctx)
        kept_float: list[str] = []
        best = quantize(state.layers)
        if opts.max_accuracy_drop is not None:
            if ctx.evaluate is None:
                raise RuntimeError("max_accuracy_drop needs evaluation data")
            best, kept_float, budget_stats = self._meet_budget(
                state.work, state.layers, sensitivity, quantize, best, ctx, opts.max_accuracy_drop
            )
            state.stats.update(budget_stats)
        chosen = [layer for layer in state.layers if layer.name not in kept_float]
        reasons = {name: "kept in float to meet the accuracy budget" for name in kept_float}
        if chosen and fmt == "onnxruntime" and opts.speed_check:
            best, chosen, timing = self._check_speed(model, best, chosen, quantize, ctx,
                                                     reasons, state.notes)
            state.stats["latency"] = timing
        return self._finish(model, best, chosen, state, quantize.calib, reasons, sensitivity,
                            ctx, fmt)

    def _prepare(self, model: Model, ctx: PassContext, fmt: str) -> _State:
        """Steps 1–3 on a copy: fold weight subgraphs, fuse attention, INT8 embeddings,
        choose the layers and their scales, SmoothQuant."""
        opts: Any = self.options
        state = _State(work=model.copy(), stats={"format": fmt, "mode": opts.mode})
        work = state.work
        folded, unfolded = fold_weight_subgraphs(work, tuple(opts.op_types))
        if folded:
            state.stats["folded_weights"] = folded
        if fmt == "onnxruntime" and opts.fuse_attention:
            attention = self._fuse(work, model, ctx, state.notes)
            if attention["fused"] or attention["skipped"]:
                state.stats["attention"] = attention
        if opts.embeddings == "on" or (opts.embeddings == "auto" and fmt == "onnxruntime"):
            # First: calibration and every later check then see the tables as shipped.
            tables = quantize_embeddings(work, opts.embedding_min_bytes)
            if tables:
                state.stats["embeddings"] = [t.to_dict() for t in tables]
        min_channels = opts.min_channels or (16 if fmt == "tensorrt" else 1)

        def choose_layers() -> None:
            state.candidates = candidate_layers(work, opts.op_types, opts.exclude, min_channels,
                                                unfolded)
            self._assign_modes(work, state.candidates, fmt, opts.mode)
            state.layers = [c for c in state.candidates if c.skip_reason is None]

        choose_layers()
        gemms = {c.name for c in state.candidates if c.op == "Gemm"}
        if gemms and any(layer.mode == "dynamic" for layer in state.layers):
            # ONNX Runtime's dynamic quantizer rewrites every Gemm as Transpose + MatMul,
            # static ones included; rewriting them first keeps names and constant weights.
            gemm_to_matmul(work, gemms)
            choose_layers()
        if state.layers and opts.smoothquant != "off":
            smoothing = self._smooth(work, state.layers, fmt, ctx, "calibration" in ctx.data,
                                     opts.smoothquant)
            if smoothing:
                state.stats["smoothquant"] = smoothing
                choose_layers()
        return state

    def _quantizer(self, state: _State, fmt: str, ctx: PassContext) -> _Quantizer:
        """Step 4: calibrate the static layers (auto: per tensor, then checked as a whole)."""
        opts: Any = self.options
        quantize = _Quantizer(state.work, typed_proto(state.work), fmt, opts.activation_ops,
                              opts.quantized_outputs,
                              [layer for layer in state.layers if layer.mode == "static"])
        if quantize.static:
            start = time.perf_counter()
            quantize.calib = self._calibrate(state.work, quantize.proto, quantize.static, fmt, ctx)
            state.stats.update(method=opts.method,
                               calibration_seconds=round(time.perf_counter() - start, 3),
                               calibration_batches=quantize.calib.batches)
            if quantize.calib.chosen:
                state.stats["methods_chosen"] = auto_summary(quantize.calib)
            if opts.method == "auto":
                quantize.calib = self._guard_auto(state.work, quantize.static, quantize.calib,
                                                  quantize, ctx, state.stats)
        return quantize

    def _finish(
        self, model: Model, best: Model, chosen: list[Layer], state: _State,
        calib: Calibration | None, reasons: dict[str, str], sensitivity: dict[str, float],
        ctx: PassContext, fmt: str,
    ) -> PassResult:
        """The written model, and a report read back from it."""
        opts: Any = self.options
        stats, notes = state.stats, state.notes
        if not chosen:
            stats["notes"] = notes
            stats["layers"] = _rows(state.candidates, {}, reasons, sensitivity)
            return PassResult(model, False, stats, reason=stats.get("budget_message")
                              or "; ".join(notes) or "no layer stays INT8")
        final = Model.from_proto(drop_intermediate_shapes(best.to_proto()), source=model.source)
        final.meta = best.meta
        actual = actual_precision(final, state.candidates)
        self._annotate(final, state.candidates, actual, reasons, sensitivity, calib, fmt)
        if calib is not None and opts.calibration_cache and ctx.output_dir is not None:
            cache = ctx.output_dir / "calibration.cache"
            used = sorted({layer.activation for layer in chosen if layer.mode == "static"})
            write_calibration_cache(cache, calib, [t for t in used if t in calib.thresholds])
        stats["quantized_layers"] = sum(p != "float32" for p in actual.values())
        stats["layers"] = _rows(state.candidates, actual, reasons, sensitivity)
        missing = [layer.name for layer in chosen if actual.get(layer.name) == "float32"]
        if missing:
            notes.append(f"{len(missing)} layer(s) chosen for INT8 stayed float in the written "
                         f"model: {', '.join(missing[:5])}")
        if notes:
            stats["notes"] = notes
        if stats["quantized_layers"] == 0:
            return PassResult(model, False, stats, reason="; ".join(notes) or "no layer became INT8")
        return PassResult(final, True, stats)

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _fuse(work: Model, reference: Model, ctx: PassContext, notes: list[str]) -> dict[str, Any]:
        """Fuse attention in ``work`` (in place); undo it if outputs move beyond rounding."""
        before = work.copy()
        report = fuse_attention(work)
        result = report.to_dict()
        if not report.fused:
            return result
        feeds = _first_batch(ctx, reference)
        expected = OrtRunner(before).run(feeds)
        got = OrtRunner(work).run(feeds)
        diff = max(float(np.nanmax(np.abs(a.astype(np.float64) - b))) for a, b in
                   zip(got, expected, strict=True))
        scale = max(float(np.nanmax(np.abs(b))) for b in expected)
        result["max_abs_diff"] = diff
        if not Tolerance.float_rounding(rtol=1e-4, atol=1e-4).allows(diff, scale):
            work.graph = before.graph
            result["fused"] = []
            note = (f"attention fusion changed outputs by {diff:.3g} (scale {scale:.3g}); "
                    "left unfused")
            result["undone"] = note
            notes.append(note)
            ctx.progress.status(f"quantize-int8: {note}")
        return result

    @staticmethod
    def _assign_modes(model: Model, layers: list[Layer], fmt: str, mode: str) -> None:
        """static or dynamic per layer (see ``mode``); convolutions never go dynamic."""
        ranks = tensor_ranks(typed_proto(model)) if mode == "auto" and fmt != "tensorrt" else {}
        for layer in layers:
            if layer.skip_reason is not None:
                continue
            if fmt == "tensorrt" or mode == "static":
                layer.mode = "static"
            elif layer.op == "Conv":
                if mode == "dynamic":
                    layer.skip_reason = ("dynamic mode keeps convolutions float: ONNX Runtime's "
                                         "ConvInteger is slower than a float Conv on x86; use "
                                         "mode static or auto")
                layer.mode = "static"
            elif mode == "dynamic":
                layer.mode = "dynamic"
            else:
                layer.mode = "dynamic" if ranks.get(layer.activation, 0) >= 3 else "static"

    def _smooth(
        self, work: Model, layers: list[Layer], fmt: str, ctx: PassContext, has_data: bool,
        setting: Any,
    ) -> dict[str, Any] | None:
        names = {layer.name for layer in layers if layer.op in ("MatMul", "Gemm")}
        if not names:
            return None
        if not has_data:
            return {"applied": 0, "reason": "SmoothQuant needs calibration data"}
        alphas = None if setting == "auto" else (float(setting),)
        return run_smoothquant(work, names, ctx, unsigned=fmt == "onnxruntime", alphas=alphas)

    def _calibrate(
        self, work: Model, proto: Any, static: list[Layer], fmt: str, ctx: PassContext
    ) -> Calibration:
        opts: Any = self.options
        calib = collect(
            proto, lambda: ctx.batches("calibration"), method=opts.method, bins=opts.bins,
            percentile=opts.percentile, progress=ctx.progress,
            tensors=tensors_to_calibrate(
                proto, static, fmt, opts.activation_ops, opts.quantized_outputs
            ),
            unsigned=fmt == "onnxruntime",
        )
        if opts.method == "auto":
            probe = LayerProbe(work, static, calib, unsigned=fmt == "onnxruntime")
            auto_thresholds(calib, probe.error)
        return calib

    def _guard_auto(
        self, work: Model, static: list[Layer], calib: Calibration, quantize: Any,
        ctx: PassContext, stats: dict[str, Any],
    ) -> Calibration:
        """Per-tensor choices are local. Check the whole model against each single method and
        keep the best configuration: by the recipe's metric when it has evaluation data
        (ties go to the smaller output error), else by the output error on a calibration
        batch (relative squared error against the float model)."""
        from .calibrate import METHODS

        feeds = _first_batch(ctx, work)
        reference = OrtRunner(work).run(feeds)
        options: list[tuple[str, Calibration]] = [("auto", calib)]
        for method in METHODS:
            alt = calib.with_method(method)
            if alt.thresholds != calib.thresholds:
                options.append((method, alt))
        scores: dict[str, dict[str, float]] = {}
        best: tuple[tuple[float, float], str, Calibration] | None = None
        for name, candidate in options:
            model = quantize(static, candidate)
            error = _relative_error(OrtRunner(model).run(feeds), reference)
            scores[name] = {"output_error": error}
            metric = 0.0
            if ctx.evaluate is not None:
                key, metric = _primary(ctx.evaluate(model, f"INT8 calibration check: {name}"))
                scores[name][key] = metric
            rank = (-metric, error)
            if best is None or rank < best[0]:
                best = (rank, name, candidate)
        assert best is not None
        stats["method_check"] = {"scores": scores, "chosen": best[1]}
        if best[1] != "auto":
            best[2].method = best[1]
        return best[2]

    def _check_speed(
        self, reference: Model, best: Model, chosen: list[Layer], quantize: Any,
        ctx: PassContext, reasons: dict[str, str], notes: list[str],
    ) -> tuple[Model, list[Layer], dict[str, Any]]:
        """Time float and INT8 on the served shapes (batch 1 and the calibration batch).
        INT8 slower at all of them is not shipped: each op family alone is tried, else the
        model stays float. Slower at some of them is said in the report and the build log."""
        opts: Any = self.options
        ctx.progress.status("quantize-int8: timing float and INT8 on ONNX Runtime (1 thread)")
        feeds = _first_batch(ctx, reference)
        shapes, decisive = shapes_to_time(reference, feeds, opts.latency_lengths)
        timings = compare(reference, best, shapes)
        table: dict[str, Any] = {"threads": 1, "timings": [t.to_dict() for t in timings]}
        served = [t for t in timings if t.label in decisive]
        if not served:
            notes.append("not timed: ONNX Runtime could not run the served shapes")
            return best, chosen, table
        slower = [t for t in served if t.speedup <= opts.min_speedup]
        if len(slower) < len(served):
            for t in slower:
                note = (f"INT8 is slower than float at {t.label} ({t.int8_ms:.2f} ms vs "
                        f"{t.float_ms:.2f} ms); faster at the other served shape(s)")
                notes.append(note)
                ctx.progress.status(f"quantize-int8: {note}")
            return best, chosen, table
        main = served[0]
        wanted = "faster" if opts.min_speedup == 1.0 else f"{opts.min_speedup:g}× faster"
        note = (f"INT8 was not {wanted} than float on ONNX Runtime ("
                + ", ".join(f"{t.int8_ms:.2f} vs {t.float_ms:.2f} ms at {t.label}" for t in served)
                + ")")
        families = sorted({"Conv" if layer.op == "Conv" else "MatMul/Gemm" for layer in chosen})
        if len(families) > 1:
            for family in families:
                subset = [layer for layer in chosen
                          if ("Conv" if layer.op == "Conv" else "MatMul/Gemm") == family]
                trial = quantize(subset)
                timing = compare(reference, trial, {main.label: shapes[main.label]})[0]
                table.setdefault("fallbacks", {})[family] = timing.to_dict()
                if timing.speedup > opts.min_speedup:
                    for layer in chosen:
                        if layer not in subset:
                            reasons[layer.name] = f"kept float: {note}; faster with only {family} INT8"
                    notes.append(f"{note}; kept only {family} layers INT8 ({timing.speedup:.2f}×)")
                    ctx.progress.status(f"quantize-int8: {notes[-1]}")
                    return trial, subset, table
        for layer in chosen:
            reasons[layer.name] = f"kept float: {note}"
        notes.append(f"{note}; the model stays float")
        ctx.progress.status(f"quantize-int8: {notes[-1]}")
        return reference, [], table

    def _sensitivity(
        self, model: Model, layers: list[Layer], quantize: Any, ctx: PassContext
    ) -> dict[str, float]:
        """Relative output MSE on one calibration batch with only that layer quantized."""
        feeds = _first_batch(ctx, model)
        reference = OrtRunner(model).run(feeds)[0].astype(np.float64)
        power = float(np.mean(reference**2)) or 1.0
        result = {}
        for layer in ctx.progress.track(layers, description="INT8 sensitivity", total=len(layers)):
            out = OrtRunner(quantize([layer])).run(feeds)[0].astype(np.float64)
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
        actual: dict[str, str],
        reasons: dict[str, str],
        sensitivity: dict[str, float],
        calib: Calibration | None,
        fmt: str,
    ) -> None:
        for layer in candidates:
            decision = _decision(layer, actual, reasons, calib, fmt)
            if layer.name in sensitivity:
                decision["sensitivity"] = sensitivity[layer.name]
            node_name = layer.name if any(n.name == layer.name for n in model.graph.nodes) \
                else f"{layer.name}_quant"
            model.meta.node(node_name)["precision"] = decision
        if calib is not None:
            for name, threshold in calib.thresholds.items():
                model.meta.tensor(name)["int8_range"] = list(calib.asymmetric_range(name)) + [threshold]


def _decision(
    layer: Layer, actual: dict[str, str], reasons: dict[str, str], calib: Calibration | None,
    fmt: str,
) -> dict[str, Any]:
    precision = actual.get(layer.name, "float32")
    if layer.skip_reason:
        return {"dtype": "float32", "reason": layer.skip_reason}
    if precision == "float32":
        return {"dtype": "float32", "reason": reasons.get(layer.name, "left float by the quantizer")}
    if precision == "int8-dynamic":
        return {"dtype": "int8", "reason": "dynamic: weights INT8, activation scale per batch"}
    method = calib.chosen.get(layer.activation, calib.method) if calib is not None else "?"
    return {"dtype": "int8", "reason": f"calibrated ({method}), {fmt} format"}


def _rows(
    candidates: list[Layer], actual: dict[str, str], reasons: dict[str, str],
    sensitivity: dict[str, float],
) -> list[dict[str, Any]]:
    rows = []
    for layer in candidates:
        precision = actual.get(layer.name, "float32")
        if layer.skip_reason:
            reason = layer.skip_reason
        elif precision == "float32":
            reason = reasons.get(layer.name, "not quantized")
        elif precision == "int8-dynamic":
            reason = "INT8, activation scale per batch"
        else:
            reason = "INT8, calibrated activation scale"
        rows.append({
            "name": layer.name, "op": layer.op,
            "precision": "int8" if precision.startswith("int8") else "float32",
            "scales": {"int8-dynamic": "dynamic", "int8-static": "static"}.get(precision),
            "reason": reason, "sensitivity": sensitivity.get(layer.name),
        })
    return rows


def _nothing_qualifies(candidates: list[Layer]) -> str:
    if not candidates:
        return "no layer qualifies for INT8: the model has no Conv, Gemm or MatMul with a weight"
    counts: dict[str, int] = {}
    for layer in candidates:
        counts[layer.skip_reason or "?"] = counts.get(layer.skip_reason or "?", 0) + 1
    why = "; ".join(f"{n} × {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"no layer qualifies for INT8 ({why})"


@hookimpl
def optcc_passes() -> list[type[Pass]]:
    return [Int8QuantizePass, SmoothQuantPass, FuseAttentionPass]


__all__ = ["FuseAttentionPass", "Int8QuantizePass", "SmoothQuantPass"]
