"""What the command line shows people: bench comparisons, lint grouping, pass and plugin
listings, help texts, the build's summary and warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_MODEL

from optcc.cli import EXIT_USER_ERROR, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FAST = ("--batch-size", "3", "--runs", "4", "--rounds", "2", "--warmup", "1", "--threads", "1")


def test_bench_refuses_models_with_other_inputs_unless_forced(capsys, conv_bn_path: Path) -> None:
    code, out, err = run(capsys, "bench", str(DEMO_MODEL), "--compare", str(conv_bn_path), *FAST)
    assert code == EXIT_USER_ERROR and out == ""
    first = err.splitlines()[0]
    assert first.startswith(f"error: {conv_bn_path} does not take the same inputs as {DEMO_MODEL}")
    assert "input names ['x'] vs ['image']" in first and "--force" in err
    code, out, _ = run(capsys, "bench", str(DEMO_MODEL), "--compare", str(conv_bn_path), *FAST,
                       "--force", "--json")
    results = json.loads(out)
    assert code == 0 and [r["rounds"] for r in results] == [2, 2]
    low, high = results[1]["speedup_range"]
    assert low <= high and results[1]["speedup_vs_first"] > 0


def test_bench_same_inputs_shows_rounds_and_spread(capsys) -> None:
    code, out, _ = run(capsys, "bench", str(DEMO_MODEL), "--compare", str(DEMO_MODEL), *FAST)
    assert code == 0
    assert "2 interleaved rounds" in out and "spread" in out and "×" in out
