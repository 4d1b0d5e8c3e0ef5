"""Fault injection: what careful and hostile users did to optcc, each a test.

Every case comes from an audit of about 240 bad inputs and faults: folders a build must
not delete, signals at every step of a build and of its publish (real processes, real
signals), kills and the repair that follows, files planted in the cache, NaN and
infinities, YAML bombs, environment errors, broken data. The rule each test holds optcc
to: one clear error (exit 2) naming the file, source or pass; no traceback; nothing lost
that optcc did not create; no code run from a cache; NaN never reported as success.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DEMO_MODEL, REPO, StopAtEpoch, tree, write_recipe
from onnx import TensorProto, helper

from optcc import hookimpl
from optcc.build import build
from optcc.cli import EXIT_USER_ERROR, main
from optcc.errors import PassError, VerificationError
from optcc.passes import Pass, PassResult, Tolerance
from optcc.passes.manager import output_difference
from optcc.plugins import create_registry

OPTCC = [sys.executable, "-m", "optcc.cli"]
QUICK = (
    "version: 1\nmodel: {model}\ntarget: {{backend: onnxruntime, threads: 1, runs: 2, warmup: 0}}\n"
    "passes:\n{passes}"
)


def quick(model: Path | str = DEMO_MODEL, passes: str = "  - fold-batchnorm\n", extra: str = "") -> str:
    return QUICK.format(model=model, passes=passes) + extra


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run optcc in this process; return its exit status and stderr, checked to be clean
    user-facing output (no traceback, every line an error, hint, warning or progress)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


def errors_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ============================================================== 1. folders a build must not delete
@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(DEMO_MODEL, tmp_path / "net.onnx")
    write_recipe(tmp_path, quick("net.onnx"))
    return tmp_path


def _docs(ws: Path) -> list[str]:
    (ws / "docs").mkdir()
    (ws / "docs" / "a.txt").write_text("x")
    return ["-o", str(ws / "docs")]


def _recipe_output_outside(ws: Path) -> list[str]:
    (ws / "mydocs").mkdir()
    (ws / "mydocs" / "thesis.tex").write_text("x")
    (ws / "sub").mkdir()
    write_recipe(ws / "sub", quick("../net.onnx", extra="output: ../mydocs\n"))
    return []


def _dot(ws: Path) -> list[str]:
    os.chdir(ws)
    return ["-o", "."]


def _empty(ws: Path) -> list[str]:
    os.chdir(ws)
    return ["-o", ""]


def _home(ws: Path) -> list[str]:
    (ws / "home").mkdir()
    (ws / "home" / ".bashrc").write_text("x")
    os.environ["HOME"] = str(ws / "home")
    return ["-o", "~"]


def _link(ws: Path) -> list[str]:
    (ws / "target").mkdir()
    (ws / "target" / "k.txt").write_text("keep")
    (ws / "link").symlink_to(ws / "target")
    return ["-o", str(ws / "link")]


def _git_clone(ws: Path) -> list[str]:
    (ws / "repo" / ".git" / "objects").mkdir(parents=True)
    (ws / "repo" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (ws / "repo" / "src.py").write_text("print(1)\n")
    return ["-o", str(ws / "repo")]


def _npz_inside(ws: Path) -> list[str]:
    (ws / "out").mkdir()
    np.savez(ws / "out" / "calib.npz", image=np.zeros((4, 1, 8, 8), np.float32))
    write_recipe(ws, quick("net.onnx", extra=(
        "data:\n  calibration: {source: npz, path: out/calib.npz}\noutput: out\n")))
    return []


def _dotdot_recipe(ws: Path) -> list[str]:
    (ws / "out" / "other").mkdir(parents=True)
    (ws / "out" / "other" / "model.onnx").write_text("another build")
    (ws / "recipe.yaml").rename(ws / "..yaml")
    return []


def _user_failed_folder(ws: Path) -> list[str]:
    (ws / "out.failed").mkdir()
    (ws / "out.failed" / "notes.md").write_text("mine")
    return ["-o", str(ws / "out")]


def _file(ws: Path) -> list[str]:
    (ws / "some_file.txt").write_text("hi")
    return ["-o", str(ws / "some_file.txt")]


def _marked_with_user_file(ws: Path) -> list[str]:
    assert main(["build", str(ws / "recipe.yaml"), "-q", "-o", str(ws / "out")]) == 0
    (ws / "out" / "my-notes.txt").write_text("added by the user")
    return ["-o", str(ws / "out")]


FOLDER_CASES = {
    "docs": (_docs, "docs exists, is not empty"),
    "recipe-output-outside": (_recipe_output_outside, "mydocs exists, is not empty"),
    "dot": (_dot, "current folder"),
    "empty-string": (_empty, "empty string"),
    "home": (_home, "home folder"),
    "symlink": (_link, "symbolic link"),
    "git-clone": (_git_clone, "not made by optcc"),
    "npz-in-output": (_npz_inside, "contains the input .*calib.npz"),
    "dotdot-recipe": (_dotdot_recipe, "cannot name an output folder after the recipe file '..yaml'"),
    "user-failed-folder": (_user_failed_folder, "out.failed exists"),
    "file": (_file, "is a file"),
    "user-file-in-build": (_marked_with_user_file, "did not write: my-notes.txt"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_build_never_deletes_what_optcc_did_not_make(
    workspace: Path, case: str, capsys, monkeypatch
) -> None:
    import re

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HOME", os.environ.get("HOME", "/"))
    setup, expected = FOLDER_CASES[case]
    args = setup(workspace)
    capsys.readouterr()
    recipes = sorted(workspace.rglob("*.yaml"))
    recipe = next(r for r in recipes if r.parent.name == "sub") if case == "recipe-output-outside" else recipes[0]
    before = tree(workspace)
    code, err = cli(capsys, "build", str(recipe), *args)
    assert code == EXIT_USER_ERROR
    assert re.search(expected, errors_of(err)[0]), err
    assert tree(workspace) == before  # nothing deleted, moved or created
    code, err = cli(capsys, "validate", str(recipe), *args)  # validate says the same
    assert code == EXIT_USER_ERROR and re.search(expected, err), err


def test_rebuilding_replaces_optcc_s_own_output(workspace: Path, capsys) -> None:
    recipe = workspace / "recipe.yaml"
    for _ in range(2):
        code, _ = cli(capsys, "build", str(recipe), "-q", "-o", str(workspace / "out"))
        assert code == 0
    assert sorted(p.name for p in workspace.iterdir()) == ["net.onnx", "out", "recipe.yaml"]


# ============================================================== 2. signals and kills, real processes
@pytest.fixture(scope="module")
def previous_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose 'out' holds an earlier build (one pass); the recipe now has two."""
    ws = tmp_path_factory.mktemp("signals")
    shutil.copy(DEMO_MODEL, ws / "net.onnx")
    build(write_recipe(ws, quick("net.onnx", extra="output: out\n")))
    write_recipe(ws, quick("net.onnx", "  - fold-batchnorm\n  - eliminate-dead-nodes\n",
                           "output: out\n"))
    return ws


