"""The backend contract: compile a model for a target, run it, measure its latency.

A backend is a class with a unique ``name`` (a recipe's ``target``), an ``Options`` model,
``is_available() -> (bool, reason)`` and ``install_hint``, ``compile(model, out_dir) ->
Artifact``, and latency measurement. Heavy libraries are imported inside methods, never at
module import: a backend whose libraries are missing is still listed, with its reason and
an install hint.

Latency is timed **round-robin**: :meth:`Backend.compare_latency` times several artifacts
(the original and the final model of a build, or the models of ``optcc bench``) in
interleaved rounds, so that a burst of load on a shared machine hits all of them alike, and
reports the spread between rounds. A speed-up whose per-round values disagree by more than
:data:`UNSTABLE_SPREAD` is flagged as untrustworthy (:func:`speedup_between`). A backend
gets this by implementing ``_open_runner`` (prepare once, return a function that runs one
inference); one that implements only ``_measure_latency_impl`` is still timed in rounds,
with a fresh measurement per round.

Optional parts, with defaults here: ``check_model`` (fail before any pass on a model the
backend cannot lower), ``can_measure`` (a backend may lower on a machine that cannot run
the result, as TensorRT does without a GPU: the build then skips latency),
``check_artifact`` (compare the artifact's outputs with ONNX Runtime's) and
``load_predictor`` (what ``optcc.load`` returns for a folder this backend built).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
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
    warmup: int = Field(
        5, ge=0, le=10_000, description="Untimed runs of each model before timing."
    )
    runs: int = Field(
        30, ge=1, le=100_000, description="Timed runs of each model, spread over the rounds; "
        "the report gives median and p90."
    )
    rounds: int = Field(
        5, ge=1, le=100, description="Models compared (original and final) are timed in "
        "this many interleaved rounds; the spread between rounds says how far to trust a "
        "speed-up."
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


# A speed-up whose per-round values differ by more than this share of it is flagged.
UNSTABLE_SPREAD = 0.25


@dataclass
class LatencyResult:
    """Latency over ``runs`` timed runs after ``warmup`` untimed ones, in milliseconds.

    ``round_medians_ms`` holds the median of each interleaved round and ``spread`` their
    range relative to the overall median (0.1: rounds differed by 10 %)."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    threads: int | None
    batch_size: int
    device: str
    rounds: int = 1
    round_medians_ms: list[float] = field(default_factory=list)
    spread: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Speedup:
    """``before`` ÷ ``after`` latency: the median of the per-round ratios (rounds pair the
    two models under the same load), the lowest and highest per-round ratio, and whether
    the rounds agree well enough to trust it."""

    ratio: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        return (self.high - self.low) / self.ratio if self.ratio else 0.0

    @property
    def trustworthy(self) -> bool:
        return self.spread <= UNSTABLE_SPREAD

    def warning(self) -> str | None:
        """A sentence for the output when the speed-up cannot be trusted, else None."""
        if self.trustworthy:
            return None
        return (f"latency varied too much between rounds to trust the speed-up: ×{self.ratio:.2f} "
                f"overall, ×{self.low:.2f} to ×{self.high:.2f} in single rounds "
                f"({self.rounds} rounds); the machine was probably busy: re-run on a quiet "
                "machine, or with more runs and rounds")

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "rounds": self.rounds,
                "spread": self.spread, "trustworthy": self.trustworthy}


def speedup_between(before: LatencyResult, after: LatencyResult) -> Speedup:
    """The speed-up from ``before`` to ``after``, with its per-round range (rounds are
    paired: round i of both was timed back to back)."""
    pairs = [b / a for b, a in zip(before.round_medians_ms, after.round_medians_ms, strict=False) if a]
    if not pairs:
        pairs = [before.median_ms / after.median_ms if after.median_ms else math.inf]
    return Speedup(ratio=statistics.median(pairs), low=min(pairs), high=max(pairs), rounds=len(pairs))


def _summarise(times: list[float], rounds: list[list[float]]) -> dict[str, Any]:
    medians = [statistics.median(r) for r in rounds if r]
    median = statistics.median(times)
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "rounds": len(medians),
        "round_medians_ms": medians,
        "spread": (max(medians) - min(medians)) / median if median else 0.0,
    }


