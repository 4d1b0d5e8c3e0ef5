"""Data sources: batching, limits, streaming, and clear errors when data does not fit."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optcc.data import Batch, InputSpec
from optcc.data.builtin import (
    CallableOptions,
    CallableSource,
    DigitsOptions,
    DigitsSource,
    NpyFolderOptions,
    NpyFolderSource,
    NpzOptions,
    NpzSource,
    RandomOptions,
    RandomSource,
)
from optcc.errors import DataError

IMAGE = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]


def test_digits_splits_and_batches() -> None:
    source = DigitsSource(DigitsOptions(split="test", batch_size=100), inputs=IMAGE)
    batches = list(source.batches())
    assert [b.size for b in batches] == [100, 100, 100, 97]
    assert batches[0].inputs["image"].shape == (100, 1, 8, 8)
    assert batches[0].inputs["image"].dtype == np.float32
    assert 0.0 <= batches[0].inputs["image"].min() and batches[0].inputs["image"].max() <= 1.0
    assert set(np.concatenate([b.labels for b in batches])) == set(range(10))
    train = DigitsSource(DigitsOptions(split="train"), inputs=IMAGE)
    assert sum(b.size for b in train.batches(500)) == 1400


def test_limit_caps_samples() -> None:
    source = DigitsSource(DigitsOptions(split="all", batch_size=64, limit=150), inputs=IMAGE)
    assert [b.size for b in source.batches()] == [64, 64, 22]


def test_npz_by_name_with_mapping_and_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", pixels=x, labels=np.arange(10))
    source = NpzSource(
        NpzOptions(path="d.npz", inputs={"image": "pixels"}, batch_size=4),
        inputs=IMAGE, base_dir=tmp_path, role="calibration",
    )
    batches = list(source.batches())
    np.testing.assert_array_equal(np.concatenate([b.inputs["image"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(10))


def test_npz_wrong_shape_names_source_input_and_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=np.zeros((10, 64), np.float32))
    source = NpzSource(NpzOptions(path="d.npz"), inputs=IMAGE, base_dir=tmp_path, role="evaluation")
    with pytest.raises(DataError) as info:
        source.first_batch()
    assert str(info.value) == (
        "data 'evaluation' (npz:d.npz): input 'image' expects 4 dimensions "
        "(image[batch,1,8,8] float32), got an array of shape [10, 64]"
    )


def test_npz_wrong_channel_count(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=np.zeros((10, 3, 8, 8), np.float32))
    source = NpzSource(NpzOptions(path="d.npz"), inputs=IMAGE, base_dir=tmp_path)
    with pytest.raises(DataError, match=r"expects dimension 1 to be 1 .* got shape \[10, 3, 8, 8\]"):
        source.first_batch()


def test_npz_missing_mapped_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 1, 8, 8), np.float32), b=np.zeros(2))
    source = NpzSource(NpzOptions(path="d.npz", inputs={"image": "pixels"}), inputs=IMAGE, base_dir=tmp_path)
    with pytest.raises(DataError, match="array 'pixels' .* not found; available: a, b"):
        source.first_batch()


def test_npz_missing_file(tmp_path: Path) -> None:
    source = NpzSource(NpzOptions(path="nope.npz"), inputs=IMAGE, base_dir=tmp_path, role="calibration")
    with pytest.raises(DataError, match=r"data 'calibration' \(npz:nope.npz\): file .*nope.npz not found"):
        source.first_batch()


def test_wrong_dtype_is_rejected(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=np.zeros((2, 1, 8, 8), np.complex64))
    with pytest.raises(DataError, match="expects float32, got complex64"):
        NpzSource(NpzOptions(path="d.npz"), inputs=IMAGE, base_dir=tmp_path).first_batch()


def test_npy_folder_streams_slices(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((600, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "image.npy", x)
    np.save(tmp_path / "labels.npy", np.arange(600) % 10)
    source = NpyFolderSource(NpyFolderOptions(path=".", batch_size=256), inputs=IMAGE, base_dir=tmp_path)
    batches = list(source.batches())
    assert [b.size for b in batches] == [256, 256, 88]
    np.testing.assert_array_equal(batches[1].inputs["image"], x[256:512])


def test_npy_folder_missing_file_lists_what_is_there(tmp_path: Path) -> None:
    np.save(tmp_path / "pixels.npy", np.zeros((2, 1, 8, 8), np.float32))
    source = NpyFolderSource(NpyFolderOptions(path="."), inputs=IMAGE, base_dir=tmp_path)
    with pytest.raises(DataError, match=r"missing image.npy for input 'image' \(found: pixels.npy\)"):
        source.first_batch()


def test_callable_generator_is_consumed_lazily(tmp_path: Path) -> None:
    (tmp_path / "feed.py").write_text(
        "import numpy as np\n"
        "CALLS = []\n"
        "def batches(n, size=3):\n"
        "    for i in range(n):\n"
        "        CALLS.append(i)\n"
        "        yield {'image': np.full((size, 1, 8, 8), i, np.float32), 'labels': np.full(size, i)}\n"
    )
    source = CallableSource(
        CallableOptions(function="feed.py:batches", kwargs={"n": 100}, batch_size=3, limit=6),
        inputs=IMAGE, base_dir=tmp_path,
    )
    batches = list(source.batches())
    assert [int(b.labels[0]) for b in batches] == [0, 1]
    import sys

    module = next(m for name, m in sys.modules.items() if name.startswith("_optcc_user_feed"))
    assert module.CALLS == [0, 1]  # not all 100: a generator streams


def test_callable_returning_whole_arrays_and_batch_objects(tmp_path: Path) -> None:
    (tmp_path / "whole.py").write_text(
        "import numpy as np\n"
        "from optcc.data import Batch\n"
        "def arrays():\n"
        "    return {'image': np.zeros((5, 1, 8, 8), np.float32), 'labels': np.arange(5)}\n"
        "def batch_objects():\n"
        "    return [Batch({'image': np.ones((2, 1, 8, 8), np.float32)})]\n"
    )
    whole = CallableSource(CallableOptions(function="whole.py:arrays"), inputs=IMAGE, base_dir=tmp_path)
    assert whole.first_batch().size == 5
    objs = CallableSource(CallableOptions(function="whole.py:batch_objects"), inputs=IMAGE, base_dir=tmp_path)
    batch = objs.first_batch()
    assert isinstance(batch, Batch) and batch.labels is None and batch.size == 2


def test_callable_unknown_module_is_a_clear_error() -> None:
    source = CallableSource(CallableOptions(function="no_such_pkg.data:load"), inputs=IMAGE, role="training")
    with pytest.raises(DataError) as info:
        source.first_batch()
    assert str(info.value) == (
        "data 'training' (callable:no_such_pkg.data:load): data function "
        "'no_such_pkg.data:load': module 'no_such_pkg' not found"
    )


def test_callable_that_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def load():\n    raise OSError('disk on fire')\n")
    source = CallableSource(CallableOptions(function="bad.py:load"), inputs=IMAGE, base_dir=tmp_path)
    with pytest.raises(DataError, match="the function raised OSError: disk on fire"):
        source.first_batch()


def test_random_source_fills_named_dims() -> None:
    specs = [InputSpec("ids", ("batch", "sequence"), np.dtype(np.int64)),
             InputSpec("x", ("batch", 4), np.dtype(np.float32))]
    batch = RandomSource(RandomOptions(samples=3, dims={"sequence": 16}), inputs=specs).first_batch()
    assert batch.inputs["ids"].shape == (3, 16) and batch.inputs["ids"].dtype == np.int64
    assert batch.inputs["x"].shape == (3, 4)


def _sources(tmp_path: Path) -> list[Any]:
    images = np.zeros((50, 1, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", image=images, labels=np.zeros(50, np.int64))
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "image.npy", images)
    return [
        DigitsSource(DigitsOptions(split="test", batch_size=64), inputs=IMAGE),
        DigitsSource(DigitsOptions(split="train", batch_size=100, limit=333), inputs=IMAGE),
        NpzSource(NpzOptions(path="d.npz", batch_size=7), inputs=IMAGE, base_dir=tmp_path),
        NpzSource(NpzOptions(path="d.npz", batch_size=1, limit=3), inputs=IMAGE, base_dir=tmp_path),
        NpyFolderSource(NpyFolderOptions(path="f", batch_size=16), inputs=IMAGE, base_dir=tmp_path),
        RandomSource(RandomOptions(samples=5, batch_size=2), inputs=IMAGE),
    ]


def test_sources_know_how_many_batches_they_yield(tmp_path: Path) -> None:
    expected = [7, 4, 8, 3, 4, 3]  # 397/64, 333/100, 50/7, limit 3 at batch 1, 50/16, 5/2
    for source, want in zip(_sources(tmp_path), expected, strict=True):
        stream = source.batches()
        assert operator.length_hint(stream) == want == source.num_batches()
        assert sum(1 for _ in stream) == want, source.describe()
        assert operator.length_hint(stream) == 0


def test_a_generator_source_has_no_total_but_streams(tmp_path: Path) -> None:
    (tmp_path / "gen.py").write_text(
        "import numpy as np\n"
        "def make():\n"
        "    for _ in range(3):\n"
        "        yield {'image': np.zeros((4, 1, 8, 8), np.float32)}\n"
    )
    source = CallableSource(CallableOptions(function="gen.py:make", batch_size=4), inputs=IMAGE,
                            base_dir=tmp_path)
    stream = source.batches()
    assert operator.length_hint(stream, -1) == -1 and source.num_batches() is None
    assert stream and sum(1 for _ in stream) == 3  # still truthy: no __len__
