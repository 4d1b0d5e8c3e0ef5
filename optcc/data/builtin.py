"""Built-in data sources, registered through the same hook as plugins' sources."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcc._objects import load_object
from optcc.data.base import Batch, DataOptions, DataSource
from optcc.errors import OptccError, first_line
from optcc.hookspecs import hookimpl
from optcc.resources import check_allocation

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DIGITS_FILE = DEMO_DIR / "digits.npz"

Chunk = tuple[dict[str, np.ndarray], "np.ndarray | None"]


def _single_input_or_named(
    source: DataSource, arrays: dict[str, np.ndarray], mapping: dict[str, str], labels_key: str
) -> dict[str, np.ndarray]:
    """Pick the arrays that feed the model's inputs: by mapping, by name, or the only one."""
    names = [spec.name for spec in source.input_specs]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise source.error(
            f"'inputs' maps {', '.join(repr(u) for u in unknown)}, which the model does not "
            f"have; its inputs are {', '.join(names)}"
        )
    picked: dict[str, np.ndarray] = {}
    candidates = [k for k in arrays if k != labels_key]
    for spec in source.input_specs:
        key = mapping.get(spec.name, spec.name)
        if key in arrays:
            picked[spec.name] = arrays[key]
        elif len(source.input_specs) == 1 and len(candidates) == 1 and spec.name not in mapping:
            picked[spec.name] = arrays[candidates[0]]
        elif spec.name in mapping:
            raise source.error(
                f"array '{key}' (mapped to input '{spec.name}') not found; "
                f"available: {', '.join(sorted(arrays)) or 'none'}"
            )
    return picked


class DigitsOptions(DataOptions):
    split: Literal["train", "test", "all"] = Field(
        "test", description="Which part of the bundled digits set (fixed 1400/397 split)."
    )


