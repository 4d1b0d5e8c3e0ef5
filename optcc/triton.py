"""Export a build's artifact as a Triton Inference Server model repository entry.

Triton serves every model from ``<repository>/<name>/``: a ``config.pbtxt`` (the model
configuration, protobuf text format) and one folder per version holding the model file,
``1/model.onnx`` for the ONNX Runtime backend (platform ``onnxruntime_onnx``) or
``1/model.plan`` for the TensorRT backend (platform ``tensorrt_plan``).

The configuration is derived from the model file that is exported: every input and output
with its Triton data type and dimensions. When every input and output has a dynamic first
axis, that axis is the batch: ``max_batch_size`` is set (from the option, else the engine
profile's largest batch, else the build's batch size, else 64), ``dims`` leave the batch axis
out, and ``dynamic_batching`` lets Triton merge requests into batches. Otherwise
``max_batch_size`` is 0 and ``dims`` are the full shapes. Dynamic dimensions are ``-1``.

The model folder gets a hidden marker file (``.optcc-triton``, which Triton ignores); an
existing folder is replaced only when it carries that marker, so optcc never overwrites a
model someone else put in the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optcc.errors import OptccError

MARKER = ".optcc-triton"

#: numpy dtype name → Triton's DataType enum name.
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "int8": "TYPE_INT8",
    "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "object": "TYPE_STRING",
}
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
             "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan")}


@dataclass
class TritonTensor:
    name: str
    data_type: str
    dims: list[int]


@dataclass
class TritonConfig:
    """The parts of Triton's ``ModelConfig`` that optcc writes."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    dynamic_batching: bool = True
    max_queue_delay_microseconds: int = 100
    instance_kind: str = "KIND_GPU"
    instance_count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_pbtxt(self) -> str:
        """Protobuf text format, as Triton reads ``config.pbtxt``."""

        def tensors(key: str, items: list[TritonTensor]) -> list[str]:
            out = [f"{key} ["]
            for i, t in enumerate(items):
                comma = "," if i < len(items) - 1 else ""
                out += ["  {", f"    name: {json.dumps(t.name)}",
                        f"    data_type: {t.data_type}",
                        f"    dims: [ {', '.join(str(d) for d in t.dims)} ]", "  }" + comma]
            return out + ["]"]

        lines = [f"name: {json.dumps(self.name)}", f"platform: {json.dumps(self.platform)}",
                 f"backend: {json.dumps(self.backend)}", f"max_batch_size: {self.max_batch_size}"]
        lines += tensors("input", self.inputs) + tensors("output", self.outputs)
        if self.dynamic_batching and self.max_batch_size > 0:
            lines += ["dynamic_batching {",
                      f"  max_queue_delay_microseconds: {self.max_queue_delay_microseconds}",
                      "}"]
        lines += ["instance_group [", "  {", f"    count: {self.instance_count}",
                  f"    kind: {self.instance_kind}", "  }", "]"]
        return "\n".join(lines) + "\n"


def _triton_type(dtype: np.dtype | str) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in TRITON_TYPES:
        raise OptccError(f"triton: no Triton data type for {name}")
    return TRITON_TYPES[name]


