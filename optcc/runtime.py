"""Running a model on ONNX Runtime's CPU provider: the reference for verification and
evaluation, whatever the build's target."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optcc.data.base import InputSpec
from optcc.errors import ModelError, first_line
from optcc.ir.indices import index_ranges
from optcc.ir.model import Model

logger = logging.getLogger(__name__)

PROVIDERS = ["CPUExecutionProvider"]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def session_options(threads: int | None = None, optimization: str = "all") -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = 3
    return opts


class OrtRunner:
    """An ONNX Runtime CPU session over a :class:`Model` (or a model file path).

    ``extra_outputs`` names intermediate tensors to return after the graph's own outputs
    (calibration and statistics passes read activations this way); the model itself is
    not modified.
    """

    def __init__(
        self,
        model: Model | str,
        *,
        threads: int | None = None,
        optimization: str = "all",
        extra_outputs: Sequence[str] = (),
    ) -> None:
        import onnxruntime as ort

        if extra_outputs and not isinstance(model, str):
            probe = model.copy()
            tensors = probe.tensor_map()
            for name in extra_outputs:
                tensors[name].dtype = tensors[name].dtype or np.float32
            probe.graph.outputs = list(probe.graph.outputs) + [tensors[n] for n in extra_outputs]
            model = probe

        self.label = model if isinstance(model, str) else (model.source or "model")
        options = session_options(threads, optimization)
        try:
            if isinstance(model, str):
                self.session = ort.InferenceSession(model, options, providers=PROVIDERS)
            elif model.needs_external_data():
                # Over protobuf's 2 GiB: go through a file with external data. ONNX Runtime
                # reads the weights while it creates the session, so the copy can go after.
                with tempfile.TemporaryDirectory(prefix="optcc-ort-") as tmp:
                    path = model.save(Path(tmp) / "model.onnx", external_data=True)
                    self.session = ort.InferenceSession(str(path), options, providers=PROVIDERS)
            else:
                payload = model.to_proto().SerializeToString()
                self.session = ort.InferenceSession(payload, options, providers=PROVIDERS)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc
        ranges = {} if isinstance(model, str) else index_ranges(model)
        self.input_specs = [
            InputSpec(i.name, tuple(i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32)),
                      *((ranges[i.name].limit, ranges[i.name].table) if i.name in ranges else ()))
            for i in self.session.get_inputs()
        ]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # A failed run raises ModelError with ONNX Runtime's message; its own (coloured) log
        # line of the same error on stderr would only repeat it.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = {spec.name for spec in self.input_specs}
        try:
            return self.session.run(
                None, {k: v for k, v in feeds.items() if k in names}, self._run_options
            )
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from exc


def model_input_specs(model: Model) -> list[InputSpec]:
    """The model's graph inputs as :class:`InputSpec` (dynamic dimensions as strings/None)."""
    specs = []
    for tensor in model.inputs:
        shape = tuple(
            d if isinstance(d, int) and d >= 0 else (str(d) if d is not None else None)
            for d in (tensor.shape or [])
        )
        specs.append(InputSpec(tensor.name, shape, np.dtype(tensor.dtype or np.float32)))
    return specs
