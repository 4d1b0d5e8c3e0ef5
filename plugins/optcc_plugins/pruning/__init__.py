"""Structured pruning: remove whole channels, attention heads and FFN neurons from the ONNX
graph, so the file, the parameters and the latency really shrink.

The channel-dependency analysis and the slicing live in :mod:`optcc.channels` (public, and
extensible by plugins through op rules); this plugin ranks the groups it finds
(importance.py), chooses what to remove (selection.py) and reports it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Field

from optcc import (
    Capability,
    Model,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Tolerance,
    channels,
    hookimpl,
    model_stats,
    restore_nm_patterns,
)

from .importance import (
    Group,
    activation_importance,
    bn_scale_importance,
    magnitude_importance,
    ranked_groups,
)
from .selection import plan_removal

logger = logging.getLogger(__name__)


class PruneOptions(PassOptions):
    ratio: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="What to remove: a fraction of the channels (heads, neurons) of every "
        "prunable group, or of the parameters / FLOPs when 'target' says so.",
    )
    target: Literal["channels", "params", "flops"] = Field(
        "channels",
        description="channels: remove 'ratio' of each group's units; params / flops: find the "
        "uniform channel ratio that removes 'ratio' of the model's parameters / FLOPs.",
    )
    importance: Literal["l1", "l2", "bn-scale", "activation"] = Field(
        "l2",
        description="Ranking criterion: group-summed L1 or L2 magnitude of every coupled "
        "weight, BatchNorm |gamma|, or mean |activation| on the calibration data.",
    )
    scope: Literal["per-group", "global"] = Field(
        "per-group",
        description="Rank within each group (every layer loses the same share), or globally "
        "with importances normalised per group (layers lose different shares).",
    )
    round_to: int = Field(
        8, ge=1, description="Kept channel counts are rounded up to a multiple of this."
    )
    min_channels: int = Field(8, ge=1, description="Never keep fewer channels in a layer.")
    overrides: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=dict,
        description="Per-layer ratios: node-name pattern (fnmatch) -> ratio (target channels).",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Node-name patterns (fnmatch) never pruned."
    )
    hidden_size: bool = Field(
        False,
        description="Also prune the residual width (transformer hidden size, ConvNeXt stage "
        "widths): channels that LayerNorm/RMSNorm normalize over are sliced together with "
        "every embedding, residual add and projection that carries them.",
    )
    norm_statistics: Literal["kept", "original"] = Field(
        "kept",
        description="With hidden_size: 'kept' normalizes over the kept channels (fused "
        "LayerNorm stays; its statistics change), 'original' keeps the statistics of the "
        "zeroed original (means over the original width; LayerNorm becomes elementary ops).",
    )


class StructuredPruningPass(Pass):
    """Remove the least important channels of every prunable group of coupled layers.

    A group is a set of output channels that must go together (through BatchNorm, residual
    adds, concats, depthwise convolutions, Flatten → Gemm, attention heads), found by
    :func:`optcc.channels.analyze`. Its importance is summed over every coupled weight. The ``ratio`` least
    important units of each group are removed: weights, biases and normalisation vectors are
    sliced, and depthwise ``group`` counts, Split sizes and Reshape targets are updated.
    Kept channel counts are rounded up to a multiple of ``round_to`` (default 8, so tensor
    cores and SIMD lanes stay full) and never fall below ``min_channels``. Groups that
    cannot be pruned safely (normalised over, reaching an output, read by an op without a
    rule) are left alone and listed with the reason.

    The result equals the original model with the removed channels' weights zeroed (tested
    on ResNet-, MobileNetV2-, BERT-style and Concat models and on the model zoo of the tests:
    fifteen Hugging Face architectures under both exporters). With ``hidden_size`` and
    ``norm_statistics: kept`` it differs by the normalization statistics alone: LayerNorm
    and RMSNorm then average over the kept channels, ``mean_kept = mean_all * C / C'`` for
    the zeroed original's activations.
    """

    name = "prune-channels"
    summary = "Structured pruning of channels, attention heads and FFN neurons (the model shrinks)."
    Options = PruneOptions
    tolerance = Tolerance.lossy()

    @classmethod
    def required_for(cls, options: Any) -> frozenset[Capability]:
        if options.importance == "activation":
            return frozenset({Capability.CALIBRATION_DATA})
        return frozenset()

    def channel_options(self) -> channels.ChannelOptions:
        opts: Any = self.options
        return channels.ChannelOptions(normalized=opts.hidden_size, norm_statistics=opts.norm_statistics)

    def plan(
        self, model: Model, ctx: PassContext
    ) -> tuple[channels.ChannelAnalysis, list[Group], set[int], dict[str, str]]:
        """Analyse, rank and choose what to remove (the graph is only prepared: constant
        aliases become real constants, which does not change what it computes)."""
        opts: Any = self.options
        channels.materialize_constant_aliases(model)
        analysis = channels.analyze(model, options=self.channel_options())
        groups = ranked_groups(analysis)
        if opts.importance == "activation":
            activation_importance(analysis, groups, model, lambda: ctx.batches("calibration"), ctx.progress)
        elif opts.importance == "bn-scale":
            gammas = {n.inputs[1].name for n in model.graph.nodes if n.op == "BatchNormalization"}
            bn_scale_importance(analysis, groups, gammas)
        else:
            magnitude_importance(analysis, groups, opts.importance)

        def choose(ratio: float) -> tuple[set[int], dict[str, str]]:
            return plan_removal(
                groups, ratio, round_to=opts.round_to, min_channels=opts.min_channels,
                overrides=opts.overrides, exclude=opts.exclude, scope=opts.scope,
            )

        if opts.target == "channels":
            removed, skipped = choose(opts.ratio)
        else:
            removed, skipped = self._search(model, choose, opts.target, opts.ratio)
        return analysis, groups, removed, skipped

    def _search(self, model: Model, choose: Any, target: str, goal: float) -> tuple[set[int], dict[str, str]]:
        """Bisect the uniform channel ratio until 'goal' of params/FLOPs is removed."""
        base = getattr(model_stats(model), target)
        lo, hi = 0.0, 0.95
        best = choose(0.0)
        for _ in range(12):
            mid = (lo + hi) / 2
            removed, skipped = choose(mid)
            trial = model.copy()  # already materialized by plan()
            channels.slice_channels(trial, channels.analyze(trial, options=self.channel_options()), removed)
            value = getattr(model_stats(trial), target)
            if value is None or base in (None, 0):
                break
            if 1 - value / base >= goal:
                best, hi = (removed, skipped), mid
            else:
                lo = mid
        return best

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = model_stats(model)
        analysis, groups, removed, skipped = self.plan(model, ctx)
        blocked = analysis.describe_blocked()
        group_rows = [
            {
                "group": g.name, "kind": group_kind(analysis, g, model), "layers": list(g.sources),
                "unit_channels": g.unit,
                "units_before": len(g.classes),
                "units_after": len(g.classes) - sum(c in removed for c in g.classes),
                "skipped": skipped.get(g.name),
            }
            for g in groups
        ]
        stats: dict[str, Any] = {"groups": group_rows, "blocked": blocked}
        if not removed:
            return PassResult(model, False, stats, reason="nothing to prune: " + (
                "; ".join(f"{k}: {v}" for k, v in list(blocked.items())[:3]) or "no prunable group"))
        channels.slice_channels(model, analysis, removed)
        nm_patterns = restore_nm_patterns(model)  # 2:4 layers whose input channels shifted
        if nm_patterns:
            stats["nm_patterns"] = nm_patterns
        after = model_stats(model)
        after_layers = {layer.name: layer for layer in after.layers}
        rows = []
        for layer in before.layers:
            new = after_layers.get(layer.name)
            rows.append({
                "name": layer.name, "op": layer.op,
                "out_before": layer.out_channels, "out_after": new.out_channels if new else 0,
                "params_before": layer.params, "params_after": new.params if new else 0,
                "flops_before": layer.flops, "flops_after": new.flops if new else 0,
            })
        stats.update(
            layers=rows,
            params_removed=1 - after.params / before.params if before.params else 0.0,
            flops_removed=(1 - after.flops / before.flops) if before.flops and after.flops else None,
            units_removed=len(removed),
        )
        return PassResult(model, True, stats)


def group_kind(analysis: channels.ChannelAnalysis, group: Group, model: Model) -> str:
    """What a group's units are, for reports: ``heads`` (attention heads: one unit is
    several channels of a projection), ``hidden`` (the residual width: normalized by a
    LayerNorm or held by an embedding table), ``channels`` (convolution channels) or
    ``neurons`` (features of linear layers: FFN neurons)."""
    if group.unit > 1:
        return "heads"
    roots = set(group.classes)
    for s in analysis.slices:
        if s.node is not None and s.node.op in ("LayerNormalization", "Gather") and any(
            analysis.find(i) in roots for i in s.ids
        ):
            return "hidden"
    if any(f.node.op == "ReduceMean" and analysis.find(f.pieces[0][0]) in roots for f in analysis.fixups):
        return "hidden"
    ops = {n.op for n in model.graph.nodes if n.name in group.sources}
    return "channels" if ops <= {"Conv"} else "neurons"


def zeroed_reference(model: Model, pass_: StructuredPruningPass, ctx: PassContext | None = None) -> Model:
    """The original model with exactly the channels ``pass_`` would remove set to zero:
    what the pruned model must equal (for tests and users checking a pruning)."""
    reference = model.copy()
    analysis, _, removed, _ = pass_.plan(reference, ctx or PassContext())
    channels.zero_channels(reference, analysis, removed)
    return reference


@hookimpl
def optcc_passes() -> list[type[Pass]]:
    return [StructuredPruningPass]
