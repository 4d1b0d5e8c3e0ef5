"""Every operator of the torch view against ONNX Runtime, one single-node model per case:
the same outputs, and gradients that flow (checked numerically in float64) where the
operator is differentiable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from optcc.ir import Model  # noqa: E402
from optcc.torchview import GraphModule  # noqa: E402

RNG = np.random.default_rng(0)
F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def x(*shape: int, low: float | None = None) -> np.ndarray:
    if low is not None:  # positive values (logs, square roots)
        return RNG.uniform(low, low + 2.0, shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


@dataclass
class Case:
    """One node: ``feeds`` become graph inputs (float ones get gradients), ``consts``
    initializers; ``inputs`` lists the node's inputs by name ('' = omitted)."""

    id: str
    op: str
    inputs: list[str]
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: list[int] = field(default_factory=lambda: [F32])
    opset: int = 17
    grad: bool = True
    fixed: tuple[str, ...] = ()  # float feeds that are state, not differentiable inputs

    def model(self) -> onnx.ModelProto:
        outs = [f"out{i}" for i in range(len(self.outputs))]
        node = helper.make_node(self.op, self.inputs, outs, name=f"the_{self.op.lower()}", **self.attrs)
        graph = helper.make_graph(
            [node], self.id,
            [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for k, v in self.feeds.items()],
            [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, self.outputs, strict=True)],
            [numpy_helper.from_array(v, k) for k, v in self.consts.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 11 if self.opset >= 23 else 10 if self.opset >= 21 else 8
        return model


def reductions() -> list[Case]:
    cases = []
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"):
        data = {"x": x(2, 3, 4, low=0.5)} if op == "ReduceLogSum" else {"x": x(2, 3, 4)}
        old = (Case(f"{op}-axes-input-13", op, ["x", "axes"], data, {"axes": i64(1)}, opset=13)
               if op == "ReduceSum" else
               Case(f"{op}-axes-attribute-17", op, ["x"], data, attrs={"axes": [1]}))
        cases += [
            old,
            Case(f"{op}-axes-input-18", op, ["x", "axes"], data, {"axes": i64(-1, 0)},
                 attrs={"keepdims": 0}, opset=18),
            Case(f"{op}-all-axes-18", op, ["x"], data, opset=18),
            Case(f"{op}-noop-empty-axes-18", op, ["x"], data, attrs={"noop_with_empty_axes": 1}, opset=18),
        ]
    return cases


def attention() -> list[Case]:
    q4, k4, v4 = x(1, 2, 3, 4), x(1, 2, 5, 4), x(1, 2, 5, 4)
    q3, k3, v3 = x(2, 3, 16), x(2, 5, 8), x(2, 5, 8)  # 4 query heads, 2 kv heads of 4
    return [
        Case("Attention-4d", "Attention", ["q", "k", "v"], {"q": q4, "k": k4, "v": v4}, opset=23),
        Case("Attention-4d-float-mask-scale", "Attention", ["q", "k", "v", "mask"],
             {"q": q4, "k": k4, "v": v4, "mask": x(3, 5)}, attrs={"scale": 0.2}, opset=23),
        Case("Attention-4d-bool-mask", "Attention", ["q", "k", "v", "mask"], {"q": q4, "k": k4, "v": v4},
             {"mask": np.array([[True, True, False, True, False]] * 3)}, opset=23),
        Case("Attention-4d-causal-square", "Attention", ["q", "k", "v"],
             {"q": x(1, 2, 5, 4), "k": k4, "v": v4}, attrs={"is_causal": 1}, opset=23),
        Case("Attention-4d-fully-masked-row", "Attention", ["q", "k", "v", "mask"], {"q": q4, "k": k4, "v": v4},
             {"mask": np.array([[True] * 5, [False] * 5, [True, False, True, False, True]])}, opset=23),
        Case("Attention-4d-causal-past", "Attention", ["q", "k", "v", "", "pk", "pv"],
             {"q": q4, "k": x(1, 2, 3, 4), "v": x(1, 2, 3, 4), "pk": x(1, 2, 2, 4), "pv": x(1, 2, 2, 4)},
             attrs={"is_causal": 1}, outputs=[F32, F32, F32], opset=23),
        Case("Attention-3d-gqa", "Attention", ["q", "k", "v"], {"q": q3, "k": k3, "v": v3},
             attrs={"q_num_heads": 4, "kv_num_heads": 2}, opset=23),
        Case("Attention-4d-past-present", "Attention", ["q", "k", "v", "", "pk", "pv"],
             {"q": q4, "k": x(1, 2, 3, 4), "v": x(1, 2, 3, 4), "pk": x(1, 2, 2, 4), "pv": x(1, 2, 2, 4)},
             outputs=[F32, F32, F32], opset=23),
    ]


def rotary() -> list[Case]:
    angles = RNG.uniform(0, 3, (2, 3, 4)).astype(np.float32)  # [batch, seq, dim/2]
    table = RNG.uniform(0, 3, (6, 2)).astype(np.float32)  # [positions, dim/2]
    return [
        Case("RotaryEmbedding-4d", "RotaryEmbedding", ["x", "cos", "sin"],
             {"x": x(2, 2, 3, 8), "cos": np.cos(angles), "sin": np.sin(angles)}, opset=23),
        Case("RotaryEmbedding-3d-interleaved-partial-positions", "RotaryEmbedding", ["x", "cos", "sin", "p"],
             {"x": x(2, 3, 16), "cos": np.cos(table), "sin": np.sin(table)},
             {"p": np.array([[0, 1, 2], [3, 4, 5]], np.int64)},
             attrs={"num_heads": 2, "interleaved": 1, "rotary_embedding_dim": 4}, opset=23),
    ]


def cases() -> list[Case]:
    c = reductions() + attention() + rotary()
    data = x(2, 3, 4)
    c += [
        Case("ArgMax", "ArgMax", ["x"], {"x": data}, attrs={"axis": 1, "keepdims": 0}, outputs=[I64], grad=False),
        Case("ArgMin-last-index", "ArgMin", ["x"], {"x": np.round(data)}, attrs={"axis": -1, "select_last_index": 1},
             outputs=[I64], grad=False),
        # Split: attribute (opset 11), input (13), num_outputs with a short last part (18), equal parts
        Case("Split-attribute-11", "Split", ["x"], {"x": x(2, 3)}, attrs={"axis": 1, "split": [1, 2]},
             outputs=[F32, F32], opset=11),
        Case("Split-input-13", "Split", ["x", "s"], {"x": x(5, 2)}, {"s": i64(3, 2)}, outputs=[F32, F32], opset=13),
        Case("Split-num-outputs-18", "Split", ["x"], {"x": x(2, 7)}, attrs={"axis": 1, "num_outputs": 3},
             outputs=[F32, F32, F32], opset=18),
        Case("Split-equal-13", "Split", ["x"], {"x": x(4, 2)}, outputs=[F32, F32], opset=13),
        # Slice: steps, negative steps, negative axes, out-of-range bounds
        Case("Slice-steps", "Slice", ["x", "s", "e", "a", "st"], {"x": x(6, 7)},
             {"s": i64(1, 0), "e": i64(100, 7), "a": i64(0, 1), "st": i64(2, 3)}),
        Case("Slice-reverse", "Slice", ["x", "s", "e", "a", "st"], {"x": x(3, 5)},
             {"s": i64(-1), "e": i64(-(2**62)), "a": i64(-1), "st": i64(-1)}),
        Case("Slice-negative-step-2", "Slice", ["x", "s", "e", "a", "st"], {"x": x(7, 2)},
             {"s": i64(5), "e": i64(0), "a": i64(0), "st": i64(-2)}),
        Case("Slice-no-axes", "Slice", ["x", "s", "e"], {"x": x(4, 5)}, {"s": i64(1, -3), "e": i64(3, 1000)}),
        # Expand (bidirectional), Tile, Range
        Case("Expand-up", "Expand", ["x", "shape"], {"x": x(3, 1)}, {"shape": i64(2, 3, 4)}),
        Case("Expand-fewer-dims", "Expand", ["x", "shape"], {"x": x(2, 1, 4)}, {"shape": i64(3, 1)}),
        Case("Expand-int", "Expand", ["x", "shape"], consts={"x": i64(1, 2, 3), "shape": i64(2, 3)},
             outputs=[I64], grad=False),
        Case("Tile", "Tile", ["x", "r"], {"x": x(2, 1, 3)}, {"r": i64(2, 3, 1)}),
        Case("Range-int", "Range", ["a", "b", "d"], consts={"a": np.array(1, np.int64), "b": np.array(10, np.int64),
                                                           "d": np.array(3, np.int64)}, outputs=[I64], grad=False),
        Case("Range-float-negative", "Range", ["a", "b", "d"],
             consts={"a": np.array(3.0, np.float32), "b": np.array(0.4, np.float32),
                     "d": np.array(-0.75, np.float32)}, grad=False),
        # Einsum
        Case("Einsum-batched-matmul", "Einsum", ["a", "b"], {"a": x(2, 3, 4), "b": x(2, 4, 5)},
             attrs={"equation": "bij,bjk->bik"}),
        Case("Einsum-attention-scores", "Einsum", ["a", "b"], {"a": x(2, 2, 3, 4), "b": x(2, 2, 5, 4)},
             attrs={"equation": "bhqd, bhkd -> bhqk"}),
        Case("Einsum-outer", "Einsum", ["a", "b"], {"a": x(3), "b": x(4)}, attrs={"equation": "i,j->ij"}),
        Case("Einsum-ellipsis-transpose", "Einsum", ["a"], {"a": x(2, 3, 4)}, attrs={"equation": "...ij->...ji"}),
        # CumSum
        Case("CumSum", "CumSum", ["x", "axis"], {"x": x(3, 4)}, {"axis": i64(1)}),
        Case("CumSum-exclusive-reverse", "CumSum", ["x", "axis"], {"x": x(3, 4)}, {"axis": np.array(0, np.int32)},
             attrs={"exclusive": 1, "reverse": 1}),
        Case("CumSum-exclusive", "CumSum", ["x", "axis"], {"x": x(5)}, {"axis": i64(0)}, attrs={"exclusive": 1}),
        Case("CumSum-int", "CumSum", ["x", "axis"], consts={"x": i64(1, 1, 0, 1), "axis": i64(0)},
             outputs=[I64], grad=False),
        # ScatterND, ScatterElements
        Case("ScatterND", "ScatterND", ["d", "i", "u"], {"d": x(4, 3, 2), "u": x(2, 2)},
             {"i": np.array([[0, 1], [3, -1]], np.int64)}),
        Case("ScatterND-add-duplicates", "ScatterND", ["d", "i", "u"], {"d": x(4, 3), "u": x(3, 3)},
             {"i": np.array([[1], [1], [2]], np.int64)}, attrs={"reduction": "add"}, opset=16),
        Case("ScatterND-mul", "ScatterND", ["d", "i", "u"], {"d": x(4, 3), "u": x(2, 3)},
             {"i": np.array([[0], [3]], np.int64)}, attrs={"reduction": "mul"}, opset=16),
        Case("ScatterND-max", "ScatterND", ["d", "i", "u"], {"d": x(4, 3), "u": x(2, 3)},
             {"i": np.array([[0], [2]], np.int64)}, attrs={"reduction": "max"}, opset=18),
        Case("ScatterElements", "ScatterElements", ["d", "i", "u"], {"d": x(3, 4), "u": x(3, 2)},
             {"i": np.array([[0, 3], [1, 2], [-1, 0]], np.int64)}, attrs={"axis": 1}),
        Case("ScatterElements-add", "ScatterElements", ["d", "i", "u"], {"d": x(3, 4), "u": x(2, 4)},
             {"i": np.array([[0, 1, 2, 0], [0, 1, 1, 2]], np.int64)}, attrs={"reduction": "add"}, opset=16),
        # Trilu
        Case("Trilu-upper", "Trilu", ["x"], {"x": x(2, 4, 5)}, opset=14),
        Case("Trilu-lower-k", "Trilu", ["x", "k"], {"x": x(4, 5)}, {"k": np.array(-1, np.int64)},
             attrs={"upper": 0}, opset=14),
        Case("Trilu-upper-k", "Trilu", ["x", "k"], {"x": x(3, 3)}, {"k": np.array(1, np.int64)}, opset=14),
        # normalizations
        Case("LayerNormalization", "LayerNormalization", ["x", "g", "b"], {"x": x(2, 3, 8), "g": x(8), "b": x(8)}),
        Case("LayerNormalization-no-bias-axis", "LayerNormalization", ["x", "g"], {"x": x(2, 3, 4), "g": x(3, 4)},
             attrs={"axis": -2, "epsilon": 1e-3}),
        Case("LayerNormalization-statistics", "LayerNormalization", ["x", "g", "b"],
             {"x": x(2, 6), "g": x(6), "b": x(6)}, outputs=[F32, F32, F32]),
        Case("RMSNormalization", "RMSNormalization", ["x", "g"], {"x": x(2, 3, 8), "g": x(8)},
             attrs={"epsilon": 1e-6}, opset=23),
        Case("InstanceNormalization", "InstanceNormalization", ["x", "g", "b"],
             {"x": x(2, 3, 5), "g": x(3), "b": x(3)}),
        Case("GroupNormalization-per-channel-21", "GroupNormalization", ["x", "g", "b"],
             {"x": x(2, 4, 5), "g": x(4), "b": x(4)}, attrs={"num_groups": 2}, opset=21),
        Case("GroupNormalization-groups-equal-channels", "GroupNormalization", ["x", "g", "b"],
             {"x": x(2, 4, 5), "g": x(4), "b": x(4)}, attrs={"num_groups": 4}, opset=21),
        Case("BatchNormalization", "BatchNormalization", ["x", "g", "b", "m", "v"],
             {"x": x(2, 3, 4, 4), "g": x(3), "b": x(3), "m": x(3), "v": x(3, low=0.5)}, fixed=("m", "v")),
        # padding, resizing, SAME convolution
        Case("Pad-constant", "Pad", ["x", "p", "v"], {"x": x(2, 3, 4)},
             {"p": i64(0, 1, 2, 0, 0, 1), "v": np.array(0.5, np.float32)}),
        Case("Pad-negative-crops", "Pad", ["x", "p"], {"x": x(2, 5, 4)}, {"p": i64(0, -1, 1, 0, -2, 0)}),
        Case("Pad-reflect", "Pad", ["x", "p"], {"x": x(1, 2, 4, 5)}, {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)},
             attrs={"mode": "reflect"}),
        Case("Pad-edge", "Pad", ["x", "p"], {"x": x(1, 2, 4, 5)}, {"p": i64(0, 0, 1, 0, 0, 0, 0, 3)},
             attrs={"mode": "edge"}),
        Case("Pad-axes-18", "Pad", ["x", "p", "", "a"], {"x": x(2, 3, 4)}, {"p": i64(1, 2), "a": i64(-1)},
             opset=18),
        Case("Resize-nearest", "Resize", ["x", "", "s"], {"x": x(1, 2, 3, 4)}, {"s": np.array([1, 1, 2, 2], np.float32)},
             attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
             opset=13),
        Case("Resize-linear-sizes", "Resize", ["x", "", "", "z"], {"x": x(1, 2, 3, 4)}, {"z": i64(1, 2, 5, 7)},
             attrs={"mode": "linear"}, opset=13),
        Case("Resize-linear-align-corners", "Resize", ["x", "", "s"], {"x": x(1, 1, 3, 3)},
             {"s": np.array([1, 1, 2, 2], np.float32)},
             attrs={"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=13),
        Case("Conv-same-upper-stride", "Conv", ["x", "w"], {"x": x(1, 2, 7, 6), "w": x(3, 2, 3, 3)},
             attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        Case("Conv-same-lower", "Conv", ["x", "w"], {"x": x(1, 2, 5, 5), "w": x(3, 2, 2, 2)},
             attrs={"auto_pad": "SAME_LOWER"}),
        Case("MaxPool-same-upper", "MaxPool", ["x"], {"x": x(1, 2, 5, 6)},
             attrs={"auto_pad": "SAME_UPPER", "kernel_shape": [3, 3], "strides": [2, 2]}),
        # elementwise
        *[Case(op, op, ["x"], {"x": x(3, 4)}) for op in (
            "Sin", "Cos", "Atan", "Sinh", "Cosh", "Elu", "Selu", "Celu", "Softsign", "Tanh", "Erf",
            "Sigmoid", "Softplus", "Exp", "Neg", "Abs", "HardSwish", "LeakyRelu", "HardSigmoid")],
        Case("Tan", "Tan", ["x"], {"x": x(3, 4) * 0.5}),
        Case("Mish", "Mish", ["x"], {"x": x(3, 4)}, opset=18),
        Case("ThresholdedRelu", "ThresholdedRelu", ["x"], {"x": x(3, 4)}, attrs={"alpha": 0.3}),
        Case("Sqrt", "Sqrt", ["x"], {"x": x(3, 4, low=0.5)}),
        Case("Log", "Log", ["x"], {"x": x(3, 4, low=0.5)}),
        Case("Reciprocal", "Reciprocal", ["x"], {"x": x(3, 4, low=0.5)}),
        Case("Gelu-tanh-20", "Gelu", ["x"], {"x": x(3, 4)}, attrs={"approximate": "tanh"}, opset=20),
        Case("Gelu-20", "Gelu", ["x"], {"x": x(3, 4)}, opset=20),
        Case("PRelu", "PRelu", ["x", "s"], {"x": x(2, 3, 4), "s": x(3, 1)}),
        *[Case(op, op, ["x"], {"x": x(3, 4) * 3}, grad=False) for op in ("Ceil", "Round", "Sign", "Floor")],
        Case("Mean", "Mean", ["a", "b", "c"], {"a": x(3, 4), "b": x(4), "c": x(3, 1)}),
        Case("Sum", "Sum", ["a", "b"], {"a": x(3, 4), "b": x(4)}),
        Case("Max", "Max", ["a", "b"], {"a": x(3, 4), "b": x(4)}),
        Case("Min", "Min", ["a", "b"], {"a": x(3, 4), "b": x(3, 1)}),
        Case("Pow", "Pow", ["a", "b"], {"a": x(3, 4, low=0.5), "b": x(4)}),
        Case("Div", "Div", ["a", "b"], {"a": x(3, 4), "b": x(4, low=0.5)}),
        Case("Div-int-truncates", "Div", ["a", "b"], consts={"a": i64(7, -7, 6), "b": i64(2, 2, -4)},
             outputs=[I64], grad=False),
        Case("Mod-int", "Mod", ["a", "b"], consts={"a": i64(7, -7, 7, -7), "b": i64(3, 3, -3, -3)},
             outputs=[I64], grad=False),
        Case("Mod-fmod", "Mod", ["a", "b"], {"a": x(3, 4) * 4, "b": x(4, low=0.5)}, attrs={"fmod": 1}, grad=False),
        Case("Xor", "Xor", ["a", "b"], consts={"a": np.array([True, False, True]), "b": np.array([True, True, False])},
             outputs=[BOOL], grad=False),
        Case("BitwiseAnd", "BitwiseAnd", ["a", "b"], consts={"a": i64(6, 5), "b": i64(3, 3)}, outputs=[I64],
             grad=False, opset=18),
        Case("Clip-inputs", "Clip", ["x", "lo", "hi"], {"x": x(3, 4)},
             {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
        Case("Clip-attributes-6", "Clip", ["x"], {"x": x(3, 4)}, attrs={"min": -0.2, "max": 0.3}, opset=6),
        Case("Clip-int-min-only", "Clip", ["x", "lo"], consts={"x": i64(-3, 0, 5), "lo": np.array(-1, np.int64)},
             outputs=[I64], grad=False),
        Case("CastLike", "CastLike", ["x", "like"], {"x": x(3)}, {"like": i64(1)}, outputs=[I64], grad=False,
             opset=15),
        Case("Size", "Size", ["x"], {"x": x(3, 4)}, outputs=[I64], grad=False),
        Case("NonZero", "NonZero", ["x"], consts={"x": np.array([[1, 0], [3, 4]], np.float32)},
             outputs=[I64], grad=False),
        Case("Constant-value-floats", "Constant", [], attrs={"value_floats": [1.0, 2.5]}, grad=False),
        Case("Constant-value-int", "Constant", [], attrs={"value_int": 7}, outputs=[I64], grad=False),
        Case("Dropout-mask", "Dropout", ["x"], {"x": x(3, 4)}, outputs=[F32, BOOL], opset=13),
        Case("Where", "Where", ["c", "a", "b"], {"a": x(3, 4), "b": x(4)}, {"c": RNG.random((3, 4)) > 0.5}),
        Case("Gather-scalar-index", "Gather", ["x", "i"], {"x": x(3, 4)}, {"i": np.array(-1, np.int64)},
             attrs={"axis": 1}),
        Case("Shape-start-end", "Shape", ["x"], {"x": x(2, 3, 4)}, attrs={"start": 1, "end": -1},
             outputs=[I64], grad=False, opset=15),
        Case("Softmax-axis", "Softmax", ["x"], {"x": x(2, 3, 4)}, attrs={"axis": 1}),
        # the rest of the view's operators
        Case("Identity", "Identity", ["x"], {"x": x(3)}),
        Case("Relu", "Relu", ["x"], {"x": x(3, 4)}),
        *[Case(op, op, ["a", "b"], {"a": x(3, 4), "b": x(4)}) for op in ("Add", "Sub", "Mul")],
        *[Case(op, op, ["a", "b"], {"a": np.round(x(3, 4)), "b": np.round(x(4))}, outputs=[BOOL], grad=False)
          for op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")],
        *[Case(op, op, ["a", "b"], consts={"a": np.array([True, False, True, False]),
                                           "b": np.array([True, True, False, False])}, outputs=[BOOL], grad=False)
          for op in ("And", "Or")],
        Case("Not", "Not", ["a"], consts={"a": np.array([True, False])}, outputs=[BOOL], grad=False),
        Case("BitwiseOr", "BitwiseOr", ["a", "b"], consts={"a": i64(6, 5), "b": i64(3, 8)}, outputs=[I64],
             grad=False, opset=18),
        Case("BitwiseNot", "BitwiseNot", ["a"], consts={"a": i64(6, -5)}, outputs=[I64], grad=False, opset=18),
        Case("Cast-to-int", "Cast", ["x"], {"x": x(3, 4) * 3}, attrs={"to": TensorProto.INT64}, outputs=[I64],
             grad=False),
        Case("IsNaN", "IsNaN", ["x"], consts={"x": np.array([1.0, np.nan, np.inf], np.float32)}, outputs=[BOOL],
             grad=False),
        Case("IsInf", "IsInf", ["x"], consts={"x": np.array([1.0, np.nan, np.inf, -np.inf], np.float32)},
             outputs=[BOOL], grad=False),
        Case("Conv-groups-dilation-asymmetric", "Conv", ["x", "w", "b"], {"x": x(1, 4, 7, 7), "w": x(6, 2, 3, 3),
             "b": x(6)}, attrs={"group": 2, "dilations": [2, 1], "pads": [1, 0, 2, 1]}),
        Case("ConvTranspose", "ConvTranspose", ["x", "w", "b"], {"x": x(1, 4, 5, 5), "w": x(4, 3, 3, 3), "b": x(3)},
             attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
        Case("Gemm-transposed-scaled", "Gemm", ["a", "b", "c"], {"a": x(4, 3), "b": x(5, 4), "c": x(5)},
             attrs={"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
        Case("MatMul-broadcast", "MatMul", ["a", "b"], {"a": x(2, 1, 3, 4), "b": x(3, 4, 5)}),
        Case("LogSoftmax", "LogSoftmax", ["x"], {"x": x(2, 5)}),
        Case("AveragePool-ceil-pads", "AveragePool", ["x"], {"x": x(1, 2, 6, 7)},
             attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1,
                    "count_include_pad": 1}),
        Case("MaxPool-dilated", "MaxPool", ["x"], {"x": x(1, 2, 7, 7)},
             attrs={"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
        Case("GlobalAveragePool", "GlobalAveragePool", ["x"], {"x": x(2, 3, 4, 5)}),
        Case("GlobalMaxPool", "GlobalMaxPool", ["x"], {"x": x(2, 3, 4, 5)}),
        Case("Flatten-axis", "Flatten", ["x"], {"x": x(2, 3, 4)}, attrs={"axis": 2}),
        Case("Reshape-zero-and-minus-one", "Reshape", ["x", "s"], {"x": x(2, 3, 4)}, {"s": i64(0, -1, 2)}),
        Case("Transpose", "Transpose", ["x"], {"x": x(2, 3, 4)}, attrs={"perm": [2, 0, 1]}),
        Case("GatherElements", "GatherElements", ["x", "i"], {"x": x(3, 4)},
             {"i": np.array([[0, -1], [2, 1], [3, 3]], np.int64)}, attrs={"axis": 1}),
        Case("GatherND-batch-dims", "GatherND", ["x", "i"], {"x": x(2, 3, 4)},
             {"i": np.array([[[1], [0]], [[2], [2]]], np.int64)}, attrs={"batch_dims": 1}),
        Case("Unsqueeze-input-13", "Unsqueeze", ["x", "a"], {"x": x(3, 4)}, {"a": i64(0, -1)}, opset=13),
        Case("Unsqueeze-attribute-11", "Unsqueeze", ["x"], {"x": x(3, 4)}, attrs={"axes": [1]}, opset=11),
        Case("Squeeze-input-13", "Squeeze", ["x", "a"], {"x": x(3, 1, 4, 1)}, {"a": i64(-1)}, opset=13),
        Case("Squeeze-all", "Squeeze", ["x"], {"x": x(1, 3, 1)}, opset=13),
        Case("Concat", "Concat", ["a", "b"], {"a": x(2, 3), "b": x(2, 1)}, attrs={"axis": -1}),
        Case("QuantizeLinear-per-channel", "QuantizeLinear", ["x", "s", "z"], {"x": x(2, 3)},
             {"s": np.array([0.01, 0.02, 0.05], np.float32), "z": np.zeros(3, np.int8)}, attrs={"axis": 1},
             outputs=[TensorProto.INT8], grad=False),
        Case("QuantizeLinear-uint8", "QuantizeLinear", ["x", "s", "z"], {"x": x(3, 4)},
             {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8)}, outputs=[TensorProto.UINT8], grad=False),
        Case("DequantizeLinear-per-channel", "DequantizeLinear", ["q", "s", "z"],
             consts={"q": RNG.integers(-127, 127, (2, 3)).astype(np.int8), "s": np.array([0.1, 0.2, 0.3], np.float32),
                     "z": np.array([0, 1, -1], np.int8)}, attrs={"axis": 1}, grad=False),
        Case("ConstantOfShape", "ConstantOfShape", ["s"], consts={"s": i64(2, 3)},
             attrs={"value": numpy_helper.from_array(np.array([1], np.int64))}, outputs=[I64], grad=False),
    ]
    return c


CASES = cases()


def onnxruntime_outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_onnxruntime(case: Case) -> None:
    proto = case.model()
    expected = onnxruntime_outputs(proto, case.feeds)
    for out, value in zip(proto.graph.output, expected, strict=True):  # the checker wants shapes
        out.CopyFrom(helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type, value.shape))
    model = Model.from_proto(proto)
    view = GraphModule(model)
    with torch.no_grad():
        got = view(**{k: torch.from_numpy(v) for k, v in case.feeds.items()})
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        g = g.numpy()
        assert g.shape == e.shape, (g.shape, e.shape)
        if case.op == "QuantizeLinear":  # fake quantization: float values on the integer grid
            g = g.astype(e.dtype)
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    if case.grad:
        float_feeds = [k for k, v in case.feeds.items() if v.dtype.kind == "f" and k not in case.fixed]
        assert float_feeds
        inputs = tuple(torch.from_numpy(case.feeds[k].astype(np.float64)).requires_grad_() for k in float_feeds)

        def run(*values: Any) -> tuple[Any, ...]:
            feeds = {k: torch.from_numpy(v.astype(np.float64) if v.dtype.kind == "f" else v)
                     for k, v in case.feeds.items()}
            feeds.update(zip(float_feeds, values, strict=True))
            return tuple(o for o in view(**feeds) if o.is_floating_point())

        torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)


def test_every_operator_of_the_view_has_a_case() -> None:
    view_ops = {name[3:] for name in dir(GraphModule) if name.startswith("op_")}
    assert view_ops == {c.op for c in CASES}
