"""The pass contract: what a compression or cleanup pass is, takes and returns.

A pass is a class with

- ``name``: unique kebab-case identity, the key a recipe uses (``fold-batchnorm``);
- ``Options``: a pydantic model (subclass of :class:`PassOptions`, unknown keys forbidden)
  whose fields are the recipe options, with types, defaults, bounds and descriptions — the
  recipe schema, ``optcc passes`` and the JSON Schema are generated from it;
- ``requires``: capabilities the pass needs (calibration data, training data, CUDA, torch);
  a recipe that cannot provide them is rejected before any work starts;
- ``tolerance``: how far the model's outputs may move. Lossless passes declare a tight
  numeric bound that the pass manager enforces on the verification batch; lossy passes
  (pruning, INT8) declare ``Tolerance.lossy()`` and are judged by the accuracy metric;
- ``run(model, ctx) -> PassResult``: does the work on a private copy of the model.

A pass that does not apply returns ``PassResult(model, modified=False, reason=...)`` — "did
not apply" is a result, not an exception.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from optcc.ir.model import Model

if TYPE_CHECKING:
    from optcc.data import DataSource

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Capability(str, enum.Enum):
    """Something a pass needs from the build environment or the recipe."""

    CALIBRATION_DATA = "calibration-data"
    TRAINING_DATA = "training-data"
    EVALUATION_DATA = "evaluation-data"
    TORCH = "torch"
    CUDA = "cuda"


@dataclass(frozen=True)
class Tolerance:
    """How much a pass may change the model's outputs on the verification batch.

    A pass passes when, for every output, ``max|new - old| <= atol + rtol * max|old|``.
    ``enforced=False`` (lossy passes) records the difference without failing on it.
    """

    atol: float = 0.0
    rtol: float = 0.0
    enforced: bool = True

    @classmethod
    def exact(cls) -> Tolerance:
        """Bit-exact: for passes that only rename, reorder or delete unused parts."""
        return cls(0.0, 0.0, True)

    @classmethod
    def float_rounding(cls, rtol: float = 1e-4, atol: float = 1e-5) -> Tolerance:
        """Mathematically lossless, but floating-point results may differ by rounding."""
        return cls(atol, rtol, True)

    @classmethod
    def lossy(cls) -> Tolerance:
        """Outputs are expected to change; the accuracy metric judges the pass."""
        return cls(0.0, 0.0, False)

    def allows(self, max_abs_diff: float, ref_max_abs: float) -> bool:
        return max_abs_diff <= self.atol + self.rtol * ref_max_abs

    def describe(self) -> str:
        if not self.enforced:
            return "lossy (judged by accuracy)"
        if self.atol == 0.0 and self.rtol == 0.0:
            return "exact"
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


class ToleranceOverride(BaseModel):
    """A recipe's override of a pass's declared tolerance."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    atol: float = Field(0.0, ge=0.0, description="Absolute bound on the largest output change.")
    rtol: float = Field(
        0.0, ge=0.0, description="Bound relative to the largest output magnitude."
    )


