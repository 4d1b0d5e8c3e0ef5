"""Load a recipe YAML into a validated :class:`Plan`, or fail with ``file:line:col``.

Everything is checked before any work starts: YAML syntax and duplicate keys, the schema,
that every pass, data source and backend exists (with a did-you-mean otherwise), every
option's type and range (NaN and infinities are refused), that each pass's requirements
(calibration data, training data, torch, CUDA) can be met, and that passes' references to
each other resolve. Every error is collected and reported at once, in file order
(:class:`RecipeErrors`).

Parsing is bounded, because a recipe may come from anyone: at most ``MAX_RECIPE_BYTES`` of
text, ``MAX_DEPTH`` levels of nesting, ``MAX_VALUES`` values once YAML aliases are expanded
(a few hundred bytes of nested aliases can otherwise expand to gigabytes), and no NUL
characters, each refused with ``file:line:col``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from optcc.errors import RecipeError, RecipeErrors
from optcc.recipe.schema import DATA_ROLES, SCHEMA_VERSION, RecipeModel

Loc = tuple[str | int, ...]

MAX_RECIPE_BYTES = 4 * 2**20
MAX_DEPTH = 64
MAX_VALUES = 100_000
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


# --------------------------------------------------------------------------- YAML with marks
class _Located:
    """The parsed YAML plus the (line, col) of every node and mapping key, by path."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.marks: dict[Loc, tuple[int, int]] = {}
        self.key_marks: dict[Loc, tuple[int, int]] = {}
        self.errors: list[RecipeError] = []
        self.values = 0
        self.seen: set[int] = set()

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

    def add(
        self, message: str, loc: Sequence[str | int] = (), *, key: bool = False,
        hint: str | None = None,
    ) -> None:
        """Record an error and carry on (all errors are reported at once)."""
        self.errors.append(self.error(message, loc, key=key, hint=hint))

    def at(self, node: yaml.Node, message: str, hint: str | None = None) -> RecipeError:
        return RecipeError(
            message, file=self.file, line=node.start_mark.line + 1,
            col=node.start_mark.column + 1, hint=hint,
        )

    def build(self, node: yaml.Node, loader: yaml.SafeLoader, path: Loc = ()) -> Any:
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
            raise self.at(node, f"YAML tag '{node.tag}' is not allowed in a recipe")
        self.values += 1
        if self.values > MAX_VALUES or len(path) > MAX_DEPTH:
            # Aliases share nodes, so the node's own mark may be far from the cause: point at
            # the top-level key whose value grew too big or too deep.
            line, col = self.key_marks.get(path[:1], (node.start_mark.line + 1, node.start_mark.column + 1))
            raise RecipeError(
                f"the recipe expands to more than {MAX_VALUES:,} values"
                if self.values > MAX_VALUES else f"the recipe nests deeper than {MAX_DEPTH} levels",
                file=self.file, line=line, col=col,
                hint="YAML aliases (*name) repeat what they name; a recipe never needs this much"
                if id(node) in self.seen or self.values > MAX_VALUES else None,
            )
        self.seen.add(id(node))
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
        value = loader.construct_object(node)
        if isinstance(value, str) and "\x00" in value:
            raise self.at(node, "a NUL character (\\0) in a value")
        return value


