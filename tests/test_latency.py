"""Round-robin latency: interleaved rounds, the spread between them, and the warning when a
speed-up cannot be trusted."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_MODEL

from optcc.backends.base import (
    Artifact,
    Backend,
    BackendOptions,
    LatencyResult,
    interleaved_timing,
    speedup_between,
)
from optcc.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions


def test_rounds_interleave_and_rotate_the_order() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = interleaved_timing(calls, warmup=1, runs=6, rounds=3)
    assert order[:3] == ["a", "b", "c"]  # warm-up, once each
    timed = order[3:]
    # 3 rounds of 2 runs per model; each round starts with a different model.
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a",
                     "c", "c", "a", "a", "b", "b"]
    assert all(len(rounds) == 3 and all(len(r) == 2 for r in rounds) for rounds in times.values())


def _result(rounds: list[float]) -> LatencyResult:
    median = float(np.median(rounds))
    return LatencyResult(median_ms=median, p90_ms=max(rounds), mean_ms=median, min_ms=min(rounds),
                         runs=len(rounds), warmup=0, threads=1, batch_size=1, device="cpu",
                         rounds=len(rounds), round_medians_ms=rounds)


def test_speedup_range_and_warning() -> None:
    steady = speedup_between(_result([10.0, 10.2, 9.9]), _result([2.0, 2.05, 1.98]))
    assert steady.ratio == pytest.approx(5.0, rel=0.02)
    assert steady.low <= steady.ratio <= steady.high and steady.trustworthy
    assert steady.warning() is None
    # A burst of load during one round of the final model: 2.5x in that round, 5x in others.
    busy = speedup_between(_result([10.0, 10.0, 10.0]), _result([2.0, 4.0, 2.0]))
    assert busy.low == pytest.approx(2.5) and busy.high == pytest.approx(5.0)
    assert not busy.trustworthy
    warning = busy.warning()
    assert warning and "×2.50 to ×5.00" in warning and "3 rounds" in warning


def test_onnxruntime_compare_latency_times_models_in_rounds() -> None:
    backend = OnnxRuntimeBackend(OnnxRuntimeOptions(threads=1, warmup=1, runs=8, rounds=4))
    feeds = {"image": np.zeros((2, 1, 8, 8), np.float32)}
    artifact = Artifact(backend="onnxruntime", path=Path(DEMO_MODEL))
    results = backend.compare_latency({"original": artifact, "final": artifact}, feeds)
    for result in results.values():
        assert result.rounds == 4 and len(result.round_medians_ms) == 4 and result.runs == 8
        assert min(result.round_medians_ms) <= result.median_ms <= max(result.round_medians_ms)
        assert result.spread >= 0 and result.batch_size == 2 and result.threads == 1
    speedup = speedup_between(results["original"], results["final"])
    assert speedup.rounds == 4 and speedup.low <= speedup.high


class _SleepBackend(Backend):
    """A backend that implements only _measure_latency_impl (the older contract)."""

    name = "sleep"
    calls: list[tuple[str, int, int]]

    def _measure_latency_impl(self, artifact: Artifact, feeds: dict) -> LatencyResult:
        self.calls.append((artifact.path.name, self.options.runs, self.options.warmup))
        start = time.perf_counter()
        time.sleep(0.001)
        ms = (time.perf_counter() - start) * 1e3
        return LatencyResult(median_ms=ms, p90_ms=ms, mean_ms=ms, min_ms=ms, runs=self.options.runs,
                             warmup=self.options.warmup, threads=None, batch_size=1, device="test")


def test_backend_without_a_runner_is_still_timed_in_rounds() -> None:
    backend = _SleepBackend(BackendOptions(runs=6, rounds=3, warmup=2))
    backend.calls = []
    results = backend.compare_latency(
        {"a": Artifact("sleep", Path("a")), "b": Artifact("sleep", Path("b"))}, {}
    )
    assert backend.calls == [("a", 2, 2), ("b", 2, 2), ("b", 2, 0), ("a", 2, 0), ("a", 2, 0), ("b", 2, 0)]
    assert results["a"].rounds == 3 and results["a"].runs == 6 and results["a"].device == "test"
    assert backend.options.runs == 6  # restored
