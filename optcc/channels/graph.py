"""The graph walk: run the op rules over a model in topological order.

:func:`analyze` gives every output channel of a weighted layer an id and lets the rules
(:mod:`optcc.channels.rules`) carry ids from tensor to tensor. The walk itself knows no op:
for every node it picks the rule of highest precedence, lets it propagate, and blocks the
ids of any input that reaches a node without a rule. Ids that reach a graph output are
blocked too (the model's interface must not change).

Rules see the walk through a :class:`ChannelContext`: concrete shapes, the ids each tensor
carries per axis, and the calls that record coupling, slices, fixups and blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from optcc.channels.analysis import ChannelAnalysis, ParamSlice, SizeFixup
from optcc.channels.index import constant_value
from optcc.channels.rules import RuleRegistry, default_rules
from optcc.ir.model import Model

logger = logging.getLogger(__name__)

#: Ids per axis of one tensor: axis -> the id at each position along it.
AxisIds = dict[int, list[int]]


def normalize_axis(axis: int, rank: int) -> int:
    """A non-negative axis index."""
    return axis + rank if axis < 0 else axis


@dataclass(frozen=True)
class ChannelOptions:
    """What the analysis may treat as editable beyond plain channels.

    ``normalized``: channels that a LayerNorm, RMSNorm or GroupNorm normalizes over (the
    residual width of a transformer, a ConvNeXt stage) may be removed; otherwise they are
    blocked. ``norm_statistics`` says what a normalization over pruned channels computes:
    ``"kept"`` normalizes over the kept channels (fused LayerNormalization stays as it
    is; the statistics change), ``"original"`` keeps the statistics the zeroed original
    has (means over the original width: a fused LayerNormalization is rewritten into
    elementary ops).
    """

    normalized: bool = False
    norm_statistics: str = "kept"


class ChannelContext:
    """What a rule reads and records while the graph is walked.

    ``model`` is the model being analysed (rules must not modify it), ``shapes`` concrete
    shapes per tensor name (see :func:`probe_shapes`), ``analysis`` the result being built,
    ``options`` the :class:`ChannelOptions` of this analysis.
    """

    def __init__(self, model: Model, shapes: Mapping[str, list[int]], analysis: ChannelAnalysis,
                 options: ChannelOptions | None = None) -> None:
        self.model = model
        self.shapes = shapes
        self.analysis = analysis
        self.options = options or ChannelOptions()

    # ------------------------------------------------------------------ reading
    constant_value = staticmethod(constant_value)

    def shape(self, t: gs.Tensor) -> list[int] | None:
        """The concrete shape of ``t`` (constants by value, others from the probe)."""
        value = constant_value(t)
        if value is not None:
            return list(value.shape)
        shape = self.shapes.get(t.name)
        return list(shape) if shape is not None else None

    def rank(self, t: gs.Tensor) -> int | None:
        shape = self.shape(t)
        if shape is None and t.shape is not None:
            return len(t.shape)
        return len(shape) if shape is not None else None

    def ids(self, t: gs.Tensor) -> AxisIds:
        """The ids ``t`` carries, per axis (empty when it carries none)."""
        return self.analysis.tensor_ids.get(t.name, {})

    def tracked(self, t: gs.Tensor) -> bool:
        return t.name in self.analysis.tensor_ids

    # ------------------------------------------------------------------ recording
    def set_ids(self, t: gs.Tensor, ids: AxisIds) -> None:
        """Say that tensor ``t`` carries ``ids`` (per axis)."""
        if ids:
            self.analysis.tensor_ids[t.name] = ids

    def new_ids(self, n: int, source: str) -> list[int]:
        """``n`` fresh channel ids created by layer ``source``."""
        return self.analysis.new_ids(n, source)

    def couple(self, a: list[int], b: list[int]) -> None:
        """Couple ``a[i]`` with ``b[i]`` for every position (same length required)."""
        for x, y in zip(a, b, strict=True):
            self.analysis.union(x, y)

    def block(self, ids: list[int], reason: str) -> None:
        """Keep the classes of ``ids`` unchanged, for ``reason`` (shown in reports)."""
        self.analysis.block(ids, reason)

    def block_all(self, t: gs.Tensor, reason: str) -> None:
        """Block every id ``t`` carries."""
        for ids in self.ids(t).values():
            self.analysis.block(ids, reason)

    def slice(self, tensor: gs.Constant, axis: int, ids: list[int], node: gs.Node | None,
              role: str = "vector") -> None:
        """Record that constant ``tensor``, read by ``node``, is sliced along ``axis`` with
        ``ids[i]`` at position ``i``."""
        self.analysis.slices.append(ParamSlice(tensor, axis, ids, role, node))

    def fixup(self, node: gs.Node, pieces: list[list[int]],
              update: Callable[[Model, gs.Node, list[int]], None], unit: int = 1) -> None:
        """Record a value of ``node`` that follows the number of kept ids per piece."""
        self.analysis.fixups.append(SizeFixup(node, pieces, update, unit))


def probe_shapes(model: Model) -> dict[str, list[int]]:
    """Concrete shapes for the analysis: batch 1, other dynamic dimensions 5 (a size
    unlikely to collide with real ones, so axes stay distinguishable)."""
    from optcc.ir.stats import static_shapes

    given = {}
    for t in model.inputs:
        dims = list(t.shape or [])
        given[t.name] = [
            (1 if i == 0 else 5) if not isinstance(d, int) or d < 0 else d for i, d in enumerate(dims)
        ]
    shapes, _ = static_shapes(model, given)
    return shapes


def analyze(
    model: Model,
    shapes: Mapping[str, list[int]] | None = None,
    *,
    rules: RuleRegistry | None = None,
    options: ChannelOptions | None = None,
) -> ChannelAnalysis:
    """Walk ``model`` (not modified) and return its :class:`ChannelAnalysis`.

    ``shapes`` defaults to :func:`probe_shapes`; ``rules`` to :func:`default_rules` (the
    built-in rules plus every plugin's); ``options`` to :class:`ChannelOptions` (plain
    channels only). The graph is sorted topologically first.
    """
    if shapes is None:
        shapes = probe_shapes(model)
    if rules is None:
        rules = default_rules()
    analysis = ChannelAnalysis()
    ctx = ChannelContext(model, shapes, analysis, options)
    model.graph.toposort()
    for node in model.graph.nodes:
        rule = rules.rule_for(node, ctx)
        carrying = [t for t in node.inputs if ctx.tracked(t)]
        if rule is None:
            for t in carrying:
                ctx.block_all(t, f"read by {node.op} '{node.name}', which has no pruning rule")
            continue
        if carrying or rule.creates_channels:
            rule.propagate(node, ctx)
    for out in model.graph.outputs:
        ctx.block_all(out, f"reaches the graph output '{out.name}'")
    analysis.finalize()
    return analysis

