"""Load a Python object named ``package.module:attr`` or ``path/to/file.py:attr``.

Recipes name user code this way (a torch model factory, a data callable). Loading it runs
that code: the README says so. Failures become one clear error that names the spec.
:func:`find_object_problem` checks that the code can be found without running it
(``optcc validate``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from optcc.errors import OptccError


def load_object(spec: str, *, base_dir: Path | None = None, what: str = "object") -> Any:
    """Import and return the attribute ``spec`` names (``module:attr`` or ``file.py:attr``)."""
    if ":" not in spec:
        raise OptccError(
            f"{what} '{spec}' must look like 'package.module:name' or 'path/to/file.py:name'"
        )
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            raise OptccError(f"{what} '{spec}': file {path} not found")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"_optcc_user_{path.stem}_{digest}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise OptccError(
                f"{what} '{spec}': importing {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise OptccError(
                f"{what} '{spec}': module '{exc.name}' not found",
                hint="is the package installed in this environment, or is the path right?",
            ) from exc
        except Exception as exc:
            raise OptccError(
                f"{what} '{spec}': importing {target} failed: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise OptccError(f"{what} '{spec}': '{target}' has no attribute '{attr}'") from exc
    return obj


def find_object_problem(spec: str, *, base_dir: Path | None = None) -> str | None:
    """Why the code ``spec`` names cannot be found (None if it can), without importing it:
    a ``file.py`` must exist; a module's top-level package must be installed."""
    if ":" not in spec:
        return f"'{spec}' must look like 'package.module:name' or 'path/to/file.py:name'"
    target = spec.rpartition(":")[0]
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            if not path.is_file():
                return f"'{spec}': file {path} not found"
        except OSError as exc:
            return f"'{spec}': cannot read {path}: {exc.strerror}"
        return None
    top = target.split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"'{spec}': module '{top}' not found"
