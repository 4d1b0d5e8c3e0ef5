"""optcc's intermediate representation: ONNX through onnx-graphsurgeon, plus metadata."""

from optcc.ir.metadata import Metadata
from optcc.ir.model import WEIGHTED_OPS, Model, constant_weight
from optcc.ir.stats import LayerStats, ModelStats, model_stats, static_shapes
from optcc.ir.verify import verify_model

__all__ = [
    "WEIGHTED_OPS",
    "LayerStats",
    "Metadata",
    "Model",
    "ModelStats",
    "constant_weight",
    "model_stats",
    "static_shapes",
    "verify_model",
]
