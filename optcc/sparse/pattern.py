"""N:M semi-structured sparsity: which axis a layer reduces over, mask selection, compliance.

NVIDIA's sparse tensor cores (Ampere and newer) run a GEMM about twice as fast when, in every
group of 4 consecutive weights along the *reduction* dimension, at most 2 are non-zero (the
2:4 pattern). "Along the reduction dimension as the hardware reads it" means:

- ``Conv`` (weight ``K × C/g × R × S``): the input channels, axis 1. A group is 4
  consecutive input channels at a fixed output channel ``k`` and kernel position ``(r, s)``;
- ``ConvTranspose`` (weight ``C × K/g × R × S``): the input channels, axis 0;
- ``Gemm`` (``Y = A·B``, ``B`` the weight): ``K`` is axis 0 of ``B``, or axis 1 with
  ``transB=1`` (the ``Linear`` layout ``N × K``);
- ``MatMul``: ``x @ W`` reduces over ``W``'s second-to-last axis, ``W @ x`` over its last.

Every weight is viewed as a matrix ``rows × K_total`` (:func:`weight_matrix`): the reduction
axis is moved last and the remaining axes after the output axis are folded into the columns,
so that for a Conv the columns run ``(r, s, c)`` and the N:M groups are consecutive columns.
That is also the column order of the layer's unfolded input (im2col), which the data-aware
methods need.

A weight stored as INT8 behind a ``DequantizeLinear`` counts as zero where it equals its
zero point. Everything here is numpy and onnx-graphsurgeon: no torch, no GPU.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from optcc.ir.model import WEIGHTED_OPS, Model

logger = logging.getLogger(__name__)

#: At least this share of a layer's groups must follow the pattern for "nearly complies".
NEARLY_SHARE = 0.9


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zeros in every group of ``m`` consecutive weights along K."""

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m <= 64):
            raise ValueError(f"N:M pattern needs 0 < N < M <= 64, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str | NMPattern) -> NMPattern:
        """``"2:4"`` → ``NMPattern(2, 4)``."""
        if isinstance(text, NMPattern):
            return text
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"N:M pattern must look like '2:4', got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def accelerated(self) -> bool:
        """Whether NVIDIA's sparse tensor cores (and so TensorRT) run this pattern faster."""
        return (self.n, self.m) == (2, 4)

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# ---------------------------------------------------------------------------- matrix views
def weight_matrix(values: np.ndarray, axis: int) -> np.ndarray:
    """View a weight as ``rows × K_total`` with the reduction ``axis`` innermost.

    The first remaining axis becomes the rows (output channels); the other remaining axes
    (kernel positions) are folded into the columns ahead of the reduction axis, so
    consecutive columns ``j, j+1, ..`` within one kernel position are consecutive input
    channels. A 1-D weight is one row.
    """
    moved = np.moveaxis(np.asarray(values), axis, -1)
    if moved.ndim == 1:
        return moved.reshape(1, -1)
    return moved.reshape(moved.shape[0], -1)


def matrix_to_weight(matrix: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Inverse of :func:`weight_matrix` for a weight of ``shape``."""
    shape = tuple(int(d) for d in shape)
    moved_shape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape)) + (shape[axis],)
    return np.moveaxis(np.asarray(matrix).reshape(moved_shape), -1, axis % len(shape))


def nm_keep(scores: np.ndarray, pattern: NMPattern) -> np.ndarray:
    """Keep the ``n`` highest-scoring entries of every ``m`` consecutive columns.

    ``scores`` is ``rows × K`` with ``K`` a multiple of ``m``; returns a boolean mask of
    the same shape (True = kept). Ties go to the lower column index, so the result is
    deterministic.
    """
    rows, k = scores.shape
    if k % pattern.m:
        raise ValueError(f"K={k} is not a multiple of {pattern.m}")
    groups = np.asarray(scores, dtype=np.float64).reshape(rows, k // pattern.m, pattern.m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., : pattern.n], True, axis=-1)
    return keep.reshape(rows, k)


def nonzeros_per_group(matrix: np.ndarray, m: int, zero: np.ndarray | None = None) -> np.ndarray:
    """Non-zero count of every group of ``m`` consecutive columns of ``matrix`` (rows × K).

    ``zero`` (broadcastable to ``matrix``) is the value that stands for zero (an INT8 zero
    point); None means 0.
    """
    nonzero = matrix != (0 if zero is None else zero)
    rows, k = nonzero.shape
    return nonzero.reshape(rows, k // m, m).sum(axis=-1)


@dataclass
class NMCheck:
    """How well one weight follows an N:M pattern."""

    groups: int
    violating: int
    first: list[tuple[int, int]] = field(default_factory=list)  # (row, first column of group)

    @property
    def status(self) -> str:
        """``complies`` (every group), ``nearly`` (at least 90 %), or ``no``."""
        if self.violating == 0:
            return "complies"
        if self.groups and (self.groups - self.violating) / self.groups >= NEARLY_SHARE:
            return "nearly"
        return "no"


def check_matrix(matrix: np.ndarray, pattern: NMPattern, zero: np.ndarray | None = None,
                 *, examples: int = 5) -> NMCheck:
    """Check a ``rows × K`` matrix (K a multiple of m) against ``pattern``."""
    counts = nonzeros_per_group(matrix, pattern.m, zero)
    bad = np.argwhere(counts > pattern.n)
    return NMCheck(
        groups=int(counts.size), violating=int(len(bad)),
        first=[(int(r), int(g) * pattern.m) for r, g in bad[:examples]],
    )


# ---------------------------------------------------------------------------- layers
@dataclass
class SparseLayer:
    """A weighted layer as the N:M pattern sees it.

    ``weight`` is the constant that holds the values (the INT8 constant for a quantized
    weight); ``axis`` is the reduction axis *in that constant's own layout* (a Transpose
    between the constant and the layer is followed); ``reduction`` is the length of that
    axis (per convolution group). ``reason`` says why the layer can never follow an N:M
    pattern (None when it can).
    """

    node: gs.Node
    weight: gs.Constant
    axis: int
    reduction: int
    groups: int = 1
    weight_operand: int = 1  # which input of the node holds the weight (0: ``W @ x``)
    quantized: bool = False
    zero: np.ndarray | None = None  # INT8 zero point, broadcast to the weight's shape
    via: tuple[str, ...] = ()  # ops between the constant and the layer
    shared_with: tuple[str, ...] = ()  # other nodes reading the same constant
    reason: str | None = None

    @property
    def name(self) -> str:
        return str(self.node.name)

    @property
    def op(self) -> str:
        return str(self.node.op)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in np.asarray(self.weight.values).shape)

    @property
    def in_channels(self) -> int:
        """Input channels (all groups) or the reduction length K."""
        return self.reduction * (self.groups if self.op.startswith("Conv") else 1)

    @property
    def out_channels(self) -> int:
        """Output channels (all groups) or N."""
        shape = self.shape
        if self.op == "Conv":
            return shape[0]
        if self.op == "ConvTranspose":
            return shape[1] * self.groups
        return int(np.prod(shape)) // max(shape[self.axis], 1)

    def matrix(self) -> np.ndarray:
        """The weight as ``rows × K_total`` (see :func:`weight_matrix`)."""
        return weight_matrix(np.asarray(self.weight.values), self.axis)

    def zero_matrix(self) -> np.ndarray | None:
        return None if self.zero is None else weight_matrix(self.zero, self.axis)

    def check(self, pattern: NMPattern) -> NMCheck | None:
        """The layer's compliance, or None when it cannot follow the pattern."""
        if self.reason is not None or self.reduction % pattern.m:
            return None
        return check_matrix(self.matrix(), pattern, self.zero_matrix())


def _reduction_axis(node: gs.Node, operand: int, ndim: int) -> int | None:
    """The reduction axis of the weight that is input ``operand`` of ``node``."""
    if node.op == "Conv":
        return 1 if operand == 1 else None
    if node.op == "ConvTranspose":
        return 0 if operand == 1 else None
    if node.op == "Gemm":
        if operand == 1:
            return 1 if int(node.attrs.get("transB", 0)) else 0
        return 0 if int(node.attrs.get("transA", 0)) else 1
    if node.op == "MatMul":
        if ndim == 1:
            return 0
        return ndim - 2 if operand == 1 else ndim - 1
    return None


def _trace_constant(tensor: gs.Tensor, axis: int) -> tuple[gs.Constant, int, gs.Node | None, tuple[str, ...], gs.Node | None] | None:
    """Follow ``tensor`` back to its constant through Transpose/Identity/Cast and one
    DequantizeLinear. Returns (constant, axis in the constant's layout, the DQ node, the
    ops passed, the node that reads the constant directly), or None."""
    via: list[str] = []
    dq = None
    reader = None
    while not isinstance(tensor, gs.Constant):
        if not tensor.inputs:
            return None
        producer = tensor.inputs[0]
        if producer.op == "Transpose":
            perm = producer.attrs.get("perm")
            if perm is None:
                rank = len(producer.inputs[0].shape or [])
                perm = list(reversed(range(rank)))
            axis = int(list(perm)[axis])
        elif producer.op == "DequantizeLinear" and dq is None:
            dq = producer
        elif producer.op not in ("Identity", "Cast"):
            return None
        via.append(producer.op)
        reader = producer
        tensor = producer.inputs[0]
    return tensor, axis, dq, tuple(reversed(via)), reader


def _dq_zero(dq: gs.Node, shape: tuple[int, ...]) -> np.ndarray:
    """The zero point of a DequantizeLinear, broadcast to the quantized weight's shape."""
    if len(dq.inputs) < 3 or not isinstance(dq.inputs[2], gs.Constant):
        return np.zeros(shape, dtype=np.int64)
    zp = np.asarray(dq.inputs[2].values).astype(np.int64)
    if zp.ndim == 1 and zp.size > 1:
        axis = int(dq.attrs.get("axis", 1)) % len(shape)
        view = [1] * len(shape)
        view[axis] = -1
        zp = zp.reshape(view)
    return np.broadcast_to(zp, shape)


def sparse_layer(node: gs.Node) -> SparseLayer | None:
    """The :class:`SparseLayer` of a Conv/ConvTranspose/Gemm/MatMul with a constant weight,
    or None for layers without one (two activations multiplied)."""
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
        return None
    operands = [1, 0] if node.op in ("MatMul", "Gemm") else [1]
    for operand in operands:
        tensor = node.inputs[operand]
        found = _trace_constant(tensor, 0)
        if found is None:
            continue
        rank = len(tensor.shape) if tensor.shape is not None else np.asarray(found[0].values).ndim
        axis = _reduction_axis(node, operand, rank)
        if axis is None:
            return None
        traced = _trace_constant(tensor, axis)
        assert traced is not None
        constant, const_axis, dq, via, reader = traced
        values = np.asarray(constant.values)
        shape = tuple(int(d) for d in values.shape)
        layer = SparseLayer(node=node, weight=constant, axis=const_axis,
                            reduction=shape[const_axis] if shape else 0, via=via,
                            weight_operand=operand)
        if dq is not None and values.dtype.kind in "iu":
            layer.quantized = True
            layer.zero = _dq_zero(dq, shape)
        if node.op in ("Conv", "ConvTranspose"):
            layer.groups = int(node.attrs.get("group", 1))
        if node.op == "ConvTranspose" and shape:
            layer.reduction = shape[0] // max(layer.groups, 1)
        direct = reader if reader is not None else node
        layer.shared_with = tuple(n.name for n in constant.outputs if n is not direct)
        layer.reason = _why_not(layer, values)
        return layer
    return None


def _why_not(layer: SparseLayer, values: np.ndarray) -> str | None:
    if values.dtype.kind not in "fiu":
        return f"weight type {values.dtype} cannot hold a sparsity pattern"
    if values.ndim == 0 or values.size == 0:
        return "empty or scalar weight"
    if layer.op == "Conv" and layer.reduction == 1 and layer.groups > 1:
        return "depthwise convolution: one input channel per group, nothing to group along"
    if layer.op == "MatMul" and values.ndim > 2:
        return f"batched MatMul weight of rank {values.ndim}"
    return None


def sparse_layers(model: Model) -> list[SparseLayer]:
    """Every weighted layer of ``model`` with a constant weight, in graph order."""
    layers = []
    for node in model.graph.nodes:
        layer = sparse_layer(node)
        if layer is not None:
            layers.append(layer)
    return layers


def pattern_fit(layer: SparseLayer, pattern: NMPattern) -> str | None:
    """Why ``layer`` cannot follow ``pattern`` at all (None when it can)."""
    if layer.reason is not None:
        return layer.reason
    if layer.reduction % pattern.m:
        what = "input channels" if layer.op.startswith("Conv") else "reduction length K"
        per = " per group" if layer.groups > 1 else ""
        return f"{what}{per} ({layer.reduction}) is not a multiple of {pattern.m}"
    return None


def tensorrt_eligibility(layer: SparseLayer, pattern: NMPattern) -> str | None:
    """Why TensorRT would not run ``layer`` with sparse tactics (None when it may).

    TensorRT documents sparse tactics for convolutions and fully connected layers (and, in
    TensorRT 10, MatMuls with a constant weight): the 2:4 pattern along the input channels,
    an input-channel count that is a multiple of 4, and FP16 or INT8 precision. It times
    sparse kernels against dense ones and keeps the faster, so small layers usually stay
    dense (see docs/sparsity.md).
    """
    fit = pattern_fit(layer, pattern)
    if fit is not None:
        return fit
    if not pattern.accelerated:
        return f"{pattern} is not a pattern the sparse tensor cores accelerate (only 2:4 is)"
    if layer.op == "ConvTranspose":
        return "TensorRT has no sparse tactics for deconvolution (ConvTranspose)"
    if layer.op == "Conv" and layer.groups > 1:
        return f"grouped convolution (group={layer.groups}): TensorRT's sparse tactics cover dense convolutions"
    return None


def layer_compliance(model: Model, pattern: NMPattern | str = "2:4") -> list[dict[str, Any]]:
    """One row per weighted layer: its status against ``pattern`` (``complies``,
    ``nearly``, ``no``, or ``n/a`` with the reason), groups, violating groups, the first
    violations and TensorRT's view. The rows ``optcc inspect`` and the lint show."""
    pattern = NMPattern.parse(pattern)
    rows = []
    for layer in sparse_layers(model):
        fit = pattern_fit(layer, pattern)
        check = None if fit else layer.check(pattern)
        rows.append({
            "name": layer.name, "op": layer.op, "weight": layer.weight.name,
            "shape": list(layer.shape), "axis": layer.axis,
            "status": "n/a" if check is None else check.status,
            "reason": fit,
            "groups": None if check is None else check.groups,
            "violating": None if check is None else check.violating,
            "first_violations": [] if check is None else [
                _position(layer, row, col) for row, col in check.first],
            "tensorrt": tensorrt_eligibility(layer, pattern),
        })
    return rows


def _position(layer: SparseLayer, row: int, col: int) -> dict[str, Any]:
    """A violating group's position in the weight's own index space: the index of its first
    element (the group runs along ``axis``)."""
    moved_shape = [d for i, d in enumerate(layer.shape) if i != layer.axis] + [layer.shape[layer.axis]]
    flat = row * (int(np.prod(moved_shape[1:])) if len(moved_shape) > 1 else 0) + col
    if len(layer.shape) == 1:
        index = [col]
    else:
        moved_index = list(np.unravel_index(flat, moved_shape))
        index = moved_index[:-1]
        index.insert(layer.axis, moved_index[-1])
    return {"index": [int(i) for i in index], "axis": layer.axis}
