"""The machine's limits, turned into user errors that say what to do.

- :func:`os_error` maps an :class:`OSError` (permission denied, read-only or full file
  system, a name too long, ...) to a :class:`ResourceError` naming the file and what optcc
  was doing, with a hint; errors outside that list stay what they are (a bug, or a
  message the caller words itself).
- :func:`check_allocation` compares a size computed *before* allocating (an array shaped
  by a model's declared inputs or by metadata read from a file) with a memory budget, so a
  hostile or mistaken shape is an error instead of a MemoryError, or the machine swapping.

The budget is half of the machine's physical memory, or ``OPTCC_MAX_MEMORY`` (bytes, or
with a ``KiB``/``MiB``/``GiB`` suffix) when set.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from optcc.errors import ResourceError

# errno -> what it means for the user, and what to do about it.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", "check the permissions, or choose a folder you can write"),
    errno.EPERM: ("operation not permitted", "check the permissions, or choose another folder"),
    errno.EROFS: ("the file system is read-only", "choose an output folder on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "free some space, or choose another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or choose another disk"),
    errno.ENAMETOOLONG: (
        "file name too long",
        "use a shorter path (at most 255 bytes per name, 4096 in all on Linux)",
    ),
    errno.ELOOP: ("too many levels of symbolic links", "check the links on the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("expected a file, found a folder", "check the path"),
    errno.EMFILE: ("too many open files", "raise the limit ('ulimit -n') and retry"),
    errno.EIO: ("input/output error", "the disk may be failing; check it and retry"),
    errno.EBUSY: ("the file or folder is busy (a mount point?)", "choose another folder"),
    errno.EXDEV: ("the path crosses file systems", "keep the output on one file system"),
}

ENVIRONMENT_ERRNOS = frozenset(_OS_ERRORS)


def os_error(exc: OSError, doing: str) -> ResourceError | None:
    """A :class:`ResourceError` for ``exc`` ('``doing``: FILE: what went wrong'), or None
    when ``exc`` is not an environment problem optcc knows how to explain."""
    if exc.errno not in _OS_ERRORS:
        return None
    what, hint = _OS_ERRORS[exc.errno]
    name = exc.filename if exc.filename is not None else ""
    where = f": {name}" if name else ""
    error = ResourceError(f"{doing}{where}: {what}", hint=hint)
    error.__cause__ = exc
    return error


def raise_os_error(exc: OSError, doing: str) -> None:
    """Raise :func:`os_error`'s error for ``exc`` (chained), or ``exc`` itself."""
    mapped = os_error(exc, doing)
    if mapped is None:
        raise exc
    raise mapped from exc


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def _parse_size(text: str) -> int | None:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def physical_memory() -> int:
    """Bytes of physical memory (8 GiB when the system does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def memory_budget() -> int:
    """The most bytes one allocation sized by a model or its metadata may take."""
    override = os.environ.get("OPTCC_MAX_MEMORY")
    if override:
        size = _parse_size(override)
        if size is not None:
            return size
    return physical_memory() // 2


def fmt_size(nbytes: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} B"


def check_allocation(nbytes: int, what: str, *, hint: str | None = None) -> None:
    """Fail before allocating ``nbytes`` for ``what`` when that exceeds :func:`memory_budget`."""
    budget = memory_budget()
    if nbytes > budget:
        raise ResourceError(
            f"{what} would need {fmt_size(nbytes)}, more than the {fmt_size(budget)} optcc "
            "allows itself on this machine (half its memory; OPTCC_MAX_MEMORY sets another "
            "limit)",
            hint=hint,
        )


def check_name_length(path: Path, *, extra: int = 0) -> None:
    """Fail when a name on ``path`` (its last part grown by ``extra`` bytes, for the
    siblings optcc derives from it) exceeds the usual 255-byte file-name limit."""
    parts = path.parts
    for i, part in enumerate(parts):
        grow = extra if i == len(parts) - 1 else 0
        if len(os.fsencode(part)) + grow > 255:
            raise ResourceError(
                f"{path}: the name '{part[:40]}...' is {len(os.fsencode(part))} bytes long"
                + (f"; optcc adds up to {extra} bytes to it for its hidden sibling folders"
                   if grow else ""),
                hint=f"use names of at most {255 - grow} bytes",
            )
