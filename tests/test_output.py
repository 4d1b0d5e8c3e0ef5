"""The output folder's lifecycle (optcc.output): ownership, staging, the journaled swap,
repair after a crash at each step, stale-staging clean-up, the cache and the lock.

These tests drive the module directly with small folders; tests/test_faults.py does the
same through real builds, real processes and real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optcc.errors import BuildInterrupted, OutputError, ResourceError
from optcc.output import (
    MARKER,
    OWNER,
    FileLock,
    OutputFolder,
    abandoned,
    read_marker,
    refusal,
    remove_stale,
    repair,
    sibling,
    signals_deferred,
    swap_in,
    write_marker,
)


def make_build(folder: Path, text: str, kind: str = "output") -> Path:
    """A folder as optcc publishes it: files plus a marker listing them."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text(text)
    (folder / "passes").mkdir()
    (folder / "passes" / "calib.cache").write_text(text)
    write_marker(folder, kind)
    return folder


def publish(path: Path, text: str, **kwargs) -> OutputFolder:
    with OutputFolder(path, **kwargs) as folder:
        (folder.staging / "model.onnx").write_text(text)
        folder.publish()
    return folder


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------ ownership
def test_marker_lists_the_files_optcc_wrote(tmp_path: Path) -> None:
    out = make_build(tmp_path / "out", "a")
    marker = read_marker(out)
    assert marker["kind"] == "output" and marker["files"] == ["model.onnx", "passes/calib.cache"]
    assert refusal(out, "output") is None


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.write_text("x"), "is a file"),
        (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "was not made by optcc"),
        (lambda p: (p.mkdir(), (p / ".git").mkdir(), (p / ".git" / "HEAD").write_text("x")),
         "was not made by optcc"),
        (lambda p: (p.mkdir(), (p / "report.json").write_text("{}")), "an older optcc's build"),
        (lambda p: (make_build(p, "a"), (p / "notes.txt").write_text("mine")),
         "holds files optcc did not write: notes.txt"),
        (lambda p: (make_build(p, "a"), (p / "passes" / "extra.npz").write_text("mine")),
         "holds files optcc did not write: passes/extra.npz"),
        (lambda p: make_build(p, "a", kind="failed"), "is an optcc failed folder"),
    ],
    ids=["file", "user-folder", "git-clone", "older-optcc", "added-file", "added-nested", "wrong-kind"],
)
def test_what_is_not_optcc_s_is_refused_and_untouched(tmp_path: Path, setup, message: str) -> None:
    out = tmp_path / "out"
    setup(out)
    before = tree(tmp_path)
    assert message in refusal(out, "output")
    with pytest.raises(OutputError, match=message):
        publish(out, "new")
    assert tree(tmp_path) == before  # nothing created, moved or deleted


def test_a_link_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    target = make_build(tmp_path / "target", "theirs")
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="is a symbolic link"):
        publish(link, "new")
    assert link.is_symlink() and (target / "model.onnx").read_text() == "theirs"


def test_an_empty_folder_or_nothing_is_fine_and_optcc_s_own_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    publish(out, "one")
    assert (out / "model.onnx").read_text() == "one" and read_marker(out)["files"] == ["model.onnx"]
    publish(out, "two")
    assert (out / "model.onnx").read_text() == "two"
    assert siblings(out) == []  # no lock, staging, backup or empty cache left
    publish(tmp_path / "new" / "deeper" / "out", "three")
    assert (tmp_path / "new" / "deeper" / "out" / "model.onnx").read_text() == "three"


