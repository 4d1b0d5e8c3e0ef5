"""Load a build's output folder and serve predictions: ``optcc.load(folder).predict(feeds)``.

:func:`load` reads ``report.json`` to find the backend that built the folder and asks that
backend for a :class:`Predictor` (``Backend.load_predictor``): ONNX Runtime runs
``model.onnx`` on the CPU, TensorRT runs ``model.plan`` on the GPU, and any backend a plugin
registers can return its own. ``backend=`` overrides the choice, for example to run the
portable ``model.onnx`` of a TensorRT output on a machine without a GPU.

:meth:`Predictor.predict` checks the inputs before running anything (names, dtypes, ranks,
static dimensions, and that named dynamic dimensions agree across inputs), then runs them in
batches of at most ``batch_size`` samples and concatenates the outputs, so an input of any
length fits a model or engine with a bounded batch. A model whose batch dimension is fixed
(say 1) gets batches of exactly that size; a short last batch is padded by repeating its
last sample, and the padding's outputs are dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optcc.data.base import InputSpec
from optcc.errors import DataError, OptccError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


class PredictError(DataError):
    """Inputs that do not fit the model (names, dtypes, ranks, shapes)."""


class Predictor:
    """Runs a compiled artifact on batches of any length. Subclasses implement :meth:`_run`."""

    backend: str = ""

    def __init__(
        self,
        *,
        input_specs: Sequence[InputSpec],
        output_names: Sequence[str],
        batch_size: int | None = None,
        source: str = "",
    ) -> None:
        self.input_specs = list(input_specs)
        self.output_names = list(output_names)
        self.source = source
        fixed = {s.shape[0] for s in self.input_specs if s.shape and isinstance(s.shape[0], int)}
        #: The model's fixed batch size, when its first dimension is static.
        self.fixed_batch = fixed.pop() if len(fixed) == 1 else None
        self.batch_size = self.fixed_batch or batch_size or DEFAULT_BATCH_SIZE

    # ------------------------------------------------------------------ public
    def predict(
        self, feeds: Mapping[str, Any], *, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs by name for ``feeds`` (arrays by input name, samples on axis 0)."""
        arrays = self.check_inputs(feeds)
        total = int(next(iter(arrays.values())).shape[0]) if arrays else 0
        step = self.fixed_batch or batch_size or self.batch_size
        if step < 1:
            raise PredictError(f"batch_size must be at least 1, got {step}")
        if total <= step and self.fixed_batch is None:
            return dict(zip(self.output_names, self._run(arrays), strict=True))
        pieces: list[list[np.ndarray]] = []
        for start in range(0, total, step):
            chunk = {k: v[start:start + step] for k, v in arrays.items()}
            real = int(next(iter(chunk.values())).shape[0])
            if self.fixed_batch is not None and real < step:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - real, axis=0)])
                         for k, v in chunk.items()}
            outputs = self._run(chunk)
            for name, out in zip(self.output_names, outputs, strict=True):
                if out.ndim == 0 or out.shape[0] != len(next(iter(chunk.values()))):
                    raise PredictError(
                        f"output '{name}' has shape {list(out.shape)}, without the batch axis "
                        f"of the inputs, so it cannot be split into batches; pass at most "
                        f"{step} samples"
                    )
            pieces.append([out[:real] for out in outputs])
        return {name: np.concatenate([p[i] for p in pieces])
                for i, name in enumerate(self.output_names)}

    def check_inputs(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The feeds as arrays of the model's dtypes, or one :class:`PredictError` naming the
        input and what is wrong with it."""
        from optcc.recipe.loader import suggest

        if not isinstance(feeds, Mapping):
            raise PredictError(
                f"feeds must be a mapping of input name to array, got {type(feeds).__name__}"
            )
        names = [s.name for s in self.input_specs]
        for name in feeds:
            if name not in names:
                hint = suggest(str(name), names)
                raise PredictError(
                    f"unknown input '{name}'; the model's inputs are: {', '.join(names)}",
                    hint=hint,
                )
        missing = [n for n in names if n not in feeds]
        if missing:
            raise PredictError(
                f"missing input(s) {', '.join(repr(m) for m in missing)}; the model's inputs "
                f"are: {', '.join(s.describe() for s in self.input_specs)}"
            )
        arrays: dict[str, np.ndarray] = {}
        named: dict[str, tuple[str, int]] = {}
        for spec in self.input_specs:
            array = _as_array(spec, feeds[spec.name])
            dims = "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in spec.shape) + "]"
            if array.ndim != len(spec.shape):
                raise PredictError(
                    f"input '{spec.name}' has {array.ndim} dimension(s) {list(array.shape)}; "
                    f"the model takes {len(spec.shape)}: {dims}"
                )
            if array.ndim == 0:
                raise PredictError(f"input '{spec.name}' is a scalar; predict needs a batch axis")
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=False)):
                if isinstance(want, int):
                    if axis == 0 and self.fixed_batch is not None:
                        continue  # any number of samples: batches of fixed_batch are formed
                    if want != got:
                        raise PredictError(
                            f"input '{spec.name}' has size {got} on axis {axis}; the model "
                            f"needs {want} there ({dims})"
                        )
                elif want and axis > 0:
                    seen = named.setdefault(want, (spec.name, got))
                    if seen[1] != got:
                        raise PredictError(
                            f"dimension '{want}' is {seen[1]} in input '{seen[0]}' but {got} in "
                            f"input '{spec.name}'"
                        )
            arrays[spec.name] = array
        sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise PredictError(
                "inputs disagree on the number of samples (axis 0): "
                + ", ".join(f"{k}: {v}" for k, v in sizes.items())
            )
        if arrays and next(iter(sizes.values())) == 0:
            raise PredictError("the inputs hold no samples (axis 0 has size 0)")
        return arrays

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "source": self.source,
            "inputs": [s.describe() for s in self.input_specs],
            "outputs": list(self.output_names),
            "batch_size": self.batch_size,
        }

    # ------------------------------------------------------------------ subclass
    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; outputs in ``output_names`` order."""
        raise NotImplementedError


def _as_array(spec: InputSpec, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise PredictError(f"input '{spec.name}' is not an array: {exc}") from exc
    if array.dtype == object or array.dtype.kind in "USV":
        raise PredictError(
            f"input '{spec.name}' has dtype {array.dtype}, not a numeric array"
        )
    if array.dtype != spec.dtype:
        if not np.can_cast(array.dtype, spec.dtype, casting="safe"):
            raise PredictError(
                f"input '{spec.name}' has dtype {array.dtype}; the model takes {spec.dtype} "
                "(convert it explicitly, e.g. array.astype(np." + spec.dtype.name + "))"
            )
        array = array.astype(spec.dtype)
    return np.ascontiguousarray(array)


class OrtPredictor(Predictor):
    """An ONNX model on ONNX Runtime's CPU provider."""

    backend = "onnxruntime"

    def __init__(
        self, path: Path, *, threads: int | None = None, batch_size: int | None = None
    ) -> None:
        from optcc.runtime import OrtRunner

        self.runner = OrtRunner(str(path), threads=threads)
        super().__init__(input_specs=self.runner.input_specs,
                         output_names=self.runner.output_names, batch_size=batch_size,
                         source=str(path))

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feeds)


def onnx_io_specs(path: Path) -> tuple[list[InputSpec], list[str]]:
    """Graph inputs (as :class:`InputSpec`, dynamic dimensions as names or None) and output
    names of an ONNX file, read without its weights."""
    import onnx
    from onnx import helper

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OptccError(f"{path}: not a readable ONNX file ({exc})") from exc
    initializers = {i.name for i in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, shape, dtype))
    return specs, [o.name for o in proto.graph.output]


