"""What TensorRT 10's ONNX parser accepts: operators, their data types, and its limits.

Data for the parser rules in :mod:`optcc.lint`, taken from the ONNX-TensorRT parser's
operator support matrix (the ``docs/operators.md`` of its 10.x releases) and from the checks
its importer makes; docs/tensorrt.md explains each fact. Type codes: ``F`` float32,
float16 and bfloat16; ``I`` int32 and int64; ``B`` bool; ``U8`` uint8; ``Q`` the quantized
types INT8/FP8/INT4, which appear only on the integer side of Q/DQ pairs.
"""

from __future__ import annotations

F, INT, B, U8, Q = "F", "I", "B", "U8", "Q"

#: Operators the parser rejects outright (the matrix's "N" rows).
UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr",
    "BitwiseXor", "BlackmanWindow", "CenterCropPad", "Col2Im", "Compress",
    "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul",
    "RegexFullMatch", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
    "StringSplit", "TfIdfVectorizer", "Unique",
})

_FLOAT_ONLY = (
    "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv "
    "ConvTranspose Cos Cosh CumSum DeformConv Dropout Einsum Elu Erf Exp Floor Gemm "
    "GlobalAveragePool GlobalLpPool GlobalMaxPool GridSample GroupNormalization GRU HardSigmoid "
    "HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log "
    "LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization Mish "
    "NonMaxSuppression NonZero ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal "
    "RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize RNN RoiAlign Round "
    "ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh "
    "ThresholdedRelu Upsample Attention"
)
_FLOAT_INT = (
    "Abs Add ArgMax ArgMin DepthToSpace Div Equal Gelu Greater GreaterOrEqual IsNaN Less "
    "LessOrEqual Max Mean Min Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu "
    "Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK"
)
_FLOAT_INT_BOOL = (
    "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND "
    "Identity If Loop OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile "
    "Transpose Trilu Unsqueeze Where"
)

#: Supported operators and the types of the input the parser checks (see DATA_INPUT).
SUPPORTED_TYPES: dict[str, frozenset[str]] = {
    **{op: frozenset({F}) for op in _FLOAT_ONLY.split()},
    **{op: frozenset({F, INT}) for op in _FLOAT_INT.split()},
    **{op: frozenset({F, INT, B}) for op in _FLOAT_INT_BOOL.split()},
    **{op: frozenset({B}) for op in ("And", "Not", "Or", "Xor")},
    "Cast": frozenset({F, INT, B, U8}),
    "CastLike": frozenset({F, INT, B, U8}),
    "DequantizeLinear": frozenset({Q}),
}

#: Which input carries the data whose type the matrix lists (default 0).
DATA_INPUT = {"Where": 1}
#: Operators whose types are not checked (types vary by input or come from sub-graphs).
TYPE_UNCHECKED = frozenset({"Shape", "Size", "If", "Loop", "Scan", "Constant",
                            "ConstantOfShape", "RandomNormal", "RandomUniform",
                            "DequantizeLinear"})  # Q/DQ types: the Q/DQ rules

#: Operators added after TensorRT 10.0, with the first release whose parser has them.
SINCE = {"Attention": "10.14"}

#: The opsets TensorRT 10's parser documents (9-20 in 10.0/10.1, up to 22 later in 10.x).
OPSET_MIN, OPSET_MAX = 9, 22

#: Resize coordinate transformations the parser implements.
RESIZE_TRANSFORMS = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                               "asymmetric", "align_corners"})

#: Operators whose ``axes`` (or ``axis``) input must be a constant, by input index.
CONSTANT_INPUTS = {
    "Slice": {3: "axes"}, "Squeeze": {1: "axes"}, "Unsqueeze": {1: "axes"},
    "Pad": {3: "axes"}, "CumSum": {1: "axis"}, "OneHot": {1: "depth"},
    **{op: {1: "axes"} for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                  "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
                                  "ReduceSum", "ReduceSumSquare")},
}

TOPK_MAX_K = 3840  # K must be below this


def type_code(onnx_type: str) -> str | None:
    """The matrix's code for an ONNX type name (``FLOAT``, ``INT64``...), or None for types
    TensorRT has no use for (strings, complex, 16-bit and unsigned integers but UINT8)."""
    if onnx_type.startswith("FLOAT8") or onnx_type in {"INT8", "INT4", "FLOAT4E2M1"}:
        return Q
    return {
        "FLOAT": F, "FLOAT16": F, "BFLOAT16": F, "DOUBLE": F,  # DOUBLE is cast to FLOAT
        "INT32": INT, "INT64": INT, "BOOL": B, "UINT8": U8,
    }.get(onnx_type)
