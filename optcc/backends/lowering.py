"""Lowering rewrites: backend-specific graph changes made when a backend lowers a model.

The portable model that every pass produces keeps standard ONNX ops, so ONNX Runtime can
always run it. Some targets do better with a rewritten graph: TensorRT, for example, can
run a 2:4 sparse layer through a plugin from ``kernels/`` instead of its own tactics. Such
a change is a :class:`LoweringRewrite`, registered by a plugin through the
``optcc_lowering_rewrites`` hook and applied by the backend while it lowers, after every
pass has run and been verified. The backend saves the rewritten graph beside the portable
one (for TensorRT: ``model.tensorrt.onnx`` next to ``model.onnx``) and builds from it.

A rewrite receives a private copy of the model and a :class:`LoweringContext` (the target,
its options and the engine build description so far) and returns a
:class:`LoweringResult`. Like a pass, a rewrite that does not apply returns
``modified=False`` with a reason; it does not raise. A rewrite that inserts plugin nodes
returns the plugin libraries that implement them, and the backend adds those to the build
description, so ``build_engine.sh``, ``build_engine.py`` and the in-process builder all
load them. Plugin nodes follow TensorRT's ONNX parser convention: the node's op type is the
plugin's name, with ``plugin_version`` and ``plugin_namespace`` attributes, in a custom
domain (for example ``trt.plugins``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from optcc.backends.trt_build import EngineBuildDescription, PluginLibrary
from optcc.ir.model import Model


@dataclass
class LoweringContext:
    """What a rewrite may read: the target backend's name and options, and (for TensorRT)
    the engine build description so far (profiles, sparse tactics, plugin libraries)."""

    target: str
    options: Any
    description: EngineBuildDescription | None = None


@dataclass
class LoweringResult:
    """A rewrite's answer: the model, whether it changed, the plugin libraries its new
    nodes need, per-node statistics for the report, and why it did not apply."""

    model: Model
    modified: bool
    plugin_libraries: list[PluginLibrary] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


class LoweringRewrite:
    """Base class of a lowering rewrite. Subclasses set ``name`` (kebab-case, unique),
    ``summary``, ``targets`` (backend names it applies to) and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    targets: ClassVar[frozenset[str]] = frozenset({"tensorrt"})

    def apply(self, model: Model, ctx: LoweringContext) -> LoweringResult:
        """Rewrite ``model`` (a private copy) for ``ctx.target``."""
        raise NotImplementedError
