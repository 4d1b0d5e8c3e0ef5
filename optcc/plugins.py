"""The plugin manager: built-in plugins plus every entry point in the ``optcc`` group.

Loading is never silent. A plugin that fails to import, declares a hook that does not
exist, takes arguments a hook does not have, or returns something that is not a pass /
backend / data source is recorded as a :class:`PluginError` with the plugin's name;
``optcc plugins`` lists it, and every build prints it as a warning. Registered names must
be unique across plugins; a clash names both plugins.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from optcc import hookspecs
from optcc.errors import PluginError

if TYPE_CHECKING:
    from optcc.channels.rules import RuleRegistry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "optcc"

# Core modules that register through the hooks like any plugin (datasette's pattern).
CORE_PLUGINS = (
    "optcc.data.builtin",
    "optcc.backends.onnxruntime",
    "optcc.backends.tensorrt",
    "optcc.backends.cuda",
    "optcc.backends.trt_plugin",
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class PluginInfo:
    """One plugin as ``optcc plugins`` shows it."""

    name: str
    module: str
    version: str | None = None
    distribution: str | None = None
    builtin: bool = False
    error: str | None = None
    passes: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    data_sources: list[str] = field(default_factory=list)
    lowering_rewrites: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    channel_rules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Registry:
    """Everything the loaded plugins contribute, with the plugin that owns each name."""

    manager: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    passes: dict[str, type] = field(default_factory=dict)
    backends: dict[str, type] = field(default_factory=dict)
    data_sources: dict[str, type] = field(default_factory=dict)
    lowering_rewrites: dict[str, type] = field(default_factory=dict)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)
    recipe_dirs: list[Path] = field(default_factory=list)
    channel_rules: RuleRegistry = field(default_factory=lambda: _rule_registry())

    @property
    def hook(self) -> Any:
        return self.manager.hook

    @property
    def errors(self) -> list[PluginError]:
        return [PluginError(p.error, plugin=p.name) for p in self.plugins if p.error]

    def pass_owner(self, pass_name: str) -> str | None:
        return self.owner.get(("pass", pass_name))

    def failed_plugins_note(self) -> str | None:
        failed = [p.name for p in self.plugins if p.error]
        if not failed:
            return None
        return "plugin(s) that failed to load: " + ", ".join(failed) + " (see 'optcc plugins')"


def _validate_class(kind: str, cls: Any) -> str:
    """Check a registered class; return its name or raise ValueError with the reason."""
    from optcc.backends.base import Backend
    from optcc.backends.lowering import LoweringRewrite
    from optcc.data.base import DataOptions, DataSource
    from optcc.passes.base import Pass, PassOptions

    base, options_base = {
        "pass": (Pass, PassOptions),
        "backend": (Backend, None),
        "data source": (DataSource, DataOptions),
        "lowering rewrite": (LoweringRewrite, None),
    }[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"returned {cls!r}, which is not a subclass of optcc.{base.__name__}")
    name = getattr(cls, "name", "")
    if not name or not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} class {cls.__name__} has name {name!r}; names are kebab-case "
            "(lowercase letters, digits and single dashes)"
        )
    if options_base is not None and not (
        isinstance(cls.Options, type) and issubclass(cls.Options, options_base)
    ):
        raise ValueError(
            f"{kind} '{name}': Options must subclass optcc.{options_base.__name__}"
        )
    return name


def _dist_of(module_name: str) -> tuple[str | None, str | None]:
    top = module_name.split(".")[0]
    for dist in md.packages_distributions().get(top, []):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None, None


def create_registry(
    *,
    entry_points: Iterable[md.EntryPoint] | None = None,
    extra_plugins: Iterable[tuple[str, Any]] = (),
    core: bool = True,
) -> Registry:
    """Build a registry: core modules, then entry points, then ``extra_plugins``.

    ``entry_points`` defaults to the installed ``optcc`` group; ``extra_plugins`` are
    ``(name, module_or_object)`` pairs registered directly (tests, embedding applications).
    """
    from optcc import __version__

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry(manager=pm)

    candidates: list[tuple[PluginInfo, Any]] = []
    if core:
        for module_name in CORE_PLUGINS:
            info = PluginInfo(
                name=module_name, module=module_name, version=__version__,
                distribution="optcc", builtin=True,
            )
            candidates.append((info, module_name))
    eps = entry_points if entry_points is not None else md.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(eps, key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        info = PluginInfo(
            name=ep.name,
            module=ep.value,
            version=dist.version if dist is not None else None,
            distribution=dist_name,
            builtin=dist_name == "optcc",
        )
        candidates.append((info, ep))
    for name, obj in extra_plugins:
        dist, version = _dist_of(getattr(obj, "__name__", "") or "")
        candidates.append(
            (PluginInfo(name=name, module=getattr(obj, "__name__", repr(obj)),
                        version=version, distribution=dist), obj)
        )

    for info, target in candidates:
        registry.plugins.append(info)
        try:
            if isinstance(target, str):
                plugin = importlib.import_module(target)
            elif isinstance(target, md.EntryPoint):
                plugin = target.load()
            else:
                plugin = target
        except Exception as exc:
            info.error = f"failed to import {info.module}: {type(exc).__name__}: {exc}"
            logger.warning("plugin '%s' %s", info.name, info.error)
            continue
        try:
            pm.register(plugin, name=info.name)
        except ValueError as exc:  # already registered (same module twice)
            info.error = f"could not be registered: {exc}"
            continue
        except pluggy.PluginValidationError as exc:
            info.error = f"invalid hook implementation: {exc}"
            continue
        unknown = [
            caller.name for caller in (pm.get_hookcallers(plugin) or []) if not caller.has_spec()
        ]
        if unknown:
            pm.unregister(plugin)
            info.error = (
                f"implements unknown hook(s) {', '.join(sorted(unknown))}; known hooks: "
                + ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("optcc_")))
            )
            continue
        info.hooks = sorted(c.name for c in (pm.get_hookcallers(plugin) or []))

    by_name = {info.name: info for info in registry.plugins}
    _collect(registry, by_name, "optcc_passes", "pass", registry.passes, "passes")
    _collect(registry, by_name, "optcc_backends", "backend", registry.backends, "backends")
    _collect(
        registry, by_name, "optcc_data_sources", "data source", registry.data_sources,
        "data_sources",
    )
    _collect(
        registry, by_name, "optcc_lowering_rewrites", "lowering rewrite",
        registry.lowering_rewrites, "lowering_rewrites",
    )
    _collect_channel_rules(registry, by_name)
    for impl in pm.hook.optcc_recipe_dirs.get_hookimpls():
        try:
            registry.recipe_dirs.extend(Path(p) for p in (impl.function() or []))
        except Exception as exc:
            _fail(by_name, impl.plugin_name, f"optcc_recipe_dirs raised {exc!r}")
    return registry


def _fail(by_name: dict[str, PluginInfo], plugin: str, message: str) -> None:
    info = by_name[plugin]
    info.error = message
    logger.warning("plugin '%s': %s", plugin, message)


def _impls_in_order(registry: Registry, hook_name: str) -> list[Any]:
    """A hook's implementations, built-in plugins first, then the others in load order."""
    order = {info.name: (not info.builtin, i) for i, info in enumerate(registry.plugins)}
    return sorted(
        getattr(registry.hook, hook_name).get_hookimpls(),
        key=lambda impl: order.get(impl.plugin_name, (True, len(order))),
    )


