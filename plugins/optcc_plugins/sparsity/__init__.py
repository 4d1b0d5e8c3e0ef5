"""2:4 semi-structured sparsity (``sparsify-2of4``): zero 2 of every 4 consecutive weights
along each layer's reduction axis, so NVIDIA's sparse tensor cores (through TensorRT or
optcc's kernels) can skip them. See methods.py for how the mask is chosen and calibrate.py
for the streamed calibration of the data-aware methods.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from optcc import (
    Capability,
    Model,
    NMPattern,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    SparseLayer,
    Tolerance,
    check_matrix,
    hookimpl,
    matrix_to_weight,
    pattern_fit,
    sparse_layers,
    tensorrt_eligibility,
)

from .calibrate import collect, layout_key, levels, unfold_support
from .methods import magnitude_keep, output_error, sparsegpt, wanda_keep
from .permute import permute_for_pattern

logger = logging.getLogger(__name__)

DATA_AWARE = ("wanda", "sparsegpt")
NO_SPEED_ON_ORT = (
    "2:4 sparsity gives no speed on ONNX Runtime's CPU backend (zeros are still multiplied); "
    "it pays off on NVIDIA GPUs (Ampere and newer) through TensorRT or optcc's sparse kernels"
)


class SparsifyOptions(PassOptions):
    method: Literal["magnitude", "permutation", "wanda", "sparsegpt"] = Field(
        "magnitude",
        description="How the mask is chosen: magnitude (keep the largest |w| of every group), "
        "permutation (magnitude after an input-channel permutation that keeps more magnitude, "
        "applied to producers and coupled layers too, so the dense model is unchanged), "
        "wanda (|w|·‖x‖ with calibration activations, no weight update) or sparsegpt "
        "(second-order: mask by OBS saliency and update the kept weights from the layer's "
        "input Hessian). wanda and sparsegpt need calibration data.",
    )
    pattern: str = Field(
        "2:4",
        description="N:M pattern: at most N non-zeros in every M consecutive weights along the "
        "reduction axis. Only 2:4 is accelerated by sparse tensor cores; others (4:8, 1:4) are "
        "for research and run at dense speed.",
    )
    op_types: list[Literal["Conv", "ConvTranspose", "Gemm", "MatMul"]] = Field(
        default_factory=lambda: ["Conv", "ConvTranspose", "Gemm", "MatMul"],
        description="Layer types to sparsify (constant-weight layers only).",
    )
    include: list[str] = Field(
        default_factory=list,
        description="Node-name patterns (fnmatch); when given, only matching layers are sparsified.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Node-name or op-type patterns (fnmatch) left dense."
    )
    min_params: int = Field(
        0, ge=0, description="Layers with fewer weights than this stay dense."
    )
    min_channels: int | None = Field(
        None, ge=1,
        description="Layers with fewer input or output channels stay dense. Default: 16 when "
        "the TensorRT rules apply (smaller layers never pick sparse tactics), 4 otherwise.",
    )
    rules: Literal["auto", "tensorrt", "portable"] = Field(
        "auto",
        description="Which layers qualify: tensorrt applies TensorRT's sparse-tactic rules "
        "(no ConvTranspose or grouped convolutions, 2:4 only); portable takes every layer whose "
        "reduction length fits the pattern; auto follows the build's target.",
    )
    sequential: bool | None = Field(
        None,
        description="Data-aware methods: calibrate level by level, each layer fed by its "
        "already-sparsified predecessors (one pass over the data per level), or (false) in one "
        "pass on the dense model. Default: true for sparsegpt, whose weight update compensates "
        "for what the predecessors lost; false for wanda (measured better and cheaper).",
    )
    permutation_sweeps: int = Field(
        4, ge=1, le=100, description="permutation: passes of the channel-swap search per group."
    )
    permutation_window: int = Field(
        64, ge=1, le=4096,
        description="permutation: how many other groups of channels each group tries swaps with.",
    )
    dampening: float = Field(
        0.01, gt=0.0, le=1.0,
        description="sparsegpt: λ = dampening · mean(diag H) added to the Hessian's diagonal.",
    )
    block_size: int = Field(
        128, ge=4, le=4096, description="sparsegpt: columns updated together (lazy batch updates)."
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        return str(NMPattern.parse(value))


class SparsifyPass(Pass):
    """Prune weights to an N:M semi-structured pattern (2:4 by default) along each layer's
    reduction axis, as NVIDIA's sparse tensor cores read it.

    For a Conv weight ``K × C × R × S`` the groups are ``m`` consecutive input channels at
    fixed ``(k, r, s)``; for Gemm/MatMul they run along ``K`` (see ``optcc.sparse``). The mask
    is chosen by magnitude, by magnitude after an input-channel permutation that keeps more
    of it (permute.py: producers and coupled layers are permuted too, so the dense function
    is unchanged), by Wanda (``|w_ij|·‖X_j‖``) or by SparseGPT (OBS saliency
    ``w²/[H⁻¹]_jj²`` and the OBS update of the kept weights from ``H = ΣXᵀX``), described
    in methods.py. Data-aware methods stream the calibration data once per level of layers,
    holding one ``K × K`` Hessian per layer. The mask is stored in the model's metadata
    (``mask`` of the weight tensor, ``sparsity`` of the node), so ``distill`` keeps the
    pruned weights at zero, and every sparsified layer is checked against the pattern
    before the pass returns. Layers that stay dense are listed with the reason.
    """

    name = "sparsify-2of4"
    summary = "2:4 (N:M) semi-structured sparsity for sparse tensor cores: magnitude, channel permutation, Wanda or SparseGPT."
    Options = SparsifyOptions
    tolerance = Tolerance.lossy()

    @classmethod
    def required_for(cls, options: Any) -> frozenset[Capability]:
        if options.method in DATA_AWARE:
            return frozenset({Capability.CALIBRATION_DATA})
        return frozenset()

    # ------------------------------------------------------------------ selection
    def _skip_reason(self, layer: SparseLayer, pattern: NMPattern, trt_rules: bool) -> str | None:
        opts: Any = self.options
        if layer.op not in opts.op_types:
            return f"op type {layer.op} is not in op_types"
        fit = pattern_fit(layer, pattern)
        if fit is not None:
            return fit
        for pat in opts.exclude:
            if fnmatch.fnmatchcase(layer.name, pat) or fnmatch.fnmatchcase(layer.op, pat):
                return f"excluded by '{pat}'"
        if opts.include and not any(fnmatch.fnmatchcase(layer.name, p) for p in opts.include):
            return "not matched by include"
        if layer.quantized:
            return "weight is already INT8: run sparsify-2of4 before quantize-int8"
        if layer.shared_with:
            return (f"weight '{layer.weight.name}' is shared with {', '.join(layer.shared_with[:3])}: "
                    "sparsifying it would change them too")
        size = int(np.prod(layer.shape))
        if size < opts.min_params:
            return f"{size} weights < min_params {opts.min_params}"
        min_channels = opts.min_channels or (16 if trt_rules else pattern.m)
        small = min(layer.in_channels, layer.out_channels)
        if small < min_channels:
            return f"{small} channels < min_channels {min_channels}"
        if trt_rules:
            rule = tensorrt_eligibility(layer, pattern)
            if rule is not None:
                return f"TensorRT rules: {rule}"
        return None

    # ------------------------------------------------------------------ run
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        pattern = NMPattern.parse(opts.pattern)
        trt_rules = opts.rules == "tensorrt" or (opts.rules == "auto" and ctx.target == "tensorrt")
        start = time.perf_counter()
        layers = sparse_layers(model)
        rows: dict[str, dict[str, Any]] = {}
        chosen: list[SparseLayer] = []
        for layer in layers:
            reason = self._skip_reason(layer, pattern, trt_rules)
            rows[layer.name] = {
                "name": layer.name, "op": layer.op, "weight": "×".join(map(str, layer.shape)),
                "sparsified": False, "method": None, "reason": reason,
                "output_error": None, "weight_change": None,
                "tensorrt": "eligible" if (reason is None and tensorrt_eligibility(layer, pattern) is None)
                else tensorrt_eligibility(layer, pattern),
            }
            if reason is None:
                chosen.append(layer)
        stats: dict[str, Any] = {
            "pattern": str(pattern), "method": opts.method, "accelerated": pattern.accelerated,
            "rules": "tensorrt" if trt_rules else "portable",
        }
        if not pattern.accelerated:
            stats["note"] = f"{pattern} is for research: no hardware runs it faster than dense"
        elif ctx.target == "onnxruntime":
            stats["note"] = NO_SPEED_ON_ORT
            logger.warning("sparsify-2of4: %s", NO_SPEED_ON_ORT)
        if not chosen:
            stats["layers"] = list(rows.values())
            why = sorted({r["reason"] for r in rows.values() if r["reason"]})
            return PassResult(model, False, stats, reason="no layer can take the pattern"
                              + (": " + "; ".join(why[:4]) if why else " (the model has no weighted layer)"))

        if opts.method == "permutation":
            names = {layer.name for layer in chosen}
            stats["permutation"] = permute_for_pattern(
                model, names, pattern, sweeps=opts.permutation_sweeps, window=opts.permutation_window)
            chosen = [layer for layer in sparse_layers(model) if layer.name in names]  # new constants
        if opts.method in DATA_AWARE:
            self._data_aware(model, chosen, pattern, ctx, rows)
        else:
            for layer in chosen:
                self._apply(model, layer, pattern, opts.method, None, rows)
        self._verify(chosen, pattern)
        done = [r for r in rows.values() if r["sparsified"]]
        total = sum(int(np.prod(layer.shape)) for layer in layers)
        zeros = sum(int(np.prod(layer.shape)) - int(np.count_nonzero(np.asarray(layer.weight.values)))
                    for layer in chosen)
        stats.update(
            sparsified_layers=len(done), dense_layers=len(rows) - len(done),
            weights_zeroed_share=zeros / total if total else 0.0,
            seconds=round(time.perf_counter() - start, 3),
            layers=list(rows.values()),
        )
        return PassResult(model, True, stats)

    def _data_aware(self, model: Model, chosen: list[SparseLayer], pattern: NMPattern,
                    ctx: PassContext, rows: dict[str, dict[str, Any]]) -> None:
        """Calibrate and prune level by level (or all at once when not sequential)."""
        opts: Any = self.options
        ready = []
        for layer in chosen:
            why = unfold_support(layer)
            if why is None:
                ready.append(layer)
            else:
                self._apply(model, layer, pattern, "magnitude", None, rows)
                rows[layer.name]["method"] = f"magnitude ({opts.method} needs the layer input: {why})"
        sequential = opts.sequential if opts.sequential is not None else opts.method == "sparsegpt"
        depth = levels(model, {layer.name for layer in ready}) if sequential else {}
        steps = sorted({depth.get(layer.name, 0) for layer in ready})
        for step, level in enumerate(steps, 1):
            group = [layer for layer in ready if depth.get(layer.name, 0) == level]
            label = (f"sparsify-2of4 ({opts.method}): calibrating level {step}/{len(steps)}, "
                     f"{len(group)} layer(s)")
            hessians = collect(model, group, lambda: ctx.batches("calibration"), ctx.progress, label)
            for layer in group:
                self._apply(model, layer, pattern, opts.method, hessians[layout_key(layer)].hessians, rows)

    def _apply(self, model: Model, layer: SparseLayer, pattern: NMPattern, method: str,
               hessians: list[np.ndarray] | None, rows: dict[str, dict[str, Any]]) -> None:
        """Prune one layer, write its weight and mask, record what happened."""
        opts: Any = self.options
        values = np.asarray(layer.weight.values)
        matrix = layer.matrix().astype(np.float64)
        new = matrix.copy()
        keep = np.ones(matrix.shape, dtype=bool)
        groups = hessians or [None]
        per = matrix.shape[0] // len(groups)
        errors = []
        for g, h in enumerate(groups):
            rows_g = slice(g * per, (g + 1) * per)
            block = matrix[rows_g]
            if method == "sparsegpt" and h is not None:
                new[rows_g], keep[rows_g] = sparsegpt(block, h, pattern, dampening=opts.dampening,
                                                      block_size=opts.block_size)
            else:  # magnitude, permutation (magnitude on permuted channels), wanda
                keep[rows_g] = wanda_keep(block, h, pattern) if method == "wanda" and h is not None \
                    else magnitude_keep(block, pattern)
                new[rows_g] = np.where(keep[rows_g], block, 0.0)
            if h is not None:
                errors.append(output_error(block, new[rows_g], h))
        layer.weight.values = matrix_to_weight(new, layer.shape, layer.axis).astype(values.dtype)
        mask = matrix_to_weight(keep, layer.shape, layer.axis)
        model.meta.tensor(layer.weight.name)["mask"] = np.ascontiguousarray(mask)
        model.meta.tensor(layer.weight.name)["nm_pattern"] = {"pattern": str(pattern), "axis": layer.axis}
        model.meta.node(layer.name)["sparsity"] = {
            "pattern": str(pattern), "method": method, "axis": layer.axis,
            "weight": layer.weight.name, "accelerated": pattern.accelerated,
        }
        norm = float(np.linalg.norm(matrix)) or 1.0
        rows[layer.name].update(
            sparsified=True, method=method,
            weight_change=float(np.linalg.norm(new - matrix)) / norm,
            output_error=float(np.mean(errors)) if errors else None,
        )

    @staticmethod
    def _verify(chosen: list[SparseLayer], pattern: NMPattern) -> None:
        """Every layer the pass sparsified must follow the pattern (a bug otherwise)."""
        for layer in chosen:
            check = check_matrix(layer.matrix(), pattern)
            if check.violating:
                raise RuntimeError(f"sparsify-2of4 left {check.violating} group(s) of layer "
                                   f"'{layer.name}' outside {pattern}")


@hookimpl
def optcc_passes() -> list[type[Pass]]:
    return [SparsifyPass]
