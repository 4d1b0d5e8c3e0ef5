"""The TensorRT backend: lowers the final model for TensorRT and, where TensorRT and a GPU
are present, builds the engine (``model.plan``).

Lowering happens everywhere, GPU or not: the backend writes the portable ``model.onnx``,
applies the lowering rewrites that plugins register (TensorRT plugin nodes; the rewritten
graph goes to ``model.tensorrt.onnx``), copies the plugin libraries into ``plugins/``,
checks the graph against TensorRT's ONNX parser rules (``optcc.lint``), and writes
``build_engine.sh`` (trtexec) and ``build_engine.py`` (TensorRT's Python API) from one
:class:`~optcc.backends.trt_build.EngineBuildDescription`. Whether the engine is built here
is the ``engine`` option: ``auto`` builds it when TensorRT and a GPU are present and
otherwise stops after lowering, saying so in the report with the steps to build it
elsewhere; ``required`` makes a missing TensorRT an error; ``skip`` never builds.

When the engine is built, it is built from the same description by the same code the
generated script holds (:func:`~optcc.backends.trt_build.build_engine`), so the three paths
cannot drift apart. The report then carries the engine inspector's per-layer precision and
sparse-tactic use, and a per-output comparison of the engine against ONNX Runtime on the
verification batch (Polygraphy-style ``atol + rtol·|ref|``).

Quantization is explicit: the model carries Q/DQ nodes and the network is built strongly
typed (TensorRT 11 has no implicit INT8). Nothing here imports tensorrt or touches CUDA at
module import, and TensorRT objects are only created after a GPU has been found: creating
them in a process without a GPU driver can crash it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from optcc.backends.base import Artifact, Backend, BackendOptions, LatencyResult, time_calls
from optcc.backends.lowering import LoweringContext, LoweringRewrite
from optcc.backends.trt_build import (
    BuildDescriptionError,
    BuildPaths,
    EngineBuildDescription,
    PluginLibrary,
    ShapeProfile,
    build_engine,
    gpu_present,
    shell_script,
    standalone_script,
    summarize_layers,
)
from optcc.errors import BackendError, BackendUnavailable, OptccError
from optcc.hookspecs import hookimpl
from optcc.ir.model import Model
from optcc.predict import Predictor, onnx_io_specs

logger = logging.getLogger(__name__)

__all__ = ["TensorRTBackend", "TensorRTOptions", "gpu_present"]

SCRIPT_FILES = ("build_engine.sh", "build_engine.py")


class PluginLibraryOption(BaseModel):
    """A TensorRT plugin library for the engine build (see ``trt_build.PluginLibrary``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(..., description="The .so file (absolute, or relative to the working folder).")
    loading: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: IPluginRegistry.load_library (trtexec --dynamicPlugins); "
        "static: dlopen, for libraries that register their creators when loaded.",
    )
    serialize: bool = Field(False, description="Embed the library in the engine (dynamic only).")


class TensorRTOptions(BackendOptions):
    engine: Literal["auto", "required", "skip"] = Field(
        "auto",
        description="Build the engine here: auto (when TensorRT and a GPU are present; otherwise "
        "lower only and write the build scripts), required (fail without them), skip (lower only).",
    )
    workspace_mib: int = Field(4096, ge=64, description="Builder workspace memory pool (MiB).")
    sparse_weights: bool = Field(
        True, description="Let TensorRT time 2:4 sparse tactics for layers whose weights fit."
    )
    strongly_typed: bool = Field(
        True, description="Build a strongly typed network (precisions from the graph's types)."
    )
    fp16: bool = Field(
        False, description="Weakly typed networks only (strongly_typed: false): allow FP16 kernels."
    )
    bf16: bool = Field(
        False, description="Weakly typed networks only (strongly_typed: false): allow BF16 kernels."
    )
    tf32: bool = Field(True, description="Allow TF32 for float32 math (TensorRT's default).")
    min_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="Optimization profile: smallest shape per input."
    )
    opt_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="Optimization profile: shape to tune for."
    )
    max_shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="Optimization profile: largest shape per input."
    )
    timing_cache: str | None = Field(
        None, description="Timing cache file to read and update (same GPU/CUDA/TensorRT); a "
        "relative path is relative to the output folder, so give an absolute one to keep it "
        "across builds.",
    )
    builder_optimization_level: int = Field(
        3, ge=0, le=5, description="TensorRT builder optimization level (0-5)."
    )
    plugin_libraries: list[PluginLibraryOption | str] = Field(
        default_factory=list, description="Plugin libraries to load for the build; copied into "
        "the output's plugins/ folder so the scripts find them on the GPU machine.",
    )
    rewrites: list[str] | None = Field(
        None, description="Lowering rewrites to apply, by name (default: every registered one "
        "for tensorrt; [] for none).",
    )
    compare_atol: float = Field(
        1e-3, ge=0, description="Engine vs ONNX Runtime check: absolute tolerance per element."
    )
    compare_rtol: float = Field(
        1e-3, ge=0, description="Engine vs ONNX Runtime check: tolerance relative to |reference|."
    )

    @model_validator(mode="after")
    def _precisions_need_weak_typing(self) -> TensorRTOptions:
        if self.strongly_typed and (self.fp16 or self.bf16):
            raise ValueError(
                "fp16/bf16 apply to weakly typed networks only; a strongly typed network takes "
                "its precisions from the graph (set strongly_typed: false to use them)"
            )
        return self


