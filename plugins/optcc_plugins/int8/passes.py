"""The passes that prepare a model for INT8 on their own: ``smooth-quant`` and
``fuse-attention`` (``quantize-int8`` runs both steps itself by default)."""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

from pydantic import Field

from optcc import Capability, Model, Pass, PassContext, PassOptions, PassResult, Tolerance

from . import smoothquant
from .attention import fuse_attention
from .graph import fold_weight_subgraphs, typed_proto
from .qdq import candidate_layers


def run_smoothquant(
    work: Model, names: set[str], ctx: PassContext, *, unsigned: bool,
    alphas: tuple[float, ...] | None,
) -> dict[str, Any]:
    """Find, measure and apply SmoothQuant on the named layers of ``work`` (in place)."""
    targets, skipped = smoothquant.find_targets(work, names)
    proto = typed_proto(work)
    smoothquant.collect_channel_stats(proto, lambda: ctx.batches("calibration"), targets,
                                      progress=ctx.progress, seed=ctx.seed)
    nodes = {n.name: n for n in work.graph.nodes}
    decisions = []
    for target in targets:
        if target.amax is None:
            continue
        weights = [smoothquant.weight_rows(nodes[n]) for n in target.layers]
        alpha, scales, before, after = smoothquant.choose(target, weights, alphas, unsigned)
        how = "left alone: smoothing did not pay for itself"
        if scales is not None:
            how = smoothquant.apply(work, target, scales)
            nodes = {n.name: n for n in work.graph.nodes}
        decisions.append(smoothquant.SmoothDecision(
            target.activation, target.layers, alpha, how, before, after,
            smoothquant.outlier_ratio(target.amax),
        ))
    return {
        "applied": sum(d.alpha is not None for d in decisions),
        "tensors": [d.to_dict() for d in decisions],
        "skipped": skipped,
    }


class SmoothQuantOptions(PassOptions):
    alpha: Literal["auto"] | float = Field(
        "auto", description="Migration strength: auto searches it per tensor; or a number in [0, 1]."
    )
    format: Literal["auto", "tensorrt", "onnxruntime"] = Field(
        "auto", description="Activation format the search assumes (unsigned for onnxruntime)."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Node-name patterns (fnmatch) left alone."
    )


class SmoothQuantPass(Pass):
    """SmoothQuant on its own: per-channel outlier migration from activations into weights.

    ``s_j = max|x_j|^α / max|W_j|^(1−α)``; ``x/s`` folds into a LayerNormalization's γ, β
    where nothing else reads it, else a ``Mul`` by ``1/s`` is inserted before the layers
    (smoothquant.py). The float model's outputs change only by rounding, which the pass
    manager checks. ``quantize-int8`` does the same by default; use this pass to inspect
    or reuse the smoothed float model.
    """

    name = "smooth-quant"
    summary = "SmoothQuant: move activation outliers into weights (float model unchanged)."
    Options = SmoothQuantOptions
    requires = frozenset({Capability.CALIBRATION_DATA})
    tolerance = Tolerance.float_rounding(rtol=1e-3, atol=1e-4)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        fmt = opts.format if opts.format != "auto" else (
            "tensorrt" if ctx.target == "tensorrt" else "onnxruntime")
        fold_weight_subgraphs(model, ("Gemm", "MatMul"))
        names = {
            layer.name for layer in candidate_layers(model, ["Gemm", "MatMul"], [], 1)
            if layer.skip_reason is None
            and not any(fnmatch.fnmatchcase(layer.name, p) for p in opts.exclude)
        }
        if not names:
            return PassResult(model, False, reason="no MatMul/Gemm layer with a constant weight")
        alphas = None if opts.alpha == "auto" else (float(opts.alpha),)
        stats = run_smoothquant(model, names, ctx, unsigned=fmt == "onnxruntime", alphas=alphas)
        if not stats["applied"]:
            return PassResult(model, False, stats, reason="smoothing reduced no layer's INT8 error")
        return PassResult(model, True, stats)


class FuseAttentionOptions(PassOptions):
    pack_projections: bool = Field(
        True, description="Pack the Q/K/V projections that read the same input into one MatMul."
    )


class FuseAttentionPass(Pass):
    """Exported multi-head attention → ONNX Runtime's ``MultiHeadAttention`` (attention.py).

    ONNX Runtime targets only: the fused node is an ONNX Runtime contrib op. Outputs change
    only by rounding (checked by the pass manager). ``quantize-int8`` runs it by default on
    the ONNX Runtime target; this pass is for float models, or to fuse earlier.
    """

    name = "fuse-attention"
    summary = "Fuse multi-head attention into ONNX Runtime's MultiHeadAttention (CPU speed)."
    Options = FuseAttentionOptions
    tolerance = Tolerance.float_rounding(rtol=1e-4, atol=1e-4)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.target == "tensorrt":
            return PassResult(model, False, reason="MultiHeadAttention is an ONNX Runtime op; the "
                              "target is tensorrt")
        report = fuse_attention(model, pack=self.options.pack_projections)  # type: ignore[attr-defined]
        stats = report.to_dict()
        if not report.fused:
            why = "; ".join(sorted(set(report.skipped.values()))) or "no Softmax in the graph"
            return PassResult(model, False, stats, reason=f"no attention block matched ({why})")
        return PassResult(model, True, stats)
