"""Every plugin hook optcc calls. The docstrings below are the plugin author's reference.

A plugin is any importable module or object with functions named after these hooks and
decorated with :data:`hookimpl`::

    from optcc import hookimpl

    @hookimpl
    def optcc_passes():
        return [MyPass]

optcc finds third-party plugins through the ``optcc`` entry-point group (see the README's
"Writing a plugin"); the built-in passes, data sources and backends are registered through
these same hooks. optcc calls every hook with keyword arguments; an implementation may
accept any subset of them (pluggy passes only the ones it names), so adding an argument
later never breaks an existing plugin. Hooks run in reverse registration order: plugins
registered later run first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from optcc.backends import Backend
    from optcc.backends.lowering import LoweringRewrite
    from optcc.channels import ChannelRule
    from optcc.data import DataSource
    from optcc.ir import Model
    from optcc.passes import Pass, PassContext, PassResult

PROJECT = "optcc"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate a plugin's hook functions with this.
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration
@hookspec
def optcc_passes() -> list[type[Pass]]:
    """Return the pass classes this plugin contributes.

    Called once, when the plugin manager starts. Each item is a subclass of
    :class:`optcc.Pass` with a unique kebab-case ``name`` — the key a recipe uses. Two
    plugins registering the same name is an error that names both plugins. Return ``[]``
    when the plugin has no passes. The pass's ``Options`` model becomes part of the recipe
    schema, so its fields should carry types, bounds, defaults and descriptions.
    """


@hookspec
def optcc_backends() -> list[type[Backend]]:
    """Return the backend classes this plugin contributes.

    Each item is a subclass of :class:`optcc.Backend` with a unique ``name`` — the value of
    a recipe's ``target``. A backend whose libraries or hardware are missing must still be
    registrable: report that from ``is_available()``, importing heavy libraries lazily.
    """


@hookspec
def optcc_lowering_rewrites() -> list[type[LoweringRewrite]]:
    """Return the lowering rewrite classes this plugin contributes.

    Each item is a subclass of :class:`optcc.backends.lowering.LoweringRewrite` with a
    unique kebab-case ``name`` and the set of backend names it applies to (``targets``).
    A backend that supports rewrites (``tensorrt``) instantiates every registered rewrite
    for its target, in registration order, when it lowers the final model, unless the
    recipe's ``rewrites`` option names a subset. A rewrite gets a private copy of the model
    and a ``LoweringContext``, and returns a ``LoweringResult``: the model, whether it
    changed, and the plugin libraries its new nodes need (added to the engine build). This
    is where TensorRT plugin nodes are inserted; the portable model is never changed.
    """


@hookspec
def optcc_data_sources() -> list[type[DataSource]]:
    """Return the data source classes this plugin contributes.

    Each item is a subclass of :class:`optcc.DataSource` with a unique ``name`` — the value
    of ``source:`` in a recipe's ``data`` section — and an ``Options`` model (a subclass of
    :class:`optcc.data.DataOptions`).
    """


@hookspec
def optcc_recipe_dirs() -> list[Path]:
    """Return folders holding recipe YAML files this plugin ships.

    ``optcc build NAME`` and ``optcc validate NAME`` look a bare recipe name up in these
    folders (after the current directory), so a plugin package can ship ready recipes.
    """


@hookspec
def optcc_channel_rules() -> list[ChannelRule]:
    """Return op rules for the channel-dependency analysis (:mod:`optcc.channels`).

    Called once, when the plugin manager starts. Structured pruning (and any pass that
    edits channels, such as a permutation for 2:4 sparsity) asks, for every node, how
    channel ids flow through it. Each item is an instance of :class:`optcc.ChannelRule`
    (or a subclass taking no arguments) that names its op types in ``ops`` (and its
    ``domain`` for custom ops) and implements ``propagate(node, ctx)``: read the inputs'
    ids with ``ctx.ids``, then record the outputs' ids (``ctx.set_ids``), coupled ids
    (``ctx.couple``), constants to slice (``ctx.slice``), attributes or shape values to
    update (``ctx.fixup``) and channels that must stay (``ctx.block``). Without a rule, an
    op blocks every channel that reaches it, so a rule is how a plugin makes its custom op
    (or an op optcc handles too cautiously) prunable.

    Precedence: for each node the rule with the highest ``priority`` whose
    ``applies(node, ctx)`` is true wins; optcc's built-in rules have priority 0 and come
    first, so a plugin rule of equal priority replaces a built-in one. Return ``[]`` when
    the plugin has none. A rule that is not a ``ChannelRule`` or names no op type is
    reported as this plugin's load error.
    """


# --------------------------------------------------------------------------- instrumentation
@hookspec
def optcc_before_pass(pass_: Pass, model: Model, ctx: PassContext, position: int) -> None:
    """Called before each pass runs.

    ``pass_`` is the configured pass instance (its options in ``pass_.options``), ``model``
    the model it will receive (do not modify it), ``ctx`` the pass context and ``position``
    the pass's 1-based index in the recipe. Return value ignored. An exception raised here
    fails the build with an error naming this plugin.
    """


@hookspec
def optcc_after_pass(
    pass_: Pass, result: PassResult, record: dict[str, Any], ctx: PassContext, position: int
) -> None:
    """Called after a pass has run and its model has been verified.

    ``pass_`` is the pass instance; ``result`` its :class:`optcc.PassResult` (the new model
    is ``result.model``); ``record`` is the dict that goes into ``report.json`` for this pass
    (time, parameters, bytes, metric, output difference, the pass's own stats) — a plugin
    may add keys to it under its own name; ``ctx`` is the pass context and ``position`` the
    pass's 1-based index. Return value ignored. An exception raised here fails the build
    with an error naming this plugin.
    """


@hookspec
def optcc_pass_failed(
    pass_: Pass, error: Exception, ctx: PassContext, position: int, reproducer: Path | None
) -> None:
    """Called when a pass raised, produced an invalid model or broke its tolerance.

    ``pass_`` is the failing pass instance; ``error`` the :class:`optcc.PassError` about to
    be raised (its ``__cause__`` is the original exception); ``ctx`` the pass context;
    ``position`` the pass's 1-based index; ``reproducer`` the folder holding the model
    before the failing pass and a one-pass recipe, or None when it could not be written.
    Return value ignored; the build fails afterwards regardless, and an exception raised
    here is logged, never allowed to hide the original error.
    """


@hookspec
def optcc_build_finished(report: dict[str, Any], output_dir: Path) -> None:
    """Called once a build has succeeded and its output folder is in place: once per build,
    in the process that published it (rank 0 under torchrun; the other ranks publish
    nothing and do not call it).

    ``report`` is the content of ``report.json``; ``output_dir`` the published output
    folder. Use it to upload artifacts, send notifications or write extra files: files
    written into ``output_dir`` here belong to the build, and the next build of that output
    replaces them with the rest. Return value ignored.
    """
