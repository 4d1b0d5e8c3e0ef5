"""Plugin discovery through the 'optcc' entry-point group; every failure is reported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optcc.plugins import create_registry


def make_dist(site: Path, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    """Install a plugin the way pip would leave it: a module plus a .dist-info with an
    entry point in the 'optcc' group (importlib.metadata reads these from sys.path)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[optcc]\n{ep_name or dist} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _info(registry, name):
    return next(p for p in registry.plugins if p.name == name)


def test_installed_sample_plugin_is_discovered() -> None:
    """tests/sample_plugin is pip-installed by the test command, like any user's plugin."""
    registry = create_registry()
    info = _info(registry, "sample")
    assert info.error is None
    assert info.distribution == "optcc-sample-plugin" and info.version == "0.2.0"
    assert info.passes == ["zero-small-weights"]
    assert "optcc_after_pass" in info.hooks
    assert registry.pass_owner("zero-small-weights") == "sample"


def test_builtin_plugins_come_through_the_entry_point() -> None:
    registry = create_registry()
    info = _info(registry, "lossless")
    assert info.builtin and info.distribution == "optcc"
    assert set(info.passes) == {"fold-constants", "fold-batchnorm", "eliminate-dead-nodes"}


def test_plugin_that_fails_to_import_is_reported(site: Path) -> None:
    make_dist(site, "broken-import", "broken_import_mod", "raise RuntimeError('no GPU libs here')\n")
    registry = create_registry()
    info = _info(registry, "broken-import")
    assert info.error == (
        "failed to import broken_import_mod: RuntimeError: no GPU libs here"
    )
    assert info.version == "1.2.3"
    assert [str(e) for e in registry.errors if e.plugin == "broken-import"] == [
        "plugin 'broken-import': failed to import broken_import_mod: RuntimeError: no GPU libs here"
    ]
    # Everything else still loads.
    assert "fold-batchnorm" in registry.passes


def test_plugin_with_unknown_hook_is_reported_and_not_registered(site: Path) -> None:
    make_dist(site, "typo-hook", "typo_hook_mod", """
        from optcc import hookimpl

        @hookimpl
        def optcc_pases():
            return []
    """)
    registry = create_registry()
    error = _info(registry, "typo-hook").error
    assert error.startswith("implements unknown hook(s) optcc_pases; known hooks: ")
    assert "optcc_passes" in error


def test_plugin_with_unknown_hook_argument_is_reported(site: Path) -> None:
    make_dist(site, "bad-args", "bad_args_mod", """
        from optcc import hookimpl

        @hookimpl
        def optcc_before_pass(pass_, not_an_argument):
            pass
    """)
    error = _info(create_registry(), "bad-args").error
    assert error.startswith("invalid hook implementation") and "not_an_argument" in error


def test_plugin_returning_a_non_pass_is_reported(site: Path) -> None:
    make_dist(site, "not-a-pass", "not_a_pass_mod", """
        from optcc import hookimpl

        @hookimpl
        def optcc_passes():
            return [dict]
    """)
    error = _info(create_registry(), "not-a-pass").error
    assert error == "optcc_passes() failed: returned <class 'dict'>, which is not a subclass of optcc.Pass"


def test_bad_pass_name_is_reported(site: Path) -> None:
    make_dist(site, "bad-name", "bad_name_mod", """
        from optcc import Pass, hookimpl

        class P(Pass):
            name = "Bad_Name"

        @hookimpl
        def optcc_passes():
            return [P]
    """)
    error = _info(create_registry(), "bad-name").error
    assert "has name 'Bad_Name'; names are kebab-case" in error


def test_duplicate_pass_name_names_both_plugins(site: Path) -> None:
    make_dist(site, "zz-dup", "zz_dup_mod", """
        from optcc import Pass, hookimpl

        class Dup(Pass):
            name = "fold-batchnorm"

        @hookimpl
        def optcc_passes():
            return [Dup]
    """)
    registry = create_registry()
    assert _info(registry, "zz-dup").error == (
        "pass 'fold-batchnorm' is already registered by plugin 'lossless'"
    )
    assert registry.pass_owner("fold-batchnorm") == "lossless"


def test_cli_plugins_lists_failures_and_exits_nonzero(site: Path) -> None:
    make_dist(site, "broken-cli", "broken_cli_mod", "import not_a_real_module_xyz\n")
    env_path = str(site)
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); "
         "from optcc.cli import main; sys.exit(main(['plugins', '--json']))"],
        capture_output=True, text=True,
    )
    assert out.returncode == 1
    assert "No module named 'not_a_real_module_xyz'" in out.stdout
    assert '"name": "broken-cli"' in out.stdout


def test_unknown_pass_error_mentions_failed_plugins(site: Path, tmp_path: Path) -> None:
    from conftest import DEMO_MODEL, write_recipe

    from optcc.errors import RecipeError
    from optcc.recipe import load_recipe

    make_dist(site, "gone", "gone_mod", "raise ImportError('missing dependency')\n")
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - their-pass\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, create_registry())
    assert "plugin(s) that failed to load: gone" in info.value.hint


def test_cli_plugins_shows_failures_without_raw_markup(site: Path, capsys) -> None:
    from optcc.cli import main
    from optcc.plugins import set_registry

    make_dist(site, "broken-cli", "broken_cli_mod", "raise RuntimeError('[red]no[/red] GPU')\n")
    set_registry(create_registry())
    try:
        assert main(["plugins"]) == 1
    finally:
        set_registry(None)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "broken-cli" in line)
    assert "failed: failed to import broken_cli_mod" in row
    assert "[red]failed" not in out and "[/red]" not in out.replace("[red]no[/red] GPU", "")
    assert "[red]no[/red] GPU" in out  # the error text itself is shown as written
