"""Graph helpers the INT8 passes share: typed protos, constant weights, clean outputs."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc import Model

logger = logging.getLogger(__name__)

CONTRIB_FLOAT_OUTPUTS = {"MultiHeadAttention": 1}  # op -> how many leading outputs are float


def namer(graph: gs.Graph) -> Any:
    """``fresh(base)``: a tensor name not yet used in ``graph`` (``base``, else ``base_2``...).
    Exporters share one initializer among many nodes (a zero bias, a unit LayerNorm γ), so
    a rewritten copy cannot simply be named after the original."""
    used = set(graph.tensors())

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        return name

    return fresh


def typed_proto(model: Model) -> onnx.ModelProto:
    """The model's proto with inferred types and shapes, including past contrib ops.

    ONNX shape inference knows no ``com.microsoft`` schemas, so everything downstream of a
    fused ``MultiHeadAttention`` would be untyped; its output is typed ``[batch, query
    length, value width]`` and inference runs again from there, one attention layer per
    round. Inference runs on a copy without the weights' bytes (they are declared as typed
    inputs), which keeps the rounds cheap on large models; the pass manager runs the full
    checker on the pass's result.
    """
    proto = model.to_proto()
    del proto.graph.value_info[:]
    light = _without_weight_bytes(proto)
    contrib = [n for n in light.graph.node
               if n.domain == "com.microsoft" and n.op_type in CONTRIB_FLOAT_OUTPUTS]
    pending = {n.output[0] for n in contrib if n.output and n.output[0]}
    light = onnx.shape_inference.infer_shapes(light, data_prop=True)
    while pending:  # each round types the contrib outputs whose inputs became known
        known = {vi.name: vi for vi in list(light.graph.value_info) + list(light.graph.input)}
        ready = []
        for node in contrib:
            shape = _attention_output_shape(node, known)
            if node.output[0] in pending and shape is not None:
                ready.append(onnx.helper.make_tensor_value_info(
                    node.output[0], onnx.TensorProto.FLOAT, shape))
        if not ready:  # the rest have inputs of unknown shape: type them at least
            ready = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                     for name in sorted(pending)]
        light.graph.value_info.extend(ready)
        pending -= {vi.name for vi in ready}
        light = onnx.shape_inference.infer_shapes(light, data_prop=True)
    weights = {t.name for t in proto.graph.initializer}
    proto.graph.value_info.extend(vi for vi in light.graph.value_info if vi.name not in weights)
    return proto


def _without_weight_bytes(proto: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    """A copy whose float initializers over ``limit`` bytes are typed graph inputs instead
    (small ones, such as shape constants, stay: shape inference reads their values)."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    keep = []
    for tensor in light.graph.initializer:
        size = len(tensor.raw_data) or 4 * (len(tensor.float_data) + len(tensor.int32_data))
        if size > limit and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                 onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            keep.append(tensor)
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    return light


def _attention_output_shape(
    node: onnx.NodeProto, known: dict[str, onnx.ValueInfoProto]
) -> list[int | str | None] | None:
    """MultiHeadAttention's output: [batch, query length, value width]."""
    def dims(name: str) -> list[int | str | None] | None:
        vi = known.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim]

    query = dims(node.input[0])
    value = dims(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if query is None or len(query) != 3:
        return None
    return [query[0], query[1], value[2] if value is not None and len(value) == 3 else None]


def fold_weight_subgraphs(
    model: Model, op_types: tuple[str, ...]
) -> tuple[dict[str, str], dict[str, str]]:
    """Evaluate constant-only subgraphs that compute a layer's weight (``Transpose(W)`` in
    raw exports, ``Cast``, ``Reshape``, a ``DequantizeLinear`` of a float8 table ...) and
    replace them with the constant, so the layer's weight is visible to quantization.

    Returns ``{layer name: what was folded}`` and ``{layer name: why it could not be}``.
    Works in place; the folded nodes go when nothing else reads them.
    """
    folded: dict[str, str] = {}
    failed: dict[str, str] = {}
    values: dict[str, gs.Constant] = {}  # one constant per folded tensor, however many readers
    for node in list(model.graph.nodes):
        if node.op not in op_types or len(node.inputs) < 2:
            continue
        index = 1
        if node.op == "MatMul" and not _computed_constant(node.inputs[1]) and _computed_constant(
            node.inputs[0]
        ):
            index = 0
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant) or not _computed_constant(tensor):
            continue
        chain = _describe_chain(tensor)
        if tensor.name not in values:
            value = _evaluate(model, tensor)
            if value is None:
                failed[node.name] = f"weight computed from constants ({chain}) that could not be folded"
                continue
            values[tensor.name] = gs.Constant(f"{tensor.name}_folded", np.ascontiguousarray(value))
        node.inputs[index] = values[tensor.name]
        folded[node.name] = chain
    if folded:
        model.graph.cleanup(remove_unused_graph_inputs=False)
    return folded, failed


def _computed_constant(tensor: gs.Tensor, depth: int = 0) -> bool:
    """Whether ``tensor`` is computed only from constants (and is not one itself)."""
    if isinstance(tensor, gs.Constant) or not tensor.inputs or depth > 16:
        return False
    node = tensor.inputs[0]
    if node.op == "Constant":
        return True
    if not node.inputs:
        return False
    return all(
        isinstance(i, gs.Constant) or i.name == "" or _computed_constant(i, depth + 1)
        for i in node.inputs
    )


