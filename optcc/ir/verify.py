"""Structural verification of a model: ONNX checker (full) and strict shape inference.

Run after every pass. Stale ``value_info`` entries (shapes recorded before a pass changed
channel counts) are dropped first and re-inferred: otherwise the checker rejects an edited
graph that is in fact valid.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from optcc.errors import ModelError, first_line
from optcc.ir.model import Model


def verify_model(model: Model) -> onnx.ModelProto:
    """Check ``model`` and return its proto with inferred shapes.

    Raises :class:`ModelError` with the checker's or shape inference's first message.
    """
    proto = model.to_proto()
    del proto.graph.value_info[:]
    try:
        if model.needs_external_data():
            with tempfile.TemporaryDirectory(prefix="optcc-verify-") as tmp:
                path = Path(tmp) / "model.onnx"
                model.save(path, external_data=True)
                onnx.checker.check_model(str(path), full_check=True)
                onnx.shape_inference.infer_shapes_path(str(path), str(path), True, True, True)
                return onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"model failed verification: {first_line(exc)}") from exc
