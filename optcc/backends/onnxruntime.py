"""The ONNX Runtime backend: the default, runs on any machine's CPU.

``compile`` writes the portable model (standard ONNX ops only) and, with
``save_optimized: true``, also ONNX Runtime's offline-optimized graph for this CPU.
Latency is measured on the CPU execution provider with a fixed thread count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcc.backends.base import Artifact, Backend, BackendOptions, LatencyResult, time_calls
from optcc.hookspecs import hookimpl
from optcc.ir.model import Model


class OnnxRuntimeOptions(BackendOptions):
    optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level for sessions."
    )
    save_optimized: bool = Field(
        False, description="Also write ONNX Runtime's optimized graph (CPU-specific)."
    )


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU."""

    name = "onnxruntime"
    summary = "ONNX Runtime, CPU execution provider (default; any machine)."
    Options = OnnxRuntimeOptions
    install_hint = "pip install onnxruntime"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime is not importable ({exc})"
        return True, ""

    def _compile_impl(self, model: Model, out_dir: Path) -> Artifact:
        import onnxruntime as ort

        from optcc.runtime import OrtRunner, session_options

        opts: Any = self.options
        path = model.save(out_dir / "model.onnx")
        files = [path]
        data_file = path.with_name(path.name + ".data")
        if data_file.exists():
            files.append(data_file)
        # Loading proves the artifact runs on this runtime.
        OrtRunner(str(path), optimization=opts.optimization)
        if opts.save_optimized:
            optimized = out_dir / "model.ort-optimized.onnx"
            so = session_options(optimization=opts.optimization)
            so.optimized_model_filepath = str(optimized)
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            files.append(optimized)
        return Artifact(
            backend=self.name,
            path=path,
            files=files,
            info={"onnxruntime": ort.__version__, "bytes": os.path.getsize(path)},
        )

    def _measure_latency_impl(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> LatencyResult:
        from optcc.runtime import OrtRunner

        opts: Any = self.options
        runner = OrtRunner(str(artifact.path), threads=opts.threads, optimization=opts.optimization)
        median, p90, mean, fastest = time_calls(
            lambda: runner.run(feeds), warmup=opts.warmup, runs=opts.runs
        )
        batch = int(next(iter(feeds.values())).shape[0])
        return LatencyResult(
            median_ms=median, p90_ms=p90, mean_ms=mean, min_ms=fastest, runs=opts.runs,
            warmup=opts.warmup, threads=opts.threads, batch_size=batch, device="cpu",
        )


    @classmethod
    def load_predictor(
        cls, output_dir: Path, report: dict[str, Any], *, batch_size: int | None = None,
        threads: int | None = None, **options: Any,
    ) -> Any:
        """``model.onnx`` of any optcc output (the portable model, whatever the target)."""
        from optcc.errors import OptccError
        from optcc.predict import OrtPredictor

        if options:
            raise OptccError(f"onnxruntime predictor: unknown option(s) {sorted(options)}")
        path = output_dir / "model.onnx"
        if not path.is_file():
            raise OptccError(f"{output_dir}: model.onnx is missing; the folder is incomplete")
        target = report.get("target", {}).get("options", {})
        return OrtPredictor(path, threads=threads or target.get("threads"),
                            batch_size=batch_size or target.get("batch_size"))


@hookimpl
def optcc_backends() -> list[type[Backend]]:
    return [OnnxRuntimeBackend]
