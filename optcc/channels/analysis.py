"""The result of a channel analysis: channel ids, their coupling, and what to edit.

Every output channel of a layer that creates channels (a Conv, Gemm or MatMul with a
constant weight) gets an integer *id*. Rules (:mod:`optcc.channels.rules`) say how ids
flow through each op; where two ids must be removed, kept or permuted together they are
*coupled* (a union-find joins them into one *class*). A class is the unit a structured
edit acts on: remove it, and every constant sliced by one of its ids loses that slice.

:class:`ChannelAnalysis` records

- the classes (``find``, ``classes``) and which layer created each id (``source_of``);
- which classes are *blocked* (reach a graph output, are normalised or reduced over, are
  read by an op without a rule), with the first reason given;
- every constant to slice: a :class:`ParamSlice` says which axis of which constant, and
  which id sits at each position along it;
- every attribute or shape constant that depends on how many channels survive
  (:class:`SizeFixup`: a depthwise Conv's ``group``, Split sizes, Reshape targets);
- the ids carried by each tensor, per axis (``tensor_ids``).

:meth:`ChannelAnalysis.groups` gathers classes into :class:`ChannelGroup` s: classes whose
ids come from the same source layers share one channel space and are ranked together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from optcc.ir.model import Model

#: Suffix of the source name given to ids that stand for fixed, unprunable channels (the
#: constant part of a Concat, say). Such ids are always blocked.
FIXED_SOURCE = ":fixed"


@dataclass
class ParamSlice:
    """A constant sliced along ``axis``; ``ids[i]`` is the channel id of position ``i``.

    ``role`` is ``"out"`` (a layer's own channels), ``"in"`` (a consumer's input columns)
    or ``"vector"`` (a per-channel vector: bias, BatchNorm or LayerNorm parameter, broadcast
    constant). ``node`` is the node reading the constant, so a constant that several nodes
    slice differently can be given one copy per reader.
    """

    tensor: gs.Constant
    axis: int
    ids: list[int]
    role: str
    node: gs.Node | None = None


@dataclass
class SizeFixup:
    """An attribute or shape value of ``node`` that follows the number of kept channels.

    ``pieces`` are lists of ids; after an edit, ``update(model, node, sizes)`` is called
    with, for every piece, ``unit`` times the number of its ids that were kept (a Split gets
    one size per output, a depthwise Conv's ``group`` one count, a Reshape one dimension).
    """

    node: gs.Node
    pieces: list[list[int]]
    update: Callable[[Model, gs.Node, list[int]], None]
    unit: int = 1

    def apply(self, model: Model, kept: Callable[[int], bool]) -> None:
        sizes = [sum(1 for cid in piece if kept(cid)) * self.unit for piece in self.pieces]
        self.update(model, self.node, sizes)


@dataclass
class ChannelGroup:
    """Classes that share the same source layers: one channel space, ranked together.

    ``unit`` is how many output channels of a source layer one class stands for, at most
    over the sources (1 for a channel, the head size for an attention head, several head
    sizes for a fused QKV projection or a GQA group).
    """

    sources: tuple[str, ...]
    classes: list[int]
    unit: int

    @property
    def name(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0]
        return f"{self.sources[0]} (+{len(self.sources) - 1} coupled)"


@dataclass
class ChannelAnalysis:
    """Channel ids, their classes, what blocks them and what an edit must change."""

    parent: list[int] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)  # root -> reason (after finalize)
    block_requests: list[tuple[int, str]] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    fixups: list[SizeFixup] = field(default_factory=list)
    source_of: dict[int, str] = field(default_factory=dict)  # id -> layer that created it
    tensor_ids: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    # ------------------------------------------------------------------ union-find
    def new_ids(self, n: int, source: str) -> list[int]:
        """``n`` fresh ids, each its own class, created by layer ``source``."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        for i in range(start, start + n):
            self.source_of[i] = source
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        """The class (root id) of id ``i``."""
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Couple ids ``a`` and ``b``: from now on they are removed or kept together."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, ids: list[int], reason: str) -> None:
        """Mark the classes of ``ids`` as not editable, for ``reason``."""
        for i in ids:
            self.block_requests.append((i, reason))

    def finalize(self) -> None:
        """Resolve block requests to classes (call once the walk is done)."""
        self.blocked = {}
        for i, reason in self.block_requests:
            self.blocked.setdefault(self.find(i), reason)

    def classes(self) -> dict[int, list[int]]:
        """Every class: root id -> member ids."""
        members: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            members[self.find(i)].append(i)
        return dict(members)

    # ------------------------------------------------------------------ views
    def groups(self) -> list[ChannelGroup]:
        """The editable classes gathered by their source layers (blocked ones left out)."""
        members = self.classes()
        by_sources: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for root, ids in members.items():
            if root in self.blocked:
                continue
            sources = tuple(sorted({self.source_of[i] for i in ids}))
            if any(FIXED_SOURCE in s for s in sources):
                continue
            by_sources[sources].append(root)
        groups = []
        for sources, roots in by_sources.items():
            per_source: dict[str, int] = defaultdict(int)
            for i in members[roots[0]]:
                per_source[self.source_of[i]] += 1
            groups.append(ChannelGroup(sources, sorted(roots), max(per_source.values())))
        return sorted(groups, key=lambda g: g.sources)

    def describe_blocked(self) -> dict[str, str]:
        """Why each blocked layer's channels cannot be edited, by source layer."""
        out: dict[str, str] = {}
        for i, source in self.source_of.items():
            reason = self.blocked.get(self.find(i))
            if reason and FIXED_SOURCE not in source:
                out.setdefault(source, reason)
        return out
