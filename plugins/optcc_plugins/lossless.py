"""Lossless built-in passes: constant folding, dead-node elimination, BatchNorm folding.

They prove the pass machinery and make later passes' work simpler (pruning and INT8 see
one Conv instead of Conv + BatchNormalization). Each declares a tolerance the pass manager
enforces on the verification batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from pydantic import Field

from optcc import Model, Pass, PassContext, PassOptions, PassResult, Tolerance, hookimpl


class FoldConstantsOptions(PassOptions):
    fold_shapes: bool = Field(
        True, description="Also fold Shape → Gather/Slice chains whose result is static."
    )
    size_threshold_mib: float | None = Field(
        16.0,
        ge=0,
        description="Do not fold a node whose output would exceed this size (MiB); None: "
        "no limit. Folding Expand/Tile can otherwise bloat the file.",
    )


class FoldConstantsPass(Pass):
    """Evaluate every subgraph whose inputs are all constants and store the result.

    Uses onnx-graphsurgeon's folder (which evaluates with ONNX Runtime), then removes the
    nodes left without consumers. Results are bit-identical on CPU in practice; the declared
    tolerance allows for rounding where a folded op is evaluated by another kernel.
    """

    name = "fold-constants"
    summary = "Precompute subgraphs whose inputs are all constants."
    Options = FoldConstantsOptions
    tolerance = Tolerance.float_rounding()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        before = len(model.graph.nodes)
        threshold = (
            None if opts.size_threshold_mib is None else int(opts.size_threshold_mib * 2**20)
        )
        model.graph.fold_constants(
            fold_shapes=opts.fold_shapes, size_threshold=threshold, error_ok=True
        )
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        after = len(model.graph.nodes)
        if after == before:
            return PassResult(model, False, {"nodes_removed": 0}, reason="nothing to fold")
        return PassResult(model, True, {"nodes_removed": before - after})


class EliminateDeadNodesOptions(PassOptions):
    remove_identity: bool = Field(True, description="Bypass Identity nodes.")
    remove_dropout: bool = Field(
        True, description="Bypass Dropout nodes (inference: Dropout is the identity)."
    )


class EliminateDeadNodesPass(Pass):
    """Remove nodes whose outputs nobody reads, and bypass Identity / inference Dropout.

    A bypassed node's consumers read its input directly. When its output is a graph output,
    the producer of its input is renamed to write the graph output instead, so graph input
    and output names never change.
    """

    name = "eliminate-dead-nodes"
    summary = "Remove unused nodes; bypass Identity and inference-mode Dropout."
    Options = EliminateDeadNodesOptions
    tolerance = Tolerance.exact()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts: Any = self.options
        graph = model.graph
        before = len(graph.nodes)
        bypass = {"Identity"} if opts.remove_identity else set()
        if opts.remove_dropout:
            bypass.add("Dropout")
        bypassed = 0
        graph_outputs = {id(t) for t in graph.outputs}
        graph_inputs = {id(t) for t in graph.inputs}
        for node in list(graph.nodes):
            if node.op not in bypass or not node.inputs:
                continue
            if node.op == "Dropout" and len(node.inputs) >= 3:
                mode = node.inputs[2]
                if not (isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values))):
                    continue  # training_mode may be true: not an identity
            src, dst = node.inputs[0], node.outputs[0]
            if any(o.outputs or id(o) in graph_outputs for o in node.outputs[1:]):
                continue  # a Dropout mask that is used
            if id(dst) in graph_outputs:
                producer = src.inputs[0] if src.inputs else None
                if (
                    producer is None
                    or id(src) in graph_outputs
                    or id(src) in graph_inputs
                    or len(src.outputs) != 1
                ):
                    continue
                # The producer writes the graph output directly.
                index = producer.outputs.index(src)
                producer.outputs[index] = dst
                node.outputs.clear()
                node.inputs.clear()
            else:
                model.replace_all_uses(dst, src)
                node.outputs.clear()
                node.inputs.clear()
            bypassed += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        stats = {"nodes_removed": removed, "bypassed": bypassed}
        if removed == 0:
            return PassResult(model, False, stats, reason="no dead, Identity or Dropout nodes")
        return PassResult(model, True, stats)


class FoldBatchNormOptions(PassOptions):
    pass


class FoldBatchNormPass(Pass):
    """Fold inference BatchNormalization into the preceding Conv / ConvTranspose.

    With ``s = gamma / sqrt(var + eps)`` per channel, ``BN(conv(x, W) + b) =
    conv(x, W * s) + (b - mean) * s + beta``: the scale goes into the weight's output-channel
    axis (axis 0 for Conv; axis 1 for an ungrouped ConvTranspose), the shift into the bias.
    A BatchNormalization that does not directly follow such a layer, or whose layer output
    has other readers, is left alone and counted with the reason.
    """

    name = "fold-batchnorm"
    summary = "Fold BatchNormalization into the preceding Conv (lossless)."
    Options = FoldBatchNormOptions
    tolerance = Tolerance.float_rounding()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folded: list[str] = []
        skipped: dict[str, str] = {}
        for bn in [n for n in model.graph.nodes if n.op == "BatchNormalization"]:
            reason = self._fold(bn)
            if reason is None:
                folded.append(bn.name)
            else:
                skipped[bn.name] = reason
        model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"folded": len(folded), "skipped": skipped}
        if not folded:
            reason = "no BatchNormalization follows a Conv" if not skipped else (
                f"{len(skipped)} BatchNormalization node(s) could not be folded"
            )
            return PassResult(model, False, stats, reason=reason)
        return PassResult(model, True, stats)

    @staticmethod
    def _fold(bn: gs.Node) -> str | None:
        x = bn.inputs[0]
        if any(o.outputs for o in bn.outputs[1:]):
            return "training-mode outputs are used"
        if not x.inputs:
            return "input is not produced by a layer"
        layer = x.inputs[0]
        if layer.op not in {"Conv", "ConvTranspose"}:
            return f"follows {layer.op}, not Conv"
        if len(x.outputs) != 1:
            return "the Conv output has other readers"
        params = bn.inputs[1:5]
        if not all(isinstance(p, gs.Constant) for p in params):
            return "BatchNormalization parameters are not constant"
        weight = layer.inputs[1]
        if not isinstance(weight, gs.Constant):
            return "the Conv weight is not constant"
        bias = layer.inputs[2] if len(layer.inputs) > 2 else None
        if bias is not None and not isinstance(bias, gs.Constant):
            return "the Conv bias is not constant"
        group = int(layer.attrs.get("group", 1))
        if layer.op == "ConvTranspose" and group != 1:
            return "grouped ConvTranspose"
        gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        w = np.asarray(weight.values)
        axis = 0 if layer.op == "Conv" else 1
        if w.shape[axis] != scale.shape[0]:
            return "channel counts of Conv and BatchNormalization differ"
        shape = [1] * w.ndim
        shape[axis] = -1
        new_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
        b = np.zeros(scale.shape[0]) if bias is None else np.asarray(bias.values, dtype=np.float64)
        new_b = ((b - mean) * scale + beta).astype(w.dtype)
        layer.inputs[1] = gs.Constant(f"{weight.name}_bnfolded", new_w)
        new_bias = gs.Constant(f"{layer.name}_bias_bnfolded", new_b)
        if len(layer.inputs) > 2:
            layer.inputs[2] = new_bias
        else:
            layer.inputs.append(new_bias)
        layer.outputs[0] = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        return None


@hookimpl
def optcc_passes() -> list[type[Pass]]:
    return [FoldConstantsPass, EliminateDeadNodesPass, FoldBatchNormPass]
