"""Passes and the pass manager."""

from optcc.passes.base import (
    Capability,
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Progress,
    Tolerance,
    ToleranceOverride,
)

__all__ = [
    "Capability",
    "Pass",
    "PassContext",
    "PassOptions",
    "PassResult",
    "Progress",
    "Tolerance",
    "ToleranceOverride",
]
