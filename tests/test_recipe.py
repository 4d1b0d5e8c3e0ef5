"""Recipe validation: every mistake is caught before work starts, with file:line:col and a
suggestion where one exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_MODEL, REPO, write_recipe

from optcc.errors import RecipeError
from optcc.recipe import json_schema, load_recipe

GOOD = f"""\
version: 1
model: {DEMO_MODEL}
data:
  evaluation: {{source: digits, split: test}}
passes:
  - fold-constants
  - fold-batchnorm: {{}}
"""


def check(tmp_path: Path, text: str) -> RecipeError:
    path = write_recipe(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert str(err).startswith(str(path))
    return err


def test_good_recipe_builds_a_plan(tmp_path: Path) -> None:
    plan = load_recipe(write_recipe(tmp_path, GOOD))
    assert [p.name for p in plan.passes] == ["fold-constants", "fold-batchnorm"]
    assert [p.line for p in plan.passes] == [6, 7]
    assert plan.passes[0].plugin == "lossless"
    assert plan.data["evaluation"].options.split == "test"
    assert plan.backend_cls.name == "onnxruntime"
    assert plan.output_dir == tmp_path / "out" / "recipe"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_recipe_validates(recipe: Path) -> None:
    plan = load_recipe(recipe)
    assert plan.passes


# ---- the catalogue of mistakes: (recipe text, message, line, col, hint substring)
BAD = [
    pytest.param("version: 1\nmodel: m.onnx\npases: []\n",
                 "recipe: unknown key 'pases'", 3, 1, "did you mean 'passes'?", id="unknown-top-key"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-batchnrom\n",
                 "unknown pass 'fold-batchnrom'", 4, 5, "did you mean 'fold-batchnorm'?", id="unknown-pass"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-constants:\n      fold_shape: true\n",
                 "pass 'fold-constants': unknown key 'fold_shape'", 5, 7, "did you mean 'fold_shapes'?",
                 id="unknown-option"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-constants:\n      fold_shapes: maybe\n",
                 "pass 'fold-constants' option 'fold_shapes': must be true or false (got maybe)",
                 5, 20, None, id="wrong-type"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-constants:\n      size_threshold_mib: -3\n",
                 "pass 'fold-constants' option 'size_threshold_mib': must be >= 0 (got -3)", 5, 27, None,
                 id="out-of-range"),
    pytest.param("version: 1\nmodel: a.onnx\nmodel: b.onnx\n",
                 "duplicate key 'model' (first defined on line 2)", 3, 1, "silently keep only the last",
                 id="duplicate-key"),
    pytest.param("version: 1\nmodel: [unclosed\n", "invalid YAML", 3, 1, None, id="yaml-syntax"),
    pytest.param("version: 2\nmodel: m.onnx\n", "unsupported recipe version 2", 1, 10, None, id="version"),
    pytest.param("", "recipe is empty", 1, 1, "version: 1", id="empty"),
    pytest.param("- just\n- a list\n", "a recipe is a mapping of keys, got a list", 1, 1, None, id="not-a-mapping"),
    pytest.param("version: 1\npasses: []\n", "recipe: missing required key 'model'", 1, 1, None, id="missing-model"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\ntarget: onnxruntme\n",
                 "unknown target backend 'onnxruntme'", 3, 9, "did you mean 'onnxruntime'?", id="unknown-backend"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\ntarget: {{backend: onnxruntime, thread: 2}}\n",
                 "target 'onnxruntime': unknown key 'thread'", 3, 32, "did you mean 'threads'?",
                 id="unknown-backend-option"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\ndata:\n  evaluation: {{source: digit}}\n",
                 "data.evaluation: unknown data source 'digit'", 4, 24, "did you mean 'digits'?",
                 id="unknown-source"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\ndata:\n  evaluation: {{source: digits, split: tset}}\n",
                 "data.evaluation (digits) option 'split': must be one of 'train', 'test' or 'all' "
                 "(got tset)", 4, 39, "did you mean 'test'?",
                 id="bad-enum"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\ndata:\n  calibraton: {{source: digits}}\n",
                 "recipe: unknown key 'calibraton' in 'data'", 4, 3, "did you mean 'calibration'?",
                 id="unknown-data-role"),
    pytest.param(f"version: 1\nmodel: {{path: {DEMO_MODEL}, torch: 'a:b'}}\n",
                 "give exactly one of 'path'", 2, 8, None, id="path-and-torch"),
    pytest.param("version: 1\nmodel: {torch: 'mod:make'}\n",
                 "a torch model needs 'inputs'", 2, 8, None, id="torch-without-inputs"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-constants: 3\n",
                 "options must be a mapping", 4, 21, None, id="options-not-mapping"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - {{a: 1, b: 2}}\n",
                 "each pass is a name", 4, 5, None, id="pass-two-keys"),
    pytest.param(f"version: 1\nmodel: {DEMO_MODEL}\nevaluate: sometimes\n",
                 "recipe key 'evaluate': must be one of 'each', 'final' or 'none' (got sometimes)",
                 3, 11, None, id="bad-evaluate"),
]


@pytest.mark.parametrize(("text", "message", "line", "col", "hint"), BAD)
def test_bad_recipes(tmp_path: Path, text: str, message: str, line: int, col: int, hint: str | None) -> None:
    err = check(tmp_path, text)
    assert message in err.bare_message, err.bare_message
    assert (err.line, err.col) == (line, col), str(err)
    if hint:
        assert err.hint and hint in err.hint, err.hint


def test_missing_recipe_file_suggests_a_neighbour(tmp_path: Path) -> None:
    write_recipe(tmp_path, GOOD, name="quickstart.yaml")
    with pytest.raises(RecipeError, match="recipe file not found") as info:
        load_recipe(tmp_path / "quickstrat.yaml")
    assert info.value.hint == "did you mean 'quickstart.yaml'?"


def test_pass_needing_data_the_recipe_lacks(tmp_path: Path) -> None:
    from optcc import hookimpl
    from optcc.passes import Capability, Pass
    from optcc.plugins import create_registry

    class Calibrate(Pass):
        name = "calibrate-thing"
        requires = frozenset({Capability.CALIBRATION_DATA})

    class Plugin:
        @hookimpl
        def optcc_passes(self):
            return [Calibrate]

    registry = create_registry(extra_plugins=[("calib", Plugin())])
    path = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - calibrate-thing\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    assert info.value.bare_message == (
        "pass 'calibrate-thing' needs calibration-data, which this recipe/machine does not provide"
    )
    assert info.value.line == 4
    assert info.value.hint == "add 'data: calibration: {source: ...}'"
    ok = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\ndata:\n  calibration: {{source: digits}}\n"
                      "passes:\n  - calibrate-thing\n", name="ok.yaml")
    assert load_recipe(ok, registry).passes[0].name == "calibrate-thing"


def test_json_schema_covers_passes_sources_and_backends(registry) -> None:
    schema = json_schema(registry)
    text = json.dumps(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert "pass:fold-batchnorm" in schema["$defs"]
    assert "data:npz" in schema["$defs"] and "backend:onnxruntime" in schema["$defs"]
    assert "size_threshold_mib" in text


def test_schema_accepts_bundled_recipes_and_rejects_typos(registry) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = json_schema(registry)
    validator = jsonschema.Draft202012Validator(schema)
    for recipe in (REPO / "recipes").glob("*.yaml"):
        errors = list(validator.iter_errors(yaml.safe_load(recipe.read_text())))
        assert errors == [], (recipe, errors[:1])
    bad = yaml.safe_load(GOOD.replace("fold-constants", "fold-constant"))
    assert list(validator.iter_errors(bad))


def test_range_error_is_worded_once_with_the_recipes_line(tmp_path: Path) -> None:
    from pydantic import Field

    from optcc import hookimpl
    from optcc.passes import Pass, PassOptions
    from optcc.plugins import create_registry

    class CapOptions(PassOptions):
        cap: int = Field(1, gt=0, description="A positive cap.")
        names: list[str] = Field(default_factory=list, description="Names.")

    class CapPass(Pass):
        name = "x"
        Options = CapOptions

    class Plugin:
        @hookimpl
        def optcc_passes(self):
            return [CapPass]

    registry = create_registry(extra_plugins=[("capper", Plugin())])
    recipe = write_recipe(tmp_path, f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - fold-constants\n"
                                    "  - x:\n      cap: 0\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, registry)
    assert str(info.value) == f"{recipe}:6:12: pass 'x' option 'cap': must be > 0 (got 0)"
    recipe.write_text(f"version: 1\nmodel: {DEMO_MODEL}\npasses:\n  - x: {{names: [a, 7]}}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, registry)
    assert info.value.bare_message == "pass 'x' option 'names' item 2: must be text (got 7)"
