"""Streaming input statistics for the data-aware methods, in bounded memory.

For each layer the input activation is unfolded into the GEMM operand ``X`` whose columns
match the columns of the weight matrix (``optcc.sparse.weight_matrix``), and ``H = Σ XᵀX``
is accumulated batch by batch: K × K numbers per layer (per convolution group), whatever
the amount of data. Unfolding works on chunks of samples, so one batch never needs more
than a few tens of MB beyond the activation itself.

Unfolding per layer type (``y = X Wᵀ`` must hold exactly; the tests check it against ONNX
Runtime):

- ``Gemm``: ``X = A`` (or ``Aᵀ`` with ``transA``); a constant ``A`` (``Y = W·B``) gives
  ``X = Bᵀ`` (or ``B`` with ``transB``);
- ``MatMul``: ``x @ W`` flattens ``x`` to ``(-1, K)``; ``W @ x`` uses the columns of ``x``;
- ``Conv``: im2col. Every output position contributes one row: the input patch it reads,
  ordered (kernel position, input channel) like the weight matrix, one matrix per group;
  strides, dilations, explicit or SAME padding and 1-D/2-D/3-D kernels are handled;
- ``ConvTranspose`` (one group): the equivalent convolution: the input with ``stride − 1``
  zeros inserted between samples, padded by ``dilation·(k−1) − pad`` (plus the output
  padding), read by the kernel flipped in space.

Layers are calibrated *level by level* (``sequential``): a layer's level is the number of
selected layers on the longest path above it, so a level can be measured in one pass over
the data once every shallower level is sparsified, and each layer sees the outputs of its
already-sparsified predecessors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from optcc import Model, OrtRunner, SparseLayer

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20  # largest unfolded chunk held at once


def unfold_support(layer: SparseLayer) -> str | None:
    """Why the layer's input cannot be unfolded for data-aware pruning (None when it can)."""
    node = layer.node
    if "Transpose" in layer.via and len(layer.shape) > 2:
        return "weight reaches the layer through a Transpose"
    if node.op == "ConvTranspose":
        if layer.groups != 1:
            return "grouped ConvTranspose"
        if "output_shape" in node.attrs:
            return "ConvTranspose with output_shape"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "ConvTranspose with auto_pad"
    if node.op == "MatMul" and len(layer.shape) != 2:
        return "batched MatMul weight"
    return None


def input_name(layer: SparseLayer) -> str:
    """The activation the layer multiplies its weight with."""
    node = layer.node
    if node.op in ("MatMul", "Gemm") and layer.weight_operand == 0:
        return str(node.inputs[1].name)
    return str(node.inputs[0].name)


def layout_key(layer: SparseLayer) -> tuple[Any, ...]:
    """Layers with equal keys unfold their input identically (Q, K and V share one H)."""
    node = layer.node
    attrs = tuple(sorted((k, str(v)) for k, v in node.attrs.items()
                         if k not in ("alpha", "beta")))
    kernel = layer.shape[2:] if node.op.startswith("Conv") else ()
    return (input_name(layer), node.op, layer.weight_operand, kernel, attrs)


def _pads(node: Any, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    pad = node.attrs.get("auto_pad", "NOTSET")
    pad = pad.decode() if isinstance(pad, bytes) else pad
    nd = len(spatial)
    if pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if pad == "VALID":
        return [0] * (2 * nd)
    return [int(p) for p in node.attrs.get("pads", [0] * (2 * nd))]


def _patches(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
             pads: list[int]) -> np.ndarray:
    """im2col: ``(N·positions, prod(kernel), C)`` patches of ``x`` (N, C, *spatial)."""
    nd = len(kernel)
    widths = [(0, 0), (0, 0)] + [(max(pads[i], 0), max(pads[i + nd], 0)) for i in range(nd)]
    xp = np.pad(x, widths)
    crop = tuple([slice(None), slice(None)] + [
        slice(max(-pads[i], 0), xp.shape[2 + i] - max(-pads[i + nd], 0)) for i in range(nd)])
    xp = xp[crop]
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations)
    windows = windows[index]  # (N, C, *positions, *kernel)
    n, c = windows.shape[:2]
    order = [0] + list(range(2, 2 + 2 * nd)) + [1]
    return np.ascontiguousarray(windows.transpose(order)).reshape(n * int(np.prod(windows.shape[2:2 + nd])),
                                                                   int(np.prod(kernel)), c)