def _describe_chain(tensor: gs.Tensor) -> str:
    ops = []
    t = tensor
    while t.inputs and len(ops) < 6:
        node = t.inputs[0]
        ops.append(node.op)
        variables = [i for i in node.inputs if not isinstance(i, gs.Constant) and i.name]
        if not variables:
            break
        t = variables[0]
    return " ← ".join(ops)


def _evaluate(model: Model, tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant-only subgraph, from ONNX Runtime on a graph holding only it."""
    import onnxruntime as ort

    graph = model.graph.copy()
    target = graph.tensors()[tensor.name]
    if target.dtype is None:
        target.dtype = _source_dtype(target)
    graph.inputs = []
    graph.outputs = [target]
    graph.cleanup(remove_unused_graph_inputs=True)
    try:
        proto = gs.export_onnx(graph)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        return np.asarray(session.run(None, {})[0])
    except Exception as exc:  # an op ORT cannot run stays as it was
        logger.debug("cannot fold the weight subgraph of %s: %s", tensor.name, exc)
        return None


def _source_dtype(tensor: gs.Tensor) -> Any:
    """The dtype of the first constant ``tensor`` is computed from (a Transpose, Reshape or
    Cast keeps it; a Cast's ``to`` wins)."""
    t = tensor
    for _ in range(16):
        if isinstance(t, gs.Constant):
            return t.dtype
        node = t.inputs[0] if t.inputs else None
        if node is None:
            break
        if node.op == "Cast":
            return onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            return node.attrs["value"].dtype
        t = node.inputs[0]
    return np.float32


def drop_intermediate_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove value_info: quantizers leave stale or partial shapes there, and ONNX Runtime
    takes them as facts (for example, to fuse Add + LayerNormalization into its much slower
    SkipLayerNormalization kernel)."""
    del proto.graph.value_info[:]
    return proto


def synthetic_feeds(model: Model, batch: int = 2, length: int = 16) -> dict[str, np.ndarray]:
    """Inputs for a check when the recipe has no calibration data: random floats, token ids
    1 (valid in any vocabulary), masks of ones; dynamic dimensions ``batch`` then ``length``."""
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in model.inputs:
        dims = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else length)
                for i, d in enumerate(tensor.shape or [])]
        dtype = np.dtype(tensor.dtype or np.float32)
        if dtype.kind == "f":
            feeds[tensor.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[tensor.name] = np.ones(dims, dtype)
        elif "type" in tensor.name.lower() or "position" in tensor.name.lower():
            feeds[tensor.name] = np.zeros(dims, dtype)
        else:
            feeds[tensor.name] = np.ones(dims, dtype)
    return feeds


def tensor_ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose shape inference knows it."""
    ranks = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


SCALE_STEPS_PER_OCTAVE = 16  # compact scales: one byte each, 2^(1/16) = 4.4 % apart


def compact_positive(values: np.ndarray, round_up: bool) -> tuple[np.ndarray, float]:
    """Positive factors as one byte each: ``value ≈ base · 2^(code / 16)``, 256 codes over 16
    octaves. ``round_up`` rounds every value to the next code at or above it (a quantization
    scale that must not clip); otherwise to the nearest. Returns the codes and ``base``
    (values below ``base`` become ``base``). The decoded values are :func:`decode_positive`'s."""
    v = np.asarray(values, dtype=np.float64)
    top = float(v.max())
    base = max(float(v.min()), top * 2.0 ** (-255 / SCALE_STEPS_PER_OCTAVE))
    exact = np.log2(np.maximum(v, base) / base) * SCALE_STEPS_PER_OCTAVE
    codes = np.ceil(exact - 1e-9) if round_up else np.round(exact)
    codes = np.clip(codes, 0, 255).astype(np.uint8)
    if round_up:  # float rounding must not land a code below its value
        low = decode_positive(codes, base) < v.astype(np.float32)
        codes[low & (codes < 255)] += 1
    return codes, base


def decode_positive(codes: np.ndarray, base: float) -> np.ndarray:
    """The float32 values :func:`compact_positive`'s codes stand for, computed the way the
    graph computes them (``base · exp(code · ln2 / 16)`` in float32)."""
    step = np.float32(np.log(2.0) / SCALE_STEPS_PER_OCTAVE)
    return (np.exp(codes.astype(np.float32) * step) * np.float32(base)).astype(np.float32)


def positive_constant(graph: gs.Graph, fresh: Any, name: str, codes: np.ndarray,
                      base: float) -> gs.Variable:
    """Nodes computing :func:`decode_positive` from one-byte codes held in the file. Every
    input is constant, so ONNX Runtime folds them into a float32 tensor when it loads the
    model: a quarter of the bytes on disk, no cost at run time."""
    step = np.float32(np.log(2.0) / SCALE_STEPS_PER_OCTAVE)
    tensors = [gs.Variable(fresh(f"{name}_{part}"), dtype=np.float32)
               for part in ("float", "log", "exp", "value")]
    graph.nodes += [
        gs.Node("Cast", fresh(f"{name}_cast"), attrs={"to": 1},
                inputs=[gs.Constant(fresh(f"{name}_code"), codes)], outputs=[tensors[0]]),
        gs.Node("Mul", fresh(f"{name}_step"), inputs=[
            tensors[0], gs.Constant(fresh(f"{name}_log_step"), np.array(step))],
            outputs=[tensors[1]]),
        gs.Node("Exp", fresh(f"{name}_exp"), inputs=[tensors[1]], outputs=[tensors[2]]),
        gs.Node("Mul", fresh(f"{name}_base"), inputs=[
            tensors[2], gs.Constant(fresh(f"{name}_base_value"), np.array(base, np.float32))],
            outputs=[tensors[3]]),
    ]
    return tensors[3]