class PassOptions(BaseModel):
    """Base of every pass's options. Unknown keys are errors, and so are NaN and infinite
    numbers (YAML's ``.nan`` and ``.inf``): no option means anything with them.
    ``tolerance`` is common to all passes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    tolerance: ToleranceOverride | None = Field(
        None,
        description="Override the pass's declared output tolerance (lossless passes only).",
    )


@dataclass
class PassResult:
    """What a pass hands back.

    ``stats`` are numbers for the report (per layer under ``stats["layers"]`` where the pass
    acts per layer); ``reason`` says why a pass did not apply when ``modified`` is False.
    """

    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


class Progress:
    """Where long steps report progress. The CLI installs a rich progress bar; the default
    logs at DEBUG level and otherwise stays silent (library code never prints)."""

    def track(
        self, iterable: Iterable[T], *, description: str, total: int | None = None
    ) -> Iterator[T]:
        logger.debug("%s", description)
        yield from iterable

    def status(self, message: str) -> None:
        logger.debug("%s", message)


@dataclass
class PassContext:
    """Everything a pass may use besides the model.

    - ``data``: the recipe's data sources by role (``calibration``, ``training``,
      ``evaluation``), each a :class:`optcc.data.DataSource`; use :meth:`batches`;
    - ``target``: the backend the build lowers to (``onnxruntime``, ``tensorrt``, ...), so a
      pass can adapt its output (Q/DQ format differs per target);
    - ``original``: the model as loaded, before any pass (a distillation teacher);
    - ``stages``: the model after each pass so far, by pass name;
    - ``workdir``: a private folder for checkpoints and scratch files (deleted after a
      successful build);
    - ``output_dir``: a folder for files the pass publishes with the build (a calibration
      cache, say): ``passes/NN-name/`` in the output folder;
    - ``cache_dir``: a folder that survives failed and interrupted builds (``OUTPUT.cache/``),
      for checkpoints a re-run can resume from;
    - ``progress``: report long loops through ``ctx.progress.track(...)``;
    - ``evaluate``: returns the recipe's metric for a model (``{"accuracy": 0.97}``);
    - ``seed``: for anything random.
    """

    target: str = "onnxruntime"
    data: dict[str, DataSource] = field(default_factory=dict)
    original: Model | None = None
    stages: dict[str, Model] = field(default_factory=dict)
    workdir: Path | None = None
    output_dir: Path | None = None
    cache_dir: Path | None = None
    progress: Progress = field(default_factory=Progress)
    evaluate: Callable[[Model], dict[str, float]] | None = None
    seed: int = 0
    position: int = 0
    capabilities: frozenset[Capability] = frozenset()

    def batches(self, role: str) -> Iterator[Any]:
        """Stream the batches of the data source with role ``role``."""
        source = self.data.get(role)
        if source is None:
            raise KeyError(f"the recipe has no '{role}' data")
        return source.batches()


class Pass:
    """Base class of every pass. Subclass it, set the class attributes, implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    requires: ClassVar[frozenset[Capability]] = frozenset()
    tolerance: ClassVar[Tolerance] = Tolerance.exact()

    def __init__(self, options: PassOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)

    @classmethod
    def required_for(cls, options: PassOptions) -> frozenset[Capability]:
        """The capabilities a pass with these options needs (default: ``requires``).
        Override when an option adds a need (an accuracy budget needs evaluation data)."""
        return frozenset(cls.requires)

    @classmethod
    def couples_samples(cls, options: PassOptions) -> bool:
        """Whether the pass, with these options, makes a sample's output depend on the other
        samples in its batch by design (dynamic quantization: one scale per batch). The pass
        manager checks that every pass keeps samples independent unless it says so here;
        see :mod:`optcc.passes.batch`. Default: False."""
        return False

    @classmethod
    def problems_in_recipe(cls, options: PassOptions, earlier: list[str]) -> list[str]:
        """What is wrong with these options at this place in the recipe beyond their types,
        one sentence each: a reference to a pass that does not run before this one, say.
        ``earlier`` names the passes before it, in order. ``optcc validate`` reports every
        problem with the pass's line; the default finds none."""
        return []

    @property
    def effective_tolerance(self) -> Tolerance:
        """The declared tolerance, or the recipe's override of it."""
        override = self.options.tolerance
        if override is None:
            return self.tolerance
        return Tolerance(override.atol, override.rtol, True)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Transform ``model`` (a private copy: edit it freely) and return the result."""
        raise NotImplementedError

    def __call__(self, model: Model, ctx: PassContext | None = None) -> PassResult:
        """Run the pass standalone (outside a build), checking what it returns."""
        result = self.run(model, ctx or PassContext())
        if not isinstance(result, PassResult):
            raise TypeError(
                f"pass '{self.name}' returned {type(result).__name__}, expected PassResult"
            )
        return result
