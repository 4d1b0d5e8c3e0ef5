"""TensorRT plugin for 2:4 sparse layers: optcc's kernels inside a TensorRT engine.

Two halves, deliberately thin:

- :func:`insert_sparse_plugins` (no TensorRT, no GPU): the lowering rewrite. Every 2:4 GEMM
  layer the cuda backend's planner would dispatch (MatMul/Gemm with their fused bias,
  residual, activation and INT8 requantization) becomes one ``SparseGemm`` node in the
  custom domain ``optcc.trt`` (``SparseGemmResidual`` when a residual is fused), with ``plugin_namespace = "optcc"`` and ``plugin_version =
  "1"``, TensorRT's ONNX-parser convention for plugin nodes. Its inputs are the layer's
  activation, the packed weight (values and metadata, in the Hopper or Ampere layout),
  the per-channel scale and bias, and the residual when there is one; float layers get
  ``Cast`` nodes to and from float16 around the plugin (TensorRT folds them into the
  neighbouring layers). Which layers to rewrite is the caller's choice (``select``): the
  point is to use the plugin only where it beats TensorRT's own sparse tactics, which only
  a measurement on the target GPU can tell (``bench/kernels.py`` records one).
  Convolutions stay with TensorRT.
- :class:`SparseGemmPluginRewrite` (``optcc-sparse-gemm``): the same as a lowering rewrite of
  the ``tensorrt`` backend. Opt-in: it acts only when the target names it
  (``rewrites: [optcc-sparse-gemm]``), because TensorRT's own sparse tactics are the safe
  default and only in-process builds can load a Python plugin.
- :func:`register` (needs TensorRT 10+ and a GPU): registers the node's implementation as a
  TensorRT quickly-deployable plugin (``tensorrt.plugin``): a shape/type function and an
  ``impl`` that calls ``liboptcc_kernels.so`` on the engine's stream. Engines built with it
  need the same registration (``import optcc.backends.trt_plugin; register()``) in the
  process that runs them; ``trtexec`` cannot load Python plugins, so scripts that build
  with trtexec must leave ``SparseGemm`` nodes out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc.backends.cuda_plan import SparseLayerPlan, plan_model
from optcc.backends.lowering import LoweringContext, LoweringResult, LoweringRewrite
from optcc.hookspecs import hookimpl
from optcc.ir.model import Model
from optcc.kernels import ACTIVATIONS
from optcc.sparse.packing import pack

logger = logging.getLogger(__name__)

PLUGIN_NAME = "SparseGemm"
PLUGIN_NAME_RESIDUAL = "SparseGemmResidual"  # the same with a residual input
PLUGIN_NAMESPACE = "optcc"
PLUGIN_VERSION = "1"
PLUGIN_DOMAIN = "optcc.trt"


def _matrix(model: Model, layer: SparseLayerPlan) -> np.ndarray:
    tensors = model.tensor_map()
    weight = np.asarray(tensors[layer.weight].values)
    matrix = weight.T if layer.weight_layout == "km" else weight
    if layer.precision == "int8":
        return np.ascontiguousarray(matrix.astype(np.int8))
    real = matrix.astype(np.float32)
    if layer.weight_scale is not None:
        scale = np.broadcast_to(np.asarray(tensors[layer.weight_scale].values, np.float32).reshape(-1),
                                (layer.m,))
        zp = np.zeros(layer.m, np.float32)
        if layer.weight_zero_point is not None:
            zp = np.broadcast_to(np.asarray(tensors[layer.weight_zero_point].values,
                                            np.float32).reshape(-1), (layer.m,))
        real = (real - zp[:, None]) * scale[:, None]
    return np.ascontiguousarray(real.astype(np.float16))


def _alpha(model: Model, layer: SparseLayerPlan) -> np.ndarray:
    alpha = np.full(layer.m, layer.alpha, dtype=np.float32)
    if layer.precision == "int8":
        tensors = model.tensor_map()
        scale = np.asarray(tensors[layer.weight_scale].values, np.float32).reshape(-1)  # type: ignore[index]
        alpha *= np.float32(layer.input_scale) * np.broadcast_to(scale, (layer.m,))
    return alpha


def insert_sparse_plugins(
    model: Model,
    *,
    arch: int = 90,
    select: Callable[[SparseLayerPlan], bool] | None = None,
) -> tuple[Model, dict[str, Any]]:
    """Replace the selected 2:4 GEMM layers of a copy of ``model`` by plugin nodes.

    ``arch`` picks the metadata layout (90: Hopper, 80: Ampere family). Returns the new
    model and statistics: the rewritten layers (with the nodes each replaced) and the
    layers left to TensorRT, each with its reason.
    """
    if arch not in (80, 90):
        raise ValueError("arch must be 80 or 90")
    model = model.copy()
    plan = plan_model(model, precision="float16", int8=True)
    graph = model.graph
    tensors = graph.tensors()
    nodes_by_name = {node.name: node for node in graph.nodes}
    rewritten: dict[str, list[str]] = {}
    left = {s.node: s.reason for s in plan.skipped}
    for layer in plan.layers:
        if layer.op == "Conv":
            left[layer.node] = "convolution: left to TensorRT's own (sparse) tactics"
            continue
        if select is not None and not select(layer):
            left[layer.node] = "not selected (TensorRT's tactics measured faster or not measured)"
            continue
        packed = pack(_matrix(model, layer), "sm90" if arch == 90 else "sm80")
        prefix = f"{layer.node}/optcc_sparse"
        values = gs.Constant(f"{prefix}/values", np.ascontiguousarray(packed.values))
        meta = gs.Constant(f"{prefix}/meta",
                           np.ascontiguousarray(packed.meta).reshape(-1).view(np.int32).copy())
        alpha = gs.Constant(f"{prefix}/alpha", _alpha(model, layer))
        bias_value = np.zeros(layer.m, np.float32)
        if layer.bias is not None:
            bias_value = (np.asarray(tensors[layer.bias].values, np.float32).reshape(-1)
                          * np.float32(layer.bias_scale))
        bias = gs.Constant(f"{prefix}/bias", bias_value)
        x = tensors[layer.input]
        output = tensors[layer.output]
        float_layer = layer.precision != "int8"
        if float_layer:  # the plugin computes in float16; casts around it
            x = _cast(graph, x, onnx.TensorProto.FLOAT16, f"{prefix}/cast_in")
        inputs = [x, values, meta, alpha, bias]
        if layer.residual is not None:
            inputs.append(_cast(graph, tensors[layer.residual], onnx.TensorProto.FLOAT16,
                                f"{prefix}/cast_residual"))
        attrs = {
            "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
            "m": layer.m, "k": layer.k, "arch": arch,
            "activation": ACTIVATIONS[layer.activation],
            "residual_after_activation": int(layer.residual_after_activation),
            "clip_min": float(layer.clip[0]) if layer.clip else 0.0,
            "clip_max": float(layer.clip[1]) if layer.clip else 0.0,
            "out_scale": 1.0 / layer.output_scale if layer.output_scale else 1.0,
        }
        produced = output
        out_dtype = np.int8 if layer.output_dtype == "int8" else np.float16
        if float_layer or layer.output_dtype != "int8":
            produced = gs.Variable(f"{prefix}/out", dtype=out_dtype)
        for name in layer.nodes:  # detach the chain; cleanup() removes it
            nodes_by_name[name].outputs.clear()
        op = PLUGIN_NAME if layer.residual is None else PLUGIN_NAME_RESIDUAL
        graph.nodes.append(gs.Node(op, name=prefix, domain=PLUGIN_DOMAIN, attrs=attrs,
                                   inputs=inputs, outputs=[produced]))
        if produced is not output:
            graph.nodes.append(gs.Node("Cast", name=f"{prefix}/cast_out", attrs={
                "to": int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(output.dtype or np.float32)))},
                inputs=[produced], outputs=[output]))
        rewritten[layer.node] = list(layer.nodes)
    if rewritten:
        graph.cleanup().toposort()
        domains = {d.domain for d in graph.import_domains or []}
        if PLUGIN_DOMAIN not in domains:
            graph.import_domains = [*(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)]),
                                    onnx.helper.make_opsetid(PLUGIN_DOMAIN, 1)]
    stats = {"rewritten": rewritten, "left_to_tensorrt": left, "arch": arch}
    return model, stats


def _cast(graph: gs.Graph, tensor: gs.Tensor, to: int, name: str) -> gs.Variable:
    out = gs.Variable(f"{name}/out", dtype=onnx.helper.tensor_dtype_to_np_dtype(to))
    graph.nodes.append(gs.Node("Cast", name=name, attrs={"to": to}, inputs=[tensor], outputs=[out]))
    return out


def select_measured_faster(timings: dict[str, dict[str, float]]) -> Callable[[SparseLayerPlan], bool]:
    """A ``select`` for :func:`insert_sparse_plugins` from per-layer measurements.

    ``timings`` maps a layer's node name to ``{"optcc_ms": .., "tensorrt_ms": ..}`` (as
    measured on the target GPU); a layer is rewritten only when optcc's kernel was faster.
    """
    def select(layer: SparseLayerPlan) -> bool:
        t = timings.get(layer.node)
        return bool(t) and t["optcc_ms"] < t["tensorrt_ms"]

    return select


class SparseGemmPluginRewrite(LoweringRewrite):
    """2:4 GEMM layers as optcc ``SparseGemm`` plugin nodes (opt-in)."""

    name = "optcc-sparse-gemm"
    summary = ("2:4 GEMM layers as optcc SparseGemm plugin nodes (opt-in; needs optcc in the "
               "process that builds and runs the engine)")
    targets = frozenset({"tensorrt"})

    def apply(self, model: Model, ctx: LoweringContext) -> LoweringResult:
        requested = getattr(ctx.options, "rewrites", None) or []
        if self.name not in requested:
            return LoweringResult(model, False, reason=(
                f"opt-in: add rewrites: [{self.name}] to the target. The plugin runs optcc's "
                "kernels through tensorrt.plugin, so the engine must be built and run by a "
                "process with optcc (build_engine.sh/trtexec cannot load it); measure first "
                "(bench/kernels.py): TensorRT's own sparse tactics may be faster"))
        arch = _target_arch()
        rewritten, stats = insert_sparse_plugins(model, arch=arch)
        if not stats["rewritten"]:
            return LoweringResult(model, False, stats=stats,
                                  reason="no 2:4 GEMM layer fits optcc's kernels")
        if _gpu_with_tensorrt():
            register()  # the in-process engine build parses the plugin nodes next
        return LoweringResult(rewritten, True, stats=stats)


def _target_arch() -> int:
    """The kernel family of the local GPU (Hopper: 90, else 80); 90 without a GPU."""
    try:
        from optcc.backends.tensorrt import gpu_present

        if gpu_present()[0]:
            import torch

            if torch.cuda.is_available():
                return 90 if torch.cuda.get_device_capability()[0] == 9 else 80
    except ImportError:
        pass
    return 90


def _gpu_with_tensorrt() -> bool:
    import importlib.util

    from optcc.backends.tensorrt import gpu_present

    return importlib.util.find_spec("tensorrt") is not None and gpu_present()[0]


@hookimpl
def optcc_lowering_rewrites() -> list[type[LoweringRewrite]]:
    return [SparseGemmPluginRewrite]


# ----------------------------------------------------------------------------- TensorRT
_registered = False


def register() -> None:
    """Register ``optcc::SparseGemm`` and ``optcc::SparseGemmResidual`` with TensorRT (needs
    ``tensorrt`` 10+ and a GPU). Call it before parsing a rewritten model and in every
    process that runs its engine."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from optcc.kernels import DTYPE_CODES, load

    library = load()

    def describe(x: Any, m: int, out_scale: float) -> Any:
        shape = trtp.ShapeExprs.from_tuple((*list(x.shape_expr)[:-1], m))
        int8_out = x.dtype == trt.int8 and out_scale != 1.0
        return trtp.from_shape_expr(shape, dtype=trt.int8 if int8_out else trt.float16)

    def run(x: Any, values: Any, meta: Any, alpha: Any, bias: Any, residual: Any, out: Any,
            attrs: dict[str, Any], stream: int) -> None:
        args = library.new_args()
        args.m, args.k, args.arch = attrs["m"], attrs["k"], attrs["arch"]
        args.n = int(np.prod(tuple(x.shape)[:-1]))
        args.ab_dtype = DTYPE_CODES["int8" if x.dtype == trt.int8 else "float16"]
        args.d_dtype = DTYPE_CODES["int8" if out.dtype == trt.int8 else "float16"]
        args.a_values, args.a_meta = values.data_ptr, meta.data_ptr
        args.b, args.d = x.data_ptr, out.data_ptr
        args.alpha, args.bias = alpha.data_ptr, bias.data_ptr
        if residual is not None:
            args.residual = residual.data_ptr
        args.activation = attrs["activation"]
        args.residual_after_activation = attrs["residual_after_activation"]
        args.clip_min, args.clip_max = attrs["clip_min"], attrs["clip_max"]
        args.out_scale = attrs["out_scale"]
        library.gemm(args, stream)

    # tensorrt.plugin reads the signatures (type hints) of these functions: keep them flat.
    @trtp.register(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}")
    def _describe(x: trtp.TensorDesc, values: trtp.TensorDesc, meta: trtp.TensorDesc,
                  alpha: trtp.TensorDesc, bias: trtp.TensorDesc, m: int, k: int, arch: int,
                  activation: int, residual_after_activation: int, clip_min: float,
                  clip_max: float, out_scale: float) -> trtp.TensorDesc:
        return describe(x, m, out_scale)

    @trtp.impl(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}")
    def _impl(x: trtp.Tensor, values: trtp.Tensor, meta: trtp.Tensor, alpha: trtp.Tensor,
              bias: trtp.Tensor, m: int, k: int, arch: int, activation: int,
              residual_after_activation: int, clip_min: float, clip_max: float,
              out_scale: float, outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(x, values, meta, alpha, bias, None, outputs[0], locals(), stream)

    @trtp.register(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME_RESIDUAL}")
    def _describe_residual(x: trtp.TensorDesc, values: trtp.TensorDesc, meta: trtp.TensorDesc,
                           alpha: trtp.TensorDesc, bias: trtp.TensorDesc,
                           residual: trtp.TensorDesc, m: int, k: int, arch: int,
                           activation: int, residual_after_activation: int, clip_min: float,
                           clip_max: float, out_scale: float) -> trtp.TensorDesc:
        return describe(x, m, out_scale)

    @trtp.impl(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME_RESIDUAL}")
    def _impl_residual(x: trtp.Tensor, values: trtp.Tensor, meta: trtp.Tensor,
                       alpha: trtp.Tensor, bias: trtp.Tensor, residual: trtp.Tensor, m: int,
                       k: int, arch: int, activation: int, residual_after_activation: int,
                       clip_min: float, clip_max: float, out_scale: float,
                       outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(x, values, meta, alpha, bias, residual, outputs[0], locals(), stream)

    _registered = True
