"""2:4 sparse weights and models for the kernel, packing and cuda-backend tests.

Tests make their own 2:4 weights with the simplest rule (keep the two largest magnitudes of
every group of four input channels); the sparsity pass itself is tested elsewhere.
"""

from __future__ import annotations

import numpy as np

# Every way a group of 4 can hold at most two non-zeros (bit j: element j is non-zero).
MASKS = np.array([0b0000, 0b0001, 0b0010, 0b0100, 0b1000, 0b0011, 0b0101, 0b1001, 0b0110,
                  0b1010, 0b1100])


def magnitude_2to4(weight: np.ndarray) -> np.ndarray:
    """Keep the two largest |w| of every group of 4 along the last axis."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.where(keep, groups, 0).reshape(weight.shape).astype(weight.dtype)


def random_2to4(m: int, k: int, dtype: np.dtype, seed: int, *, dense_groups: bool = False
                ) -> np.ndarray:
    """A random [m, k] weight where each group of 4 has one of the masks above (or exactly
    two non-zeros with ``dense_groups``); non-zero values are never 0."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.int8:
        values = rng.integers(1, 128, (m, k)) * rng.choice([-1, 1], (m, k))
    else:
        values = rng.uniform(0.25, 2.0, (m, k)) * rng.choice([-1, 1], (m, k))
    masks = rng.choice(MASKS[5:] if dense_groups else MASKS, size=(m, k // 4))
    keep = ((masks[..., None] >> np.arange(4)) & 1).astype(bool).reshape(m, k)
    return np.where(keep, values, 0).astype(dtype)


def sparsify_module(module):  # type: ignore[no-untyped-def]
    """Make every Linear and 1x1 Conv weight of a torch module 2:4 along its input channels."""
    import torch

    with torch.no_grad():
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if isinstance(sub, torch.nn.Linear) or (
                    isinstance(sub, torch.nn.Conv2d) and sub.kernel_size == (1, 1) and sub.groups == 1
                    and sub.in_channels % 4 == 0):
                flat = weight.reshape(weight.shape[0], -1).numpy()
                weight.copy_(torch.from_numpy(magnitude_2to4(flat)).reshape(weight.shape))
    return module


def sparse_bert_onnx(exporter: str = "legacy"):  # type: ignore[no-untyped-def]
    """The 2:4 BERT-style encoder exported to ONNX, and a batch of padded token inputs."""
    from pathlib import Path

    from optcc.frontend import export_torch

    tokens = [{"name": "input_ids", "shape": ["batch", 16], "dtype": "int64"},
              {"name": "attention_mask", "shape": ["batch", 16], "dtype": "int64"}]
    model = export_torch("sparse_nets:sparse_bert_style", inputs=tokens, exporter=exporter,
                         base_dir=Path(__file__).parent)
    rng = np.random.default_rng(4)
    feeds = {"input_ids": rng.integers(0, 100, (5, 16)).astype(np.int64),
             "attention_mask": np.ones((5, 16), np.int64)}
    feeds["attention_mask"][1, 10:] = 0
    return model, feeds


def sparse_bert_style():  # type: ignore[no-untyped-def]
    """tests.nets' BERT-style encoder with every Linear 2:4 sparse."""
    from nets import bert_style

    return sparsify_module(bert_style())


def onnx_mlp(seed: int = 0, opset: int = 17):  # type: ignore[no-untyped-def]
    """x[batch, 64] -> MatMul -> Add(b1) -> Relu -> MatMul -> Add(b2) -> Add(x) -> y, built
    with onnx.helper; both weights 2:4 along K."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from optcc import Model

    rng = np.random.default_rng(seed)

    def weight(k: int, n: int) -> np.ndarray:  # [K, N], 2:4 along K for every column
        return magnitude_2to4(rng.standard_normal((n, k)).astype(np.float32)).T.copy()

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["b2", "o"], ["ob"], name="fc2_bias"),  # bias first
        helper.make_node("Add", ["ob", "x"], ["y"], name="residual"),
    ]
    inits = [numpy_helper.from_array(weight(64, 128), "w1"),
             numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), "b1"),
             numpy_helper.from_array(weight(128, 64), "w2"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return Model.from_proto(onnx.shape_inference.infer_shapes(proto))


def reference_epilogue(acc, alpha, bias, residual, *, activation: str = "none",  # type: ignore[no-untyped-def]
                       residual_after_activation: bool = False, clip=None, out_scale: float = 1.0):
    """The fused epilogue of kernels/optcc_kernels.h, on float64 torch tensors:
    v = acc * alpha + bias; [+ residual]; act; [+ residual]; * out_scale."""
    import torch

    v = acc * alpha + bias
    if residual is not None and not residual_after_activation:
        v = v + residual
    if activation == "relu":
        v = torch.relu(v)
    elif activation in ("gelu", "gelu_tanh"):
        v = torch.nn.functional.gelu(v, approximate="tanh" if activation == "gelu_tanh" else "none")
    elif activation == "clip":
        v = torch.clamp(v, clip[0], clip[1])
    if residual is not None and residual_after_activation:
        v = v + residual
    return v * out_scale


class ReferenceRuntime:
    """Stands in for the GPU runtime of optcc.backends.cuda on the CPU: same packed weights,
    the kernel's math done by unpacking the weight and multiplying in float64."""

    def __init__(self, fmt: str = "sm90") -> None:
        import torch

        self.format = fmt
        self.device = torch.device("cpu")
        self.calls: list[str] = []

    def launch(self, layer, rows, out, residual, *, with_epilogue: bool) -> None:  # type: ignore[no-untyped-def]
        import torch

        from optcc.sparse.packing import PackedWeight, unpack

        plan = layer.plan
        if self.format == "sm80":  # the library's contract for the Ampere-family kernels
            assert rows.shape[0] % (16 if plan.precision == "int8" else 8) == 0, rows.shape
        values = layer.values
        if values.dtype == torch.bfloat16:
            values_np = values.view(torch.int16).numpy().view(np.float16)
        else:
            values_np = values.numpy()
        packed = PackedWeight(values=values_np, meta=layer.meta.numpy(), format=self.format,
                              shape=(plan.m, plan.k))
        weight = torch.from_numpy(unpack(packed))
        if values.dtype == torch.bfloat16:
            weight = weight.view(torch.int16).view(torch.bfloat16)
        acc = rows.double() @ weight.double().T
        alpha = layer.alpha.double() if layer.alpha is not None else 1.0
        bias = layer.bias.double() if layer.bias is not None else 0.0
        v = reference_epilogue(
            acc, alpha, bias, residual.double() if (with_epilogue and residual is not None) else None,
            activation=plan.activation if with_epilogue else "none",
            residual_after_activation=plan.residual_after_activation, clip=plan.clip,
            out_scale=1.0 / plan.output_scale if (with_epilogue and plan.output_scale) else 1.0)
        if out.dtype == torch.int8:
            v = torch.clamp(torch.round(v), -128, 127)
        out.copy_(v.to(out.dtype))
        self.calls.append(plan.node)
