"""Everything a plugin author or recipe writer relies on is documented."""

from __future__ import annotations

import inspect

from conftest import REPO

from optcc import hookspecs


def _hooks():
    return [(name, fn) for name, fn in vars(hookspecs).items() if name.startswith("optcc_")]


def test_every_hook_has_a_real_docstring_and_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    hooks = _hooks()
    assert len(hooks) == 10
    for name, fn in hooks:
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 150, f"{name} needs a docstring that states the contract"
        for arg in inspect.signature(fn).parameters:
            assert arg in doc or arg.rstrip("_") in doc, f"{name}: argument '{arg}' undocumented"
        assert f"`{name}`" in readme, f"{name} missing from the README"


def test_every_pass_is_documented(registry) -> None:
    readme = (REPO / "README.md").read_text()
    for name, cls in registry.passes.items():
        if registry.pass_owner(name) != "lossless" and not name.startswith(("fold", "elim")):
            continue  # third-party test plugins document themselves
        assert cls.summary, f"{name} has no summary"
        assert len(inspect.getdoc(cls) or "") > 80, f"{name} needs a docstring"
        for field, info in cls.Options.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
        assert f"`{name}`" in readme, f"{name} missing from the README's pass table"


def test_every_data_source_and_backend_is_documented(registry) -> None:
    readme = (REPO / "README.md").read_text()
    for kind in (registry.data_sources, registry.backends):
        for name, cls in kind.items():
            assert cls.summary and f"`{name}`" in readme, name
            for field, info in cls.Options.model_fields.items():
                assert info.description, f"{name}.{field} has no description"


def test_plugins_use_only_the_public_api() -> None:
    """Built-in plugins are plugins like any other: they import only what optcc exports."""
    import ast

    import optcc

    for path in (REPO / "plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optcc"):
                if node.module.startswith("optcc_plugins"):
                    continue
                assert node.module == "optcc", f"{path.name} imports from {node.module}"
                for alias in node.names:
                    assert alias.name in optcc.__all__, f"{path.name}: optcc.{alias.name} is not public"
