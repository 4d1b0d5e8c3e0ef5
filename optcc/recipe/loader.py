"""Load a recipe YAML into a validated :class:`Plan`, or fail with ``file:line:col``.

Everything is checked before any work starts: YAML syntax and duplicate keys, the schema,
that every pass, data source and backend exists (with a did-you-mean otherwise), every
option's type and range, and that each pass's requirements (calibration data, training
data, torch, CUDA) can be met.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from optcc.errors import RecipeError
from optcc.recipe.schema import DATA_ROLES, SCHEMA_VERSION, RecipeModel

Loc = tuple[str | int, ...]


# --------------------------------------------------------------------------- YAML with marks
class _Located:
    """The parsed YAML plus the (line, col) of every node and mapping key, by path."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.marks: dict[Loc, tuple[int, int]] = {}
        self.key_marks: dict[Loc, tuple[int, int]] = {}

    def where(self, loc: Sequence[str | int], *, key: bool = False) -> tuple[int, int] | None:
        """The mark of the deepest known prefix of ``loc`` (1-based line and column)."""
        path = tuple(loc)
        while True:
            if key and path in self.key_marks:
                return self.key_marks[path]
            if path in self.marks:
                return self.marks[path]
            if not path:
                return None
            path = path[:-1]

    def error(
        self, message: str, loc: Sequence[str | int] = (), *, key: bool = False,
        hint: str | None = None,
    ) -> RecipeError:
        mark = self.where(loc, key=key)
        line, col = mark if mark else (None, None)
        return RecipeError(message, file=self.file, line=line, col=col, hint=hint)

    def build(self, node: yaml.Node, loader: yaml.SafeLoader, path: Loc = ()) -> Any:
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeError(
                        "mapping keys must be plain names", file=self.file,
                        line=key_node.start_mark.line + 1, col=key_node.start_mark.column + 1,
                    )
                key = loader.construct_object(key_node)
                key = str(key) if not isinstance(key, str) else key
                if key in result:
                    first = self.key_marks[(*path, key)]
                    raise RecipeError(
                        f"duplicate key '{key}' (first defined on line {first[0]})",
                        file=self.file, line=key_node.start_mark.line + 1,
                        col=key_node.start_mark.column + 1,
                        hint="YAML would silently keep only the last one; remove one of them",
                    )
                self.key_marks[(*path, key)] = (
                    key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                )
                result[key] = self.build(value_node, loader, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, loader, (*path, i)) for i, item in enumerate(node.value)]
        return loader.construct_object(node)


def _parse_yaml(file: Path, text: str) -> tuple[Any, _Located]:
    located = _Located(file)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, located
        return located.build(node, loader), located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(
            f"invalid YAML: {problem}", file=file,
            line=mark.line + 1 if mark else None, col=mark.column + 1 if mark else None,
        ) from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"invalid YAML: {exc}", file=file) from exc
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- the plan
@dataclass
class PlannedPass:
    """One pass of the plan: its class, validated options, position and recipe fragment."""

    name: str
    cls: type
    options: Any
    position: int
    line: int | None
    fragment: Any
    plugin: str | None = None


@dataclass
class DataPlan:
    role: str
    source: str
    cls: type
    options: Any


@dataclass
class Plan:
    """A validated recipe, ready to build."""

    file: Path
    base_dir: Path
    recipe: RecipeModel
    raw: dict[str, Any]
    passes: list[PlannedPass] = field(default_factory=list)
    data: dict[str, DataPlan] = field(default_factory=dict)
    backend_cls: type | None = None
    backend_options: Any = None

    @property
    def name(self) -> str:
        return self.recipe.name or self.file.stem

    @property
    def output_dir(self) -> Path:
        spec = self.recipe.output
        if spec is None:
            return self.base_dir / "out" / self.file.stem
        p = Path(spec.path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def suggest(word: str, candidates: Sequence[str]) -> str | None:
    """'did you mean ...?' for the closest candidate, or None."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _pydantic_error(
    exc: ValidationError,
    located: _Located,
    prefix: Loc,
    model: type[BaseModel],
    what: str,
) -> RecipeError:
    """Turn the first pydantic error into a RecipeError at the right line."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    full = (*prefix, *loc)
    hint = None
    if loc and loc[-1] == "[key]":  # a mapping key outside an allowed set (data roles)
        key_loc = (*prefix, *loc[:-1])
        expected = err.get("ctx", {}).get("expected", "")
        options = [s.strip(" '") for s in expected.replace(" or ", ",").split(",") if s.strip()]
        hint = suggest(str(loc[-2]), options)
        allowed = f"allowed: {', '.join(options)}"
        return located.error(
            f"{what}: unknown key '{loc[-2]}' in '{'.'.join(map(str, key_loc[:-1]))}'",
            key_loc, key=True, hint=f"{hint} {allowed}" if hint else allowed,
        )
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        fields = _fields_at(model, loc[:-1])
        hint = suggest(key, fields)
        allowed = ", ".join(sorted(fields)) if fields else "none"
        hint = f"{hint + ' ' if hint else ''}allowed keys: {allowed}"
        return located.error(f"{what}: unknown key '{key}'", full, key=True, hint=hint)
    if err["type"] == "missing":
        return located.error(f"{what}: missing required key '{loc[-1]}'", full[:-1])
    if err["type"] in {"literal_error", "enum"}:
        expected = err.get("ctx", {}).get("expected", "")
        got = err.get("input")
        options = [s.strip(" '") for s in expected.replace(" or ", ",").split(",")]
        hint = suggest(str(got), options) if isinstance(got, str) else None
    return located.error(value_error_message(what, loc, err), full, hint=hint)


_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                "less_than_equal": "<="}
_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false",
               "string": "text", "list": "a list", "dict": "a mapping"}


