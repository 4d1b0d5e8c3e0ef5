"""Output comparison between two runtimes, output by output (Polygraphy's way).

An output matches when every element satisfies ``|candidate - reference| <= atol + rtol *
|reference|``, the elementwise check Polygraphy's comparator applies by default. Each output
is judged on its own, and the result names the one that failed, with its largest absolute
and relative errors, so one big output cannot hide a broken small one. A non-finite value
counts as a mismatch unless the reference holds the same value at the same position (NaN
where the reference has NaN, the same infinity where it has that infinity).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def compare_output(
    name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float, rtol: float
) -> dict[str, Any]:
    """One output's comparison: shape match, error statistics, and pass/fail."""
    result: dict[str, Any] = {
        "name": name, "shape": list(reference.shape), "candidate_shape": list(candidate.shape),
    }
    if reference.shape != candidate.shape:
        return {**result, "passed": False, "reason": "shapes differ"}
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    both_nan = np.isnan(ref) & np.isnan(got)
    same_inf = np.isinf(ref) & (ref == got)
    agree_nonfinite = both_nan | same_inf
    finite = np.isfinite(ref) & np.isfinite(got)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.where(finite, np.abs(got - ref), np.inf)
    error = np.where(agree_nonfinite, 0.0, error)
    allowed = atol + rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))
    bad = error > allowed
    magnitude = np.abs(np.where(finite, ref, 0.0))
    rel = np.where(magnitude > 0, error / np.maximum(magnitude, 1e-300), np.where(error > 0, np.inf, 0.0))
    return {
        **result,
        "passed": not bool(bad.any()),
        "mismatched": int(bad.sum()),
        "elements": int(bad.size),
        "max_abs_error": float(error.max()) if error.size else 0.0,
        "mean_abs_error": float(error[np.isfinite(error)].mean()) if np.isfinite(error).any() else 0.0,
        "max_rel_error": float(rel.max()) if rel.size else 0.0,
        "nonfinite_mismatches": int((~finite & ~agree_nonfinite).sum()),
    }


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Compare every output of ``reference`` with ``candidate``; a missing output fails."""
    outputs = []
    for name, ref in reference.items():
        if name not in candidate:
            outputs.append({"name": name, "passed": False, "reason": "missing from the candidate"})
            continue
        outputs.append(compare_output(name, np.asarray(ref), np.asarray(candidate[name]),
                                      atol=atol, rtol=rtol))
    failed = [o["name"] for o in outputs if not o["passed"]]
    return {"atol": atol, "rtol": rtol, "passed": not failed, "failed": failed, "outputs": outputs}
