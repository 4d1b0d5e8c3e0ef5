"""A sample third-party optcc plugin: magnitude sparsification plus an instrumentation hook."""

from __future__ import annotations

import numpy as np
from pydantic import Field

import optcc
from optcc import Pass, PassOptions, PassResult, Tolerance, hookimpl

# Every (pass name, position) the after-pass hook saw; the tests read it.
SEEN: list[tuple[str, int]] = []


class ZeroSmallWeightsOptions(PassOptions):
    threshold: float = Field(0.01, ge=0.0, description="Zero weights with |w| below this.")


class ZeroSmallWeightsPass(Pass):
    """Set every weight of a Conv/Gemm/MatMul whose magnitude is below a threshold to 0."""

    name = "zero-small-weights"
    summary = "Zero weights whose magnitude is below a threshold."
    Options = ZeroSmallWeightsOptions
    tolerance = Tolerance.lossy()

    def run(self, model: optcc.Model, ctx: optcc.PassContext) -> PassResult:
        zeroed = {}
        for node, weight, _precision in model.weighted_layers():
            values = np.asarray(weight.values)
            small = np.abs(values) < self.options.threshold
            if small.any():
                weight.values = np.where(small, 0, values).astype(values.dtype)
                zeroed[node.name] = int(small.sum())
        return PassResult(
            model, modified=bool(zeroed), stats={"zeroed": zeroed},
            reason=None if zeroed else "no weight below the threshold",
        )


@hookimpl
def optcc_passes():
    return [ZeroSmallWeightsPass]


@hookimpl
def optcc_after_pass(pass_, record, position):
    SEEN.append((pass_.name, position))
    record["sample_plugin"] = {"seen": True}