def test_folders_holding_inputs_or_the_working_folder_are_refused(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "out" / "calib.npz"
    data.parent.mkdir()
    data.write_text("user data")
    with pytest.raises(OutputError, match="contains the input .*calib.npz"):
        publish(tmp_path / "out", "x", inputs=[data])
    assert data.read_text() == "user data"
    monkeypatch.chdir(tmp_path / "out")
    assert any("current folder" in p for p in OutputFolder(tmp_path / "out").problems())
    assert any("current folder" in p for p in OutputFolder(tmp_path).problems())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert any("home folder" in p for p in OutputFolder(tmp_path / "home").problems())


def test_failed_and_cache_folders_of_the_user_are_refused(tmp_path: Path) -> None:
    (tmp_path / "out.failed").mkdir()
    (tmp_path / "out.failed" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="failed-build folder .*out.failed exists"):
        publish(tmp_path / "out", "x")
    (tmp_path / "out.failed" / "keep.txt").unlink()
    (tmp_path / "out.cache").mkdir()
    (tmp_path / "out.cache" / "weights.pt").write_text("mine")
    with pytest.raises(OutputError, match="cache folder .*out.cache exists"):
        publish(tmp_path / "out", "x")
    assert (tmp_path / "out.cache" / "weights.pt").read_text() == "mine"


def test_cache_is_marked_kept_while_it_holds_something_and_removed_when_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputFolder(out) as folder:
        assert read_marker(folder.cache)["kind"] == "cache"
        (folder.cache / "checkpoint.json").write_text("{}")
    assert (tmp_path / "out.cache" / "checkpoint.json").exists()  # interrupted work survives
    with OutputFolder(out) as folder:
        (folder.cache / "checkpoint.json").unlink()
        (folder.staging / "model.onnx").write_text("x")
        folder.publish()
    assert not (tmp_path / "out.cache").exists()


def test_failed_build_is_parked_and_replaces_only_an_earlier_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for attempt in ("first", "second"):
        with OutputFolder(out) as folder:
            (folder.staging / "error.txt").write_text(attempt)
            assert folder.park_failure({"status": "running"}, ValueError(attempt)) == folder.failed
    failed = tmp_path / "out.failed"
    assert (failed / "error.txt").read_text() == "second"
    assert json.loads((failed / "report.json").read_text())["error"]["message"] == "second"
    assert read_marker(failed)["kind"] == "failed"
    assert not out.exists() and siblings(out) == ["out.failed"]


def test_interrupt_message_says_where_the_output_stands(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(BuildInterrupted, match="out was not created"):
        with OutputFolder(out):
            raise KeyboardInterrupt
    publish(out, "old")
    with pytest.raises(BuildInterrupted, match="left as it was before the build"):
        with OutputFolder(out):
            raise KeyboardInterrupt
    with pytest.raises(BuildInterrupted, match="after it had published"):
        with OutputFolder(out) as folder:
            (folder.staging / "model.onnx").write_text("new")
            folder.publish()
            raise KeyboardInterrupt
    assert siblings(out) == []


def test_unused_parent_folders_are_removed_again(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with OutputFolder(tmp_path / "a" / "b" / "out"):
            raise RuntimeError("failed before publishing")
    assert list(tmp_path.iterdir()) == []


def test_long_names_are_refused_before_anything_is_created(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="bytes long"):
        publish(tmp_path / ("x" * 240), "x")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ the journal
def _interrupted_swap(tmp_path: Path, step: str) -> Path:
    """Leave the folders as a publish killed after ``step`` would: journal written, old
    build moved aside, or new build in place."""
    out = make_build(tmp_path / "out", "old")
    staging = make_build(sibling(out, "staging-4242"), "new")
    backup = sibling(out, "old-4242")
    journal = sibling(out, "journal")
    journal.write_text(json.dumps({"format": 1, "staging": staging.name, "backup": backup.name}))
    if step in ("moved", "swapped"):
        os.replace(out, backup)
    if step == "swapped":
        os.replace(staging, out)
    return out


@pytest.mark.parametrize(("step", "expected"), [("journal", "old"), ("moved", "old"), ("swapped", "new")])
def test_repair_after_a_crash_at_each_step(tmp_path: Path, step: str, expected: str) -> None:
    out = _interrupted_swap(tmp_path, step)
    assert repair(out)
    assert (out / "model.onnx").read_text() == expected
    assert siblings(out) == []
    assert repair(out) is None  # nothing left to do
    publish(out, "next")  # and the next build goes through normally
    assert (out / "model.onnx").read_text() == "next"


def test_opening_the_folder_repairs_before_anything_else(tmp_path: Path) -> None:
    out = _interrupted_swap(tmp_path, "moved")
    assert not out.exists()
    with OutputFolder(out):
        assert (out / "model.onnx").read_text() == "old"
    assert siblings(out) == []


def test_a_planted_journal_cannot_point_elsewhere(tmp_path: Path) -> None:
    out = make_build(tmp_path / "out", "old")
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "file").write_text("keep")
    sibling(out, "journal").write_text(json.dumps({"staging": "precious", "backup": "../x"}))
    with pytest.raises(OutputError, match="journal optcc cannot read"):
        repair(out)
    assert (victim / "file").read_text() == "keep" and (out / "model.onnx").read_text() == "old"


def test_swap_failure_is_undone(tmp_path: Path, monkeypatch) -> None:
    out = make_build(tmp_path / "out", "old")
    staging = make_build(sibling(out, "staging-1"), "new")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == staging:
            raise OSError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        swap_in(staging, out)
    monkeypatch.undo()
    assert (out / "model.onnx").read_text() == "old"
    assert siblings(out) == []


def test_signals_wait_for_the_swap(tmp_path: Path) -> None:
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)  # still running: the signal waits
    assert finished == [True]


# ------------------------------------------------------------------------ stale folders, locks
def test_staging_of_a_dead_build_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    out = make_build(tmp_path / "out", "old")
    dead = make_build(sibling(out, "staging-11"), "dead")
    (dead / OWNER).write_text("11")  # its lock died with its process
    live = make_build(sibling(out, "staging-12-r1"), "live")
    holder = FileLock(live / OWNER)
    assert holder.acquire()
    try:
        assert abandoned(dead) and not abandoned(live)
        leftover_backup = make_build(sibling(out, "old-13"), "backup")
        removed = remove_stale(out)
        assert sorted(p.name for p in removed) == sorted([dead.name, leftover_backup.name])
        assert live.exists() and (out / "model.onnx").read_text() == "old"
    finally:
        holder.release(remove=True)


def test_folders_of_older_optcc_versions_are_cleaned_or_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    partial = make_build(tmp_path / f".out.partial-{pid}", "partial")
    old = make_build(tmp_path / f".out.old-{pid}", "previous")  # its build died between renames
    remove_stale(out)
    assert not partial.exists() and not old.exists()
    assert (out / "model.onnx").read_text() == "previous"


def test_a_second_build_of_the_same_output_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputFolder(out):
        with pytest.raises(OutputError, match=f"another optcc build \\(process {os.getpid()}\\)"):
            with OutputFolder(out):
                pass
        assert sibling(out, "lock").exists()
    assert siblings(out) == []


def test_non_publishing_ranks_stage_privately_and_never_publish(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputFolder(out) as rank0, OutputFolder(out, publish=False, rank=1) as rank1:
        assert rank1.staging != rank0.staging and rank1.staging.name.endswith("-r1")
        (rank1.staging / "model.onnx").write_text("rank1")
        rank1.publish()  # discards
        (rank0.staging / "model.onnx").write_text("rank0")
        rank0.publish()
    assert (out / "model.onnx").read_text() == "rank0" and siblings(out) == []


# ------------------------------------------------------------------------ property
names = st.sampled_from(["model.onnx", "report.json", "a.txt", "sub/b.bin", "sub/c", ".git/HEAD"])


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.sets(names, max_size=5), listed=st.sets(names, max_size=5),
       marked=st.booleans())
def test_nothing_optcc_did_not_write_is_ever_lost(tmp_path_factory, files, listed, marked) -> None:
    """Whatever a folder holds, publishing over it either replaces only files its marker
    lists, or refuses and leaves every file as it was."""
    root = tmp_path_factory.mktemp("prop")
    out = root / "out"
    out.mkdir()
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    if marked:
        (out / MARKER).write_text(json.dumps({"kind": "output", "files": sorted(listed)}))
    before = tree(root)
    try:
        publish(out, "new")
    except OutputError:
        assert tree(root) == before
        assert files and (not marked or not files <= listed)
    else:
        assert not files or (marked and files <= listed)
        assert (out / "model.onnx").read_text() == "new"
        assert sorted(p.name for p in root.iterdir()) == ["out"]


def test_a_publish_of_the_failed_folder_cut_short_is_repaired_too(tmp_path: Path) -> None:
    """A crash while parking a failure (its staging folder is named after OUT, not after
    OUT.failed): the staging folder is not taken for stale before its journal is read."""
    out = tmp_path / "out"
    failed = make_build(tmp_path / "out.failed", "old failure", kind="failed")
    staging = make_build(sibling(out, "staging-4242"), "new failure", kind="failed")
    backup = sibling(failed, "old-4242")
    sibling(failed, "journal").write_text(json.dumps({"staging": staging.name, "backup": backup.name}))
    os.replace(failed, backup)
    with OutputFolder(out):
        assert (failed / "model.onnx").read_text() == "old failure"
    assert siblings(out) == ["out.failed"]