def _check_text(file: Path, text: str) -> None:
    """Refuse NUL and the other characters YAML forbids, and nesting beyond ``MAX_DEPTH``,
    with their line and column, before PyYAML's recursive composer sees the text."""
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad:
        index, char = bad.start(), bad.group()
        line = text.count("\n", 0, index) + 1
        col = index - (text.rfind("\n", 0, index) + 1) + 1
        what = "a NUL byte" if char == "\x00" else f"the character U+{ord(char):04X}"
        raise RecipeError(f"{what} in the recipe", file=file, line=line, col=col,
                          hint="recipes are plain UTF-8 text")
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise RecipeError(
                    f"the recipe nests deeper than {MAX_DEPTH} levels", file=file,
                    line=mark.line + 1, col=mark.column + 1,
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _parse_yaml(file: Path, text: str) -> tuple[Any, _Located]:
    located = _Located(file)
    loader = None
    try:
        _check_text(file, text)
        loader = yaml.SafeLoader(text)
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
    except RecursionError as exc:
        raise RecipeError(f"the recipe nests too deeply (limit {MAX_DEPTH})", file=file) from exc
    finally:
        if loader is not None:
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
    located: Any = field(default=None, repr=False)

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

    def output_folder(self, override: str | Path | None = None) -> Path:
        """The absolute output folder: ``override`` (``-o``, relative to the working
        folder) or the recipe's ``output`` (relative to the recipe). A link as the last part
        stays a link, so the ownership check sees the link and not its target."""
        from optcc.errors import OutputError

        if override is not None:
            text = str(override)
            if not text.strip():
                raise OutputError("the output folder is an empty string",
                                  hint="give a folder, e.g. -o out/model")
            path = Path(text).expanduser()
        elif self.recipe.output is None and self.file.stem in {"", ".", ".."}:
            raise OutputError(
                f"cannot name an output folder after the recipe file '{self.file.name}'",
                hint="set 'output:' in the recipe, or pass -o",
            )
        else:
            path = self.output_dir
        if "\x00" in str(path):
            raise OutputError("the output folder's name contains a NUL byte")
        path = Path(os.path.abspath(path))
        if not path.name:
            raise OutputError(f"the output folder cannot be the root folder {path}")
        return path.parent.resolve() / path.name

    def input_files(self) -> list[Path]:
        """Every file or folder the build reads: the recipe, the model or the torch
        factory's file, and the paths in data, target and pass options (options named
        ``path``, ``*_path``, ``*_file``, ``*_cache``, and ``file.py:function`` specs)."""
        found = [self.file.resolve()]
        spec = self.recipe.model
        for value in (spec.path, spec.torch):
            found += option_paths(self, "path", value)
        option_sets = [entry.options for entry in self.data.values()]
        option_sets += [self.backend_options] + [p.options for p in self.passes]
        for options in option_sets:
            for key, value in dict(options or {}).items():
                found += option_paths(self, key, value)
        return found


def option_paths(plan: Plan, key: str, value: Any) -> list[Path]:
    if not isinstance(value, str) or not value or "\x00" in value:
        return []
    if ".py:" in value:
        return [plan.resolve(value.rpartition(":")[0])]
    if key == "path" or key.endswith(("_path", "_file", "_cache")):
        return [plan.resolve(value)]
    return []


def suggest(word: str, candidates: Sequence[str]) -> str | None:
    """'did you mean ...?' for the closest candidate, or None."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _pydantic_errors(
    exc: ValidationError,
    located: _Located,
    prefix: Loc,
    model: type[BaseModel],
    what: str,
) -> list[RecipeError]:
    """Every pydantic error as a RecipeError at the right line."""
    return [_one_pydantic_error(err, located, prefix, model, what) for err in exc.errors()]


def _one_pydantic_error(
    err: Any, located: _Located, prefix: Loc, model: type[BaseModel], what: str
) -> RecipeError:
    """One pydantic error as a RecipeError at the line of the value (or key) it is about."""
    loc = tuple(err["loc"])
    full = (*prefix, *loc)
    dotted = ".".join(str(p) for p in full) if full else "recipe"
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
    return located.error(f"{what}: {dotted}: {err['msg']}", full, hint=hint)


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
    """Parse and fully validate the recipe at ``path`` (see module docstring); raise
    :class:`RecipeErrors` listing every mistake, in file order."""
    plan, errors = plan_recipe(path, registry)
    if errors:
        raise RecipeErrors(sort_errors(errors))
    assert plan is not None
    return plan


def sort_errors(errors: list[RecipeError]) -> list[RecipeError]:
    """Errors in file order (those without a line first), duplicates dropped."""
    unique = {str(e): e for e in errors}
    return sorted(unique.values(), key=lambda e: (e.line or 0, e.col or 0))


def plan_recipe(path: str | Path, registry: Any = None) -> tuple[Plan | None, list[RecipeError]]:
    """The plan and every error found in the recipe (the plan is None when too little of
    the recipe is valid to plan anything). Errors that stop parsing are raised."""
    from optcc.plugins import get_registry

    registry = registry or get_registry()
    file, raw, located = _read_recipe(path, registry)
    normalized = dict(raw)
    for key, long_key in (("model", "path"), ("target", "backend"), ("output", "path")):
        if isinstance(normalized.get(key), str):
            normalized[key] = {long_key: normalized[key]}
    recipe = _validate_top(normalized, located)
    if recipe is None:
        return None, located.errors
    if bool(recipe.model.path) == bool(recipe.model.torch):
        located.add(
            "model: give exactly one of 'path' (an ONNX file) or 'torch' (a module factory)",
            ("model",),
        )
    elif recipe.model.torch and not recipe.model.inputs:
        located.add(
            "model: a torch model needs 'inputs' (name, shape, dtype per input) to export",
            ("model",),
        )
    plan = Plan(file=file, base_dir=file.resolve().parent, recipe=recipe, raw=raw, located=located)
    _plan_target(plan, located, registry)
    _plan_data(plan, located, registry)
    _plan_passes(plan, located, registry)
    return plan, located.errors


def _read_recipe(path: str | Path, registry: Any) -> tuple[Path, dict[str, Any], _Located]:
    """The recipe file's YAML as a mapping with marks; fatal problems are raised."""
    file = find_recipe(str(path), registry)
    try:
        if not file.exists():
            near = (suggest(file.name, [p.name for p in file.parent.glob("*.y*ml")])
                    if file.parent.is_dir() else None)
            raise RecipeError("recipe file not found", file=file, hint=near)
        if file.is_dir():
            raise RecipeError("expected a recipe .yaml file, got a folder", file=file)
        size = file.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"the recipe is {size:,} bytes; optcc reads recipes of up to "
                f"{MAX_RECIPE_BYTES:,}", file=file,
            )
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError("recipe is not UTF-8 text", file=file) from exc
    except OSError as exc:
        from optcc.resources import raise_os_error

        raise_os_error(exc, "reading the recipe")
    raw, located = _parse_yaml(file, text)
    if raw is None:
        raise RecipeError(
            "recipe is empty", file=file, line=1, col=1,
            hint="a recipe needs at least 'version: 1' and 'model:'",
        )
    if not isinstance(raw, dict):
        raise located.error(f"a recipe is a mapping of keys, got a {type(raw).__name__}")
    version = raw.get("version")
    if "version" in raw and (type(version) is not int or version != SCHEMA_VERSION):
        raise located.error(
            f"unsupported recipe version {version!r}; this optcc reads version "
            f"{SCHEMA_VERSION}", ("version",),
        )
    return file, raw, located


