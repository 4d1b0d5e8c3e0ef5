"""The backend contract: compile a model for a target, run it, measure its latency.

A backend is a class with a unique ``name`` (a recipe's ``target``), an ``Options`` model,
``is_available() -> (bool, reason)`` and ``install_hint``, ``compile(model, out_dir) ->
Artifact``, and ``measure_latency(artifact, feeds, ...)``. Heavy libraries are imported
inside methods, never at module import: a backend whose libraries are missing is still
listed, with its reason and an install hint.

Optional parts, with defaults here: ``check_model`` (fail before any pass on a model the
backend cannot lower), ``can_measure`` (a backend may lower on a machine that cannot run
the result, as TensorRT does without a GPU: the build then skips latency),
``check_artifact`` (compare the artifact's outputs with ONNX Runtime's) and
``load_predictor`` (what ``optcc.load`` returns for a folder this backend built).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optcc.errors import BackendUnavailable
from optcc.ir.model import Model


class BackendOptions(BaseModel):
    """Options every backend accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    threads: int | None = Field(
        None, ge=1, le=1024,
        description="Intra-op threads for latency runs (None: the runtime's default).",
    )
    warmup: int = Field(5, ge=0, le=10_000, description="Untimed runs before measuring latency.")
    runs: int = Field(
        30, ge=1, le=100_000, description="Timed runs; the report gives median and p90."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Batch size for latency (default: the data's batch size)."
    )


@dataclass
class Artifact:
    """What a backend produced: the deployable file(s) and facts about them."""

    backend: str
    path: Path
    files: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LatencyResult:
    """Latency over ``runs`` timed runs after ``warmup`` untimed ones, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    threads: int | None
    batch_size: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_calls(
    fn: Callable[[], Any], *, warmup: int, runs: int
) -> tuple[float, float, float, float]:
    """Median, p90, mean and min wall time of ``fn`` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return (
        statistics.median(times),
        float(np.percentile(times, 90)),
        statistics.fmean(times),
        min(times),
    )


class Backend:
    """Base class of a backend."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    install_hint: ClassVar[str | None] = None

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options or self.Options()

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """Whether this machine can use the backend, and if not, why."""
        return True, ""

    def ensure_available(self) -> None:
        ok, reason = self.is_available()
        if not ok:
            raise BackendUnavailable(self.name, reason, install_hint=self.install_hint)

    def compile(self, model: Model, out_dir: Path) -> Artifact:
        """Validate, then lower ``model`` into ``out_dir``."""
        self.ensure_available()
        out_dir.mkdir(parents=True, exist_ok=True)
        return self._compile_impl(model, out_dir)

    def _compile_impl(self, model: Model, out_dir: Path) -> Artifact:
        raise NotImplementedError

    def measure_latency(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> LatencyResult:
        """Time inference of ``feeds`` on the compiled artifact."""
        self.ensure_available()
        return self._measure_latency_impl(artifact, feeds)

    def _measure_latency_impl(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> LatencyResult:
        raise NotImplementedError

    def can_measure(self) -> tuple[bool, str]:
        """Whether this machine can run, and so time, what :meth:`compile` produces."""
        return self.is_available()

    def check_model(self, model: Model, feeds: dict[str, np.ndarray]) -> None:
        """Raise a :class:`BackendError` now, before any pass runs, when ``model`` (the
        input model; ``feeds`` its verification batch) cannot be lowered as configured."""

    def check_artifact(
        self, artifact: Artifact, model: Model, feeds: dict[str, np.ndarray]
    ) -> dict[str, Any] | None:
        """Compare the artifact's outputs with ONNX Runtime's on ``feeds``; None when the
        artifact is the ONNX model itself or cannot run here. Goes into report.json."""
        return None

    @classmethod
    def load_predictor(
        cls, output_dir: Path, report: dict[str, Any], *, batch_size: int | None = None,
        **options: Any,
    ) -> Any:
        """A :class:`optcc.predict.Predictor` for the artifact in ``output_dir`` (built by
        this backend, or by another one when the user asked for this backend)."""
        from optcc.errors import BackendError

        raise BackendError(f"backend '{cls.name}' cannot load artifacts for prediction")
