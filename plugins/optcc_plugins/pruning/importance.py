"""Importance criteria: how much each channel class matters, per group.

A class is a set of coupled channel ids (:mod:`optcc.channels`); its importance is summed
over everything that would be removed with it, so a residual channel is judged by every
layer of its stage at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optcc import Model, channels


@dataclass
class Group(channels.ChannelGroup):
    """A channel group with the importance of each of its classes (same order)."""

    importance: np.ndarray = field(default_factory=lambda: np.zeros(0))


def ranked_groups(analysis: channels.ChannelAnalysis) -> list[Group]:
    """The analysis' editable groups, ready to receive importances."""
    return [Group(g.sources, g.classes, g.unit) for g in analysis.groups()]


def _set(groups: list[Group], score: dict[int, float]) -> None:
    for g in groups:
        g.importance = np.array([score.get(c, 0.0) for c in g.classes])


def magnitude_importance(analysis: channels.ChannelAnalysis, groups: list[Group], norm: str) -> None:
    """Group-summed magnitude: for each class, the sum over every sliced constant of the
    L1 norm (``norm='l1'``) or squared L2 norm (``'l2'``) of its slice."""
    score: dict[int, float] = defaultdict(float)
    for s in analysis.slices:
        values = np.moveaxis(np.asarray(s.tensor.values, dtype=np.float64), s.axis, 0)
        rows = values.reshape(values.shape[0], -1)
        per_row = np.abs(rows).sum(axis=1) if norm == "l1" else (rows**2).sum(axis=1)
        for position, cid in enumerate(s.ids):
            score[analysis.find(cid)] += float(per_row[position])
    _set(groups, score)


def bn_scale_importance(analysis: channels.ChannelAnalysis, groups: list[Group], bn_gammas: set[str]) -> None:
    """|gamma| of the BatchNormalizations in the group (Network Slimming); groups without
    BatchNorm fall back to L2 magnitude."""
    magnitude_importance(analysis, groups, "l2")
    score: dict[int, float] = defaultdict(float)
    for s in analysis.slices:
        if s.tensor.name in bn_gammas:
            values = np.abs(np.asarray(s.tensor.values, dtype=np.float64))
            for position, cid in enumerate(s.ids):
                score[analysis.find(cid)] += float(values[position])
    for g in groups:
        if any(score.get(c, 0.0) for c in g.classes):
            g.importance = np.array([score.get(c, 0.0) for c in g.classes])


def activation_importance(
    analysis: channels.ChannelAnalysis,
    groups: list[Group],
    model: Model,
    batches: Callable[[], Iterable[Any]],
    progress: Any,
) -> None:
    """Mean |activation| of each class at its source layers' outputs, over the calibration
    data (a data-driven criterion: channels that stay near zero on real inputs go first)."""
    from optcc import OrtRunner

    wanted: dict[str, tuple[int, list[int]]] = {}
    sources = {s for g in groups for s in g.sources}
    for node in model.graph.nodes:
        if node.name in sources:
            ids = analysis.tensor_ids.get(node.outputs[0].name, {})
            if len(ids) == 1:
                wanted[node.outputs[0].name] = next(iter(ids.items()))
    runner = OrtRunner(model, extra_outputs=list(wanted), optimization="disable")
    names = runner.output_names
    sums: dict[str, np.ndarray] = {}
    count = 0
    for batch in progress.track(batches(), description="pruning: activation statistics"):
        outs = dict(zip(names, runner.run(batch.inputs), strict=True))
        count += 1
        for name, (axis, _) in wanted.items():
            a = np.abs(outs[name].astype(np.float64))
            mean = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).mean(axis=1)
            sums[name] = sums.get(name, 0) + mean
    score: dict[int, float] = defaultdict(float)
    for name, (_, ids) in wanted.items():
        for position, cid in enumerate(ids):
            score[analysis.find(cid)] += float(sums[name][position] / max(count, 1))
    _set(groups, score)
