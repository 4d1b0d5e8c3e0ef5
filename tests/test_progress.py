"""Progress totals come from the data (sources know their sample counts and limits), and
third-party output goes to the log instead of over the progress display."""

from __future__ import annotations

import logging
import operator
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DEMO_MODEL

from optcc._thirdparty import captured_output
from optcc.data.base import InputSpec
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
from optcc.evaluate import Evaluator
from optcc.ir import Model
from optcc.passes.base import Progress

IMAGE = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]


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


class RecordingProgress(Progress):
    def __init__(self) -> None:
        self.totals: list[tuple[str, int | None]] = []

    def track(self, iterable: Any, *, description: str, total: int | None = None) -> Any:
        self.totals.append((description, total or operator.length_hint(iterable) or None))
        yield from iterable


def test_evaluation_progress_has_a_total() -> None:
    progress = RecordingProgress()
    source = DigitsSource(DigitsOptions(split="test", batch_size=100), inputs=IMAGE)
    evaluator = Evaluator(source, Model.load(DEMO_MODEL), progress=progress)
    evaluator(Model.load(DEMO_MODEL), "evaluating original")
    assert progress.totals == [("evaluating original", 4)]


def test_rich_progress_prints_totals_in_logs(capsys: pytest.CaptureFixture[str]) -> None:
    from optcc.cli import RichProgress

    progress = RichProgress(enabled=True)
    source = RandomSource(RandomOptions(samples=6, batch_size=2), inputs=IMAGE)
    assert len(list(progress.track(source.batches(), description="calibrating"))) == 3
    assert "• calibrating (3 steps)" in capsys.readouterr().err


def test_third_party_output_goes_to_the_log(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    chatty = logging.getLogger("thirdparty.exporter")
    handler = logging.StreamHandler(sys.stderr)  # what torch installs on its loggers
    chatty.addHandler(handler)
    chatty.propagate = False
    logger = logging.getLogger("optcc.test")
    caplog.set_level(logging.INFO, logger="optcc.test")
    try:
        with captured_output(logger, "exporter"):
            print("[exporter] step 1 of 3")
            warnings.warn("this API is deprecated", DeprecationWarning, stacklevel=1)
            chatty.warning("torchvision is not installed")
    finally:
        chatty.removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    messages = [r.getMessage() for r in caplog.records]
    assert "exporter: [exporter] step 1 of 3" in messages
    assert "exporter: DeprecationWarning: this API is deprecated" in messages
    assert "exporter: torchvision is not installed" in messages
    assert chatty.handlers == [] and handler.stream is sys.stderr  # restored


def test_cli_logs_python_warnings_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    from optcc.cli import _setup_logging

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _setup_logging(0)
        warnings.warn("noise from a library", UserWarning, stacklevel=1)
        assert "noise from a library" not in capsys.readouterr().err
        _setup_logging(1)
        warnings.warn("noise from a library", UserWarning, stacklevel=1)
        err = capsys.readouterr().err
        assert "info:" in err and "UserWarning: noise from a library" in err
        _setup_logging(0)
