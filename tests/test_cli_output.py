"""What the command line shows people: bench comparisons, lint grouping, pass and plugin
listings, help texts, the build's summary and warnings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def test_lint_groups_repeated_findings(tmp_path: Path, capsys) -> None:
    from optcc_plugins.int8 import Int8QuantizePass
    from optcc_plugins.lossless import FoldBatchNormPass

    from optcc.data import InputSpec
    from optcc.data.builtin import DigitsOptions, DigitsSource
    from optcc.ir import Model
    from optcc.passes import Capability, PassContext

    spec = [InputSpec("image", ("batch", 1, 8, 8), np.dtype(np.float32))]
    ctx = PassContext(target="onnxruntime", capabilities=frozenset({Capability.CALIBRATION_DATA}),
                      data={"calibration": DigitsSource(DigitsOptions(limit=32), inputs=spec)})
    folded = FoldBatchNormPass()(Model.load(DEMO_MODEL)).model
    path = tmp_path / "ort_int8.onnx"
    Int8QuantizePass(method="max")(folded, ctx).model.save(path)
    code, out, _ = run(capsys, "lint", str(path))
    lines = out.splitlines()
    assert code == 1 and lines[0].startswith("error: [unsigned] ")
    count = int(lines[0].split()[2])  # "error: [unsigned] N nodes: ..."
    assert count > 10 and sum("[unsigned]" in line for line in lines) == 1
    assert lines[1].startswith("    at ") and f"and {count - 3} more (--verbose lists all)" in lines[1]
    assert "against TensorRT's ONNX parser" in lines[-1]
    code, out, _ = run(capsys, "lint", str(path), "--verbose")
    assert out.count("[unsigned]") == count


def test_every_flag_has_help_and_a_default_and_every_command_an_example() -> None:
    import argparse

    from optcc.cli import make_parser

    parser = make_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"build", "validate", "passes", "plugins", "inspect",
                                     "bench", "lint", "schema"}
    for name, sub in {"optcc": parser, **commands.choices}.items():
        text = sub.format_help()
        assert "examples:\n  optcc " in text, f"optcc {name} --help has no example"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"optcc {name}: {action.dest} has no help"
            if action.option_strings and not isinstance(action, argparse._VersionAction):
                shown = sub._get_formatter()._get_help_string(action)
                if action.required:  # says so, and has no default to show
                    assert "default" not in shown and "required" in shown, action.option_strings
                    continue
                assert "default" in shown, f"optcc {name} {action.option_strings[0]}: no default"


def test_tolerance_override_on_a_lossy_pass_is_enforced_and_named(tmp_path: Path, capsys) -> None:
    from conftest import write_recipe

    recipe = write_recipe(tmp_path, (
        f"version: 1\nmodel: {DEMO_MODEL}\ntarget: {{runs: 1, rounds: 1, warmup: 0}}\n"
        "passes:\n  - prune-channels: {ratio: 0.25, tolerance: {atol: 0.001}}\noutput: out\n"
    ))
    code, _, err = run(capsys, "build", str(recipe), "--quiet")
    lines = err.splitlines()
    assert code == EXIT_USER_ERROR
    assert lines[0].startswith("error: pass #1 'prune-channels' (plugin 'pruning'): changed the "
                               "outputs by up to ")
    assert lines[0].endswith("the recipe's tolerance is atol=0.001, rtol=0")
    assert lines[1].startswith("hint: loosen or remove this pass's 'tolerance:' in the recipe")
