"""SmoothQuant: move activation outliers into the weights, per input channel.

Transformer activations have a few channels far larger than the rest (BERT's LayerNorm
outputs reach 30 where most channels stay below 2). A per-tensor INT8 scale sized for
those channels leaves the others a handful of levels. For a layer ``y = x·W`` (``W`` is
``[K, N]``, input channel ``j`` is row ``j``) SmoothQuant rescales each input channel:

    y = (x · diag(1/s)) · (diag(s) · W),   s_j = max|x_j|^α / max|W_j|^(1−α)

which is exact in real arithmetic. With ``α`` near 1 the activation ranges flatten and the
weights take the outliers; near 0 the reverse. The division ``x / s`` is folded where it
costs nothing: into the ``γ`` and ``β`` of a LayerNormalization that produces ``x`` when
nothing but the smoothed layers reads it (pre-norm transformers). Otherwise (post-norm
BERT, whose LayerNorm output is also the residual) a ``Mul`` by ``1/s`` is inserted in
front of the smoothed layers only, and the residual keeps the original tensor. Either way
the float model computes the same function, up to rounding.

``α`` is chosen per tensor on calibration data: for each candidate the layer outputs are
computed with ``x/s`` quantized per tensor (the format's activation scheme) and ``s·W``
quantized per output channel, and the ``α`` with the smallest output error wins; "no
smoothing" is always a candidate, so the choice never makes a layer worse on that data.
A smoothing that needs an inserted ``Mul`` is kept only where it pays for the node (see
``MUL_MIN_ERROR`` and ``MUL_MIN_GAIN``).

Statistics are streamed: the per-channel ``max|x_j|`` over all calibration batches, and a
bounded sample of rows per tensor for the ``α`` search (``max_rows``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc import Model

logger = logging.getLogger(__name__)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Smoothing that needs an inserted Mul costs a node at run time: it is done only where the
# layer loses a noticeable share of its output to INT8 (relative error of at least
# MUL_MIN_ERROR) and smoothing at least halves that loss (MUL_MIN_GAIN). Folds are free and
# are done whenever they reduce the error.
MUL_MIN_ERROR = 1e-4
MUL_MIN_GAIN = 2.0


@dataclass
class SmoothTarget:
    """An activation tensor and the weighted layers that read it (smoothed together)."""

    activation: str
    layers: list[str]
    channels: int
    fold_into: str | None = None  # LayerNormalization node whose γ, β absorb 1/s
    fold_value: tuple[str, str | None, int] | None = None  # value projection: MatMul, Add, column
    amax: np.ndarray | None = None
    rows: list[np.ndarray] = field(default_factory=list)


@dataclass
class SmoothDecision:
    """What was done to one tensor, for the report."""

    activation: str
    layers: list[str]
    alpha: float | None
    how: str
    error_before: float
    error_after: float
    outlier_ratio: float  # max channel range / median channel range, before smoothing

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": self.activation, "layers": self.layers, "alpha": self.alpha,
            "how": self.how, "error_before": self.error_before, "error_after": self.error_after,
            "outlier_ratio": self.outlier_ratio,
        }


def weight_rows(node: gs.Node) -> np.ndarray | None:
    """The weight as ``[K, N]`` (row j multiplies input channel j), or None."""
    if node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant):
        w = np.asarray(node.inputs[1].values)
        return w if w.ndim == 2 else None
    if node.op == "Gemm" and isinstance(node.inputs[1], gs.Constant):
        if int(node.attrs.get("transA", 0)):
            return None
        w = np.asarray(node.inputs[1].values)
        return w.T if int(node.attrs.get("transB", 0)) else w
    return None


def find_targets(model: Model, layer_names: set[str]) -> tuple[list[SmoothTarget], dict[str, str]]:
    """Group the chosen layers by input tensor; say why a layer cannot be smoothed."""
    skipped: dict[str, str] = {}
    by_input: dict[str, list[gs.Node]] = {}
    for node in model.graph.nodes:
        if node.name not in layer_names:
            continue
        w = weight_rows(node)
        if w is None or w.dtype != np.float32:
            skipped[node.name] = "not a float MatMul/Gemm with a 2-D constant weight"
            continue
        by_input.setdefault(node.inputs[0].name, []).append(node)
    tensors = model.tensor_map()
    targets = []
    for name, nodes in by_input.items():
        tensor = tensors[name]
        channels = {weight_rows(n).shape[0] for n in nodes}  # type: ignore[union-attr]
        if len(channels) != 1:
            for n in nodes:
                skipped[n.name] = "readers of the same input disagree on its width"
            continue
        weighted_readers = [c for c in tensor.outputs if weight_rows(c) is not None]
        if len(weighted_readers) != len(nodes):
            for n in nodes:
                skipped[n.name] = "another weighted reader of this input is not being quantized"
            continue
        fold = None
        producer = tensor.inputs[0] if tensor.inputs else None
        if (
            producer is not None and producer.op == "LayerNormalization"
            and int(producer.attrs.get("axis", -1)) == -1
            and all(isinstance(i, gs.Constant) for i in producer.inputs[1:3])
            and len(producer.inputs) >= 3
            and all(c in nodes for c in tensor.outputs)
            and tensor not in model.graph.outputs
        ):
            fold = producer.name
        width = channels.pop()
        value = None
        if producer is not None and producer.op == "MultiHeadAttention" and all(
            c in nodes for c in tensor.outputs
        ) and tensor not in model.graph.outputs:
            value = _value_projection(producer, width)
        targets.append(SmoothTarget(name, [n.name for n in nodes], width, fold, value))
    return targets, skipped


def _value_projection(mha: gs.Node, width: int) -> tuple[str, str | None, int] | None:
    """Where attention's value comes from, when it is a projection that can absorb a
    per-channel scale: ``(MatMul, bias Add or None, first column)``. Attention mixes value
    rows over positions but never channels, so scaling value channel ``j`` scales output
    channel ``j`` alike."""
    value = mha.inputs[2] if len(mha.inputs) > 2 else None
    if value is None or not value.inputs or len(value.outputs) != 1:
        return None
    node = value.inputs[0]
    start = 0
    if node.op == "Split":
        index = node.outputs.index(value)
        sizes = node.inputs[1].values if len(node.inputs) > 1 and isinstance(
            node.inputs[1], gs.Constant) else node.attrs.get("split")
        if sizes is None or int(node.attrs.get("axis", -1)) not in (-1, 2):
            return None
        start = int(np.sum(np.asarray(sizes)[:index]))
        value = node.inputs[0]
        if len(value.outputs) != 1 or not value.inputs:
            return None
        node = value.inputs[0]
    add = None
    if node.op == "Add":
        add = node
        bias = next((i for i in node.inputs if isinstance(i, gs.Constant)), None)
        data = next((i for i in node.inputs if not isinstance(i, gs.Constant)), None)
        if bias is None or data is None or np.asarray(bias.values).ndim != 1 or not data.inputs \
                or len(data.outputs) != 1:
            return None  # (a bias behind an Identity alias is not folded into)
        node = data.inputs[0]
    if node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = np.asarray(node.inputs[1].values)
    if w.ndim != 2 or w.shape[1] < start + width:
        return None
    return node.name, add.name if add is not None else None, start


def collect_channel_stats(
    proto: onnx.ModelProto, batches: Any, targets: list[SmoothTarget], *, max_rows: int = 1024,
    progress: Any = None, seed: int = 0,
) -> None:
    """Per-channel ``max|x_j|`` of every target over the data, and up to ``max_rows`` rows."""
    from optcc import Model as _Model
    from optcc import OrtRunner

    if not targets:
        return
    runner = OrtRunner(_Model.from_proto(proto), optimization="disable",
                       extra_outputs=[t.activation for t in targets])
    names = runner.output_names
    rng = np.random.default_rng(seed)
    source = batches()
    if progress is not None:
        source = progress.track(source, description="SmoothQuant: channel ranges")
    kept = {t.activation: 0 for t in targets}
    for batch in source:
        outputs = dict(zip(names, runner.run(batch.inputs), strict=True))
        for t in targets:
            x = outputs.get(t.activation)
            if x is None:
                x = batch.inputs[t.activation]
            rows = np.asarray(x, dtype=np.float32).reshape(-1, t.channels)
            rows = rows[np.all(np.isfinite(rows), axis=1)]
            if not len(rows):
                continue
            amax = np.abs(rows).max(axis=0)
            t.amax = amax if t.amax is None else np.maximum(t.amax, amax)
            room = max_rows - kept[t.activation]
            if room > 0:
                take = rows if len(rows) <= room else rows[rng.choice(len(rows), room, replace=False)]
                t.rows.append(take)
                kept[t.activation] += len(take)


def _fake_quant_activation(x: np.ndarray, unsigned: bool) -> np.ndarray:
    """Per-tensor INT8 round trip with a max range (unsigned asymmetric or signed symmetric)."""
    if unsigned:
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zero = np.round(-lo / scale)
        return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    scale = float(np.abs(x).max()) / 127.0 or 1.0
    return np.clip(np.round(x / scale), -127, 127) * scale


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric INT8 round trip of a ``[K, N]`` weight."""
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def layer_error(
    x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, unsigned: bool,
    references: list[np.ndarray] | None = None,
) -> float:
    """Relative squared error of the layers' outputs with ``x/s`` and ``s·W`` in INT8
    (``references``: the float outputs ``x·W``, when already computed)."""
    xs = x if s is None else x / s
    xq = _fake_quant_activation(xs, unsigned).astype(np.float32)
    num = den = 0.0
    for i, w in enumerate(weights):
        ws = w if s is None else w * s[:, None]
        ref = references[i] if references is not None else x @ w
        out = xq @ _fake_quant_weight(ws).astype(np.float32)
        num += float(np.sum(np.square(out - ref, dtype=np.float64)))
        den += float(np.sum(np.square(ref, dtype=np.float64)))
    return num / den if den else 0.0


