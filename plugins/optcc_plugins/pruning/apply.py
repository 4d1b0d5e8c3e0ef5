"""Importance, selection and the graph edit for structured pruning (see groups.py)."""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc import Model

from .groups import Analysis, shape_slot


@dataclass
class Group:
    """Classes that share the same source layers: one channel space, ranked together.

    ``unit`` is how many output channels of a source layer one class stands for (1 for a
    channel, the head size for an attention head).
    """

    sources: tuple[str, ...]
    classes: list[int]
    unit: int
    importance: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def name(self) -> str:
        return self.sources[0] if len(self.sources) == 1 else f"{self.sources[0]} (+{len(self.sources) - 1} coupled)"


def build_groups(analysis: Analysis) -> list[Group]:
    members = analysis.classes()
    by_sources: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for root, ids in members.items():
        if root in analysis.blocked:
            continue
        sources = tuple(sorted({analysis.source_of[i] for i in ids}))
        if any(":fixed" in s for s in sources):
            continue
        by_sources[sources].append(root)
    groups = []
    for sources, roots in by_sources.items():
        first = sources[0]
        unit = max(1, sum(1 for i in members[roots[0]] if analysis.source_of[i] == first))
        groups.append(Group(sources, sorted(roots), unit))
    return sorted(groups, key=lambda g: g.sources)


def magnitude_importance(analysis: Analysis, groups: list[Group], norm: str) -> None:
    """Group-summed magnitude: for each class, the sum over every sliced constant of the
    L1 norm (``norm='l1'``) or squared L2 norm (``'l2'``) of its slice."""
    score: dict[int, float] = defaultdict(float)
    for s in analysis.slices:
        values = np.moveaxis(np.asarray(s.tensor.values, dtype=np.float64), s.axis, 0)
        rows = values.reshape(values.shape[0], -1)
        per_row = np.abs(rows).sum(axis=1) if norm == "l1" else (rows**2).sum(axis=1)
        for position, cid in enumerate(s.ids):
            score[analysis.find(cid)] += float(per_row[position])
    for g in groups:
        g.importance = np.array([score[c] for c in g.classes])


def bn_scale_importance(analysis: Analysis, groups: list[Group], bn_gammas: set[str]) -> None:
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
    analysis: Analysis, groups: list[Group], model: Model, batches: Any, progress: Any
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
    for g in groups:
        g.importance = np.array([score[c] for c in g.classes])