# --------------------------------------------------------------------------- load
def read_report(output_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The output folder and its ``report.json``, or a clear error when ``output_dir`` is
    not a finished optcc output folder."""
    folder = Path(output_dir).expanduser()
    if not folder.exists():
        raise OptccError(f"{folder}: no such folder", hint="give the output folder of 'optcc build'")
    if not folder.is_dir():
        raise OptccError(f"{folder}: not a folder; give the output folder of 'optcc build'")
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise OptccError(
            f"{folder}: not an optcc output folder (it has no report.json)",
            hint="give the folder 'optcc build' wrote (the recipe's 'output', or -o)",
        )
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptccError(f"{report_path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(report, dict) or "optcc_version" not in report or "target" not in report:
        raise OptccError(f"{report_path}: not an optcc build report")
    if report.get("status") != "ok" or "final" not in report:
        raise OptccError(
            f"{folder}: the build that wrote it did not finish (status {report.get('status')!r})"
        )
    return folder, report


def load(
    output_dir: str | Path,
    *,
    backend: str | None = None,
    batch_size: int | None = None,
    registry: Any = None,
    **options: Any,
) -> Predictor:
    """A :class:`Predictor` for the artifact in ``output_dir`` (see the module docstring).

    ``backend`` overrides the backend recorded in the report; ``batch_size`` caps the
    samples per run (default: the target's ``batch_size``, the engine's largest profile
    batch, or 64); other keyword arguments go to the backend's ``load_predictor``.
    """
    from optcc.plugins import get_registry
    from optcc.recipe.loader import suggest

    folder, report = read_report(output_dir)
    registry = registry or get_registry()
    name = backend or report["target"]["backend"]
    cls = registry.backends.get(name)
    if cls is None:
        raise OptccError(
            f"backend '{name}' is not installed here (known: {', '.join(sorted(registry.backends))})",
            hint=suggest(name, list(registry.backends)),
        )
    predictor = cls.load_predictor(folder, report, batch_size=batch_size, **options)
    logger.info("loaded %s with %s", folder, predictor.backend)
    return predictor


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file by name (no pickles), or a clear error."""
    import zipfile

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{file}: input file not found" if not file.exists() else
                        f"{file}: not a file")
    try:
        with np.load(file, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise DataError(f"{file}: a single array, not an .npz archive of named inputs")
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{file}: not a readable .npz file ({exc})") from exc


__all__ = ["OrtPredictor", "onnx_io_specs", "PredictError", "Predictor", "load", "load_npz",
           "read_report"]