def passes_in(out: Path) -> int:
    return len(json.loads((out / "report.json").read_text())["passes"])


def run_until(ws: Path, point: str, sig: int, *, pause: float = 2.0) -> tuple[int, str]:
    """Start a build, wait until it reaches ``point``, send ``sig``; exit status and stderr."""
    reached = ws / f"reached-{point.replace(':', '-')}-{sig}"
    env = {**os.environ, "OPTCC_TEST_PAUSE": point, "OPTCC_TEST_PAUSE_FILE": str(reached),
           "OPTCC_TEST_PAUSE_SECONDS": str(pause if sig != signal.SIGKILL else 60)}
    proc = subprocess.Popen([*OPTCC, "build", str(ws / "recipe.yaml"), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (reached.exists() and point in reached.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never reached " + point
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    reached.unlink()
    return proc.returncode, err


def hidden_siblings(ws: Path) -> list[str]:
    return sorted(p.name for p in ws.iterdir() if p.name.startswith(".out"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "name", "published"),
    [
        ("build:prepared", "SIGINT", False),
        ("build:compiled", "SIGTERM", False),
        ("publish:journal", "SIGTERM", True),
        ("publish:moved", "SIGINT", True),
        ("publish:swapped", "SIGTERM", True),
    ],
)
def test_ctrl_c_and_sigterm_leave_one_complete_build(
    previous_build: Path, tmp_path: Path, point: str, name: str, published: bool
) -> None:
    sig = getattr(signal, name)
    ws = tmp_path / "ws"
    shutil.copytree(previous_build, ws, symlinks=True)
    code, err = run_until(ws, point, sig)
    assert code == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err
    if published:  # the swap had begun: it finished first, then the signal was honoured
        assert "interrupted after it had published" in err
        assert passes_in(ws / "out") == 2
    else:
        assert "was left as it was before the build" in err
        assert passes_in(ws / "out") == 1
    assert hidden_siblings(ws) == []  # no staging, backup, journal or lock left


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "after_repair"),
    [("build:prepared", 1), ("publish:journal", 1), ("publish:moved", 1), ("publish:swapped", 2)],
)
def test_a_killed_build_is_repaired_by_the_next_command(
    previous_build: Path, tmp_path: Path, point: str, after_repair: int
) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(previous_build, ws, symlinks=True)
    code, _ = run_until(ws, point, signal.SIGKILL)
    assert code == -signal.SIGKILL
    if point == "publish:moved":  # the window the journal exists for
        assert not (ws / "out").exists()
    assert hidden_siblings(ws)  # what the dead build left
    # The next build of that output repairs first; this one then fails on its data.
    write_recipe(ws, quick("net.onnx", extra=(
        "data:\n  calibration: {source: npz, path: missing.npz}\noutput: out\n")), name="next.yaml")
    proc = subprocess.run([*OPTCC, "build", str(ws / "next.yaml")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR and "missing.npz not found" in proc.stderr
    assert passes_in(ws / "out") == after_repair
    assert hidden_siblings(ws) == []


# ============================================================== 3. resume in a new process
DISTILL_RECIPE = quick(
    "net.onnx", "  - prune-channels: {ratio: 0.5}\n  - distill: {epochs: 3}\n",
    "data:\n  training: {source: digits, split: train, batch_size: 64, limit: 128}\noutput: out\n")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("reference")
    shutil.copy(DEMO_MODEL, folder / "net.onnx")
    result = build(write_recipe(folder, DISTILL_RECIPE))
    return result.report, result.artifact


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGKILL"])
def test_distillation_resumes_in_a_fresh_process(tmp_path: Path, uninterrupted, name: str) -> None:
    """Interrupt `distill` in one process, resume it in another (each with its own string
    hashing seed), and get the same weights as an uninterrupted build."""
    sig = getattr(signal, name)
    reference, reference_model = uninterrupted
    shutil.copy(DEMO_MODEL, tmp_path / "net.onnx")
    recipe = write_recipe(tmp_path, DISTILL_RECIPE)
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    proc = subprocess.Popen([*OPTCC, "build", str(recipe), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "out.cache").glob("distill-*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    assert not (tmp_path / "out").exists()
    env["PYTHONHASHSEED"] = "2"
    done = subprocess.run([*OPTCC, "build", str(recipe), "--json"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ignoring checkpoint" not in done.stderr
    stats = json.loads(done.stdout)["passes"][1]["stats"]
    assert 1 <= stats["resumed_from_epoch"] < 3
    assert stats["loss_per_epoch"] == reference["passes"][1]["stats"]["loss_per_epoch"]
    resumed = onnx.load(tmp_path / "out" / "model.onnx").graph.initializer
    expected = {t.name: t.raw_data for t in onnx.load(reference_model).graph.initializer}
    assert {t.name: t.raw_data for t in resumed} == expected  # bit for bit
    assert not (tmp_path / "out.cache").exists()


# ============================================================== 4. nothing runs from the cache
class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, proof: str) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


@pytest.fixture(scope="module")
def distill_setup(tmp_path_factory: pytest.TempPathFactory):
    """A pruned student, its teacher, a small data stream, options, and the checkpoint an
    interrupted first epoch left (record and weights, as bytes)."""
    pytest.importorskip("torch")
    from optcc_plugins.distillation import DistillOptions, train_distill
    from optcc_plugins.pruning import StructuredPruningPass

    from optcc.data.builtin import DigitsOptions, DigitsSource
    from optcc.ir import Model
    from optcc.runtime import OrtRunner

    teacher = Model.load(DEMO_MODEL)
    student = StructuredPruningPass(ratio=0.5)(teacher.copy()).model
    source = DigitsSource(DigitsOptions(split="train", limit=64, batch_size=32),
                          inputs=OrtRunner(teacher).input_specs)
    options = DistillOptions(epochs=2)
    record = tmp_path_factory.mktemp("checkpoint") / "ckpt.json"
    with pytest.raises(KeyboardInterrupt):
        train_distill(student, teacher, source.batches, options, progress=StopAtEpoch(2),
                      checkpoint=record)
    weights = record.with_name(json.loads(record.read_text())["file"])
    return student, teacher, source.batches, options, record.read_bytes(), weights.name, weights.read_bytes()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("attack", ["pickle-with-its-hash", "pickle-without-hash", "other-model",
                                    "truncated", "record-points-elsewhere"])
def test_a_planted_checkpoint_is_reported_and_ignored_never_run(
    distill_setup, tmp_path: Path, attack: str, caplog
) -> None:
    import torch
    from optcc_plugins.distillation import train_distill

    student, teacher, data, options, record_bytes, weights_name, weights_bytes = distill_setup
    record, weights = tmp_path / "ckpt.json", tmp_path / weights_name
    record.write_bytes(record_bytes)
    weights.write_bytes(weights_bytes)
    proof = tmp_path / "pwned"
    entry = json.loads(record.read_text())
    if attack.startswith("pickle"):
        weights.write_bytes(pickle.dumps({"epoch": 1, "model": _Payload(str(proof))}))
    elif attack == "other-model":
        torch.save({"epoch": 1, "history": [1.0], "model": {"w": torch.zeros(3)}, "optimizer": {},
                    "scheduler": {}, "torch_rng": torch.get_rng_state()}, weights)
    elif attack == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        entry["file"] = "../../etc/passwd"
    if attack in ("pickle-with-its-hash", "other-model", "truncated"):
        entry["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    record.write_text(json.dumps(entry))
    with caplog.at_level("WARNING"):
        _, stats = train_distill(student, teacher, data, options, checkpoint=record)
    assert not proof.exists(), "a pickle from the cache ran"
    assert stats["resumed_from_epoch"] == 0 and len(stats["loss_per_epoch"]) == 2
    warnings = [r.getMessage() for r in caplog.records if "ignoring checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]


# ============================================================== 5. NaN and infinities
def test_output_difference_sees_nan_and_infinities() -> None:
    a = np.array([1.0, 2.0], np.float32)
    assert output_difference([np.array([1.0, np.nan], np.float32)], [a])[0] == float("inf")
    assert output_difference([np.array([np.nan, 2.0], np.float32)], [a])[0] == float("inf")
    assert output_difference([np.array([1.0, np.inf], np.float32)], [a])[0] == float("inf")
    # A non-finite value the reference shares is not a change; the scale ignores it.
    ref = np.array([-np.inf, 3.0], np.float32)
    assert output_difference([np.array([-np.inf, 3.5], np.float32)], [ref]) == (0.5, 3.0)
    assert output_difference([np.array([np.inf, 3.0], np.float32)], [ref])[0] == float("inf")


class _Poison(Pass):
    """Writes NaN (or inf) into the classifier weight."""

    name = "poison"
    tolerance = Tolerance.lossy()
    value = float("nan")

    def run(self, model, ctx):
        for node, weight, _ in model.weighted_layers():
            if node.op == "Gemm":
                weight.values = np.full_like(np.asarray(weight.values), self.value)
        return PassResult(model, True)


class _PoisonLossless(_Poison):
    """Claims to be lossless; its huge weight overflows the outputs to +inf."""

    name = "poison-lossless"
    tolerance = Tolerance.float_rounding()
    value = 1e38


class _PoisonPlugin:
    @hookimpl
    def optcc_passes(self):
        return [_Poison, _PoisonLossless]


@pytest.mark.parametrize("pass_name", ["poison", "poison-lossless"])
def test_a_pass_that_makes_nan_or_inf_fails_by_name(tmp_path: Path, pass_name: str) -> None:
    registry = create_registry(extra_plugins=[("poison-plugin", _PoisonPlugin())])
    recipe = write_recipe(tmp_path, quick(passes=f"  - fold-batchnorm\n  - {pass_name}\n",
                                          extra="output: out\n"))
    with pytest.raises(VerificationError) as info:
        build(recipe, registry=registry)
    message = str(info.value)
    assert message.startswith(f"pass #2 '{pass_name}' (plugin 'poison-plugin'): output 'logits' has ")
    assert ("NaN" if pass_name == "poison" else "infinite") in message
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.failed" / "report.json").read_text())
    assert report["status"] == "failed" and [p["name"] for p in report["passes"]] == ["fold-batchnorm"]


@pytest.mark.parametrize("option", ["learning_rate: .inf", "temperature: .inf", "temperature: .nan",
                                    "kd_weight: -.inf"])
def test_non_finite_options_are_refused(tmp_path: Path, capsys, option: str) -> None:
    recipe = write_recipe(tmp_path, quick(passes=f"  - distill: {{{option}}}\n", extra=(
        "data:\n  training: {source: digits}\n")))
    code, err = cli(capsys, "validate", str(recipe))
    assert code == EXIT_USER_ERROR
    [error] = errors_of(err)
    assert error.startswith(f"error: {recipe}:5:")
    assert error.endswith(f"pass 'distill': passes.0.distill.{option.split(':')[0]}: Input should be a "
                          "finite number")


def test_training_stops_on_a_non_finite_loss(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    recipe = write_recipe(tmp_path, quick(
        passes="  - distill: {epochs: 1, learning_rate: 1.0e+30, schedule: constant}\n",
        extra="data:\n  training: {source: digits, split: train, limit: 256}\noutput: out\n"))
    with pytest.raises(PassError, match=r"pass #1 'distill' \(plugin 'distillation'\): the training "
                       r"loss became (nan|inf) in epoch 1, step \d+") as info:
        build(recipe)
    assert "lower learning_rate (now 1e+30)" in info.value.hint
    assert not (tmp_path / "out").exists()


# ============================================================== 6. hostile YAML
BILLION_LAUGHS = "\n".join(
    ["version: 1", "a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
       f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
       for i in range(8)]
    + ["model: x.onnx", "name: *i"]
) + "\n"


def test_an_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    for command in ("validate", "build"):
        code = limit + f"from optcc.cli import main; raise SystemExit(main(['{command}', '{recipe}']))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
        assert "the recipe expands to more than 100,000 values" in proc.stderr
        assert "YAML aliases" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"version: 1\nmodel: net\x00.onnx\n", ":2:11: a NUL byte in the recipe"),
        (b'version: 1\nmodel: "net\\0.onnx"\n', ":2:8: a NUL character (\\0) in a value"),
        (b"version: 1\nname: " + b"[" * 10_000 + b"]" * 10_000 + b"\n",
         ":2:70: the recipe nests deeper than 64 levels"),
        (b"version: 1\nmodel: x.onnx\nname: &a [*a]\n", "the recipe nests deeper than 64 levels"),
        (b"version: 1\nmodel: x.onnx\nname: &a {k: *a}\n", "the recipe nests deeper than 64 levels"),
        (b"version: 1\nmodel: x\x07.onnx\n", ":2:9: the character U+0007 in the recipe"),
        (b"\xff\xfeversion: 1\n", "recipe is not UTF-8 text"),
        (b"version: 1\nmodel: !!python/object/apply:os.system [echo]\n",
         ":2:8: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
        (b"version: 1\nmodel: !!python/name:os.system ''\n", "invalid YAML: could not determine a constructor"),
    ],
    ids=["nul-byte", "nul-escape", "deep-nesting", "recursive-list", "recursive-map",
         "control-char", "not-utf8", "python-apply-tag", "python-name-tag"],
)
def test_hostile_recipe_text_is_one_located_error(tmp_path: Path, capsys, text: bytes, expected: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    for command in ("validate", "build"):
        code, err = cli(capsys, command, str(recipe))
        assert code == EXIT_USER_ERROR
        assert expected in errors_of(err)[0], err


# ============================================================== 7. validate = what a build checks
@pytest.fixture
def torch_file(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text("def make():\n    raise SystemExit('user code must not run')\n")
    return tmp_path


VALIDATE_CASES = {
    "missing-model": ("version: 1\nmodel: missing.onnx\n", ":2:8: ", "missing.onnx: model file not found"),
    "missing-torch-file": ("version: 1\nmodel: {torch: 'gone.py:make', inputs: [{name: x, shape: [b, 3]}]}\n",
                           ":2:8: ", "file .*gone.py not found"),
    "missing-npz": ("version: 1\nmodel: {m}\ndata:\n  calibration: {{source: npz, path: nope.npz}}\n",
                    ":4:16: ", "nope.npz not found"),
    # Without TensorRT a tensorrt target lowers (ONNX + build scripts); only a recipe that
    # requires the engine is refused.
    "tensorrt-unavailable": ("version: 1\nmodel: {m}\ntarget: {{backend: tensorrt, engine: required}}\n",
                             ":3:9: ", "backend 'tensorrt' is not available"),
    "override-1.5": ("version: 1\nmodel: {m}\npasses:\n  - prune-channels: {{overrides: {{'*': 1.5}}}}\n",
                     ":4:39: ", "Input should be less than 1"),
    "override-negative": ("version: 1\nmodel: {m}\npasses:\n  - prune-channels: {{overrides: {{'*': -1}}}}\n",
                          ":4:39: ", "greater than or equal to 0"),
    "override-nan": ("version: 1\nmodel: {m}\npasses:\n  - prune-channels: {{overrides: {{'*': .nan}}}}\n",
                     ":4:39: ", "finite number"),
    "unknown-teacher": ("version: 1\nmodel: {m}\ndata: {{training: {{source: digits}}}}\npasses:\n"
                        "  - distill: {{teacher: prune}}\n", ":5:14: ", "teacher 'prune' is neither"),
    "version-true": ("version: true\nmodel: {m}\n", ":1:10: ", "unsupported recipe version True"),
    "runs-huge": ("version: 1\nmodel: {m}\ntarget: {{runs: 1000000000000}}\n", ":3:16: ",
                  "less than or equal to 100000"),
    "seed-negative": ("version: 1\nmodel: {m}\nseed: -1\n", ":3:7: ", "greater than or equal to 0"),
    "npz-maps-unknown-input": ("version: 1\nmodel: {m}\ndata:\n  calibration: {{source: npz, path: c.npz, "
                               "inputs: {{pixels: image}}}}\n", ":4:16: ", "'inputs' maps 'pixels', which the "
                               "model does not have; its inputs are image"),
    "long-model-path": ("version: 1\nmodel: " + "m" * 300 + ".onnx\n", ":2:8: ", "file name too long"),
    "verification-role-missing": ("version: 1\nmodel: {m}\nverification: {{source: training}}\n",
                                  ":3:15: ", "verification.source is 'training'"),
    "callable-missing": ("version: 1\nmodel: {m}\ndata:\n  calibration: {{source: callable, "
                         "function: 'nope.py:load'}}\n", ":4:16: ", "nope.py not found"),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_finds_what_the_build_would_fail_on(torch_file: Path, capsys, case: str) -> None:
    import re

    text, where, expected = VALIDATE_CASES[case]
    np.savez(torch_file / "c.npz", image=np.zeros((4, 1, 8, 8), np.float32))
    recipe = write_recipe(torch_file, text.replace("{m}", str(DEMO_MODEL)).replace("{{", "{").replace("}}", "}"))
    code, err = cli(capsys, "validate", str(recipe))
    assert code == EXIT_USER_ERROR
    assert errors_of(err)[0].startswith(f"error: {recipe}{where}"), err
    assert re.search(expected, errors_of(err)[0]), err
    code, err = cli(capsys, "build", str(recipe), "-o", str(torch_file / "out"))
    assert code == EXIT_USER_ERROR  # and the build indeed refuses it
    assert not (torch_file / "out").exists()


def test_validate_reports_every_error_at_once_in_file_order(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, (
        "version: 1\n"
        "model: missing.onnx\n"
        "target: {backend: onnxruntime, runs: 0}\n"
        "data:\n"
        "  calibration: {source: npz, path: nope.npz, batch_size: 0}\n"
        "passes:\n"
        "  - fold-constnts\n"
        "  - distill: {teacher: nobody, learning_rate: .inf}\n"
        "seed: -3\n"
    ))
    code, err = cli(capsys, "validate", str(recipe))
    lines = [e.split(": ", 2)[1] for e in errors_of(err)]
    assert code == EXIT_USER_ERROR
    assert [int(where.split(":")[1]) for where in lines] == [2, 3, 5, 7, 8, 9], err
    code, out = main(["validate", str(recipe), "--json"]), capsys.readouterr().out
    report = json.loads(out)
    assert code == EXIT_USER_ERROR and report["valid"] is False
    assert [e["line"] for e in report["errors"]] == [2, 3, 5, 7, 8, 9]


# ============================================================== 8. environment errors
def _fail_under(prefix: Path, error: int, monkeypatch, function: str = "mkdir") -> None:
    real = getattr(os, function)

    def failing(path, *args, **kwargs):
        if str(path).startswith(str(prefix)):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, function, failing)


@pytest.mark.parametrize(("error", "expected"), [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                                 (errno.ENOSPC, "no space left")])
def test_an_unwritable_output_disk_is_a_clear_error(tmp_path: Path, capsys, monkeypatch, error: int, expected: str) -> None:
    recipe = write_recipe(tmp_path, quick())
    _fail_under(tmp_path / "disk", error, monkeypatch)
    code, err = cli(capsys, "build", str(recipe), "-o", str(tmp_path / "disk" / "out"))
    assert code == EXIT_USER_ERROR
    assert expected in errors_of(err)[0] and str(tmp_path / "disk") in errors_of(err)[0]
    assert err.count("hint: ") == 1


def test_a_disk_that_fills_up_keeps_the_previous_build(tmp_path: Path, capsys, monkeypatch) -> None:
    recipe = write_recipe(tmp_path, quick(extra="output: out\n"))
    assert main(["build", str(recipe), "-q"]) == 0
    previous = tree(tmp_path / "out")

    def full(report, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "report.json"))

    monkeypatch.setattr("optcc.report.write_reports", full)
    code, err = cli(capsys, "build", str(recipe))
    assert code == EXIT_USER_ERROR
    assert "no space left on the device" in errors_of(err)[0] and "report.json" in errors_of(err)[0]
    assert tree(tmp_path / "out") == previous
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_folder_really_refuses(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    recipe = write_recipe(tmp_path, quick())
    locked.chmod(0o500)
    try:
        code, err = cli(capsys, "build", str(recipe), "-o", str(locked / "out"))
    finally:
        locked.chmod(0o700)
    assert code == EXIT_USER_ERROR and "permission denied" in err


def test_a_long_output_name_is_refused(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, quick())
    code, err = cli(capsys, "build", str(recipe), "-o", str(tmp_path / ("o" * 250)))
    assert code == EXIT_USER_ERROR and "bytes long" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# ============================================================== 9. models and data that break things
def _model_file(folder: Path, inputs: list, name: str) -> Path:
    const = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    nodes = [const] if not inputs else [helper.make_node("Relu", ["x"], ["y"])]
    outputs = [helper.make_tensor_value_info("c" if not inputs else "y", TensorProto.FLOAT, ["n"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    path = folder / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_model_without_inputs(tmp_path: Path, capsys) -> None:
    model = _model_file(tmp_path, [], "noinputs.onnx")
    recipe = write_recipe(tmp_path, quick(model, "  - eliminate-dead-nodes\n"))
    for command in ("validate", "build"):
        code, err = cli(capsys, command, str(recipe))
        assert code == EXIT_USER_ERROR and "the model has no inputs" in err


def test_a_huge_declared_input_is_refused_before_allocating(tmp_path: Path, capsys) -> None:
    huge = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 100000, 100000])]
    recipe = write_recipe(tmp_path, quick(_model_file(tmp_path, huge, "huge.onnx"), "  - eliminate-dead-nodes\n"))
    for command in ("validate", "build"):
        code, err = cli(capsys, command, str(recipe))
        assert code == EXIT_USER_ERROR
        assert "random inputs of shape x[8, 1, 100000, 100000] would need" in err
        assert "TiB" in err or "GiB" in err


def test_corrupt_metadata_is_ignored_with_a_warning(tmp_path: Path, capsys, caplog) -> None:
    import base64

    proto = onnx.load(DEMO_MODEL)
    bomb = {"format": 1, "history": [], "nodes": {}, "tensors": {"w": {"mask": {
        "__ndarray__": "bits", "shape": [100000, 100000, 100], "data": base64.b64encode(b"\xff" * 150).decode()}}}}
    proto.metadata_props.add(key="optcc.meta", value=json.dumps(bomb))
    onnx.save(proto, tmp_path / "bomb.onnx")
    with caplog.at_level("WARNING"):
        code, _ = cli(capsys, "inspect", str(tmp_path / "bomb.onnx"))
    [warning] = [r.getMessage() for r in caplog.records if "optcc metadata" in r.getMessage()]
    assert code == 0 and "ignoring unreadable optcc metadata" in warning
    assert "needs 125000000000 bytes, the file holds 150" in warning


BAD_DATA = {
    "npz-object-array": (lambda d: np.savez(d / "c.npz", image=np.array([object()] * 4, dtype=object)),
                         "{source: npz, path: c.npz}", "cannot read .*c.npz: Object arrays cannot be loaded"),
    "labels-0d": (lambda d: np.savez(d / "c.npz", image=np.zeros((4, 1, 8, 8), np.float32), labels=np.int64(3)),
                  "{source: npz, path: c.npz}", "labels is a single value"),
    "labels-2d": (lambda d: np.savez(d / "c.npz", image=np.zeros((4, 1, 8, 8), np.float32),
                                     labels=np.zeros((4, 10))), "{source: npz, path: c.npz}",
                  r"labels must hold one class id per sample \(shape \[N\]\), got shape \[4, 10\]"),
    "garbage-npy": (lambda d: ((d / "val").mkdir(), (d / "val" / "image.npy").write_bytes(b"garbage" * 20)),
                    "{source: npy-folder, path: val}", "cannot read .*image.npy: "),
    "not-an-npz": (lambda d: (d / "c.npz").write_bytes(b"PK\x03\x04 broken"), "{source: npz, path: c.npz}",
                   "cannot read .*c.npz"),
    "returns-none": (lambda d: (d / "load.py").write_text("def load():\n    return None\n"),
                     "{source: callable, function: 'load.py:load'}", "the function returned NoneType"),
    "returns-int": (lambda d: (d / "load.py").write_text("def load():\n    return 7\n"),
                    "{source: callable, function: 'load.py:load'}", "the function returned int"),
    "raises-at-start": (lambda d: (d / "load.py").write_text(
        "def load():\n    raise RuntimeError('database offline')\n    yield\n"),
        "{source: callable, function: 'load.py:load'}", "RuntimeError: database offline"),
    "raises-mid-stream": (lambda d: (d / "load.py").write_text(
        "import numpy as np\ndef load():\n    yield {'image': np.zeros((64, 1, 8, 8), np.float32)}\n"
        "    raise OSError('connection reset')\n"),
        "{source: callable, function: 'load.py:load', batch_size: 32}", "OSError: connection reset|connection reset"),
    "ragged-lists": (lambda d: (d / "load.py").write_text(
        "def load():\n    return {'image': [[[[0.0] * 8] * 8], [[[0.0] * 7] * 8]]}\n"),
        "{source: callable, function: 'load.py:load'}", "input 'image' is not a rectangular array"),
    "nan-inputs": (lambda d: np.savez(d / "c.npz", image=np.full((4, 1, 8, 8), np.nan, np.float32)),
                   "{source: npz, path: c.npz}", "input 'image' contains NaN values"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_broken_data_is_one_error_naming_the_source(tmp_path: Path, capsys, case: str) -> None:
    import re

    make, entry, expected = BAD_DATA[case]
    make(tmp_path)
    recipe = write_recipe(tmp_path, quick(extra=f"data:\n  evaluation: {entry}\noutput: out\n"))
    code, err = cli(capsys, "build", str(recipe))
    assert code == EXIT_USER_ERROR
    first = errors_of(err)[0]
    assert first.startswith("error: data 'evaluation' ("), err
    assert re.search(expected, first), first
    assert not (tmp_path / "out").exists()
    if "callable" not in entry:  # validate reads the same data (it never runs user code)
        code, err = cli(capsys, "validate", str(recipe))
        assert code == EXIT_USER_ERROR and re.search(expected, err), err


def test_the_readme_says_what_runs_user_code() -> None:
    readme = (REPO / "README.md").read_text()
    assert "`callable` data sources and torch model factories run your code" in readme
    assert "## Output folders" in readme


# ============================================================== 10. torchrun ranks and the finished hook
class _Finished:
    def __init__(self) -> None:
        self.calls: list[Path] = []

    @hookimpl
    def optcc_build_finished(self, report, output_dir):
        self.calls.append(output_dir)
        (output_dir / "uploaded.txt").write_text("receipt")  # a file the hook adds


def test_build_finished_fires_once_on_the_publishing_rank_only(tmp_path: Path, monkeypatch) -> None:
    plugin = _Finished()
    registry = create_registry(extra_plugins=[("finished", plugin)])
    recipe = write_recipe(tmp_path, quick(extra="output: out\n"))
    monkeypatch.setenv("RANK", "1")
    build(recipe, registry=registry)
    assert plugin.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    monkeypatch.setenv("RANK", "0")
    for _ in range(2):  # what the hook wrote belongs to the build: the next one replaces it
        build(recipe, registry=registry)
    assert plugin.calls == [tmp_path / "out"] * 2
    assert (tmp_path / "out" / "uploaded.txt").read_text() == "receipt"
