"""docs/plugins.md runs as written: every code block, in order, in a fresh folder.

- a block whose first line is ``# file: PATH`` is that file's content: it is written there;
- other ``python`` blocks run, in one namespace shared by the whole guide;
- ``yaml`` and ``toml`` blocks must parse;
- ``console`` blocks: ``$ optcc ...`` runs the command line (exit status 0), and the lines
  shown under a command must appear in its output; ``$ pip install -e DIR`` registers the
  package's ``optcc`` entry points the way pip would, without installing anything.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from optcc.cli import main
from optcc.plugins import create_registry, set_registry

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

GUIDE = REPO / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str, int]]:
    text = GUIDE.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def _install(folder: Path, plugins: list[tuple[str, object]]) -> None:
    """What ``pip install -e folder`` gives optcc: its entry points in the 'optcc' group."""
    import importlib

    project = tomllib.loads((folder / "pyproject.toml").read_text())
    sys.path.insert(0, str(folder))
    for name, module in project["project"]["entry-points"]["optcc"].items():
        plugins.append((name, importlib.import_module(module)))
    set_registry(create_registry(extra_plugins=plugins))


def _normal(text: str) -> str:
    return " ".join(text.split())


def _console(block: str, line: int, plugins: list[tuple[str, object]],
             capsys: pytest.CaptureFixture[str]) -> None:
    commands: list[tuple[str, list[str]]] = []
    for text in block.splitlines():
        if text.startswith("$ "):
            commands.append((text[2:], []))
        elif commands and text.strip():
            commands[-1][1].append(text)
    for command, shown in commands:
        argv = shlex.split(command)
        if argv[:3] == ["pip", "install", "-e"]:
            _install(Path(argv[3]).resolve(), plugins)
            continue
        assert argv[0] == "optcc", f"docs/plugins.md:{line}: unexpected command {command!r}"
        capsys.readouterr()
        code = main(argv[1:])
        out = capsys.readouterr().out
        assert code == 0, f"docs/plugins.md:{line}: '{command}' exited {code}"
        for expected in shown:
            assert _normal(expected) in _normal(out), (
                f"docs/plugins.md:{line}: '{command}' did not print {expected!r}:\n{out}")


@pytest.mark.slow
def test_plugin_guide_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules_before = set(sys.modules)
    plugins: list[tuple[str, object]] = []
    namespace: dict[str, object] = {"__name__": "plugin_guide"}
    found = {"python": 0, "file": 0, "console": 0}
    try:
        for lang, code, line in blocks():
            first = code.splitlines()[0] if code.strip() else ""
            if first.startswith("# file: "):
                path = tmp_path / first.removeprefix("# file: ").strip()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(code)
                found["file"] += 1
            if lang == "toml":
                tomllib.loads(code)
            elif lang == "yaml":
                yaml.safe_load(code)
            elif lang == "python" and not first.startswith("# file: "):
                exec(compile(code, f"docs/plugins.md:{line}", "exec"), namespace)
                found["python"] += 1
            elif lang == "console":
                _console(code, line, plugins, capsys)
                found["console"] += 1
    finally:
        set_registry(None)
        for name in set(sys.modules) - modules_before:
            if name.startswith("optcc_csv"):
                del sys.modules[name]
    # The guide keeps its promises: a complete plugin package, runnable examples, commands.
    assert found["file"] >= 3 and found["python"] >= 6 and found["console"] >= 2, found
    assert (tmp_path / "out" / "csv-demo" / "report.html").exists()


def test_plugin_guide_covers_the_public_api() -> None:
    """What a plugin author uses is documented: every public method of Model, DataSource
    and PassContext, every Tolerance constructor and every hook is named in the guide."""
    import inspect

    import optcc
    from optcc import hookspecs

    guide = GUIDE.read_text()
    public = {
        "model.": [n for n, _ in inspect.getmembers(optcc.Model) if not n.startswith("_")],
        "ctx.": [n for n in optcc.PassContext.__dataclass_fields__ if n not in {"capabilities", "data"}]
        + ["batches", "data"],
        "": [n for n in ("num_samples", "describe", "resolve", "error", "batches", "first_batch",
                         "input_specs", "_samples")],
    }
    for prefix, names in public.items():
        for name in names:
            assert re.search(rf"\b{re.escape(name)}\b", guide), f"docs/plugins.md lacks {prefix}{name}"
    for constructor in ("exact", "float_rounding", "lossy"):
        assert f"Tolerance.{constructor}(" in guide
    for hook in (n for n in vars(hookspecs) if n.startswith("optcc_")):
        assert f"`{hook}`" in guide, hook
