"""The TensorRT backend: builds a serialized engine (``model.plan``) for the local GPU.

Quantization is explicit: the model carries Q/DQ nodes and the network is built strongly
typed (TensorRT 11 has no implicit INT8; see FACTS.md). Sparse tactics are enabled with
``sparse_weights`` (2:4 layers), dynamic inputs get one optimization profile from
``min/opt/max`` shapes, and a timing cache can be reused across builds on the same GPU,
CUDA and TensorRT versions.

Nothing here imports tensorrt or touches CUDA at module import, and ``is_available`` checks
for a GPU device before importing TensorRT: creating TensorRT objects in a process without
a GPU driver can crash it (FACTS.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from optcc.backends.base import Artifact, Backend, BackendOptions, LatencyResult, time_calls
from optcc.errors import BackendError
from optcc.hookspecs import hookimpl
from optcc.ir.model import Model

logger = logging.getLogger(__name__)


def gpu_present() -> tuple[bool, str]:
    """Whether an NVIDIA GPU and driver are visible, without initialising CUDA."""
    if not Path("/dev/nvidiactl").exists() and not Path("/dev/nvidia0").exists():
        if shutil.which("nvidia-smi") is None:
            return False, "no NVIDIA GPU or driver found (/dev/nvidia* and nvidia-smi absent)"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"nvidia-smi failed: {exc}"
        if out.returncode != 0 or "GPU" not in out.stdout:
            return False, "nvidia-smi lists no GPU"
    return True, ""


class TensorRTOptions(BackendOptions):
    workspace_mib: int = Field(4096, ge=64, description="Builder workspace memory pool (MiB).")
    sparse_weights: bool = Field(
        True, description="Let TensorRT time 2:4 sparse tactics for layers whose weights fit."
    )
    fp16: bool = Field(
        False,
        description="Weakly typed networks only: allow FP16 kernels (strongly typed networks "
        "take precisions from the graph).",
    )
    strongly_typed: bool = Field(
        True, description="Build a strongly typed network (precisions from the graph's types)."
    )
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
        None, description="Timing cache file to read and update (same GPU/CUDA/TensorRT)."
    )
    builder_optimization_level: int = Field(
        3, ge=0, le=5, description="TensorRT builder optimization level (0-5)."
    )


class TensorRTBackend(Backend):
    """TensorRT engines for NVIDIA GPUs (Ampere and newer for 2:4 sparse tactics)."""

    name = "tensorrt"
    summary = "TensorRT engine for the local NVIDIA GPU (needs the tensorrt extra and a GPU)."
    Options = TensorRTOptions
    install_hint = (
        "pip install 'optcc[tensorrt]' on a machine with an NVIDIA GPU (TensorRT's libraries "
        "come from NVIDIA's package index)"
    )

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
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

    # ------------------------------------------------------------------ build
    def _profile_shapes(self, network: Any) -> dict[str, tuple[list[int], list[int], list[int]]]:
        opts: Any = self.options
        shapes = {}
        default_batch = opts.batch_size or 1
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if all(d >= 0 for d in dims):
                continue
            name = tensor.name

            def fill(d: list[int], batch: int) -> list[int]:
                return [batch if (k == 0 and v < 0) else (v if v >= 0 else 1) for k, v in enumerate(d)]

            lo = opts.min_shapes.get(name) or fill(dims, 1)
            mid = opts.opt_shapes.get(name) or fill(dims, default_batch)
            hi = opts.max_shapes.get(name) or fill(dims, max(default_batch, 1) * 4)
            if any(v < 0 for v in dims[1:]) and name not in opts.opt_shapes:
                raise BackendError(
                    f"tensorrt: input '{name}' has dynamic dimensions {dims}; give "
                    "min_shapes/opt_shapes/max_shapes for it in the target options"
                )
            shapes[name] = (lo, mid, hi)
        return shapes

    def _compile_impl(self, model: Model, out_dir: Path) -> Artifact:
        import tensorrt as trt

        opts: Any = self.options
        onnx_path = model.save(out_dir / "model.onnx")
        trt_logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(trt_logger)
        flags = 0
        if opts.strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(
                "tensorrt: the ONNX parser rejected the model: " + "; ".join(errors[:5])
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
        config.builder_optimization_level = opts.builder_optimization_level
        if opts.sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if opts.fp16 and not opts.strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        shapes = self._profile_shapes(network)
        if shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, mid, hi) in shapes.items():
                profile.set_shape(name, lo, mid, hi)
            config.add_optimization_profile(profile)
        cache_bytes = b""
        if opts.timing_cache and os.path.exists(opts.timing_cache):
            cache_bytes = Path(opts.timing_cache).read_bytes()
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        config.progress_monitor = _progress_monitor(trt)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError("tensorrt: the engine build failed (see the log above)")
        plan = out_dir / "model.plan"
        plan.write_bytes(bytes(serialized))
        if opts.timing_cache:
            Path(opts.timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
        return Artifact(
            backend=self.name,
            path=plan,
            files=[plan, onnx_path],
            info={"tensorrt": trt.__version__, "profile_shapes": shapes, "bytes": plan.stat().st_size},
        )

    # ------------------------------------------------------------------ latency
    def _measure_latency_impl(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> LatencyResult:
        import tensorrt as trt
        import torch

        opts: Any = self.options
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(artifact.path.read_bytes())
        context = engine.create_execution_context()
        buffers = {}
        for name, value in feeds.items():
            buffers[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
            context.set_input_shape(name, tuple(value.shape))
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
                buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, buf in buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        stream = torch.cuda.Stream()

        def infer() -> None:
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()

        median, p90, mean, fastest = time_calls(infer, warmup=opts.warmup, runs=opts.runs)
        return LatencyResult(
            median_ms=median, p90_ms=p90, mean_ms=mean, min_ms=fastest, runs=opts.runs,
            warmup=opts.warmup, threads=None, batch_size=int(next(iter(feeds.values())).shape[0]),
            device=torch.cuda.get_device_name(),
        )


def _progress_monitor(trt: Any) -> Any:
    """A TensorRT progress monitor that logs build phases (engine builds take minutes)."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            logger.info("tensorrt: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            logger.debug("tensorrt: %s step %d", phase_name, step)
            return True

        def phase_finish(self, phase_name: str) -> None:
            logger.debug("tensorrt: %s done", phase_name)

    return _Monitor()


@hookimpl
def optcc_backends() -> list[type[Backend]]:
    return [TensorRTBackend]