def unfold(layer: SparseLayer, x: np.ndarray) -> list[np.ndarray]:
    """The layer's GEMM operand for input ``x``: one ``rows × K_total`` matrix per group."""
    node = layer.node
    x = np.asarray(x, dtype=np.float32)
    if node.op == "Gemm":
        if layer.weight_operand == 1:
            rows = x.T if int(node.attrs.get("transA", 0)) else x
        else:
            rows = x if int(node.attrs.get("transB", 0)) else x.T
        return [rows]
    if node.op == "MatMul":
        k = layer.shape[layer.axis]
        if layer.weight_operand == 1:
            return [x.reshape(-1, k)]
        return [np.swapaxes(x, -1, -2).reshape(-1, k)]
    kernel = list(layer.shape[2:])
    nd = len(kernel)
    strides = [int(s) for s in node.attrs.get("strides", [1] * nd)]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * nd)]
    if node.op == "Conv":
        pads = _pads(node, list(x.shape[2:]), kernel, strides, dilations)
        patches = _patches(x, kernel, strides, dilations, pads)
        groups = layer.groups
        per = patches.shape[2] // groups
        return [patches[:, :, g * per:(g + 1) * per].reshape(len(patches), -1) for g in range(groups)]
    # ConvTranspose, one group: the equivalent stride-1 convolution of the zero-stuffed input.
    pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * nd))]
    extra = [int(p) for p in node.attrs.get("output_padding", [0] * nd)]
    stuffed = np.zeros(x.shape[:2] + tuple((size - 1) * s + 1 for size, s in zip(x.shape[2:], strides, strict=True)),
                       dtype=x.dtype)
    stuffed[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    eq_pads = [d * (k - 1) - p for k, d, p in zip(kernel, dilations, pads[:nd], strict=True)] + [
        d * (k - 1) - p + e for k, d, p, e in zip(kernel, dilations, pads[nd:], extra, strict=True)]
    patches = _patches(stuffed, kernel, [1] * nd, dilations, eq_pads)
    flipped = patches.reshape(len(patches), *kernel, patches.shape[2])
    flipped = flipped[(slice(None),) + (slice(None, None, -1),) * nd]
    return [np.ascontiguousarray(flipped).reshape(len(patches), -1)]


@dataclass
class InputStats:
    """``H = Σ XᵀX`` per group of one layout, and the number of rows seen."""

    hessians: list[np.ndarray]
    rows: int = 0


def _accumulate(stats: InputStats | None, matrices: list[np.ndarray]) -> InputStats:
    if stats is None:
        stats = InputStats([np.zeros((m.shape[1], m.shape[1])) for m in matrices])
    for h, m in zip(stats.hessians, matrices, strict=True):
        m32 = np.asarray(m, dtype=np.float32)
        h += (m32.T @ m32).astype(np.float64)  # float32 GEMM per chunk, float64 running sum
    stats.rows += len(matrices[0])
    return stats


def _chunks(layer: SparseLayer, x: np.ndarray) -> Iterable[np.ndarray]:
    """Split a batch along its first axis so that each unfolded chunk stays small."""
    if layer.node.op not in ("Conv", "ConvTranspose") or len(x) <= 1:
        yield x
        return
    per_sample = int(np.prod(x.shape[1:])) * int(np.prod(layer.shape[2:])) * 4
    step = max(1, CHUNK_BYTES // max(per_sample, 1))
    for start in range(0, len(x), step):
        yield x[start:start + step]


def collect(
    model: Model, layers: list[SparseLayer], batches: Callable[[], Iterable[Any]],
    progress: Any, label: str,
) -> dict[tuple[Any, ...], InputStats]:
    """One pass over the data: ``H`` for every distinct input layout of ``layers``."""
    keys = {layout_key(layer): layer for layer in layers}
    names = sorted({input_name(layer) for layer in layers})
    graph_inputs = {t.name for t in model.inputs}
    runner = OrtRunner(_truncated(model, [n for n in names if n not in graph_inputs]))
    stats: dict[tuple[Any, ...], InputStats] = {}
    for batch in progress.track(batches(), description=label):
        outputs = dict(zip(runner.output_names, runner.run(batch.inputs), strict=True)) \
            if runner.output_names else {}
        outputs.update({k: v for k, v in batch.inputs.items() if k in graph_inputs})
        for key, layer in keys.items():
            x = outputs[input_name(layer)]
            for chunk in _chunks(layer, x):
                stats[key] = _accumulate(stats.get(key), unfold(layer, chunk))
    return stats


def _truncated(model: Model, names: list[str]) -> Model:
    """A copy of ``model`` that computes only the tensors ``names`` (the rest of the graph
    is dropped, so early levels cost a fraction of a full run)."""
    probe = model.copy()
    tensors = probe.tensor_map()
    for name in names:
        tensors[name].dtype = tensors[name].dtype or np.float32
    probe.graph.outputs = [tensors[name] for name in names]
    probe.graph.cleanup(remove_unused_graph_inputs=False)
    return probe


def levels(model: Model, names: set[str]) -> dict[str, int]:
    """The level of every node in ``names``: how many of them lie on the longest path above
    it (0 for the first ones)."""
    model.graph.toposort()
    depth_of: dict[str, int] = {}
    result: dict[str, int] = {}
    for node in model.graph.nodes:
        depth = max((depth_of.get(t.name, -1) for t in node.inputs), default=-1)
        if node.name in names:
            depth += 1
            result[node.name] = depth
        for t in node.outputs:
            depth_of[t.name] = depth
    return result
