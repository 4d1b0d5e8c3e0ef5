"""Backends lower a model to a deployable artifact and measure it."""

from optcc.backends.base import Artifact, Backend, BackendOptions, LatencyResult

__all__ = ["Artifact", "Backend", "BackendOptions", "LatencyResult"]
