"""The output folder's life: who owns it, where a build is written, and how it is swapped in.

Rules (the README's "Output folders" section says the same to users):

- **Ownership.** optcc replaces only a folder that an optcc build made. Every folder it
  publishes holds a marker file (``.optcc-output``) that lists the files optcc wrote. A
  path that is a file or a symbolic link, a non-empty folder without the marker, a marked
  folder holding files the marker does not list, or a folder that contains any input of the
  build (the recipe, the model, a data file, user code) is refused before any work starts.
  ``OUT.failed/`` (a failed build's report and reproducer) and ``OUT.cache/`` (checkpoints a
  re-run resumes from) follow the same rule; the cache is never deleted as a whole.
- **Staging.** A build writes into ``.OUT.optcc-staging-PID`` beside the output, so the
  final rename stays on one file system. The staging folder holds ``.optcc-owner``, a file
  its build keeps locked (``flock``) while it lives: a staging folder whose lock is free
  belongs to a dead build and is removed by the next build of that output.
- **Journaled publish.** Publishing swaps the staging folder in with two renames, recorded
  first in ``.OUT.optcc-journal``::

      journal {staging, backup} ─► OUT → .OUT.optcc-old-PID ─► staging → OUT ─► rm old, journal

  The rename of the staging folder is the commit point. At every instant ``OUT`` is the old
  complete build, the new one, or missing while the journal says how to get it back; the
  next build of that output reads the journal before anything else and either restores the
  old build (the staging folder is still there) or finishes the clean-up (it is not).
  Ctrl-C and SIGTERM are held back during the swap and honoured right after it.
- **One writer.** The build that will publish holds ``.OUT.optcc-lock`` for its lifetime;
  a second build of the same output is refused while the first runs. Under torchrun only
  rank 0 publishes; the other ranks stage privately and discard.

Tests widen the windows between steps with :func:`fault_point` (``OPTCC_TEST_PAUSE``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from optcc.errors import BuildInterrupted, OutputError
from optcc.resources import check_name_length, os_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

MARKER = ".optcc-output"
OWNER = ".optcc-owner"
FORMAT = 1
KINDS = ("output", "failed", "cache")
_LONGEST_SUFFIX = len(".failed") + len(".optcc-staging-4194304-r9999") + 2

REFUSE_HINT = (
    "optcc replaces only folders its own builds made: choose another output (-o or "
    "'output:'), or move those files away yourself"
)


# --------------------------------------------------------------------------- test hook
def fault_point(name: str) -> None:
    """Pause here when the fault-injection tests ask for it; a no-op otherwise.

    With ``OPTCC_TEST_PAUSE=name[,name...]`` the point's name is appended to
    ``OPTCC_TEST_PAUSE_FILE`` (so a test knows the process got there) and the process
    sleeps ``OPTCC_TEST_PAUSE_SECONDS`` (default 5), a window in which a test sends a
    signal. Points: ``build:prepared``, ``build:compiled``, ``publish:journal``,
    ``publish:moved``, ``publish:swapped``.
    """
    wanted = os.environ.get("OPTCC_TEST_PAUSE")
    if not wanted or name not in wanted.split(","):
        return
    announce = os.environ.get("OPTCC_TEST_PAUSE_FILE")
    if announce:
        with open(announce, "a") as f:
            f.write(name + "\n")
    time.sleep(float(os.environ.get("OPTCC_TEST_PAUSE_SECONDS", "5")))


# --------------------------------------------------------------------------- names
def sibling(dest: Path, role: str) -> Path:
    """A hidden file or folder beside ``dest`` that belongs to it: ``.NAME.optcc-ROLE``."""
    return dest.with_name(f".{dest.name}.optcc-{role}")


def _own_sibling(dest: Path, name: Any) -> Path:
    """``name`` read from a journal, checked to be a staging or backup folder of ``dest``
    (or, for ``OUT.failed``, of ``OUT``): a planted journal must not make optcc touch
    anything else."""
    bases = {dest.name, dest.name.removesuffix(".failed")}
    match = re.fullmatch(r"\.(.+)\.optcc-(staging|old)-[0-9]+(-r[0-9]+)?", str(name))
    if not isinstance(name, str) or match is None or match.group(1) not in bases:
        raise ValueError(f"unexpected entry {name!r}")
    return dest.parent / name


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- markers
def _walk_files(folder: Path) -> Iterator[str]:
    """Relative paths of every file and link below ``folder`` (links are not followed)."""
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            yield (base / name).relative_to(folder).as_posix()


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as optcc's, listing the files in it now (``cache``: no list)."""
    from optcc import __version__

    data: dict[str, Any] = {
        "optcc": __version__, "format": FORMAT, "kind": kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if kind != "cache":
        data["files"] = sorted(f for f in _walk_files(folder) if f not in (MARKER, OWNER))
    (folder / MARKER).write_text(json.dumps(data, indent=1) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    return data


def refusal(path: Path, kind: str) -> str | None:
    """Why optcc may not replace (or, for ``cache``, write into) ``path``; None if it may."""
    what = {"output": "output folder", "failed": "failed-build folder",
            "cache": "cache folder"}[kind]
    if path.is_symlink():
        return f"the {what} {path} is a symbolic link (to {os.readlink(path)})"
    if not path.exists():
        return None
    if not path.is_dir():
        return f"the {what} {path} is a file, not a folder optcc made"
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        mapped = os_error(exc, f"reading the {what}")
        return str(mapped) if mapped else f"cannot read the {what} {path}: {exc}"
    if not entries:
        return None
    marker = read_marker(path)
    if marker is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        older = " (an older optcc's build? delete it yourself)" if "report.json" in entries else ""
        return f"the {what} {path} exists, is not empty ({shown}) and was not made by optcc{older}"
    if marker["kind"] != kind:
        return f"the {what} {path} is an optcc {marker['kind']} folder, not an {kind} folder"
    if kind == "cache":
        return None
    listed = set(marker.get("files") or [])
    foreign = sorted(f for f in _walk_files(path) if f not in listed and f not in (MARKER, OWNER))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"the {what} {path} holds files optcc did not write: {shown}"
    return None


# --------------------------------------------------------------------------- locks
class FileLock:
    """An exclusive ``flock`` on a file, taken without waiting. The lock dies with the
    process that holds it, which is how optcc tells a live build from a dead one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (creating the file); False if another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return False
            try:  # the holder may have removed the file between our open and lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self, *, remove: bool) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def abandoned(staging: Path) -> bool:
    """Whether a staging folder's build is gone (its owner lock is free, or missing)."""
    owner = staging / OWNER
    if fcntl is None:  # pragma: no cover - not POSIX: only a dead PID proves it
        pid = re.search(r"-([0-9]+)(-r[0-9]+)?$", staging.name)
        return pid is None or not _pid_alive(int(pid.group(1)))
    try:
        fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- journal
@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration (main thread only) and deliver them
    once it is over, so a publish is never cut between its renames."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def swap_in(staging: Path, dest: Path) -> None:
    """Replace ``dest`` with ``staging`` through the journal (see the module docstring).
    Callers hold signals back around it (:func:`signals_deferred`)."""
    journal = sibling(dest, "journal")
    backup = sibling(dest, f"old-{os.getpid()}")
    if backup.exists():
        shutil.rmtree(backup)
    _write_json_atomic(journal, {"format": FORMAT, "staging": staging.name,
                                 "backup": backup.name})
    fault_point("publish:journal")
    try:
        if dest.exists():
            os.replace(dest, backup)
        fault_point("publish:moved")
        os.replace(staging, dest)
    except OSError:
        repair(dest)  # undo whatever half happened, then report the error
        raise
    _fsync_dir(dest.parent)
    fault_point("publish:swapped")
    shutil.rmtree(backup, ignore_errors=True)
    journal.unlink()
    _fsync_dir(dest.parent)


def repair(dest: Path) -> str | None:
    """Finish or undo a publish of ``dest`` that a crash cut short; say what was done.

    The caller must hold ``dest``'s lock (so the journal's writer is known to be gone).
    """
    journal = sibling(dest, "journal")
    if not journal.exists():
        return None
    try:
        entry = json.loads(journal.read_text())
        staging = _own_sibling(dest, entry["staging"])
        backup = _own_sibling(dest, entry["backup"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(
            f"{journal}: an interrupted publish left a journal optcc cannot read ({exc})",
            hint=f"look at the hidden '.{dest.name}.optcc-*' folders beside it, keep what you "
            "need, and delete the journal",
        ) from exc
    if staging.exists():  # not committed: the previous build comes back
        done = "the interrupted build was discarded"
        if not dest.exists() and backup.exists():
            os.replace(backup, dest)
            done = "the previous build was restored"
        shutil.rmtree(staging, ignore_errors=True)
    elif dest.exists():  # committed: the new build is in place, only the clean-up was left
        done = "the new build was already in place; its clean-up was finished"
        shutil.rmtree(backup, ignore_errors=True)
    elif backup.exists():  # neither the new nor the old build in place: the old comes back
        os.replace(backup, dest)
        done = "the previous build was restored"
    else:
        done = "nothing was left to restore"
    journal.unlink()
    _fsync_dir(dest.parent)
    logger.warning("repaired %s after an interrupted publish: %s", dest, done)
    return done


def remove_stale(dest: Path) -> list[Path]:
    """Remove the hidden siblings of ``dest`` that dead builds left (staging folders whose
    owner lock is free, backups no journal refers to). Call with ``dest``'s lock held and
    after :func:`repair`."""
    removed: list[Path] = []
    prefix = f".{dest.name}.optcc-"
    legacy = re.compile(re.escape(f".{dest.name}.") + r"(partial|old)-([0-9]+)")
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        stale = False
        if name.startswith(prefix + "staging-"):
            stale = entry.is_dir() and not entry.is_symlink() and abandoned(entry)
        elif name.startswith(prefix + "old-"):
            stale = entry.is_dir() and not entry.is_symlink()
        elif name in (prefix + "journal.tmp",):
            stale = True
        elif (match := legacy.fullmatch(name)) and entry.is_dir() and not entry.is_symlink():
            # Folders of optcc versions before the journal; an '.old' one may be the only
            # copy of the output when its build died between its two renames.
            if not _pid_alive(int(match.group(2))):
                if match.group(1) == "old" and not dest.exists():
                    os.replace(entry, dest)
                    logger.warning("restored %s from %s (left by an older optcc)", dest, entry)
                    continue
                stale = True
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d folder(s) left by dead builds of %s", len(removed), dest)
    return removed


# --------------------------------------------------------------------------- the folder
class OutputFolder:
    """One build's hold on its output folder and the siblings optcc keeps beside it.

    Use as a context manager: entering takes the lock (publishing builds), repairs an
    interrupted publish, removes what dead builds left, refuses folders that are not
    optcc's or that hold inputs, and creates the staging folder; leaving discards the
    staging folder if it was neither published nor parked, removes an empty cache, and
    drops the locks.
    """

    def __init__(
        self, path: Path, *, inputs: Sequence[Path] = (), publish: bool = True, rank: int = 0
    ) -> None:
        self.path = path
        self.failed = path.with_name(path.name + ".failed")
        self.cache = path.with_name(path.name + ".cache")
        self.inputs = list(inputs)
        self.publishing = publish
        self.rank = rank
        suffix = f"{os.getpid()}" + ("" if publish else f"-r{rank}")
        self.staging = sibling(path, f"staging-{suffix}")
        self.published = False
        self.parked = False
        self._lock = FileLock(sibling(path, "lock"))
        self._owner: FileLock | None = None
        self._created: list[Path] = []  # parent folders this build made (removed if unused)

    # -- checks that need no lock (``optcc validate`` runs them too)
    def problems(self) -> list[str]:
        """Every reason this build may not use its output paths, or an empty list."""
        problems = []
        for kind, folder in (("output", self.path), ("failed", self.failed), ("cache", self.cache)):
            reason = refusal(folder, kind)
            if reason:
                problems.append(reason)
        problems += self._input_problems()
        return problems

    def _input_problems(self) -> list[str]:
        problems = []
        cwd = Path.cwd().resolve()
        if self.path == cwd or self.path in cwd.parents:
            problems.append(f"the output folder {self.path} is (or contains) the current folder")
        if self.path == Path.home().resolve():
            problems.append(f"the output folder {self.path} is the home folder")
        for item in self.inputs:
            resolved = item.resolve()
            for folder in (self.path, self.failed):
                if folder == resolved or folder in resolved.parents:
                    problems.append(
                        f"the {'output' if folder is self.path else 'failed-build'} folder "
                        f"{folder} contains the input {item}; a build replaces that folder, so "
                        "it would be lost"
                    )
        return problems

    # -- the lifecycle
    def __enter__(self) -> OutputFolder:
        try:
            self._enter()
        except BaseException:
            self._leave()
            raise
        return self

    def _enter(self) -> None:
        check_name_length(self.path, extra=_LONGEST_SUFFIX)
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        self._mkdirs(self.path.parent)
        self._created = missing
        if self.publishing:
            self._take_lock()
            # Both journals first: a staging folder a journal names is not stale yet.
            for dest in (self.path, self.failed):
                self._guard(repair, dest, "repairing an interrupted publish of")
            for dest in (self.path, self.failed):
                self._guard(remove_stale, dest, "removing what dead builds left beside")
        problems = self.problems()
        if problems:
            raise OutputError("; ".join(problems), hint=REFUSE_HINT)
        self._mkdirs(self.staging)
        self._owner = FileLock(self.staging / OWNER)
        self._owner.acquire()
        if self.publishing:
            self._guard(self._make_cache, self.cache, "creating")

    def _make_cache(self, folder: Path) -> None:
        """Create (or adopt, when it is an empty folder) the cache, with its marker."""
        folder.mkdir(exist_ok=True)
        if read_marker(folder) is None:
            write_marker(folder, "cache")

    def _take_lock(self) -> None:
        try:
            acquired = self._lock.acquire()
        except OSError as exc:
            raise self._environment(exc, f"locking the output folder {self.path}") from exc
        if not acquired:
            raise OutputError(
                f"another optcc build (process {self._lock.holder()}) is writing {self.path}",
                hint="wait for it to finish, or choose another output folder",
            )

    def _mkdirs(self, folder: Path) -> None:
        try:
            if folder == self.staging and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)  # our own name: a dead process had our PID
            folder.mkdir(parents=True, exist_ok=folder != self.staging)
        except FileExistsError as exc:
            raise OutputError(f"{exc.filename or folder} exists and is not a folder") from exc
        except OSError as exc:
            raise self._environment(exc, "creating the folder") from exc

    def _guard(self, fn: Any, path: Path, doing: str) -> Any:
        try:
            return fn(path)
        except OSError as exc:
            raise self._environment(exc, f"{doing} {path}") from exc

    @staticmethod
    def _environment(exc: OSError, doing: str) -> Exception:
        mapped = os_error(exc, doing)
        return mapped if mapped is not None else exc

    @property
    def workdir(self) -> Path:
        """Scratch space inside the staging folder, removed before publishing."""
        return self.staging / "work"

    def publish(self) -> None:
        """Swap the staging folder in as the output (publishing rank), or discard it."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        if not self.publishing:
            self.discard()
            return
        try:
            write_marker(self.staging, "output")
            self._release_owner()
            with signals_deferred():  # a Ctrl-C here is honoured once the swap is done
                swap_in(self.staging, self.path)
                self.published = True
        except OSError as exc:
            raise self._environment(exc, f"publishing {self.path}") from exc

    def adopt_new_files(self) -> None:
        """List files added to the published output since (by this build's
        ``optcc_build_finished`` hooks) in its marker, as optcc's own."""
        if self.published:
            try:
                write_marker(self.path, "output")
            except OSError as exc:
                logger.warning("could not update the marker of %s: %s", self.path, exc)

    def park_failure(self, report: dict[str, Any], exc: BaseException) -> Path | None:
        """Keep a failed build's staging folder as ``OUT.failed/`` with a partial report."""
        if not self.staging.exists() or not self.publishing:
            self.discard()
            return None
        report["status"] = "failed"
        report["error"] = {"type": type(exc).__name__, "message": str(exc)}
        try:
            shutil.rmtree(self.workdir, ignore_errors=True)
            (self.staging / "report.json").write_text(json.dumps(report, indent=2, default=str))
            write_marker(self.staging, "failed")
            self._release_owner()
            with signals_deferred():
                swap_in(self.staging, self.failed)
                self.parked = True
        except OSError as exc:
            logger.warning("could not keep the failed build's folder as %s: %s", self.failed, exc)
            self.discard()
            return None
        return self.failed

    def discard(self) -> None:
        self._release_owner()
        shutil.rmtree(self.staging, ignore_errors=True)

    def interrupted(self) -> BuildInterrupted:
        """The error for a Ctrl-C / SIGTERM, saying truthfully where the output stands."""
        if self.published:
            return BuildInterrupted(f"build interrupted after it had published {self.path}")
        state = "was left as it was before the build" if self.path.exists() else "was not created"
        return BuildInterrupted(f"build interrupted; {self.path} {state}")

    def _release_owner(self) -> None:
        if self._owner is not None:
            self._owner.release(remove=True)
            self._owner = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._leave()
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            raise self.interrupted() from None

    def _leave(self) -> None:
        if not (self.published or self.parked):
            self.discard()
        else:
            self._release_owner()
        if self.publishing:
            with contextlib.suppress(OSError):
                self._remove_cache_if_empty()
        self._lock.release(remove=True)
        if not (self.published or self.parked):
            for folder in self._created:  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _remove_cache_if_empty(self) -> None:
        marker = read_marker(self.cache) if self.cache.is_dir() else None
        if marker is None or marker.get("kind") != "cache":
            return
        try:
            if [p.name for p in self.cache.iterdir()] == [MARKER]:
                (self.cache / MARKER).unlink()
                self.cache.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                logger.warning("could not remove the empty cache %s: %s", self.cache, exc)