def _validate_top(normalized: dict[str, Any], located: _Located) -> RecipeModel | None:
    """Validate the top level, recording every error. Sections with errors are then left
    out (their defaults stand in) so that the rest of the recipe can still be checked."""
    try:
        return RecipeModel.model_validate(normalized)
    except ValidationError as exc:
        located.errors += _pydantic_errors(exc, located, (), RecipeModel, "recipe")
        bad = {e["loc"][0] for e in exc.errors() if e["loc"]}
    if not bad or bad & {"version", "model"}:
        return None
    try:
        return RecipeModel.model_validate({k: v for k, v in normalized.items() if k not in bad})
    except ValidationError:
        return None


def _plan_target(plan: Plan, located: _Located, registry: Any) -> None:
    target = plan.recipe.target
    name = target.backend
    loc: Loc = ("target",) if isinstance(plan.raw.get("target"), str) else ("target", "backend")
    cls = registry.backends.get(name)
    if cls is None:
        hint = suggest(name, list(registry.backends)) or (
            "known backends: " + ", ".join(sorted(registry.backends))
        )
        located.add(f"unknown target backend '{name}'", loc, hint=hint)
        return
    options = {k: v for k, v in (target.model_extra or {}).items()}
    try:
        plan.backend_options = cls.Options.model_validate(options)
    except ValidationError as exc:
        located.errors += _pydantic_errors(exc, located, ("target",), cls.Options, f"target '{name}'")
        return
    plan.backend_cls = cls


def _plan_data(plan: Plan, located: _Located, registry: Any) -> None:
    for role, entry in plan.recipe.data.items():
        name = entry.source
        cls = registry.data_sources.get(name)
        if cls is None:
            hint = suggest(name, list(registry.data_sources)) or (
                "known sources: " + ", ".join(sorted(registry.data_sources))
            )
            located.add(
                f"data.{role}: unknown data source '{name}'", ("data", role, "source"), hint=hint
            )
            continue
        try:
            options = cls.Options.model_validate(dict(entry.model_extra or {}))
        except ValidationError as exc:
            located.errors += _pydantic_errors(
                exc, located, ("data", role), cls.Options, f"data.{role} ({name})"
            )
            continue
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
    earlier: list[str] = []
    for index, item in enumerate(plan.recipe.passes):
        loc: Loc = ("passes", index)
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            options = {} if options is None else options
            if not isinstance(options, dict):
                located.add(
                    f"pass '{name}': options must be a mapping of option: value, got "
                    f"{type(options).__name__}", (*loc, name),
                )
                continue
        else:
            located.add(
                "each pass is a name ('- fold-constants') or a name with options "
                "('- fold-batchnorm: {...}')", loc,
            )
            continue
        cls = registry.passes.get(name)
        if cls is None:
            hint = suggest(name, list(registry.passes)) or (
                "known passes: " + ", ".join(sorted(registry.passes))
            )
            note = registry.failed_plugins_note()
            if note:
                hint = f"{hint}; {note}"
            located.add(f"unknown pass '{name}'", loc if isinstance(item, str) else (*loc, name),
                        key=True, hint=hint)
            continue
        try:
            validated = cls.Options.model_validate(options)
        except ValidationError as exc:
            located.errors += _pydantic_errors(exc, located, (*loc, name), cls.Options, f"pass '{name}'")
            continue
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
                located.add(
                    f"pass '{name}' needs {', '.join(missing)}, which this recipe/machine "
                    "does not provide",
                    loc, hint="; ".join(fixes.get(m, m) for m in missing),
                )
        for problem in cls.problems_in_recipe(validated, list(earlier)):
            located.add(f"pass '{name}': {problem}", loc if isinstance(item, str) else (*loc, name))
        earlier.append(name)
        mark = located.where(loc)
        plan.passes.append(
            PlannedPass(
                name=name, cls=cls, options=validated, position=index + 1,
                line=mark[0] if mark else None, fragment=item,
                plugin=registry.pass_owner(name),
            )
        )


__all__ = ["DATA_ROLES", "Plan", "PlannedPass", "load_recipe", "plan_recipe", "suggest"]