def _collect(
    registry: Registry,
    by_name: dict[str, PluginInfo],
    hook_name: str,
    kind: str,
    target: dict[str, type],
    info_attr: str,
) -> None:
    """Call one registration hook plugin by plugin, so each name has a known owner.

    On a name clash the first plugin keeps the name: built-in plugins first, then the
    others in load order (entry points sorted by name).
    """
    for impl in _impls_in_order(registry, hook_name):
        plugin = impl.plugin_name
        try:
            items = impl.function() or []
            names = [_validate_class(kind, cls) for cls in items]
        except Exception as exc:
            _fail(by_name, plugin, f"{hook_name}() failed: {exc}")
            continue
        for name, cls in zip(names, items, strict=True):
            existing = registry.owner.get((kind, name))
            if existing is not None and existing != plugin:
                _fail(
                    by_name, plugin, f"{kind} '{name}' is already registered by plugin '{existing}'"
                )
                continue
            target[name] = cls
            registry.owner[(kind, name)] = plugin
            getattr(by_name[plugin], info_attr).append(name)


def _rule_registry() -> RuleRegistry:
    from optcc.channels.rules import RuleRegistry

    return RuleRegistry()


def _collect_channel_rules(registry: Registry, by_name: dict[str, PluginInfo]) -> None:
    """Gather op rules for the channel analysis, plugin by plugin (built-ins, then load
    order), so a failing plugin is named and a later plugin's rule wins ties."""
    from optcc.channels.rules import RuleRegistry

    for impl in _impls_in_order(registry, "optcc_channel_rules"):
        try:
            # Validate the plugin's rules together first: a bad one registers none of them.
            checked = RuleRegistry(impl.function() or [], owner=impl.plugin_name)
            registry.channel_rules.extend(checked)
            by_name[impl.plugin_name].channel_rules = checked.rule_names()
        except Exception as exc:
            _fail(by_name, impl.plugin_name, f"optcc_channel_rules() failed: {exc}")


_REGISTRY: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, created on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = create_registry()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests and embedding applications)."""
    global _REGISTRY
    _REGISTRY = registry