class DigitsSource(DataSource):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled with optcc.

    Images are float32 in [0, 1], shape [N, 1, 8, 8]; labels are int64 class ids.
    """

    name = "digits"
    summary = "The bundled 8x8 digits data set (offline), for the demo."
    Options = DigitsOptions

    def describe(self) -> str:
        return f"digits:{self.options.split}"  # type: ignore[attr-defined]

    def _samples(self) -> Iterator[Chunk]:
        with np.load(DIGITS_FILE) as data:
            images = data["images"].astype(np.float32)[:, None] / 16.0
            labels = data["labels"].astype(np.int64)
            split = self.options.split  # type: ignore[attr-defined]
            if split != "all":
                idx = data[f"{split}_index"]
                images, labels = images[idx], labels[idx]
        if len(self.input_specs) != 1:
            raise self.error("the digits set feeds models with exactly one image input")
        yield {self.input_specs[0].name: images}, labels


class NpzOptions(DataOptions):
    path: str = Field(..., description="An .npz file, relative to the recipe.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Model input name -> array name in the file."
    )
    labels: str | None = Field(
        "labels", description="Array holding the labels (ignored when absent)."
    )


class NpzSource(DataSource):
    """Arrays in one .npz file, named after the model's inputs (or mapped with ``inputs``).

    Arrays are memory-mapped where numpy allows, so large files stream.
    """

    name = "npz"
    summary = "Arrays from an .npz file."
    Options = NpzOptions

    def describe(self) -> str:
        return f"npz:{self.options.path}"  # type: ignore[attr-defined]

    def _samples(self) -> Iterator[Chunk]:
        opts: Any = self.options
        path = self.resolve(opts.path)
        if not path.exists():
            raise self.error(f"file {path} not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise ValueError("it holds a single array, not an .npz archive")
                arrays = {k: data[k] for k in data.files}
        except OSError:
            raise
        except Exception as exc:  # not a zip, a pickled object array, a truncated member
            raise self.error(f"cannot read {path}: {first_line(exc)}") from exc
        labels = arrays.get(opts.labels) if opts.labels else None
        yield _single_input_or_named(self, arrays, opts.inputs, opts.labels or ""), labels


class NpyFolderOptions(DataOptions):
    path: str = Field(..., description="A folder with one <input>.npy per model input.")
    labels: str | None = Field("labels", description="Label file stem (labels.npy).")


class NpyFolderSource(DataSource):
    """A folder holding ``<input name>.npy`` per model input and optionally ``labels.npy``.

    Files are memory-mapped and read in slices, so data larger than memory works.
    """

    name = "npy-folder"
    summary = "A folder of .npy files, one per model input."
    Options = NpyFolderOptions

    def describe(self) -> str:
        return f"npy-folder:{self.options.path}"  # type: ignore[attr-defined]

    def _samples(self) -> Iterator[Chunk]:
        opts: Any = self.options
        folder = self.resolve(opts.path)
        if not folder.is_dir():
            raise self.error(f"folder {folder} not found")
        arrays: dict[str, np.ndarray] = {}
        for spec in self.input_specs:
            file = folder / f"{spec.name.replace('/', '_')}.npy"
            if not file.exists():
                present = ", ".join(sorted(p.name for p in folder.glob("*.npy"))) or "none"
                raise self.error(f"missing {file.name} for input '{spec.name}' (found: {present})")
            arrays[spec.name] = self._load(file)
        labels = None
        if opts.labels and (folder / f"{opts.labels}.npy").exists():
            labels = self._load(folder / f"{opts.labels}.npy")
        if any(a.ndim == 0 for a in arrays.values()):
            raise self.error("every .npy file needs a sample axis (it holds a single value)")
        n = min(a.shape[0] for a in arrays.values())
        step = max(opts.batch_size, 256)
        for start in range(0, n, step):
            yield (
                {k: np.asarray(v[start : start + step]) for k, v in arrays.items()},
                None if labels is None else np.asarray(labels[start : start + step]),
            )


    def _load(self, file: Path) -> np.ndarray:
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except OSError:
            raise
        except Exception as exc:  # not an .npy file, or a pickled object array
            raise self.error(f"cannot read {file}: {first_line(exc)}") from exc


class CallableOptions(DataOptions):
    function: str = Field(
        ..., description="'package.module:function' or 'file.py:function' returning the data."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")


class CallableSource(DataSource):
    """Data from user code. The function may return (or yield):

    - an iterable of batches: :class:`optcc.data.Batch`, dicts of input arrays, or
      ``(inputs_dict, labels)`` pairs — consumed lazily, so a generator streams;
    - a dict of whole arrays, with an optional ``"labels"`` entry.
    """

    name = "callable"
    summary = "Data returned or yielded by a Python function."
    Options = CallableOptions

    def describe(self) -> str:
        return f"callable:{self.options.function}"  # type: ignore[attr-defined]

    def _samples(self) -> Iterator[Chunk]:
        opts: Any = self.options
        try:
            fn = load_object(opts.function, base_dir=self.base_dir, what="data function")
        except OptccError as exc:
            raise self.error(exc.message, hint=exc.hint) from exc
        try:
            produced = fn(**opts.kwargs)
        except Exception as exc:
            raise self.error(f"the function raised {type(exc).__name__}: {exc}") from exc
        if isinstance(produced, dict):
            arrays = dict(produced)
            labels = arrays.pop("labels", None)
            yield _single_input_or_named(self, arrays, {}, "labels"), labels
            return
        if isinstance(produced, str | bytes) or not hasattr(produced, "__iter__"):
            raise self.error(
                f"the function returned {type(produced).__name__}; expected a dict of arrays "
                "or an iterable of batches"
            )
        for item in produced:
            if isinstance(item, Batch):
                yield item.inputs, item.labels
            elif isinstance(item, dict):
                arrays = dict(item)
                labels = arrays.pop("labels", None)
                yield _single_input_or_named(self, arrays, {}, "labels"), labels
            elif isinstance(item, tuple) and len(item) == 2:
                inputs, labels = item
                if not isinstance(inputs, dict):
                    inputs = {self.input_specs[0].name: inputs}
                yield inputs, labels
            else:
                raise self.error(
                    f"yielded a {type(item).__name__}; expected a Batch, a dict of arrays "
                    "or an (inputs, labels) pair"
                )


class RandomOptions(DataOptions):
    samples: int = Field(64, ge=1, le=10_000_000, description="How many random samples.")
    seed: int = Field(0, ge=0, description="Random seed.")
    dims: dict[str, int] = Field(
        default_factory=dict,
        description="Values for named dynamic dimensions (e.g. sequence: 128); others are 1.",
    )


class RandomSource(DataSource):
    """Random inputs shaped like the model's inputs.

    - float inputs: standard normal values;
    - integer inputs that index a table (token ids into an embedding, found by following
      the input to a ``Gather``): ids drawn uniformly from the table's rows ``[0, rows)``;
    - other integer and boolean inputs (attention masks, counts): ones — a valid index, a
      mask that masks nothing.

    :meth:`describe` says what was generated for each input. Only for output-agreement
    checks; accuracy on random data means nothing.
    """

    name = "random"
    summary = "Random inputs shaped like the model's (agreement checks only)."
    Options = RandomOptions

    def describe(self) -> str:
        parts = []
        for spec in self.input_specs:
            if spec.dtype.kind == "f":
                parts.append(f"{spec.name}: normal(0, 1)")
            elif spec.index_limit is not None and spec.dtype.kind in "iu":
                parts.append(f"{spec.name}: ids in [0, {spec.index_limit}) "
                             f"(rows of '{spec.index_table}')")
            else:
                parts.append(f"{spec.name}: ones")
        return "random (" + "; ".join(parts) + ")" if parts else "random"

    def _samples(self) -> Iterator[Chunk]:
        """Drawn chunk by chunk, so that ``samples`` may exceed memory (one input's values
        are the same stream as one big draw)."""
        opts: Any = self.options
        rng = np.random.default_rng(opts.seed)
        tails = {
            spec.name: [d if isinstance(d, int) and d > 0 else opts.dims.get(str(d), 1)
                        for d in spec.shape[1:]]
            for spec in self.input_specs
        }
        step = min(opts.samples, max(opts.batch_size, 256))
        # float64 draws, cast afterwards (the values stay those of earlier versions)
        nbytes = sum(step * math.prod(tails[s.name]) * (8 + s.dtype.itemsize) for s in self.input_specs)
        check_allocation(
            nbytes, f"{self.role} data: random inputs of shape "
            + ", ".join(f"{k}{[step, *v]}" for k, v in tails.items()),
            hint="the model declares very large inputs: give real data, or smaller 'dims'",
        )
        for start in range(0, opts.samples, step):
            n = min(step, opts.samples - start)
            inputs = {}
            for spec in self.input_specs:
                shape = [n, *tails[spec.name]]
                if spec.dtype.kind == "f":
                    inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.index_limit is not None and spec.dtype.kind in "iu":
                    inputs[spec.name] = rng.integers(0, spec.index_limit, shape).astype(spec.dtype)
                else:
                    inputs[spec.name] = np.ones(shape, dtype=spec.dtype)
            yield inputs, None


BUILTIN_SOURCES: list[type[DataSource]] = [
    DigitsSource,
    NpzSource,
    NpyFolderSource,
    CallableSource,
    RandomSource,
]


@hookimpl
def optcc_data_sources() -> list[type[DataSource]]:
    return BUILTIN_SOURCES