def interleaved_timing(
    calls: Mapping[str, Callable[[], Any]], *, warmup: int, runs: int, rounds: int
) -> dict[str, list[list[float]]]:
    """Time each of ``calls`` in ``rounds`` interleaved rounds of about ``runs / rounds``
    runs each (ms), after ``warmup`` untimed runs each. The order of the calls rotates from
    round to round, so none is always first after another's cache-warming."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    per_round = max(1, math.ceil(runs / rounds))
    labels = list(calls)
    times: dict[str, list[list[float]]] = {label: [] for label in labels}
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            fn = calls[label]
            this_round = []
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                this_round.append((time.perf_counter() - start) * 1e3)
            times[label].append(this_round)
    return times


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
        """Time inference of ``feeds`` on the compiled artifact (in rounds, as
        :meth:`compare_latency` does for several)."""
        return self.compare_latency({"model": artifact}, feeds)["model"]

    def compare_latency(
        self,
        artifacts: Mapping[str, Artifact],
        feeds: dict[str, np.ndarray],
        *,
        own_feeds: Mapping[str, dict[str, np.ndarray]] | None = None,
    ) -> dict[str, LatencyResult]:
        """Time every artifact on the same ``feeds`` in interleaved rounds (see the module
        docstring); results by the labels of ``artifacts``. ``own_feeds`` gives some
        artifacts inputs of their own (models whose inputs differ)."""
        self.ensure_available()
        opts = self.options
        feeds_of = {label: (own_feeds or {}).get(label, feeds) for label in artifacts}
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        runners = {label: self._open_runner(artifact, feeds_of[label])
                   for label, artifact in artifacts.items()}
        if all(fn is not None for fn in runners.values()):
            timed = interleaved_timing(
                runners, warmup=opts.warmup, runs=opts.runs, rounds=opts.rounds  # type: ignore[arg-type]
            )
            return {
                label: LatencyResult(
                    **_summarise([t for r in rounds for t in r], rounds),
                    runs=sum(len(r) for r in rounds), warmup=opts.warmup, threads=opts.threads,
                    batch_size=batch, device=self.device_name(),
                )
                for label, rounds in timed.items()
            }
        return self._compare_by_repeated_measurement(artifacts, feeds_of)

    def _compare_by_repeated_measurement(
        self, artifacts: Mapping[str, Artifact], feeds_of: Mapping[str, dict[str, np.ndarray]]
    ) -> dict[str, LatencyResult]:
        """Rounds for a backend with only ``_measure_latency_impl``: each round measures
        every artifact once with ``runs / rounds`` runs; rounds alternate the order."""
        opts = self.options
        per_round = max(1, math.ceil(opts.runs / opts.rounds))
        found: dict[str, list[LatencyResult]] = {label: [] for label in artifacts}
        labels = list(artifacts)
        try:
            for r in range(opts.rounds):
                self.options = opts.model_copy(
                    update={"runs": per_round, "warmup": opts.warmup if r == 0 else 0}
                )
                for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                    found[label].append(self._measure_latency_impl(artifacts[label], feeds_of[label]))
        finally:
            self.options = opts
        out = {}
        for label, results in found.items():
            medians = [res.median_ms for res in results]
            median = statistics.median(medians)
            first = results[0]
            out[label] = LatencyResult(
                median_ms=median, p90_ms=max(res.p90_ms for res in results),
                mean_ms=statistics.fmean(res.mean_ms for res in results),
                min_ms=min(res.min_ms for res in results), runs=per_round * len(results),
                warmup=opts.warmup, threads=first.threads, batch_size=first.batch_size,
                device=first.device, rounds=len(results), round_medians_ms=medians,
                spread=(max(medians) - min(medians)) / median if median else 0.0,
            )
        return out

    def _open_runner(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> Callable[[], Any] | None:
        """Prepare inference of ``feeds`` on ``artifact`` and return a function that runs it
        once (what the timing loop calls), or None if the backend only implements
        ``_measure_latency_impl``."""
        return None

    def device_name(self) -> str:
        """The device latency is measured on, for the report."""
        return "cpu"

    def _measure_latency_impl(
        self, artifact: Artifact, feeds: dict[str, np.ndarray]
    ) -> LatencyResult:
        """Time ``options.runs`` runs after ``options.warmup`` untimed ones (for backends
        without ``_open_runner``)."""
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
