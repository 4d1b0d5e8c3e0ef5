"""Batch checks: a pass must not make a sample's output depend on its batch.

The numeric check compares each pass's model with the previous one on the verification
batch (B samples) only. A defect that depends on the batch size slips through it: a
Reshape whose target hard-codes the batch (``[-1, 4, 64, 32]`` left behind after pruning
attention heads 4 → 2) runs at B = 8, silently pairing each sample with a neighbour, and
fails only at batch sizes where the arithmetic does not work out. So every model is also
run on *probe batches* built from the verification batch:

- **batch 1**: the first sample alone;
- **an odd batch**: 3 samples (5 when B is 3), taken from the verification batch starting at
  its second sample and wrapping around, so every sample has new batch-mates;
- for a model with a **static batch** dimension (a batch of N is legitimate and other sizes
  cannot run), the verification batch with **new batch-mates** instead: the first sample
  twice, then the others shifted by one place (``[0, 0, 1, …, N-2]``), so the first sample
  shares the batch with a copy of itself and every other sample moves.

For every output whose first axis follows the batch, a sample's output in a probe batch must
equal its output in the verification batch. The difference is measured per sample and per
output as ``rms(probe − reference) / spread(reference)``, where *spread* is the standard
deviation of the reference output over the whole verification batch (its largest magnitude
when it is constant): a sample that sees its batch-mates moves by about one spread, float
rounding between batch sizes by less than 1e-6. The limit is :data:`COUPLING_LIMIT`.

Only what the model before a pass could do is required of the model after it: the checks
start from the model as loaded. A probe that the loaded model cannot run (a static batch, an
export that fixed the batch) is skipped for the whole pipeline, and when the loaded model's
samples already influence each other (batch statistics, dynamic quantization), only the
runs and the output shapes are checked. A pass whose output couples samples by design
(dynamic quantization computes one scale per batch) declares it with
:meth:`optcc.passes.Pass.couples_samples`; its coupling is measured and reported, and later
passes are no longer held to independence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optcc.errors import ModelError

logger = logging.getLogger(__name__)

COUPLING_LIMIT = 1e-3
"""Largest per-sample output change (relative to the output's spread) between batchings."""


@dataclass
class Probe:
    """A batch built from rows of the verification batch."""

    label: str
    rows: list[int]
    independence: bool = True  # whether sample independence is still required
    tracked: list[bool] = field(default_factory=list)  # per output: first axis is the batch

    def feeds(self, feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        index = np.asarray(self.rows)
        return {k: v[index] if v.ndim and v.shape[0] == size else v for k, v in feeds.items()}


def make_probes(size: int, static_batch: bool) -> list[Probe]:
    """The probe batches for a verification batch of ``size`` samples (see module docstring)."""
    if static_batch:
        if size < 2:
            return []
        return [Probe(f"a batch of {size} with new batch-mates (static batch)",
                      [0, *range(size - 1)])]
    odd = 5 if size == 3 else 3
    probes = [Probe("batch size 1", [0])] if size != 1 else []
    probes.append(Probe(f"batch size {odd}", [(1 + i) % size for i in range(odd)]))
    return probes


def _spread(ref: np.ndarray) -> float:
    values = ref.astype(np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    spread = float(finite.std())
    return spread if spread > 0 else (float(np.abs(finite).max()) or 1.0)


def sample_coupling(probe_out: np.ndarray, ref_out: np.ndarray, rows: list[int]) -> tuple[float, int]:
    """The largest per-sample change of one output between a probe and the reference,
    relative to the reference's spread; and the probe row where it happened."""
    a = probe_out.astype(np.float64)
    b = ref_out[np.asarray(rows)].astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, a - b)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    per_sample = np.sqrt(np.mean(diff.reshape(len(rows), -1) ** 2, axis=1)) if diff.size else np.zeros(len(rows))
    worst = int(np.argmax(per_sample)) if per_sample.size else 0
    value = float(per_sample[worst]) if per_sample.size else 0.0
    return value / _spread(ref_out), worst


def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


class BatchChecker:
    """Runs the probe batches on each model and compares them with the verification batch.

    Build it with :meth:`baseline` on the model as loaded; then :meth:`check` each pass's
    model (given an ONNX Runtime runner over it and its outputs on the verification batch).
    """

    def __init__(self, feeds: dict[str, np.ndarray], output_names: list[str], probes: list[Probe]) -> None:
        self.feeds = feeds
        self.size = int(next(iter(feeds.values())).shape[0]) if feeds else 0
        self.output_names = output_names
        self.probes = probes
        self.skipped: dict[str, str] = {}  # probe label -> why it is not checked
        self.coupled_since: str | None = None  # who made samples depend on each other

    @classmethod
    def baseline(cls, runner: Any, feeds: dict[str, np.ndarray], reference: list[np.ndarray],
                 *, static_batch: bool) -> BatchChecker:
        """Decide what can be checked from the model as loaded (``runner`` over it)."""
        size = int(next(iter(feeds.values())).shape[0]) if feeds else 0
        checker = cls(feeds, list(runner.output_names), make_probes(size, static_batch) if size else [])
        kept = []
        for probe in checker.probes:
            try:
                outputs = runner.run(probe.feeds(feeds, size))
            except ModelError as exc:
                checker.skipped[probe.label] = f"the model as loaded does not run at {probe.label}: {exc}"
                logger.warning("batch checks: %s", checker.skipped[probe.label])
                continue
            probe.tracked = [
                out.ndim > 0 and ref.ndim > 0 and out.shape[0] == len(probe.rows)
                and ref.shape[0] == size and out.shape[1:] == ref.shape[1:]
                for out, ref in zip(outputs, reference, strict=True)
            ]
            couplings = [sample_coupling(out, ref, probe.rows)[0]
                         for out, ref, t in zip(outputs, reference, probe.tracked, strict=True) if t]
            if couplings and max(couplings) > COUPLING_LIMIT:
                probe.independence = False
                logger.warning("batch checks: in the model as loaded, samples influence each other "
                               "(up to %.3g at %s); only runs and shapes are checked", max(couplings),
                               probe.label)
            kept.append(probe)
        checker.probes = kept
        return checker

    def summary(self) -> dict[str, Any]:
        """What the checks cover, for the report."""
        return {
            "probes": [p.label for p in self.probes],
            "independence": self.coupled_since is None and all(p.independence for p in self.probes),
            "skipped": dict(self.skipped),
            **({"coupled_since": self.coupled_since} if self.coupled_since else {}),
        }

    def check(self, runner: Any, reference: list[np.ndarray], *, pass_name: str,
              couples_samples: bool = False) -> tuple[dict[str, Any], str | None]:
        """Run the probes on a pass's model. Returns the record (the worst coupling per
        probe) and a message when the model broke what the previous one could do."""
        record: dict[str, Any] = {}
        for probe in self.probes:
            try:
                outputs = runner.run(probe.feeds(self.feeds, self.size))
            except ModelError as exc:
                return record, (f"the model no longer runs at {probe.label} (the model as loaded "
                                f"did; the verification batch has {self.size}): {exc}")
            worst, where = 0.0, ""
            for name, out, ref, tracked in zip(self.output_names, outputs, reference, probe.tracked,
                                               strict=True):
                if not tracked:
                    continue
                if out.ndim == 0 or out.shape[0] != len(probe.rows) or out.shape[1:] != ref.shape[1:]:
                    return record, (f"output '{name}' has shape {_shape(out)} at {probe.label}, but "
                                    f"{_shape(ref)} at the verification batch of {self.size}: its "
                                    "first axis no longer follows the batch")
                value, row = sample_coupling(out, ref, probe.rows)
                if value > worst:
                    worst, where = value, f"output '{name}', sample {probe.rows[row]}"
            record[probe.label] = worst
            independence = probe.independence and self.coupled_since is None
            if independence and worst > COUPLING_LIMIT and not couples_samples:
                return record, (f"samples influence each other: at {probe.label}, {where} differs "
                                f"from its value in the verification batch of {self.size} by "
                                f"{worst:.3g} of the output's spread (limit {COUPLING_LIMIT:g}); a "
                                "Reshape or broadcast that hard-codes the batch size?")
        if couples_samples and self.coupled_since is None and any(v > COUPLING_LIMIT for v in record.values()):
            self.coupled_since = pass_name
            logger.warning(
                "pass '%s' makes a sample's output depend on its batch-mates (by up to %.3g of the "
                "output's spread); later passes are not checked for sample independence",
                pass_name, max(record.values()))
        return record, None
