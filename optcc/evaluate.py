"""The recipe's metric: top-1 accuracy where the data has labels, else agreement with the
original model.

Agreement is the mean, over samples, of the cosine similarity between the *centred*
outputs (each output vector minus its mean) of the model and of the original: plain cosine
hides damage, because two different inputs already score near 1 on many nets.
For 2-D outputs the share of samples whose argmax matches is reported too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optcc.data.base import DataSource
from optcc.ir.model import Model
from optcc.passes.base import Progress
from optcc.runtime import OrtRunner


def centred_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of mean-centred rows of ``a`` and ``b``."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, (a * b).sum(axis=1) / denom, 1.0)
    return cos


class Evaluator:
    """Computes the metric of a model on the evaluation data (ONNX Runtime, CPU)."""

    def __init__(
        self, source: DataSource, reference: Model, *, progress: Progress | None = None
    ) -> None:
        self.source = source
        self.progress = progress or Progress()
        first = source.first_batch()
        self.has_labels = first.labels is not None
        self.metric = "accuracy" if self.has_labels else "agreement"
        self._reference: list[np.ndarray] | None = None
        if not self.has_labels:
            self._reference = [out for out in self._outputs(reference, "reference outputs")]

    def _outputs(self, model: Model, label: str) -> Any:
        runner = OrtRunner(model)
        for batch in self.progress.track(self.source.batches(), description=label):
            yield runner.run(batch.inputs)[0]

    def __call__(self, model: Model, label: str = "evaluating") -> dict[str, float]:
        if self.has_labels:
            correct = total = 0
            runner = OrtRunner(model)
            for batch in self.progress.track(self.source.batches(), description=label):
                logits = runner.run(batch.inputs)[0]
                pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
                assert batch.labels is not None
                correct += int((pred == batch.labels.reshape(-1)).sum())
                total += int(pred.shape[0])
            return {"accuracy": correct / total if total else float("nan"), "samples": total}
        assert self._reference is not None
        cos: list[np.ndarray] = []
        top1: list[np.ndarray] = []
        for out, ref in zip(self._outputs(model, label), self._reference, strict=True):
            cos.append(centred_cosine(out, ref))
            if out.ndim == 2:
                top1.append(out.argmax(axis=1) == ref.argmax(axis=1))
        result = {"agreement": float(np.concatenate(cos).mean())}
        if top1:
            result["top1_agreement"] = float(np.concatenate(top1).mean())
        result["samples"] = int(sum(len(c) for c in cos))
        return result