def _dims(shape: tuple[Any, ...]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def model_tensors(onnx_path: Path) -> tuple[list[tuple[str, np.dtype, tuple[Any, ...]]],
                                            list[tuple[str, np.dtype, tuple[Any, ...]]]]:
    """(name, dtype, shape) of the graph inputs and outputs, output shapes inferred."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(onnx_path), load_external_data=False)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # keep the declared shapes
        pass
    initializers = {i.name for i in proto.graph.initializer}

    def describe(value: Any) -> tuple[str, np.dtype, tuple[Any, ...]]:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tensor.shape.dim)
        return value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape

    inputs = [describe(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in proto.graph.output]


def make_config(
    onnx_path: Path,
    *,
    name: str,
    backend: str,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    instance_kind: str = "gpu",
    instance_count: int = 1,
    max_queue_delay_microseconds: int = 100,
) -> TritonConfig:
    """The Triton configuration for the model in ``onnx_path`` (see module docstring)."""
    if backend not in PLATFORMS:
        raise OptccError(f"triton: backend must be one of {sorted(PLATFORMS)}, got '{backend}'")
    platform, triton_backend, _ = PLATFORMS[backend]
    inputs, outputs = model_tensors(onnx_path)
    everything = inputs + outputs
    batched = bool(everything) and all(
        shape and not (isinstance(shape[0], int) and shape[0] >= 0) for _, _, shape in everything
    )
    if max_batch_size is not None and max_batch_size > 0 and not batched:
        raise OptccError(
            f"triton: max_batch_size {max_batch_size} needs a dynamic first (batch) axis on "
            "every input and output; this model has fixed ones (use max_batch_size 0)"
        )
    size = (max_batch_size or 64) if batched else 0
    start = 1 if batched else 0
    return TritonConfig(
        name=name, platform=platform, backend=triton_backend, max_batch_size=size,
        inputs=[TritonTensor(n, _triton_type(d), _dims(s[start:])) for n, d, s in inputs],
        outputs=[TritonTensor(n, _triton_type(d), _dims(s[start:])) for n, d, s in outputs],
        dynamic_batching=dynamic_batching and size > 0,
        max_queue_delay_microseconds=max_queue_delay_microseconds,
        instance_kind="KIND_GPU" if instance_kind == "gpu" else "KIND_CPU",
        instance_count=instance_count,
    )


def export_triton(
    output_dir: str | Path,
    repository: str | Path,
    *,
    name: str | None = None,
    backend: str | None = None,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    instance_kind: str | None = None,
    instance_count: int = 1,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<repository>/<name>/`` for the artifact in an optcc output folder.

    ``backend`` picks the artifact: ``tensorrt`` exports ``model.plan`` (it must exist),
    ``onnxruntime`` the portable ``model.onnx``; the default is the engine when there is
    one, else the ONNX model. Returns what was written (for report.json).
    """
    from optcc.predict import read_report

    folder = Path(output_dir)
    if report is None:
        folder, report = read_report(folder)
    target = report["target"]["backend"]
    plan = folder / "model.plan"
    if backend is None:
        backend = "tensorrt" if plan.is_file() else "onnxruntime"
    if backend not in PLATFORMS:
        raise OptccError(f"triton: backend must be one of {sorted(PLATFORMS)}, got '{backend}'")
    build = report["final"]["artifact"].get("info", {}).get("build") or {}
    if backend == "tensorrt":
        if not plan.is_file():
            raise OptccError(
                f"{folder}: no TensorRT engine (model.plan) to export",
                hint="build it first (build_engine.sh or build_engine.py in that folder), or "
                "export the ONNX model with --backend onnxruntime",
            )
        onnx_path = folder / build.get("onnx", "model.onnx")
        files = [plan]
        if max_batch_size is None:
            max_batch_size = _profile_max_batch(build)
    else:
        onnx_path = folder / "model.onnx"
        files = [onnx_path, *([onnx_path.with_name("model.onnx.data")]
                              if onnx_path.with_name("model.onnx.data").exists() else [])]
    if not onnx_path.is_file():
        raise OptccError(f"{folder}: {onnx_path.name} is missing; the folder is incomplete")
    if max_batch_size is None:
        max_batch_size = report["target"]["options"].get("batch_size")
    model_name = _model_name(name or report["recipe"].get("name") or folder.name)
    kind = instance_kind or ("gpu" if backend == "tensorrt" or target != "onnxruntime" else "cpu")
    config = make_config(onnx_path, name=model_name, backend=backend,
                         max_batch_size=max_batch_size, dynamic_batching=dynamic_batching,
                         instance_kind=kind, instance_count=instance_count)
    repo = Path(repository).expanduser()
    model_dir = repo / model_name
    if model_dir.exists() and not (model_dir / MARKER).is_file():
        raise OptccError(
            f"{model_dir} exists and was not written by optcc; it is left as it is",
            hint="choose another --name or --repository",
        )
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_name}.partial-", dir=repo))
    staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        (staging / "1").mkdir()
        for file in files:
            shutil.copy2(file, staging / "1" / file.name)
        (staging / "config.pbtxt").write_text(config.to_pbtxt())
        (staging / MARKER).write_text(json.dumps({"source": str(folder.resolve())}) + "\n")
        if model_dir.exists():
            old = repo / f".{model_name}.old-{os.getpid()}"
            os.replace(model_dir, old)
            os.replace(staging, model_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    notes = []
    if backend == "tensorrt" and build.get("plugin_libraries"):
        notes.append("the engine uses plugin libraries: start Triton with them preloaded "
                     "(LD_PRELOAD) or list them in tritonserver's --backend-config=tensorrt,"
                     "plugins=...")
    return {"repository": str(repo), "model": model_name, "backend": backend,
            "platform": config.platform, "max_batch_size": config.max_batch_size,
            "files": [f"{model_name}/config.pbtxt"] + [f"{model_name}/1/{f.name}" for f in files],
            "notes": notes}


def _profile_max_batch(build: dict[str, Any]) -> int | None:
    sizes = [p["max"][0] for p in build.get("profiles", []) if p.get("max")]
    return min(sizes) if sizes else None


def _model_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    if not cleaned:
        raise OptccError(f"triton: '{name}' cannot be a model name")
    return cleaned
