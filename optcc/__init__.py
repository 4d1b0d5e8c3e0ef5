"""optcc: an optimization compiler for neural networks.

The public API is re-exported here lazily, so ``import optcc`` stays fast and never imports
torch, onnxruntime or TensorRT.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "OptccError": "optcc.errors",
    "RecipeError": "optcc.errors",
    "PluginError": "optcc.errors",
    "ModelError": "optcc.errors",
    "DataError": "optcc.errors",
    "PassError": "optcc.errors",
    "PreconditionError": "optcc.errors",
    "VerificationError": "optcc.errors",
    "ToleranceError": "optcc.errors",
    "BackendError": "optcc.errors",
    "BackendUnavailable": "optcc.errors",
    "RecipeErrors": "optcc.errors",
    "OutputError": "optcc.errors",
    "ResourceError": "optcc.errors",
    "BuildInterrupted": "optcc.errors",
    # IR
    "Model": "optcc.ir",
    "Metadata": "optcc.ir",
    "model_stats": "optcc.ir",
    "verify_model": "optcc.ir",
    "constant_weight": "optcc.ir",
    "static_shapes": "optcc.ir",
    # channel-dependency analysis (structured pruning, channel permutations, op rules)
    "channels": "optcc.channels",
    "ChannelRule": "optcc.channels",
    "ChannelContext": "optcc.channels",
    "ChannelAnalysis": "optcc.channels",
    # running models (ONNX Runtime, CPU) and the trainable torch view
    "OrtRunner": "optcc.runtime",
    "GraphModule": "optcc.torchview",
    # N:M (2:4) sparsity patterns
    "NMPattern": "optcc.sparse",
    "SparseLayer": "optcc.sparse",
    "sparse_layer": "optcc.sparse",
    "sparse_layers": "optcc.sparse",
    "weight_matrix": "optcc.sparse",
    "matrix_to_weight": "optcc.sparse",
    "nm_keep": "optcc.sparse",
    "check_matrix": "optcc.sparse",
    "pattern_fit": "optcc.sparse",
    "tensorrt_eligibility": "optcc.sparse",
    "layer_compliance": "optcc.sparse",
    "restore_nm_patterns": "optcc.sparse",
    # passes
    "Pass": "optcc.passes",
    "PassOptions": "optcc.passes",
    "PassResult": "optcc.passes",
    "PassContext": "optcc.passes",
    "Tolerance": "optcc.passes",
    "Capability": "optcc.passes",
    # data
    "Batch": "optcc.data",
    "DataSource": "optcc.data",
    # backends
    "Backend": "optcc.backends",
    "Artifact": "optcc.backends",
    "LatencyResult": "optcc.backends",
    # plugins and build
    "hookimpl": "optcc.hookspecs",
    "load_recipe": "optcc.recipe",
    "build": "optcc.build",
    "validate": "optcc.build",
    # deployment: load a build's output folder and predict
    "load": "optcc.predict",
    "Predictor": "optcc.predict",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optcc' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"optcc.{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
