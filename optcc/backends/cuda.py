"""The ``cuda`` backend: the model on an NVIDIA GPU through the torch view, with every 2:4
sparse layer on optcc's own kernels (``liboptcc_kernels.so``).

The graph runs in :class:`optcc.torchview.GraphModule` under torch autocast (float16 or
bfloat16), so dense layers use cuBLAS/cuDNN as torch would. The dispatch plan
(:mod:`optcc.backends.cuda_plan`) picks the sparse layers and the chains of nodes each one
absorbs (bias, residual, activation, INT8 dequantization and requantization); each becomes
one kernel call through the view's node overrides. The weights are packed once, with
:mod:`optcc.sparse.packing`, in the metadata layout of the kernel family chosen for the card
(``sm90`` on Hopper, ``sm80`` on Ampere and Ada). Tile configurations are tuned per GEMM
shape on first use and cached (:mod:`optcc.backends.cuda_tuning`).

Latency is measured with CUDA events after warm-up runs (median and p90), and reported with
the card's name. This backend is how users without TensorRT get the sparse speed-up, and
how the kernels are tested end to end against ONNX Runtime.

Nothing here imports torch or touches CUDA at module import; ``is_available`` looks for a
GPU device before importing torch's CUDA support.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcc.backends.base import Artifact, Backend, BackendOptions, LatencyResult
from optcc.backends.cuda_plan import DispatchPlan, SparseLayerPlan, plan_model
from optcc.backends.cuda_tuning import KernelTuner, TuneKey, TuningCache
from optcc.errors import BackendError
from optcc.hookspecs import hookimpl
from optcc.ir.model import Model
from optcc.predict import Predictor, onnx_io_specs

logger = logging.getLogger(__name__)


class CudaOptions(BackendOptions):
    precision: Literal["float16", "bfloat16"] = Field(
        "float16", description="Autocast precision of the graph and of the float sparse kernels.")
    int8: bool = Field(
        True, description="Run layers quantized in the TensorRT Q/DQ format on the INT8 kernels.")
    sparse_kernels: bool = Field(
        True, description="Dispatch 2:4 layers to optcc's kernels (false: torch only, the dense "
        "baseline).")
    arch: Literal["auto", "sm80", "sm90"] = Field(
        "auto", description="Kernel family: auto (from the card), sm80 (Ampere code; also runs "
        "on Hopper) or sm90 (Hopper).")
    tune: bool = Field(True, description="Time the tile configurations per GEMM shape once.")
    tuning_cache: str | None = Field(
        None, description="Tuning cache file (default ~/.cache/optcc/kernels/tuning.json).")
    channels_last: bool = Field(
        True, description="Run 4-D activations channels-last, so 1x1 convolutions are GEMMs "
        "without copies.")
    compare_atol: float = Field(
        1e-2, ge=0, description="Outputs on the GPU against ONNX Runtime (report): absolute "
        "tolerance (16-bit arithmetic).")
    compare_rtol: float = Field(
        2e-2, ge=0, description="Outputs on the GPU against ONNX Runtime (report): relative "
        "tolerance.")


def _gpu_present() -> tuple[bool, str]:
    from optcc.backends.tensorrt import gpu_present

    return gpu_present()


def _device_arch(torch: Any, requested: str) -> int:
    major, minor = torch.cuda.get_device_capability()
    if requested == "sm90":
        if major != 9:
            raise BackendError(f"cuda: arch sm90 needs a Hopper GPU, this one is sm_{major}{minor}")
        return 90
    if requested == "sm80" or major == 8:
        if major not in (8, 9):
            raise BackendError(f"cuda: the sm80 kernels run on sm_8x and sm_90, not sm_{major}{minor}")
        return 80
    if major == 9:
        return 90
    raise BackendError(f"cuda: no sparse kernels for sm_{major}{minor} (Ampere or Hopper needed)")


def cuda_event_times(fn: Callable[[], Any], *, warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn``, timed with CUDA events on the
    current stream after ``warmup`` untimed calls (GPU time, launch gaps included)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


# ----------------------------------------------------------------------------- layers
class SparseKernelLayer:
    """One planned layer at run time: its packed weight on the GPU and the kernel call."""

    def __init__(self, plan: SparseLayerPlan, model: Model, runtime: SparseRuntime) -> None:
        import torch

        from optcc.sparse.packing import pack

        self.plan = plan
        self.runtime = runtime
        tensors = model.tensor_map()
        weight = np.asarray(tensors[plan.weight].values)
        matrix = _as_mk(weight, plan.weight_layout)
        scale = _weight_scale(plan, tensors, plan.m)
        alpha = np.full(plan.m, plan.alpha, dtype=np.float32)
        if plan.precision == "int8":
            packed_source = matrix.astype(np.int8)
            alpha *= np.float32(plan.input_scale) * scale
        else:
            real = matrix.astype(np.float32)
            if plan.weight_scale is not None:  # dequantize an INT8 weight for the float kernel
                zp = _weight_zero_point(plan, tensors, plan.m)
                real = (real - zp[:, None]) * scale[:, None]
            packed_source = real.astype(plan.precision if plan.precision != "bfloat16" else np.float32)
        device = runtime.device
        if plan.precision == "bfloat16":
            bf16 = torch.from_numpy(np.ascontiguousarray(packed_source)).to(torch.bfloat16)
            packed = pack(bf16.view(torch.int16).numpy().view(np.float16), runtime.format)
            self.values = torch.from_numpy(packed.values.view(np.int16)).view(torch.bfloat16).to(device)
        else:
            packed = pack(np.ascontiguousarray(packed_source), runtime.format)
            self.values = torch.from_numpy(packed.values).to(device)
        self.meta = torch.from_numpy(np.ascontiguousarray(packed.meta).view(np.uint8)).to(device)
        self.alpha = None if np.all(alpha == 1.0) else torch.from_numpy(alpha).to(device)
        self.bias = None
        if plan.bias is not None:
            bias = np.asarray(tensors[plan.bias].values, dtype=np.float32).reshape(-1)
            self.bias = torch.from_numpy(bias * np.float32(plan.bias_scale)).to(device)
        self.out_dtype = getattr(torch, plan.output_dtype)
        self.in_dtype = getattr(torch, plan.precision)
        self.residual_dtype = torch.bfloat16 if plan.precision == "bfloat16" else torch.float16

    # ------------------------------------------------------------------ operands
    def _input_rows(self, x: Any) -> tuple[Any, tuple[int, ...]]:
        """The input as a contiguous [T, K] matrix, and the output's leading shape."""
        import torch

        plan = self.plan
        if plan.precision == "int8" and x.dtype != torch.int8:
            x = x.to(torch.int8)  # float values on the INT8 grid (torch's QuantizeLinear)
        elif plan.precision != "int8" and x.dtype != self.in_dtype:
            x = x.to(self.in_dtype)
        if plan.op == "Conv":
            sh, sw = (plan.conv_strides or (1, 1))[-2:]
            if sh != 1 or sw != 1:
                x = x[:, :, ::sh, ::sw]
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            return rows.contiguous(), (n, h, w)
        if x.shape[-1] != plan.k:
            raise BackendError(f"cuda: layer {plan.node} expects {plan.k} input features, "
                               f"got shape {tuple(x.shape)}")
        return x.reshape(-1, plan.k).contiguous(), tuple(x.shape[:-1])

    def _output(self, rows: Any, lead: tuple[int, ...]) -> Any:
        if self.plan.op == "Conv":
            n, h, w = lead
            return rows.view(n, h, w, self.plan.m).permute(0, 3, 1, 2)
        return rows.view(*lead, self.plan.m)

    def _residual_rows(self, residual: Any, out_shape: tuple[int, ...]) -> Any | None:
        """The residual as [T, M] in the kernel's type, or None if it does not fit exactly."""
        if tuple(residual.shape) != out_shape:
            return None
        residual = residual.to(self.residual_dtype)
        if self.plan.op == "Conv":
            return residual.permute(0, 2, 3, 1).reshape(-1, self.plan.m).contiguous()
        return residual.reshape(-1, self.plan.m).contiguous()

    # ------------------------------------------------------------------ call
    def _row_multiple(self) -> int:
        """The Ampere-family kernels need the token count N to be a multiple of 16 bytes of
        elements (8, or 16 for INT8); the Hopper ones take any N."""
        if self.runtime.format != "sm80":
            return 1
        return 16 if self.plan.precision == "int8" else 8

    def __call__(self, env: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        plan = self.plan
        rows, lead = self._input_rows(env[plan.input])
        out_shape = (lead[0], plan.m, *lead[1:]) if plan.op == "Conv" else (*lead, plan.m)
        residual = None
        if plan.residual is not None:
            residual = self._residual_rows(env[plan.residual], out_shape)
            if residual is None:
                return self._unfused(env, rows, lead)
        tokens = rows.shape[0]
        padded = -(-tokens // self._row_multiple()) * self._row_multiple()
        rows, residual = _pad_rows(rows, padded), _pad_rows(residual, padded)
        out = torch.empty((padded, plan.m), dtype=self.out_dtype, device=rows.device)
        self.runtime.launch(self, rows, out, residual, with_epilogue=True)
        return {plan.output: self._output(out[:tokens], lead)}

    def _unfused(self, env: Mapping[str, Any], rows: Any, lead: tuple[int, ...]) -> dict[str, Any]:
        """The chain when the residual only broadcasts to the output: the kernel computes
        ``acc * alpha + bias`` and torch finishes residual, activation and requantization."""
        import torch

        plan = self.plan
        tokens = rows.shape[0]
        padded = -(-tokens // self._row_multiple()) * self._row_multiple()
        out = torch.empty((padded, plan.m), dtype=self.residual_dtype, device=rows.device)
        self.runtime.launch(self, _pad_rows(rows, padded), out, None, with_epilogue=False)
        value = self._output(out[:tokens], lead).float()
        residual = env[plan.residual].float()
        if plan.residual_after_activation:
            value = _activate(torch, value, plan) + residual
        else:
            value = _activate(torch, value + residual, plan)
        if plan.output_scale is not None:
            return {plan.output: torch.clamp(torch.round(value / plan.output_scale), -128, 127
                                             ).to(torch.int8)}
        return {plan.output: value.to(self.out_dtype)}


def _pad_rows(rows: Any, count: int) -> Any:
    """``rows`` with zero rows appended up to ``count`` (None stays None)."""
    if rows is None or rows.shape[0] == count:
        return rows
    import torch

    return torch.nn.functional.pad(rows, (0, 0, 0, count - rows.shape[0]))


def _activate(torch: Any, value: Any, plan: SparseLayerPlan) -> Any:
    if plan.activation == "relu":
        return torch.relu(value)
    if plan.activation in ("gelu", "gelu_tanh"):
        return torch.nn.functional.gelu(value, approximate="tanh" if plan.activation == "gelu_tanh"
                                        else "none")
    if plan.activation == "clip" and plan.clip is not None:
        return torch.clamp(value, plan.clip[0], plan.clip[1])
    return value


def _as_mk(weight: np.ndarray, layout: str) -> np.ndarray:
    if layout == "km":
        return np.ascontiguousarray(weight.T)
    if layout == "conv":
        return np.ascontiguousarray(weight.reshape(weight.shape[0], weight.shape[1]))
    return np.ascontiguousarray(weight)


def _weight_scale(plan: SparseLayerPlan, tensors: Mapping[str, Any], m: int) -> np.ndarray:
    if plan.weight_scale is None:
        return np.ones(m, dtype=np.float32)
    scale = np.asarray(tensors[plan.weight_scale].values, dtype=np.float32).reshape(-1)
    return np.broadcast_to(scale, (m,)).astype(np.float32) if scale.size == 1 else scale


def _weight_zero_point(plan: SparseLayerPlan, tensors: Mapping[str, Any], m: int) -> np.ndarray:
    if plan.weight_zero_point is None:
        return np.zeros(m, dtype=np.float32)
    zp = np.asarray(tensors[plan.weight_zero_point].values, dtype=np.float32).reshape(-1)
    return np.broadcast_to(zp, (m,)).astype(np.float32) if zp.size == 1 else zp


# ----------------------------------------------------------------------------- runtime
class SparseRuntime:
    """What the layers share: the library, the kernel family, the device and the tuner."""

    def __init__(self, library: Any, arch: int, device: Any, tuner: KernelTuner,
                 device_name: str | None = None) -> None:
        self.library = library
        self.arch = arch
        self.format = "sm90" if arch == 90 else "sm80"
        self.device = device
        self.tuner = tuner
        if device_name is None:
            import torch

            device_name = torch.cuda.get_device_name(device)
        self.device_name = device_name
        self.library_key = str(library.build_info.get("path", ""))
        self._configs: dict[tuple[str, str], list[str]] = {}

    def _args(self, layer: SparseKernelLayer, rows: Any, out: Any, residual: Any,
              with_epilogue: bool) -> Any:
        from optcc.kernels import ACTIVATIONS, DTYPE_CODES

        plan = layer.plan
        args = self.library.new_args()
        args.m, args.n, args.k = plan.m, rows.shape[0], plan.k
        args.ab_dtype = DTYPE_CODES[plan.precision]
        args.d_dtype = DTYPE_CODES[_dtype_name(out)]
        args.arch = self.arch
        args.a_values, args.a_meta = layer.values.data_ptr(), layer.meta.data_ptr()
        args.b, args.d = rows.data_ptr(), out.data_ptr()
        if layer.alpha is not None:
            args.alpha = layer.alpha.data_ptr()
        if layer.bias is not None:
            args.bias = layer.bias.data_ptr()
        if with_epilogue:
            if residual is not None:
                args.residual = residual.data_ptr()
                args.residual_after_activation = int(plan.residual_after_activation)
            args.activation = ACTIVATIONS[plan.activation]
            if plan.clip is not None:
                args.clip_min, args.clip_max = plan.clip
            if plan.output_scale is not None:
                args.out_scale = 1.0 / plan.output_scale
        return args

    def launch(self, layer: SparseKernelLayer, rows: Any, out: Any, residual: Any,
               *, with_epilogue: bool) -> None:
        import torch

        args = self._args(layer, rows, out, residual, with_epilogue)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        ab, d = layer.plan.precision, _dtype_name(out)
        names = self._configs.get((ab, d))
        if names is None:
            names = self._configs[(ab, d)] = self.library.configs(self.arch, ab, d)

        def accepts(index: int) -> bool:
            args.config = index
            return self.library.check(args) is None

        def run(index: int) -> None:
            args.config = index
            self.library.gemm(args, stream)

        key = TuneKey(self.device_name, self.library_key, self.arch, ab, d, args.m, args.n, args.k)
        try:
            config = self.tuner.choose(key, names, accepts, run, self._time)
        except ValueError as exc:
            args.config = -1
            raise BackendError(f"cuda: layer {layer.plan.node}: {self.library.check(args) or exc}"
                               ) from exc
        args.config = config
        self.library.gemm(args, stream)

    @staticmethod
    def _time(launch: Callable[[], None]) -> float:
        # one warm-up call: the first launch of a kernel pays its module loading
        return statistics.median(cuda_event_times(launch, warmup=1, runs=5))


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).replace("torch.", "")


def install_sparse_layers(module: Any, model: Model, plan: DispatchPlan, runtime: Any
                          ) -> list[SparseKernelLayer]:
    """Pack every planned layer and make ``module`` (a GraphModule of ``model``) run it:
    the chain's last node computes the whole chain through the kernel, the others are
    skipped. ``runtime`` launches the kernels (:class:`SparseRuntime` on a GPU)."""
    layers, overrides = [], {}
    for layer_plan in plan.layers:
        layer = SparseKernelLayer(layer_plan, model, runtime)
        layers.append(layer)
        overrides.update({name: None for name in layer_plan.nodes[:-1]})
        overrides[layer_plan.nodes[-1]] = layer
    module.set_node_overrides(overrides)
    return layers


# ----------------------------------------------------------------------------- runner
class CudaRunner:
    """Run a model on the GPU: the torch view, with the planned layers on the kernels."""

    def __init__(self, model: Model, options: CudaOptions | None = None,
                 plan: DispatchPlan | None = None) -> None:
        import torch

        from optcc.torchview import GraphModule

        self.options = options or CudaOptions()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model
        self.module = GraphModule(model).to(self.device).eval()
        self.plan = plan or (plan_model(model, precision=self.options.precision,
                                        int8=self.options.int8)
                             if self.options.sparse_kernels else DispatchPlan([], [], self.options.precision))
        self.layers: list[SparseKernelLayer] = []
        if self.plan.layers:
            from optcc.kernels import load

            library = load()
            arch = _device_arch(torch, self.options.arch)
            tuner = KernelTuner(TuningCache(self.options.tuning_cache), enabled=self.options.tune)
            runtime = SparseRuntime(library, arch, self.device, tuner)
            self.layers = install_sparse_layers(self.module, model, self.plan, runtime)
        self.autocast_dtype = getattr(torch, self.options.precision)

    def _inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import torch

        tensors = {}
        for name, value in feeds.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
            if tensor.ndim == 4 and tensor.is_floating_point() and self.options.channels_last:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            tensors[name] = tensor
        return tensors

    def forward(self, inputs: Mapping[str, Any]) -> list[Any]:
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=self.autocast_dtype):
            return self.module(**inputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for numpy ``feeds``, as float32 (or their integer type) numpy arrays."""
        import torch

        outputs = self.forward(self._inputs(feeds))
        torch.cuda.synchronize(self.device)
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
                for o in outputs]

    def latency(self, feeds: Mapping[str, np.ndarray], *, warmup: int, runs: int) -> list[float]:
        """Per-run times in ms (CUDA events around each forward, after ``warmup`` runs)."""
        inputs = self._inputs(feeds)
        # at least one warm-up run: tile tuning and kernel loading happen there
        return cuda_event_times(lambda: self.forward(inputs), warmup=max(1, warmup), runs=runs)


class CudaPredictor(Predictor):
    """``optcc.load(folder).predict(...)`` for cuda builds: batches through :class:`CudaRunner`."""

    backend = "cuda"

    def __init__(self, path: Path, options: CudaOptions, *, batch_size: int | None = None) -> None:
        specs, outputs = onnx_io_specs(path)
        super().__init__(input_specs=specs, output_names=outputs, batch_size=batch_size,
                         source=str(path))
        self.runner = CudaRunner(Model.load(path), options)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feeds)


# ----------------------------------------------------------------------------- backend
class CudaBackend(Backend):
    """The model on the local NVIDIA GPU via torch, 2:4 layers on optcc's sparse kernels."""

    name = "cuda"
    summary = "torch on the local NVIDIA GPU, 2:4 sparse layers on optcc's CUTLASS kernels."
    Options = CudaOptions
    install_hint = (
        "a CUDA build of torch and an Ampere/Hopper GPU; for the sparse kernels the CUDA "
        "toolkit (nvcc 12.4+) and `pip install 'optcc[kernels]'`")

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        ok, reason = _gpu_present()
        if not ok:
            return False, reason
        try:
            import torch
        except ImportError:
            return False, "torch is not installed"
        if not torch.cuda.is_available():
            return False, "torch has no CUDA support here (CPU build or no driver)"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"the GPU is sm_{major}{minor}; the sparse kernels need sm_80 or newer"
        return True, ""

    def _compile_impl(self, model: Model, out_dir: Path) -> Artifact:
        opts: Any = self.options
        path = model.save(out_dir / "model.onnx")
        plan = (plan_model(model, precision=opts.precision, int8=opts.int8)
                if opts.sparse_kernels else DispatchPlan([], [], opts.precision))
        info: dict[str, Any] = {"plan": plan.summary(), "sparse_layers": len(plan.layers)}
        if plan.layers:
            from optcc.kernels import load

            library = load(progress=logger.info)
            info["kernels"] = {k: library.build_info[k] for k in ("cutlass", "nvcc", "targets", "path")}
        plan_file = out_dir / "cuda_plan.json"
        plan_file.write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
        files = [path, plan_file]
        data_file = path.with_name(path.name + ".data")
        if data_file.exists():
            files.append(data_file)
        return Artifact(backend=self.name, path=path, files=files, info=info)

    def runner(self, artifact: Artifact) -> CudaRunner:
        return CudaRunner(Model.load(artifact.path), self.options)  # type: ignore[arg-type]

    def check_artifact(self, artifact: Artifact, model: Model, feeds: dict[str, np.ndarray]
                       ) -> dict[str, Any] | None:
        """The model on the GPU (sparse kernels included) against ONNX Runtime on the
        verification batch, output by output."""
        from optcc.backends.compare import compare_outputs
        from optcc.runtime import OrtRunner

        opts: Any = self.options
        runner = self.runner(artifact)
        reference = OrtRunner(model)
        expected = dict(zip(reference.output_names, reference.run(feeds), strict=True))
        got = dict(zip(reference.output_names, runner.run(feeds), strict=True))
        result = compare_outputs(expected, got, atol=opts.compare_atol, rtol=opts.compare_rtol)
        result["against"] = "onnxruntime (CPU) on the verification batch"
        if not result["passed"]:
            logger.warning("cuda: outputs %s differ from ONNX Runtime beyond atol=%g rtol=%g",
                           result["failed"], opts.compare_atol, opts.compare_rtol)
        return result

    @classmethod
    def load_predictor(cls, output_dir: Path, report: dict[str, Any], *,
                       batch_size: int | None = None, **options: Any) -> Any:
        """``model.onnx`` on the GPU with the build's cuda options (overridable)."""
        from optcc.errors import OptccError

        path = output_dir / "model.onnx"
        if not path.is_file():
            raise OptccError(f"{output_dir}: model.onnx is missing; the folder is incomplete")
        target = dict(report.get("target", {}).get("options", {}))
        target.update(options)
        backend = cls(CudaOptions.model_validate(
            {k: v for k, v in target.items() if k in CudaOptions.model_fields}))
        backend.ensure_available()
        return CudaPredictor(path, backend.options,  # type: ignore[arg-type]
                             batch_size=batch_size or target.get("batch_size"))

    def _measure_latency_impl(self, artifact: Artifact, feeds: dict[str, np.ndarray]
                              ) -> LatencyResult:
        import torch

        opts: Any = self.options
        runner = self.runner(artifact)
        times = runner.latency(feeds, warmup=opts.warmup, runs=opts.runs)
        batch = int(next(iter(feeds.values())).shape[0])
        return LatencyResult(
            median_ms=statistics.median(times), p90_ms=float(np.percentile(times, 90)),
            mean_ms=statistics.fmean(times), min_ms=min(times), runs=opts.runs,
            warmup=opts.warmup, threads=None, batch_size=batch,
            device=torch.cuda.get_device_name(),
        )


@hookimpl
def optcc_backends() -> list[type[Backend]]:
    return [CudaBackend]