def value_error_message(what: str, loc: Loc, err: Any) -> str:
    """One pydantic value error in recipe words, e.g. ``pass 'x' option 'cap': must be > 0
    (got 0)``: the option's own path (list items 1-based), the rule, the offending value."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"item {part + 1}")
        elif not str(part).startswith(("function-", "union[", "nullable[")):  # pydantic internals
            parts.append(str(part))
    name = ".".join(p for p in parts if not p.startswith("item "))
    items = [p for p in parts if p.startswith("item ")]
    kind = "key" if what == "recipe" else "option"
    subject = f"{what} {kind} '{name}'" + (f" {items[-1]}" if items else "") if name else what
    kind_of_error, ctx = err.get("type", ""), err.get("ctx") or {}
    base = kind_of_error.split("_")[0]
    if kind_of_error in _BOUND_WORDS:
        limit = next(iter(ctx.values()), "?")
        rule = f"must be {_BOUND_WORDS[kind_of_error]} {limit:g}" if isinstance(
            limit, int | float) else f"must be {_BOUND_WORDS[kind_of_error]} {limit}"
    elif kind_of_error == "int_from_float":
        rule = "must be a whole number"
    elif kind_of_error.endswith(("_parsing", "_type")) and base in _TYPE_WORDS:
        rule = f"must be {_TYPE_WORDS[base]}"
    elif kind_of_error in {"literal_error", "enum"}:
        rule = f"must be one of {ctx.get('expected', '?')}"
    else:
        message = str(err.get("msg", "invalid value"))
        rule = message[:1].lower() + message[1:]
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) or got is None and "input" not in err else (
        f" (got {yaml.safe_dump(got, default_flow_style=True).strip().removesuffix('...').strip()})"
    )
    return f"{subject}: {rule}{shown}"


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return []
        annotation = info.annotation
        inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)]
        candidates = [annotation, *inner]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def find_recipe(name: str, registry: Any = None) -> Path:
    """A recipe path as given, or a bare name looked up in plugin recipe folders."""
    path = Path(name).expanduser()
    if path.exists() or path.suffix in {".yaml", ".yml"} or "/" in name:
        return path
    dirs = list(registry.recipe_dirs) if registry is not None else []
    for folder in dirs:
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name}{suffix}"
            if candidate.exists():
                return candidate
    return path


def load_recipe(path: str | Path, registry: Any = None) -> Plan:
    """Parse and fully validate the recipe at ``path`` (see module docstring)."""
    from optcc.plugins import get_registry

    registry = registry or get_registry()
    file = find_recipe(str(path), registry)
    if not file.exists():
        near = suggest(file.name, [p.name for p in file.parent.glob("*.y*ml")]) if file.parent.exists() else None
        raise RecipeError("recipe file not found", file=file, hint=near)
    if file.is_dir():
        raise RecipeError("expected a recipe .yaml file, got a folder", file=file)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError("recipe is not UTF-8 text", file=file) from exc
    raw, located = _parse_yaml(file, text)
    if raw is None:
        raise RecipeError(
            "recipe is empty", file=file, line=1, col=1,
            hint="a recipe needs at least 'version: 1' and 'model:'",
        )
    if not isinstance(raw, dict):
        raise located.error(f"a recipe is a mapping of keys, got a {type(raw).__name__}")
    if "version" in raw and raw["version"] != SCHEMA_VERSION:
        raise located.error(
            f"unsupported recipe version {raw['version']!r}; this optcc reads version "
            f"{SCHEMA_VERSION}", ("version",),
        )
    normalized = dict(raw)
    if isinstance(normalized.get("model"), str):
        normalized["model"] = {"path": normalized["model"]}
    if isinstance(normalized.get("target"), str):
        normalized["target"] = {"backend": normalized["target"]}
    if isinstance(normalized.get("output"), str):
        normalized["output"] = {"path": normalized["output"]}
    try:
        recipe = RecipeModel.model_validate(normalized)
    except ValidationError as exc:
        raise _pydantic_error(exc, located, (), RecipeModel, "recipe") from exc

    if bool(recipe.model.path) == bool(recipe.model.torch):
        raise located.error(
            "model: give exactly one of 'path' (an ONNX file) or 'torch' (a module factory)",
            ("model",),
        )
    if recipe.model.torch and not recipe.model.inputs:
        raise located.error(
            "model: a torch model needs 'inputs' (name, shape, dtype per input) to export",
            ("model",),
        )
    base_dir = file.resolve().parent
    plan = Plan(file=file, base_dir=base_dir, recipe=recipe, raw=raw)
    _plan_target(plan, located, registry)
    _plan_data(plan, located, registry)
    _plan_passes(plan, located, registry)
    return plan


def _plan_target(plan: Plan, located: _Located, registry: Any) -> None:
    target = plan.recipe.target
    name = target.backend
    loc: Loc = ("target",) if isinstance(plan.raw.get("target"), str) else ("target", "backend")
    cls = registry.backends.get(name)
    if cls is None:
        hint = suggest(name, list(registry.backends)) or (
            "known backends: " + ", ".join(sorted(registry.backends))
        )
        raise located.error(f"unknown target backend '{name}'", loc, hint=hint)
    options = {k: v for k, v in (target.model_extra or {}).items()}
    try:
        plan.backend_options = cls.Options.model_validate(options)
    except ValidationError as exc:
        raise _pydantic_error(exc, located, ("target",), cls.Options, f"target '{name}'") from exc
    plan.backend_cls = cls


def _plan_data(plan: Plan, located: _Located, registry: Any) -> None:
    for role, entry in plan.recipe.data.items():
        name = entry.source
        cls = registry.data_sources.get(name)
        if cls is None:
            hint = suggest(name, list(registry.data_sources)) or (
                "known sources: " + ", ".join(sorted(registry.data_sources))
            )
            raise located.error(
                f"data.{role}: unknown data source '{name}'", ("data", role, "source"), hint=hint
            )
        try:
            options = cls.Options.model_validate(dict(entry.model_extra or {}))
        except ValidationError as exc:
            raise _pydantic_error(
                exc, located, ("data", role), cls.Options, f"data.{role} ({name})"
            ) from exc
        plan.data[role] = DataPlan(role=role, source=name, cls=cls, options=options)


def available_capabilities(plan: Plan) -> set[str]:
    """What this build can offer passes: data roles present, torch, CUDA."""
    from optcc.backends.tensorrt import gpu_present

    caps = {f"{role}-data" for role in plan.data}
    if importlib.util.find_spec("torch") is not None:
        caps.add("torch")
        if gpu_present()[0]:
            caps.add("cuda")
    return caps


def _plan_passes(plan: Plan, located: _Located, registry: Any) -> None:
    caps: set[str] | None = None
    for index, item in enumerate(plan.recipe.passes):
        loc: Loc = ("passes", index)
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            options = {} if options is None else options
            if not isinstance(options, dict):
                raise located.error(
                    f"pass '{name}': options must be a mapping of option: value, got "
                    f"{type(options).__name__}", (*loc, name),
                )
        else:
            raise located.error(
                "each pass is a name ('- fold-constants') or a name with options "
                "('- fold-batchnorm: {...}')", loc,
            )
        cls = registry.passes.get(name)
        if cls is None:
            hint = suggest(name, list(registry.passes)) or (
                "known passes: " + ", ".join(sorted(registry.passes))
            )
            note = registry.failed_plugins_note()
            if note:
                hint = f"{hint}; {note}"
            raise located.error(f"unknown pass '{name}'", loc if isinstance(item, str) else (*loc, name), key=True, hint=hint)
        try:
            validated = cls.Options.model_validate(options)
        except ValidationError as exc:
            raise _pydantic_error(
                exc, located, (*loc, name), cls.Options, f"pass '{name}'"
            ) from exc
        needs = {getattr(r, "value", r) for r in cls.required_for(validated)}
        if needs:
            caps = caps if caps is not None else available_capabilities(plan)
            missing = sorted(needs - caps)
            if missing:
                fixes = {
                    "calibration-data": "add 'data: calibration: {source: ...}'",
                    "training-data": "add 'data: training: {source: ...}'",
                    "evaluation-data": "add 'data: evaluation: {source: ...}'",
                    "torch": "pip install 'optcc[torch]'",
                    "cuda": "run on a machine with an NVIDIA GPU and a CUDA build of torch",
                }
                raise located.error(
                    f"pass '{name}' needs {', '.join(missing)}, which this recipe/machine "
                    "does not provide",
                    loc, hint="; ".join(fixes.get(m, m) for m in missing),
                )
        mark = located.where(loc)
        plan.passes.append(
            PlannedPass(
                name=name, cls=cls, options=validated, position=index + 1,
                line=mark[0] if mark else None, fragment=item,
                plugin=registry.pass_owner(name),
            )
        )


__all__ = ["DATA_ROLES", "Plan", "PlannedPass", "load_recipe", "suggest"]
