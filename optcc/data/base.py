"""Data sources: calibration, training and evaluation data as streams of batches.

A source never needs the whole data set in memory: ``batches()`` yields
:class:`Batch` objects of at most ``batch_size`` samples, stopping after ``limit`` samples.
Plugins add sources through the ``optcc_data_sources`` hook.

Whatever goes wrong while a source reads (a missing or corrupt file, user code that
raises, arrays of the wrong shape, NaN in the inputs) becomes one :class:`DataError` that
names the role and the source.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optcc.errors import DataError, OptccError, first_line


@dataclass
class Batch:
    """One batch: model inputs by name, plus labels where the data has them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        first = next(iter(self.inputs.values()))
        return int(first.shape[0]) if first.ndim else 1


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (``None`` or a string for dynamic dimensions), dtype.

    ``index_limit``: for an integer input that indexes a table (token ids into an
    embedding), valid values are ``[0, index_limit)``; ``index_table`` names the table.
    ``None`` when the model does not say (see :func:`optcc.ir.indices.index_ranges`).
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype
    index_limit: int | None = None
    index_table: str | None = None

    def describe(self) -> str:
        dims = ",".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}[{dims}] {self.dtype.name}"


class DataOptions(BaseModel):
    """Options every data source accepts, besides its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    batch_size: int = Field(32, ge=1, le=1_000_000, description="Samples per batch.")
    limit: int | None = Field(None, ge=1, description="Use at most this many samples.")


class DataSource:
    """Base class of a data source. Subclasses set ``name``, ``Options`` and ``_samples``.

    ``_samples()`` yields ``(inputs, labels)`` chunks of any size (whole arrays are fine for
    small data); the base class slices them into batches of ``batch_size`` and applies
    ``limit``. A source that streams from disk yields small chunks.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[DataOptions]] = DataOptions

    def __init__(
        self,
        options: DataOptions,
        *,
        inputs: Sequence[InputSpec],
        base_dir: Path | None = None,
        role: str = "data",
    ) -> None:
        self.options = options
        self.input_specs = list(inputs)
        self.base_dir = base_dir or Path.cwd()
        self.role = role

    # -- to implement
    def _samples(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    # -- provided
    def resolve(self, path: str | Path) -> Path:
        """A path from the recipe, relative to the recipe's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def error(self, message: str, hint: str | None = None) -> DataError:
        return DataError(f"data '{self.role}' ({self.describe()}): {message}", hint=hint)

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """Yield batches of at most ``batch_size`` samples, checked against the model inputs."""
        try:
            yield from self._batches(batch_size)
        except OptccError:
            raise
        except OSError as exc:
            from optcc.resources import os_error

            mapped = os_error(exc, f"data '{self.role}' ({self.describe()}): reading")
            raise (mapped or self.error(f"cannot read {exc.filename or 'the data'}: "
                                        f"{exc.strerror or exc}")) from exc
        except MemoryError as exc:
            raise self.error("ran out of memory reading the data",
                             hint="use smaller batches or a 'limit'") from exc
        except Exception as exc:
            raise self.error(f"reading failed: {type(exc).__name__}: {first_line(exc)}") from exc

    def _batches(self, batch_size: int | None) -> Iterator[Batch]:
        size = batch_size or self.options.batch_size
        remaining = self.options.limit
        pending: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []
        pending_n = 0
        checked = False
        for inputs, labels in self._samples():
            inputs, labels = self.as_arrays(inputs, labels)
            if not checked:
                self.check(inputs, labels)
                checked = True
            n = _count(inputs)
            if remaining is not None:
                if n > remaining:
                    inputs = {k: v[:remaining] for k, v in inputs.items()}
                    labels = labels[:remaining] if labels is not None else None
                    n = remaining
                remaining -= n
            pending.append((inputs, labels))
            pending_n += n
            while pending_n >= size:
                batch, pending, pending_n = _take(pending, size)
                yield Batch(self.cast(batch.inputs), batch.labels)
            if remaining is not None and remaining <= 0:
                break  # do not pull another chunk from a streaming source
        if pending_n:
            batch, _, _ = _take(pending, pending_n)
            yield Batch(self.cast(batch.inputs), batch.labels)

    def first_batch(self, batch_size: int | None = None) -> Batch:
        for batch in self.batches(batch_size):
            return batch
        raise self.error("yields no samples")

    def as_arrays(
        self, inputs: Any, labels: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """A chunk as numeric arrays with a sample axis, or a clear error (ragged lists,
        objects, scalars, labels that are not one value per sample)."""
        if not isinstance(inputs, dict):
            raise self.error(f"produced {type(inputs).__name__} inputs; expected a dict of arrays")
        arrays = {str(k): self._array(v, f"input '{k}'") for k, v in inputs.items()}
        if not arrays:
            raise self.error("produced a chunk without any input arrays")
        if labels is None:
            return arrays, None
        labels = self._array(labels, "labels")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise self.error(
                f"labels must hold one class id per sample (shape [N]), got shape "
                f"{list(labels.shape)}"
            )
        if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
            raise self.error("labels must be integer class ids, got fractional values")
        if labels.dtype.kind not in "iubf":
            raise self.error(f"labels must be integer class ids, got {labels.dtype}")
        return arrays, labels

    def _array(self, value: Any, what: str) -> np.ndarray:
        try:
            arr = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise self.error(f"{what} is not a rectangular array ({first_line(exc)})") from exc
        if arr.dtype == object:
            raise self.error(f"{what} holds Python objects, not numbers")
        if arr.ndim == 0:
            raise self.error(f"{what} is a single value, not an array with a sample axis")
        return arr

    def check(self, inputs: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        """Fail with one clear message when the data does not fit the model's inputs."""
        expected = {spec.name for spec in self.input_specs}
        missing = sorted(expected - set(inputs))
        if missing:
            raise self.error(
                f"no data for model input(s) {', '.join(missing)}; it provides "
                f"{', '.join(sorted(inputs)) or 'nothing'}",
                hint="name the arrays after the model's inputs, or map them with 'inputs:'",
            )
        n = None
        for spec in self.input_specs:
            arr = inputs[spec.name]
            if arr.ndim != len(spec.shape):
                raise self.error(
                    f"input '{spec.name}' expects {len(spec.shape)} dimensions "
                    f"({spec.describe()}), got an array of shape {list(arr.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
                if isinstance(want, int) and want > 0 and want != got and axis != 0:
                    raise self.error(
                        f"input '{spec.name}' expects dimension {axis} to be {want} "
                        f"({spec.describe()}), got shape {list(arr.shape)}"
                    )
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise self.error(
                    f"input '{spec.name}' expects {spec.dtype.name}, got {arr.dtype.name}"
                )
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise self.error("inputs have different numbers of samples")
        if labels is not None and n is not None and labels.shape[0] != n:
            raise self.error(f"{labels.shape[0]} labels for {n} samples")

    def cast(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's inputs in its dtypes; NaN in float data is an error (it would make
        every comparison of outputs meaningless)."""
        cast = {
            spec.name: np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
            for spec in self.input_specs
        }
        for name, arr in cast.items():
            if arr.dtype.kind == "f" and np.isnan(arr).any():
                raise self.error(f"input '{name}' contains NaN values")
        return cast


def _count(inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0])


def _take(
    pending: list[tuple[dict[str, np.ndarray], np.ndarray | None]], size: int
) -> tuple[Batch, list[tuple[dict[str, np.ndarray], np.ndarray | None]], int]:
    """Concatenate the first ``size`` samples of ``pending``; return the rest."""
    taken_inputs: dict[str, list[np.ndarray]] = {}
    taken_labels: list[np.ndarray] = []
    has_labels = all(labels is not None for _, labels in pending)
    need = size
    rest: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []
    for inputs, labels in pending:
        n = _count(inputs)
        if need <= 0:
            rest.append((inputs, labels))
            continue
        k = min(n, need)
        for key, arr in inputs.items():
            taken_inputs.setdefault(key, []).append(arr[:k])
        if has_labels and labels is not None:
            taken_labels.append(labels[:k])
        if k < n:
            rest.append(
                ({key: arr[k:] for key, arr in inputs.items()}, None if labels is None else labels[k:])
            )
        need -= k
    batch = Batch(
        inputs={k: np.concatenate(v) for k, v in taken_inputs.items()},
        labels=np.concatenate(taken_labels) if has_labels and taken_labels else None,
    )
    rest_n = sum(_count(i) for i, _ in rest)
    return batch, rest, rest_n

