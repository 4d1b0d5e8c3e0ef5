"""The command line: every command on the demo, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_MODEL, REPO, write_recipe

from optcc.cli import EXIT_USER_ERROR, main

GOOD = (
    "version: 1\nmodel: {model}\ntarget: {{backend: onnxruntime, runs: 2, warmup: 0}}\n"
    "data:\n  evaluation: {{source: digits, split: test, batch_size: 256}}\n"
    "passes:\n  - fold-batchnorm\noutput: out\n"
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    code = (
        "import sys\nimport optcc\nfrom optcc.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'onnx') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "build" in out.stdout and "inspect" in out.stdout


def test_console_script_build_quiet(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, GOOD.format(model=DEMO_MODEL))
    exe = Path(sys.executable).with_name("optcc")
    out = subprocess.run([str(exe), "build", str(recipe), "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "out")
    assert out.stderr == ""


def test_build_prints_tables_and_progress(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, GOOD.format(model=DEMO_MODEL))
    code, out, err = run(capsys, "build", str(recipe))
    assert code == 0
    assert "fold-batchnorm" in out and "median ms" in out and "wrote " in out
    assert "evaluating original" in err and "measuring latency" in err


def test_build_json(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, GOOD.format(model=DEMO_MODEL))
    code, out, _ = run(capsys, "build", str(recipe), "--json", "-o", str(tmp_path / "elsewhere"))
    report = json.loads(out)
    assert code == 0 and report["status"] == "ok"
    assert (tmp_path / "elsewhere" / "model.onnx").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("recipe_text", "expected"),
    [
        ("version: 1\nmodel: missing.onnx\n", "missing.onnx: model file not found"),
        ("version: 1\nmodel: corrupt.onnx\n", "corrupt.onnx: not a valid ONNX model"),
        ("version: 1\nmodel: m.onnx\npases: []\n", "recipe.yaml:3:1: recipe: unknown key 'pases'"),
    ],
    ids=["missing-model", "corrupt-model", "recipe-typo"],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, capsys, recipe_text: str, expected: str) -> None:
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    recipe = write_recipe(tmp_path, recipe_text)
    code, out, err = run(capsys, "build", str(recipe))
    assert code == EXIT_USER_ERROR
    lines = [line for line in err.strip().splitlines() if not line.startswith("• ")]  # progress
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), err
    assert "Traceback" not in err and out == ""


def test_validate(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, GOOD.format(model=DEMO_MODEL))
    code, out, _ = run(capsys, "validate", str(recipe))
    assert code == 0 and out.strip() == f"{recipe}: ok — fold-batchnorm → onnxruntime"
    code, out, _ = run(capsys, "validate", str(recipe), "--json")
    assert json.loads(out)["passes"] == [{"name": "fold-batchnorm", "plugin": "lossless", "line": 7}]


def test_validate_error_has_hint(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-constnts\n")
    code, _, err = run(capsys, "validate", str(recipe))
    assert code == EXIT_USER_ERROR
    assert err.splitlines() == [
        f"error: {recipe}:4:5: unknown pass 'fold-constnts'",
        "hint: did you mean 'fold-constants'?",
    ]


def test_passes_lists_options_and_defaults(capsys) -> None:
    code, out, _ = run(capsys, "passes", "--json")
    passes = {p["name"]: p for p in json.loads(out)}
    assert code == 0 and {"fold-constants", "fold-batchnorm", "eliminate-dead-nodes"} <= set(passes)
    opts = {o["name"]: o for o in passes["fold-constants"]["options"]}
    assert opts["size_threshold_mib"]["default"] == 16.0
    assert passes["eliminate-dead-nodes"]["tolerance"] == "exact"
    code, out, _ = run(capsys, "passes", "fold-batchnorm")
    assert "fold-batchnorm" in out and "tolerance: atol=1e-05" in out
    code, _, err = run(capsys, "passes", "fold-batchnrm")
    assert code == EXIT_USER_ERROR and "did you mean 'fold-batchnorm'?" in err
    code, out, _ = run(capsys, "passes", "--data")
    assert "npy-folder" in out and "digits" in out


def test_plugins_lists_backends_with_reasons(capsys) -> None:
    code, out, _ = run(capsys, "plugins", "--json")
    data = json.loads(out)
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["onnxruntime"]["available"] is True
    if not backends["tensorrt"]["available"]:
        assert backends["tensorrt"]["reason"] and "optcc[tensorrt]" in backends["tensorrt"]["install_hint"]
    assert {p["name"] for p in data["plugins"]} >= {"lossless", "optcc.data.builtin"}


def test_inspect_demo(capsys) -> None:
    code, out, _ = run(capsys, "inspect", str(DEMO_MODEL), "--json")
    info = json.loads(out)
    assert code == 0
    assert info["op_histogram"]["Conv"] == 8 and info["op_histogram"]["BatchNormalization"] == 8
    assert info["params"] == 520_778
    # Per sample: stem 2*64*64*9, four 64-ch convs 2*64*64*576, down 2*128*16*576,
    # two 128-ch convs 2*128*16*1152, fc 2*10*128.
    assert info["flops"] == 73_728 + 4 * 4_718_592 + 2_359_296 + 2 * 4_718_592 + 2_560
    assert len(info["layers"]) == 9 and info["int8_coverage"] == 0.0
    code, out, _ = run(capsys, "inspect", str(DEMO_MODEL))
    assert "Conv" in out and "INT8 coverage: 0.0 %" in out


def test_inspect_flops_stay_per_sample_with_a_batch_shape(capsys) -> None:
    _, out, _ = run(capsys, "inspect", str(DEMO_MODEL), "--json", "--shape", "image=4,1,8,8")
    assert json.loads(out)["flops"] == 30_747_136


def test_bench_compares_models(tmp_path: Path, capsys) -> None:
    code, out, _ = run(capsys, "bench", str(DEMO_MODEL), "--compare", str(DEMO_MODEL),
                       "--batch-size", "4", "--runs", "3", "--warmup", "1", "--threads", "1", "--json")
    results = json.loads(out)
    assert code == 0 and len(results) == 2
    assert results[0]["batch_size"] == 4 and results[0]["threads"] == 1
    assert results[1]["speedup_vs_first"] > 0


def test_bench_unknown_backend(capsys) -> None:
    code, _, err = run(capsys, "bench", str(DEMO_MODEL), "--backend", "onnxruntim")
    assert code == EXIT_USER_ERROR and "did you mean 'onnxruntime'?" in err


def test_build_with_unavailable_tensorrt_fails_before_work(tmp_path: Path, capsys) -> None:
    from optcc.backends.tensorrt import TensorRTBackend

    if TensorRTBackend.is_available()[0]:
        pytest.skip("TensorRT is available here")
    # engine: required asks for the engine itself; the default (auto) lowers only.
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\n"
                          "target: {backend: tensorrt, engine: required}\n")
    code, _, err = run(capsys, "build", str(recipe))
    assert code == EXIT_USER_ERROR
    assert err.startswith("error: backend 'tensorrt' is not available: ")
    assert "optcc[tensorrt]" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.failed").exists()


def test_schema_command_matches_committed_schema(tmp_path: Path, capsys) -> None:
    target = tmp_path / "schema.json"
    code, out, _ = run(capsys, "schema", "--builtin", "-o", str(target))
    schema = json.loads(target.read_text())
    assert code == 0 and schema["title"] == "optcc recipe"
    assert "pass:zero-small-weights" not in schema["$defs"]  # the test plugin is not built in
    committed = REPO / "docs" / "recipe.schema.json"
    assert json.loads(committed.read_text()) == schema, (
        "docs/recipe.schema.json is stale: run 'optcc schema --builtin -o docs/recipe.schema.json'"
    )
    code, out, _ = run(capsys, "schema")
    assert "pass:zero-small-weights" in json.loads(out)["$defs"]  # installed plugins included


def test_no_command_prints_help(capsys) -> None:
    code, out, _ = run(capsys)
    assert code == EXIT_USER_ERROR and "usage: optcc" in out


def test_internal_bug_keeps_traceback_and_exit_70(tmp_path: Path, capsys) -> None:
    from optcc import hookimpl
    from optcc.backends import Backend
    from optcc.plugins import create_registry, set_registry

    class BuggyBackend(Backend):
        name = "buggy"

        def _compile_impl(self, model, out_dir):
            raise RuntimeError("an optcc bug")

    class P:
        @hookimpl
        def optcc_backends(self):
            return [BuggyBackend]

    set_registry(create_registry(extra_plugins=[("buggy", P())]))
    try:
        recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\ntarget: buggy\n")
        code, _, err = run(capsys, "build", str(recipe))
    finally:
        set_registry(None)
    assert code == 70
    assert "Traceback" in err and "RuntimeError: an optcc bug" in err and "bug in optcc" in err


def test_recipes_shipped_by_a_plugin_are_found_by_name(tmp_path: Path, capsys) -> None:
    from optcc import hookimpl
    from optcc.plugins import create_registry, set_registry

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    write_recipe(shipped, f"version: 1\nmodel: {DEMO_MODEL}\npasses: [fold-batchnorm]\n", name="vendor-recipe.yaml")

    class P:
        @hookimpl
        def optcc_recipe_dirs(self):
            return [shipped]

    set_registry(create_registry(extra_plugins=[("vendor", P())]))
    try:
        code, out, _ = run(capsys, "validate", "vendor-recipe")
    finally:
        set_registry(None)
    assert code == 0 and out.startswith(f"{shipped / 'vendor-recipe.yaml'}: ok")


def test_an_unexpected_exception_in_a_built_in_pass_is_reported_as_optccs_bug(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A built-in pass that crashes is optcc's bug (status 70, traceback kept, pass named);
    the same crash in a third-party plugin stays a one-line error naming that plugin
    (tests/test_pass_manager.py)."""
    from optcc_plugins.lossless import FoldConstantsPass

    def crash(self, model, ctx):
        raise ValueError("Too many bins for data range")

    monkeypatch.setattr(FoldConstantsPass, "run", crash)
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\npasses: [fold-constants]\n")
    code, _, err = run(capsys, "build", str(recipe), "-o", str(tmp_path / "out"))
    assert code == 70, err
    assert "Traceback" in err and "ValueError: Too many bins for data range" in err
    assert "error: pass #1 'fold-constants'" in err and "bug in optcc" in err