def smoothing_scales(amax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|x_j|^α / max|W_j|^(1−α)`` (channels that are all zero keep s = 1)."""
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.power(np.maximum(amax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
    s = np.where((amax > 0) & (wmax > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def choose(
    target: SmoothTarget, weights: list[np.ndarray], alphas: tuple[float, ...] | None,
    unsigned: bool,
) -> tuple[float | None, np.ndarray | None, float, float]:
    """The best ``α`` (None: leave the tensor alone), its scales, and the errors before/after."""
    assert target.amax is not None
    x = np.concatenate(target.rows) if target.rows else np.zeros((1, target.channels), np.float32)
    weights = [w.astype(np.float32) for w in weights]
    references = [x @ w for w in weights]
    before = layer_error(x, weights, None, unsigned, references)
    best: tuple[float | None, np.ndarray | None, float] = (None, None, before)
    for alpha in alphas or ALPHAS:
        s = smoothing_scales(target.amax, weights, alpha)
        err = layer_error(x, weights, s, unsigned, references)
        if err < best[2]:
            best = (alpha, s, err)
    free = target.fold_into is not None or target.fold_value is not None
    if not free and alphas is None and (before < MUL_MIN_ERROR or best[2] * MUL_MIN_GAIN > before):
        return None, None, before, before  # not worth a node (a fixed alpha forces it)
    return best[0], best[1], before, best[2]


def apply(model: Model, target: SmoothTarget, s: np.ndarray) -> str:
    """Rescale the layers' weights by ``s`` and divide their input by ``s`` (see module doc)."""
    from .graph import compact_positive, decode_positive, namer, positive_constant

    fresh = namer(model.graph)
    nodes = {n.name: n for n in model.graph.nodes}
    inv = (1.0 / s).astype(np.float32)
    codes, base = None, 0.0
    if target.fold_into is None and target.fold_value is None:
        codes, base = compact_positive(inv, round_up=False)
        inv = decode_positive(codes, base)  # what the inserted Mul will use
        s = (1.0 / inv.astype(np.float64)).astype(np.float32)
    for name in target.layers:
        node = nodes[name]
        w = node.inputs[1]
        values = np.asarray(w.values)
        if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
            scaled = values * s[None, :]
        else:
            scaled = values * s[:, None]
        node.inputs[1] = gs.Constant(fresh(f"{w.name}_smoothed"), scaled.astype(values.dtype))
    if target.fold_into is not None:
        ln = nodes[target.fold_into]
        gamma = np.asarray(ln.inputs[1].values)
        beta = np.asarray(ln.inputs[2].values)
        ln.inputs[1] = gs.Constant(fresh(f"{ln.inputs[1].name}_smoothed"),
                                   (gamma * inv).astype(gamma.dtype))
        ln.inputs[2] = gs.Constant(fresh(f"{ln.inputs[2].name}_smoothed"),
                                   (beta * inv).astype(beta.dtype))
        return f"folded into LayerNormalization '{ln.name}'"
    if target.fold_value is not None:
        matmul, add, start = target.fold_value
        columns = slice(start, start + len(inv))
        w = np.array(nodes[matmul].inputs[1].values)
        w[:, columns] *= inv[None, :]
        nodes[matmul].inputs[1] = gs.Constant(fresh(f"{nodes[matmul].inputs[1].name}_smoothed"), w)
        if add is not None:
            index = next(i for i, t in enumerate(nodes[add].inputs) if isinstance(t, gs.Constant))
            b = np.array(nodes[add].inputs[index].values)
            b[columns] *= inv
            nodes[add].inputs[index] = gs.Constant(
                fresh(f"{nodes[add].inputs[index].name}_smoothed"), b)
        return f"folded into the value projection '{matmul}'"
    tensor = model.tensor_map()[target.activation]
    smoothed = gs.Variable(fresh(f"{target.activation}_smoothed"), dtype=np.float32)
    # The factors are stored as one-byte codes that ONNX Runtime decodes once, when it loads
    # the model (graph.py); the weights were scaled by the exact inverse of the decoded value.
    assert codes is not None
    factor = positive_constant(model.graph, fresh, f"{target.activation}_smooth_scale", codes, base)
    mul = gs.Node("Mul", fresh(f"{target.activation}_smooth"), inputs=[tensor, factor],
                  outputs=[smoothed])
    model.graph.nodes.append(mul)
    for name in target.layers:
        node = nodes[name]
        node.inputs[0] = smoothed
    model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    reason = "its producer is not a LayerNormalization" if not tensor.inputs or \
        tensor.inputs[0].op != "LayerNormalization" else "the LayerNorm output is also read elsewhere"
    return f"Mul by 1/s inserted ({reason})"


def outlier_ratio(amax: np.ndarray) -> float:
    median = float(np.median(amax))
    return float(amax.max()) / median if median > 0 else float("inf")
