"""Progress bars get their totals from the data (tests/test_data.py checks each source's
count), and third-party output goes to the log instead of over the progress display."""

from __future__ import annotations

import logging
import operator
import sys
import warnings
from typing import Any

import numpy as np
import pytest
from conftest import DEMO_MODEL

from optcc._logging import captured_output
from optcc.data.base import InputSpec
from optcc.data.builtin import DigitsOptions, DigitsSource, RandomOptions, RandomSource
from optcc.evaluate import Evaluator
from optcc.ir import Model
from optcc.passes.base import Progress

IMAGE = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]


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
