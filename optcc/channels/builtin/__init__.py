"""optcc's built-in op rules (see :mod:`optcc.channels.rules` for the contract), one module
per family:

- :mod:`~optcc.channels.builtin.layers` — Conv, Gemm, MatMul (weighted layers create ids;
  a depthwise Conv passes them; MatMul between activations couples attention heads) and
  Gather from a constant table (embeddings, relative position biases);
- :mod:`~optcc.channels.builtin.elementwise` — activations, binary ops (residual ``Add``
  couples branches; per-channel constants are sliced), pooling;
- :mod:`~optcc.channels.builtin.layout` — Concat, Split, Flatten, Transpose,
  Squeeze/Unsqueeze, Slice, Pad, Expand, Shape;
- :mod:`~optcc.channels.builtin.reshape` — Reshape: moves, splits into (heads, head size),
  merges (heads back, GQA repeats);
- :mod:`~optcc.channels.builtin.normalization` — BatchNorm/InstanceNorm, LayerNorm,
  Softmax, reductions.
"""

from __future__ import annotations

from optcc.channels.builtin.elementwise import (
    BINARY,
    SPATIAL,
    UNARY,
    BinaryRule,
    SpatialRule,
    UnaryRule,
)
from optcc.channels.builtin.layers import (
    ConvRule,
    GatherRule,
    GemmRule,
    MatMulRule,
    WeightedLayerRule,
)
from optcc.channels.builtin.layout import (
    ConcatRule,
    ExpandRule,
    FlattenRule,
    PadRule,
    ShapeRule,
    SliceRule,
    SplitRule,
    SqueezeRule,
    TransposeRule,
)
from optcc.channels.builtin.normalization import (
    BatchNormRule,
    LayerNormRule,
    ReduceRule,
    SoftmaxRule,
)
from optcc.channels.builtin.reshape import ReshapeRule
from optcc.channels.rules import ChannelRule

BUILTIN_RULES: tuple[ChannelRule, ...] = (
    ConvRule(), GemmRule(), MatMulRule(), GatherRule(), UnaryRule(), BinaryRule(), SpatialRule(),
    BatchNormRule(), LayerNormRule(), SoftmaxRule(), ReduceRule(), ConcatRule(), SplitRule(),
    FlattenRule(), ReshapeRule(), TransposeRule(), ShapeRule(), SqueezeRule(), SliceRule(),
    PadRule(), ExpandRule(),
)

__all__ = [
    "BINARY", "BUILTIN_RULES", "SPATIAL", "UNARY", "BatchNormRule", "BinaryRule", "ConcatRule",
    "ConvRule", "ExpandRule", "FlattenRule", "GatherRule", "GemmRule", "LayerNormRule",
    "MatMulRule", "PadRule", "ReduceRule", "ReshapeRule", "ShapeRule", "SliceRule",
    "SoftmaxRule", "SplitRule", "SqueezeRule", "TransposeRule", "UnaryRule", "WeightedLayerRule",
]