def plan_removal(
    groups: list[Group],
    ratio: float,
    *,
    round_to: int,
    min_channels: int,
    overrides: dict[str, float],
    exclude: list[str],
    scope: str,
) -> tuple[set[int], dict[str, str]]:
    """Which classes to remove. Returns (removed roots, skip reasons by group name)."""
    removed: set[int] = set()
    skipped: dict[str, str] = {}
    counts: dict[int, int] = {}
    active = []
    for gi, g in enumerate(groups):
        if any(fnmatch.fnmatchcase(s, p) for s in g.sources for p in exclude):
            skipped[g.name] = "excluded by the recipe"
            continue
        r = ratio
        for pattern, value in overrides.items():
            if any(fnmatch.fnmatchcase(s, pattern) for s in g.sources):
                r = value
        active.append((gi, r))
    if scope == "global" and active:
        normalized = []
        for gi, _ratio in active:
            imp = groups[gi].importance
            mean = float(imp.mean()) if imp.size and imp.mean() > 0 else 1.0
            normalized += [(v / mean, gi) for v in imp]
        normalized.sort()
        budget = int(ratio * len(normalized))
        per_group: dict[int, int] = defaultdict(int)
        for _, gi in normalized[:budget]:
            per_group[gi] += 1
        for gi, r in active:
            target = per_group.get(gi, 0)
            if r != ratio:  # a per-layer override wins over the global ranking
                target = int(round(r * len(groups[gi].classes)))
            counts[gi] = target
    else:
        for gi, r in active:
            counts[gi] = int(round(r * len(groups[gi].classes)))
    for gi, drop in counts.items():
        g = groups[gi]
        n = len(g.classes)
        keep = n - drop
        step = max(1, round_to // math.gcd(round_to, g.unit)) if round_to > 1 else 1
        keep = max(keep, math.ceil(min_channels / g.unit), 1)
        keep = min(n, int(math.ceil(keep / step) * step))
        if keep >= n:
            if drop > 0:
                skipped[g.name] = (
                    f"{n} unit(s): rounding to a multiple of {round_to} channels and the "
                    f"minimum of {min_channels} leave nothing to remove"
                )
            continue
        order = np.argsort(g.importance, kind="stable")
        removed.update(g.classes[i] for i in order[: n - keep])
    return removed, skipped


def unshare_conflicting_constants(analysis: Analysis) -> None:
    """Give a node its own copy of a constant that another node slices differently.

    Exporters deduplicate identical initializers (freshly initialised biases are all zero),
    so one tensor can feed layers whose channels are pruned differently. Modifies the graph
    the analysis refers to.
    """
    # Readers that do not slice (a LayerNorm sharing a deduplicated zero bias) keep the
    # original; the slicing nodes get one copy between them.
    slicers: dict[int, set[int]] = defaultdict(set)
    for s in analysis.slices:
        if s.node is not None:
            slicers[id(s.tensor)].add(id(s.node))
    private: dict[int, gs.Constant] = {}
    for s in analysis.slices:
        tensor = s.tensor
        if id(tensor) in private:
            s.tensor = private[id(tensor)]
            continue
        readers = {id(n) for n in tensor.outputs}
        if s.node is not None and readers - slicers[id(tensor)]:
            clone = gs.Constant(f"{tensor.name}_pruned", np.array(tensor.values))
            for other in analysis.slices:
                if other.tensor is tensor and other.node is not None:
                    for i, t in enumerate(other.node.inputs):
                        if t is tensor:
                            other.node.inputs[i] = clone
            private[id(tensor)] = clone
            s.tensor = clone
    for s in analysis.slices:
        if id(s.tensor) in private:
            s.tensor = private[id(s.tensor)]
    seen: dict[tuple[int, int], list[int]] = {}
    clones: dict[tuple[int, int], gs.Constant] = {}
    for s in analysis.slices:
        key = (id(s.tensor), s.axis)
        first = seen.setdefault(key, s.ids)
        if first is s.ids or first == s.ids or s.node is None:
            continue
        clone_key = (id(s.tensor), id(s.node))
        if clone_key not in clones:
            clone = gs.Constant(f"{s.tensor.name}_for_{s.node.name}", np.array(s.tensor.values))
            for i, t in enumerate(s.node.inputs):
                if t is s.tensor:
                    s.node.inputs[i] = clone
            clones[clone_key] = clone
        s.tensor = clones[clone_key]


def _slice_groups(analysis: Analysis) -> dict[int, tuple[gs.Constant, dict[int, list[int]]]]:
    """Per constant (by identity): its axes and the ids along each (deduplicated)."""
    unshare_conflicting_constants(analysis)
    out: dict[int, tuple[gs.Constant, dict[int, list[int]]]] = {}
    for s in analysis.slices:
        tensor, axes = out.setdefault(id(s.tensor), (s.tensor, {}))
        axes.setdefault(s.axis, s.ids)
    return out


def apply_removal(model: Model, analysis: Analysis, removed: set[int]) -> None:
    """Slice every recorded constant and fix attributes and shapes (modifies ``model``)."""
    find = analysis.find
    for tensor, axes in _slice_groups(analysis).values():
        values = np.asarray(tensor.values)
        for axis, ids in axes.items():
            keep = [i for i, cid in enumerate(ids) if find(cid) not in removed]
            if len(keep) < values.shape[axis]:
                values = np.take(values, keep, axis=axis)
        tensor.values = np.ascontiguousarray(values)
    for node, ids in analysis.group_attrs:
        node.attrs["group"] = sum(1 for cid in ids if find(cid) not in removed)
    for node, pieces in analysis.split_fixups:
        sizes = [sum(1 for cid in piece if find(cid) not in removed) for piece in pieces]
        if "split" in node.attrs:
            node.attrs["split"] = sizes
        else:  # opset 13+: sizes are an input (an initializer or a Constant node's output)
            node.inputs[1] = gs.Constant(f"{node.name}_split_pruned", np.array(sizes, np.int64))
    for node, axis, per_head, unit in analysis.reshape_fixups:
        new_size = sum(1 for cid in per_head if find(cid) not in removed) * unit
        set_shape_dim(node, axis, new_size)
    for tensor in model.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in model.graph.inputs and tensor not in model.graph.outputs:
            tensor.shape = None  # stale shapes would fail the checker; inference recomputes them


def set_shape_dim(node: gs.Node, axis: int, size: int) -> None:
    slot = shape_slot(node, axis)
    if slot is None:
        raise ValueError(f"Reshape '{node.name}': the target shape is computed at run time")
    if slot == "implicit":
        return
    const, index = slot  # type: ignore[misc]
    if isinstance(const, gs.Node):  # a Constant node: edit its value in place
        values = np.asarray(const.attrs["value"].values).copy()
        values.reshape(-1)[index] = size
        const.attrs["value"] = gs.Constant(f"{const.name}_value_pruned", values)
        return
    values = np.asarray(const.values).copy()
    flat = values.reshape(-1)
    flat[index] = size
    replacement = gs.Constant(f"{const.name}_pruned_{node.name}", values)
    for i, t in enumerate(node.inputs):
        if t is const:
            node.inputs[i] = replacement
            return
    producer = node.inputs[1].inputs[0]
    for i, t in enumerate(producer.inputs):
        if t is const:
            producer.inputs[i] = replacement
            return


def zero_removed(model: Model, analysis: Analysis, removed: set[int]) -> None:
    """The reference for testing: the same model with every slice of the removed classes
    set to zero (modifies ``model``, whose constants must be the analysed ones)."""
    find = analysis.find
    for tensor, axes in _slice_groups(analysis).values():
        values = np.asarray(tensor.values).copy()
        for axis, ids in axes.items():
            drop = [i for i, cid in enumerate(ids) if find(cid) in removed]
            if drop:
                index = [slice(None)] * values.ndim
                index[axis] = drop  # type: ignore[call-overload]
                values[tuple(index)] = 0
        tensor.values = values
