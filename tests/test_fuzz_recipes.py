"""Property-based fuzzing of the recipe loader and ``validate`` (Hypothesis).

Whatever the recipe holds (random text, random bytes, or a structured recipe with wrong
keys, wrong types, NaN, huge numbers, odd strings), loading and validating it either
succeeds or raises :class:`RecipeError`s that carry the recipe file and, where known, a
line inside it. Any other exception is a bug. Examples are derandomized (the same in every
run, so CI is stable) and bounded in number.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import DEMO_MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optcc.build import validate
from optcc.errors import RecipeError
from optcc.recipe.loader import plan_recipe

FUZZ = settings(
    deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

TOKENS = [
    "version: 1\n", "model: x.onnx\n", f"model: {DEMO_MODEL}\n", "passes:\n", "  - ", "- ",
    "fold-constants", "prune-channels: {ratio: ", "distill: {", "}", "{", "[", "]", ", ",
    ": ", "\n", "  ", "&a ", "*a", "&b [*a, *a, *a]", "!!python/object:os.system", "!!binary",
    "'", '"', "\\0", "\x00", "\t", "#", "---\n", "...\n", ".nan", ".inf", "-1", "1e999",
    "true", "null", "~", "? ", "|\n", ">\n", "%YAML 1.1\n", "data:\n", "target: ", "output: ",
]


def _check(path: Path, registry) -> None:
    """Load (and, when the schema holds, validate) ``path``: a plan or RecipeErrors only."""
    try:
        plan, errors = plan_recipe(path, registry)
    except RecipeError as exc:
        assert exc.file == str(path), exc
        return
    for error in errors:
        assert isinstance(error, RecipeError) and error.file == str(path), error
    if plan is not None and not errors:
        try:
            validate(path, registry=registry)
        except RecipeError as exc:
            assert all(e.file == str(path) for e in getattr(exc, "errors", [exc]))


@settings(FUZZ, max_examples=250)
@given(st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=30))
def test_random_recipe_text(tmp_path_factory, registry, parts: list[str]) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text("".join(parts), encoding="utf-8", errors="surrogatepass")
    _check(path, registry)


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=300))
def test_random_recipe_bytes(tmp_path_factory, registry, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_bytes(data)
    _check(path, registry)


# --------------------------------------------------------------------------- structured
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# Values that often fit an option (so that many recipes get as far as validate), and some
# that never do.
plausible = (st.integers(0, 64) | st.floats(0, 1) | st.booleans()
             | st.sampled_from(["max", "entropy", "l1", "cpu", "train", "test", "channels", "global"]))
option_values = plausible | plausible | plausible | values


def _options(registry, kind: str) -> st.SearchStrategy:
    """Options of a pass / source / backend: real field names (and a typo) with any value."""
    table = {"pass": registry.passes, "data": registry.data_sources, "target": registry.backends}[kind]
    fields = sorted({f for cls in table.values() for f in cls.Options.model_fields} | {"typo_field"})
    return st.dictionaries(st.sampled_from(fields), option_values, max_size=2)


@st.composite
def recipes(draw, registry) -> dict:
    recipe: dict = {"version": draw(st.sampled_from([1] * 8 + [2, True, "1", None]))}
    recipe["model"] = draw(st.sampled_from([str(DEMO_MODEL)] * 6 + [
        "missing.onnx", {"torch": "nowhere.py:make", "inputs": [{"name": "x", "shape": [1]}]}, 7, None]))
    passes = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(sorted(registry.passes) + ["no-such-pass"]))
        passes.append(name if draw(st.booleans()) else {name: draw(_options(registry, "pass"))})
    recipe["passes"] = passes
    if draw(st.booleans()):
        roles = draw(st.lists(st.sampled_from(["calibration", "training", "evaluation", "testing"]),
                              max_size=2, unique=True))
        recipe["data"] = {
            role: {"source": draw(st.sampled_from(["digits", "digits", "random", "npz", "digit"])),
                   **draw(_options(registry, "data"))}
            for role in roles
        }
    if draw(st.booleans()):
        recipe["target"] = {"backend": draw(st.sampled_from(["onnxruntime"] * 3 + ["tensorrt", "onnxruntme"])),
                            **draw(_options(registry, "target"))}
    if draw(st.booleans()):
        recipe[draw(st.sampled_from(["seed", "evaluate", "verification", "name", "output", "extra"]))] = draw(values)
    return recipe


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_structured_recipes(tmp_path_factory, registry, data) -> None:
    recipe = data.draw(recipes(registry))
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    _check(path, registry)
