"""Is the INT8 model faster? Measured on ONNX Runtime, float and INT8 side by side.

A quantized model is only worth shipping where it runs faster: ONNX Runtime's dynamic
``ConvInteger`` is several times slower than a float convolution on x86, and an INT8 graph
that breaks the runtime's float fusions can lose more than the integer GEMMs win. So the
pass times both models here, on the inputs the user serves (the calibration batch's shapes,
cut to batch 1), and, for sequence models, at several sequence lengths.

Timing on a busy machine is noisy. Both models are timed in alternation (round robin), each
round's median is taken and the best round counts; with one intra-op thread ONNX Runtime
runs on the calling thread, so thread CPU time is used, which other processes disturb far
less than wall time does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from optcc import Model, OrtRunner

logger = logging.getLogger(__name__)


@dataclass
class Timing:
    """Float and INT8 latency for one input shape."""

    label: str
    float_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.label, "float_ms": round(self.float_ms, 3),
                "int8_ms": round(self.int8_ms, 3), "speedup": round(self.speedup, 3)}


def sequence_axis(model: Model) -> str | None:
    """The symbolic name of a dynamic axis 1 shared by the model's integer inputs (token ids,
    masks): the sequence length. None for models without one."""
    names = set()
    for tensor in model.inputs:
        shape = tensor.shape or []
        if len(shape) >= 2 and np.dtype(tensor.dtype or np.float32).kind in "iu" and not (
            isinstance(shape[1], int) and shape[1] > 0
        ):
            names.add(str(shape[1]))
    return names.pop() if len(names) == 1 else None


def at_length(feeds: dict[str, np.ndarray], model: Model, length: int) -> dict[str, np.ndarray]:
    """``feeds`` with the sequence axis cut or tiled to ``length`` (inputs that have it)."""
    axis = sequence_axis(model)
    out = {}
    for tensor in model.inputs:
        x = feeds[tensor.name]
        shape = tensor.shape or []
        if axis is not None and len(shape) >= 2 and str(shape[1]) == axis:
            reps = -(-length // x.shape[1])
            x = np.concatenate([x] * reps, axis=1)[:, :length] if reps > 1 else x[:, :length]
            if "mask" in tensor.name.lower():
                x = np.ones_like(x)  # every position real: the served worst case
        out[tensor.name] = np.ascontiguousarray(x)
    return out


def _cpu_ms(runner: OrtRunner, feeds: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.thread_time()
        runner.run(feeds)
        times.append(time.thread_time() - start)
    return float(np.median(times)) * 1e3


def compare(
    float_model: Model, int8_model: Model, shapes: dict[str, dict[str, np.ndarray]], *,
    rounds: int = 3, budget_s: float = 0.1,
) -> list[Timing]:
    """Time both models on every feed set in ``shapes`` (label → feeds), round robin."""
    runners = [OrtRunner(float_model, threads=1), OrtRunner(int8_model, threads=1)]
    results = []
    for label, feeds in shapes.items():
        try:
            for r in runners:  # warm up, and size the run count to the time budget
                r.run(feeds)
        except Exception as exc:  # a length the model cannot take (position table, say)
            logger.info("not timed at %s: %s", label, exc)
            continue
        start = time.perf_counter()
        runners[0].run(feeds)
        one = max(time.perf_counter() - start, 1e-4)
        runs = int(min(50, max(2, budget_s / one)))
        best = [float("inf"), float("inf")]
        for _ in range(rounds if one < 0.05 else 2):
            for i, r in enumerate(runners):
                best[i] = min(best[i], _cpu_ms(r, feeds, runs))
        results.append(Timing(label, best[0], best[1]))
    return results


def shapes_to_time(
    model: Model, feeds: dict[str, np.ndarray], lengths: list[int]
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """Feed sets to time, and the labels of the served ones that decide.

    Served: batch 1 and the calibration batch, at the calibration data's shapes (its
    sequence length for sequence models). Sequence models are also timed at batch 1 for
    each of ``lengths``, for the report.
    """
    one = {k: v[:1] for k, v in feeds.items()}
    full = next(iter(feeds.values())).shape[0]
    axis = sequence_axis(model)
    served = ""
    if axis is not None:
        served = next((f" × {v.shape[1]} tokens" for t in model.inputs for k, v in one.items()
                       if k == t.name and t.shape and len(t.shape) >= 2
                       and str(t.shape[1]) == axis), "")
    sets = {f"batch 1{served}": one}
    if full > 1:
        sets[f"batch {full}{served}"] = feeds
    decisive = list(sets)
    if axis is not None:
        for length in lengths:
            label = f"batch 1 × {length} tokens"
            if label not in sets:
                sets[label] = at_length(one, model, length)
    return sets, decisive