class TensorRTBackend(Backend):
    """TensorRT engines for NVIDIA GPUs (Ampere and newer for 2:4 sparse tactics)."""

    name = "tensorrt"
    summary = ("TensorRT: ONNX + engine build scripts anywhere; the engine itself where "
               "TensorRT and a GPU are present.")
    Options = TensorRTOptions
    install_hint = (
        "pip install 'optcc[tensorrt]' on a machine with an NVIDIA GPU (TensorRT's libraries "
        "come from NVIDIA's package index)"
    )

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """Whether engines can be built and run here (TensorRT imports and a GPU is seen)."""
        if importlib.util.find_spec("tensorrt") is None:
            return False, "the tensorrt Python package is not installed"
        ok, reason = gpu_present()
        if not ok:
            return False, reason
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # missing libnvonnxparser.so and friends
            return False, f"tensorrt does not import: {exc}"
        return True, ""

    # ------------------------------------------------------------------ the decision
    def engine_decision(self) -> tuple[bool, str]:
        """Whether this build makes the engine here, and if not, why. The one answer that
        ``validate``, ``build`` and latency measurement share."""
        opts: Any = self.options
        if opts.engine == "skip":
            return False, "the recipe sets engine: skip"
        ok, reason = self.is_available()
        if ok:
            return True, ""
        if opts.engine == "required":
            raise BackendUnavailable(self.name, reason, install_hint=self.install_hint)
        return False, reason

    def ensure_available(self) -> None:
        """Lowering works anywhere; only ``engine: required`` needs TensorRT and a GPU."""
        self.engine_decision()

    def can_measure(self) -> tuple[bool, str]:
        built, reason = self.engine_decision()
        return built, "" if built else f"the engine is not built here ({reason})"

    def check_model(self, model: Model, feeds: dict[str, np.ndarray]) -> None:
        self.profiles_for(model)

    # ------------------------------------------------------------------ description
    def profiles_for(self, model: Model) -> list[ShapeProfile]:
        """One optimization profile entry per dynamic input.

        Given shapes win. Missing ones are filled from ``opt_shapes``: a dynamic first
        (batch) axis spans 1 .. 4×opt, other axes stay at their opt size. A dynamic axis
        other than the batch axis needs at least ``opt_shapes`` for its input.
        """
        from optcc.recipe.loader import suggest

        opts: Any = self.options
        inputs = {t.name: list(t.shape or []) for t in model.inputs}
        for option in ("min_shapes", "opt_shapes", "max_shapes"):
            for name in getattr(opts, option):
                if name not in inputs:
                    raise BackendError(
                        f"tensorrt: {option} names '{name}', which is not an input of the model "
                        f"(inputs: {', '.join(inputs)})", hint=suggest(name, list(inputs)),
                    )
        profiles = []
        batch = opts.batch_size or 1
        for name, dims in inputs.items():
            dynamic = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d >= 0)]
            given = [getattr(opts, o).get(name) for o in ("min_shapes", "opt_shapes", "max_shapes")]
            if not dynamic and not any(given):
                continue
            if any(i > 0 for i in dynamic) and given[1] is None:
                example = [d if isinstance(d, int) and d >= 0 else 16 for d in dims]
                raise BackendError(
                    f"tensorrt: input '{name}' has dynamic dimensions {_dims(dims)} beyond the "
                    "batch axis; TensorRT needs an optimization profile for it",
                    hint=f"add to the target: opt_shapes: {{{name}: {example}}} (and min_shapes / "
                    "max_shapes for the range it must accept)",
                )
            opt = given[1] or [batch if i == 0 else d for i, d in enumerate(dims)]
            lo = given[0] or [1 if (i == 0 and 0 in dynamic) else d for i, d in enumerate(opt)]
            hi = given[2] or [4 * d if (i == 0 and 0 in dynamic) else d for i, d in enumerate(opt)]
            for which, shape in (("min", lo), ("opt", opt), ("max", hi)):
                if len(shape) != len(dims) or any(
                    isinstance(d, int) and d >= 0 and d != s for d, s in zip(dims, shape, strict=False)
                ):
                    raise BackendError(
                        f"tensorrt: {which} shape {shape} for input '{name}' does not fit its "
                        f"dimensions {_dims(dims)}"
                    )
            profile = ShapeProfile(name, [int(v) for v in lo], [int(v) for v in opt],
                                   [int(v) for v in hi])
            try:
                profile.check()
            except BuildDescriptionError as exc:
                raise BackendError(f"tensorrt: {exc}") from exc
            profiles.append(profile)
        return profiles

    def describe_build(self, model: Model) -> EngineBuildDescription:
        """The engine build for ``model`` with this backend's options (before rewrites)."""
        opts: Any = self.options
        precisions = [p for p in ("fp16", "bf16") if getattr(opts, p)]
        return EngineBuildDescription(
            onnx="model.onnx",
            engine="model.plan",
            strongly_typed=opts.strongly_typed,
            precisions=precisions,
            tf32=opts.tf32,
            sparse_weights=opts.sparse_weights,
            profiles=self.profiles_for(model),
            workspace_mib=opts.workspace_mib,
            builder_optimization_level=opts.builder_optimization_level,
            timing_cache=opts.timing_cache,
            plugin_libraries=[],
            layer_info="model.layers.json",
        )

    # ------------------------------------------------------------------ lowering
    def _rewrites(self) -> list[LoweringRewrite]:
        from optcc.plugins import get_registry

        opts: Any = self.options
        registered = {name: cls for name, cls in get_registry().lowering_rewrites.items()
                      if self.name in cls.targets}
        names = list(registered) if opts.rewrites is None else list(opts.rewrites)
        unknown = [n for n in names if n not in registered]
        if unknown:
            raise BackendError(
                f"tensorrt: unknown lowering rewrite(s) {unknown}; registered for tensorrt: "
                f"{sorted(registered) or 'none'}"
            )
        return [registered[n]() for n in names]

    def lower(
        self, model: Model, description: EngineBuildDescription
    ) -> tuple[Model, list[dict[str, Any]], list[PluginLibrary]]:
        """Apply the lowering rewrites; returns the lowered model, one record per rewrite,
        and the plugin libraries (recipe's first, then the rewrites')."""
        opts: Any = self.options
        libraries = [PluginLibrary(p) if isinstance(p, str) else PluginLibrary(**p.model_dump())
                     for p in opts.plugin_libraries]
        records = []
        current = model
        for rewrite in self._rewrites():
            ctx = LoweringContext(target=self.name, options=opts, description=description)
            try:
                result = rewrite.apply(current.copy(), ctx)
            except OptccError:
                raise
            except Exception as exc:
                raise BackendError(f"tensorrt: lowering rewrite '{rewrite.name}' failed: {exc}") from exc
            records.append({"name": rewrite.name, "modified": result.modified,
                            "reason": result.reason, "stats": result.stats,
                            "plugin_libraries": [lib.path for lib in result.plugin_libraries]})
            if result.modified:
                current = result.model
                libraries += result.plugin_libraries
        return current, records, libraries

    def _compile_impl(self, model: Model, out_dir: Path) -> Artifact:
        from optcc.lint import lint_tensorrt

        description = self.describe_build(model)
        portable = model.save(out_dir / "model.onnx")
        files = [portable, *_data_file(portable)]
        lowered, rewrites, libraries = self.lower(model, description)
        if lowered is not model:
            source = lowered.save(out_dir / "model.tensorrt.onnx")
            files += [source, *_data_file(source)]
            description.onnx = source.name
        description.plugin_libraries = _copy_plugins(libraries, out_dir)
        files += [out_dir / lib.path for lib in description.plugin_libraries]
        try:
            description.check()
        except BuildDescriptionError as exc:
            raise BackendError(f"tensorrt: {exc}") from exc
        for name, text in zip(SCRIPT_FILES, (shell_script(description),
                                             standalone_script(description)), strict=True):
            script = out_dir / name
            script.write_text(text)
            script.chmod(0o755)
            files.append(script)
        findings = lint_tensorrt(lowered, profiles=description.profiles)
        errors = [str(f) for f in findings if f.severity == "error"]
        for message in errors[:10]:
            logger.warning("tensorrt lint: %s", message)
        info: dict[str, Any] = {
            "build": description.to_dict(),
            "rewrites": rewrites,
            "lint": {
                "errors": len(errors),
                "warnings": sum(f.severity == "warning" for f in findings),
                "findings": [f.to_dict() for f in findings],
            },
        }
        build_here, reason = self.engine_decision()
        if not build_here:
            info["engine"] = {"built": False, "reason": reason, "how_to_build": HOW_TO_BUILD}
            logger.warning("tensorrt: engine not built here (%s); see build_engine.sh", reason)
            return Artifact(backend=self.name, path=out_dir / description.onnx, files=files,
                            info=info)
        paths = BuildPaths.resolve(description, out_dir)
        try:
            built = build_engine(description, paths)
        except BuildDescriptionError as exc:
            raise BackendError(f"tensorrt: {exc}") from exc
        info["engine"] = {"built": True, **built}
        if paths.layer_info is not None and paths.layer_info.is_file():
            info["engine"]["layers"] = summarize_layers(paths.layer_info.read_text())
            files.append(paths.layer_info)
        plan = paths.engine
        return Artifact(backend=self.name, path=plan, files=[plan, *files],
                        info={**info, "tensorrt": built["tensorrt"], "bytes": plan.stat().st_size})

    # ------------------------------------------------------------------ running engines
    def _runner(self, artifact: Artifact) -> EngineRunner:
        libraries = [PluginLibrary(str(artifact.path.parent / p["path"]), p["loading"], p["serialize"])
                     for p in artifact.info.get("build", {}).get("plugin_libraries", [])]
        return EngineRunner(artifact.path, libraries)

    def _measure_latency_impl(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> LatencyResult:
        opts: Any = self.options
        runner = self._runner(artifact)
        runner.bind(feeds)
        median, p90, mean, fastest = time_calls(runner.execute, warmup=opts.warmup, runs=opts.runs)
        return LatencyResult(
            median_ms=median, p90_ms=p90, mean_ms=mean, min_ms=fastest, runs=opts.runs,
            warmup=opts.warmup, threads=None, batch_size=int(next(iter(feeds.values())).shape[0]),
            device=runner.device_name(),
        )

    def check_artifact(
        self, artifact: Artifact, model: Model, feeds: dict[str, np.ndarray]
    ) -> dict[str, Any] | None:
        """The engine's outputs against ONNX Runtime's on the verification batch."""
        from optcc.backends.compare import compare_outputs
        from optcc.runtime import OrtRunner

        if artifact.path.suffix != ".plan":
            return None
        opts: Any = self.options
        runner = self._runner(artifact)
        largest = runner.max_batch()
        if largest is not None:  # stay inside the engine's optimization profile
            feeds = {k: v[:largest] for k, v in feeds.items()}
        reference = OrtRunner(model)
        expected = dict(zip(reference.output_names, reference.run(feeds), strict=True))
        got = runner.run(feeds)
        result = compare_outputs(expected, got, atol=opts.compare_atol, rtol=opts.compare_rtol)
        result["against"] = "onnxruntime (CPU) on the verification batch"
        if not result["passed"]:
            logger.warning("tensorrt: engine outputs %s differ from ONNX Runtime beyond "
                           "atol=%g rtol=%g", result["failed"], opts.compare_atol, opts.compare_rtol)
        return result

    @classmethod
    def load_predictor(
        cls, output_dir: Path, report: dict[str, Any], *, batch_size: int | None = None,
        **options: Any,
    ) -> Any:
        plan = output_dir / "model.plan"
        hint = ("build it with build_engine.sh or build_engine.py in that folder on a GPU "
                "machine, or load the portable model with backend='onnxruntime' "
                "(optcc predict --backend onnxruntime)")
        if options:
            raise OptccError(f"tensorrt predictor: unknown option(s) {sorted(options)}")
        if not plan.is_file():
            raise OptccError(f"{output_dir}: no TensorRT engine (model.plan) in the folder",
                             hint=hint)
        ok, reason = cls.is_available()
        if not ok:
            raise BackendUnavailable(cls.name, reason, install_hint=hint)
        build = _read_description(output_dir)
        return TensorRTPredictor(output_dir, build, batch_size=batch_size)


HOW_TO_BUILD = [
    "copy this folder to a machine with an NVIDIA GPU and TensorRT 10 or newer",
    "check it there without TensorRT: python build_engine.py --dry-run",
    "build with trtexec: bash build_engine.sh (TRTEXEC=/path/to/trtexec to choose a binary)",
    "or with TensorRT's Python API: python build_engine.py",
    "both write model.plan (and model.layers.json) into this folder; then "
    "optcc.load(folder).predict(...) or 'optcc predict' runs the engine",
]


def _dims(dims: list[Any]) -> str:
    return "[" + ", ".join(str(d) if d not in (None, -1) else "?" for d in dims) + "]"


def _data_file(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [data] if data.exists() else []


def _copy_plugins(libraries: list[PluginLibrary], out_dir: Path) -> list[PluginLibrary]:
    """Copy plugin libraries into ``out_dir/plugins`` so the output folder is complete."""
    copied = []
    for library in libraries:
        source = Path(library.path).expanduser()
        if not source.is_file():
            raise BackendError(f"tensorrt: plugin library not found: {source}")
        target = out_dir / "plugins" / source.name
        if any(c.path == f"plugins/{source.name}" for c in copied):
            raise BackendError(f"tensorrt: two plugin libraries named {source.name}")
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(source, target)
        copied.append(PluginLibrary(f"plugins/{source.name}", library.loading, library.serialize))
    return copied


def _read_description(output_dir: Path) -> EngineBuildDescription:
    report = json.loads((output_dir / "report.json").read_text())
    data = report.get("final", {}).get("artifact", {}).get("info", {}).get("build")
    if data is None:
        return EngineBuildDescription()
    return EngineBuildDescription.from_dict(data)


class EngineRunner:
    """A deserialized engine with one execution context, inputs and outputs in CUDA memory
    (torch tensors). GPU only: never constructed without a GPU."""

    def __init__(self, plan: Path, plugin_libraries: list[PluginLibrary]) -> None:
        import tensorrt as trt
        import torch

        from optcc.backends.trt_build import load_plugin_libraries

        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt", "torch cannot see a CUDA device",
                                     install_hint="a CUDA build of torch runs TensorRT engines")
        self.trt, self.torch = trt, torch
        self._plugins = load_plugin_libraries(trt, plugin_libraries)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan}: TensorRT could not deserialize the engine (built by "
                               "another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, Any] = {}

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def max_batch(self) -> int | None:
        """The largest first dimension every input's profile accepts (None: not dynamic)."""
        sizes = []
        for name in self.inputs:
            if self.engine.get_tensor_shape(name)[0] < 0:
                sizes.append(self.engine.get_tensor_profile_shape(name, 0)[2][0])
        return min(sizes) if sizes else None

    def bind(self, feeds: dict[str, np.ndarray]) -> None:
        torch = self.torch
        self.buffers = {}
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self._dtype(name))
            tensor = torch.from_numpy(array).cuda()
            self.context.set_input_shape(name, tuple(array.shape))
            self.buffers[name] = tensor
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, self._dtype(name))).dtype
            self.buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("tensorrt: the engine failed to execute")
        self.stream.synchronize()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.bind(feeds)
        self.execute()
        return {name: self.buffers[name].cpu().numpy() for name in self.outputs}

    def device_name(self) -> str:
        return str(self.torch.cuda.get_device_name())


class TensorRTPredictor(Predictor):
    """Predictions from ``model.plan`` (see :class:`optcc.predict.Predictor`); GPU only."""

    backend = "tensorrt"

    def __init__(self, output_dir: Path, description: EngineBuildDescription,
                 batch_size: int | None = None) -> None:
        libraries = [PluginLibrary(str(output_dir / lib.path), lib.loading, lib.serialize)
                     for lib in description.plugin_libraries]
        self.runner = EngineRunner(output_dir / "model.plan", libraries)
        specs, outputs = onnx_io_specs(output_dir / description.onnx)
        super().__init__(input_specs=specs, output_names=outputs,
                         batch_size=batch_size or self.runner.max_batch(),
                         source=str(output_dir / "model.plan"))

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runner.run(feeds)
        return [out[name] for name in self.output_names]


@hookimpl
def optcc_backends() -> list[type[Backend]]:
    return [TensorRTBackend]
