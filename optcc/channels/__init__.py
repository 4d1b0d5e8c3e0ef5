"""Channel-dependency analysis: which channels of an ONNX graph must change together.

Structured edits (removing channels, attention heads or FFN neurons; permuting channels
for 2:4 sparsity) must act on every layer that shares a channel: the producer's output
rows, the consumers' input columns, every BatchNorm or bias vector on the way, the
residual branches a ``Add`` joins, and the shape constants of attention reshapes. This
package finds those couplings on any ONNX graph, for any exporter:

- :mod:`optcc.channels.graph` — :func:`analyze` walks the graph, :class:`ChannelContext`
  is what an op rule sees;
- :mod:`optcc.channels.rules` — :class:`ChannelRule` and :class:`RuleRegistry`: op type
  → rule, with explicit precedence; plugins add rules through the
  ``optcc_channel_rules`` hook;
- :mod:`optcc.channels.builtin` — the built-in rules, one module per op family (weighted layers, elementwise ops,
  normalization, Concat/Split/Flatten, attention reshapes, ...);
- :mod:`optcc.channels.analysis` — the result: classes of coupled channel ids, groups,
  slices, size fixups and blocked channels with reasons;
- :mod:`optcc.channels.index` — index mapping: slice, zero or permute the analysed
  channels in the graph.

Typical use::

    from optcc.channels import analyze, materialize_constant_aliases, slice_channels

    materialize_constant_aliases(model)         # every reader gets its own constant
    analysis = analyze(model)
    for group in analysis.groups():             # channel spaces that can be edited
        ...
    slice_channels(model, analysis, removed)    # removed: a set of class root ids
"""

from __future__ import annotations

from optcc.channels.analysis import (
    ChannelAnalysis,
    ChannelGroup,
    ParamSlice,
    SizeFixup,
)
from optcc.channels.graph import (
    AxisIds,
    ChannelContext,
    ChannelOptions,
    analyze,
    normalize_axis,
    probe_shapes,
)
from optcc.channels.index import (
    clear_intermediate_shapes,
    concat_part_at,
    constant_value,
    materialize_constant_aliases,
    permute_channels,
    set_shape_dim,
    shape_slot,
    slice_channels,
    slot_value,
    unshare_conflicting_constants,
    zero_channels,
)
from optcc.channels.rules import (
    ChannelRule,
    RegisteredRule,
    RuleRegistry,
    builtin_rules,
    default_rules,
)

__all__ = [
    "AxisIds",
    "ChannelAnalysis",
    "ChannelContext",
    "ChannelGroup",
    "ChannelOptions",
    "ChannelRule",
    "ParamSlice",
    "RegisteredRule",
    "RuleRegistry",
    "SizeFixup",
    "analyze",
    "builtin_rules",
    "clear_intermediate_shapes",
    "concat_part_at",
    "constant_value",
    "default_rules",
    "materialize_constant_aliases",
    "normalize_axis",
    "permute_channels",
    "probe_shapes",
    "set_shape_dim",
    "shape_slot",
    "slot_value",
    "slice_channels",
    "unshare_conflicting_constants",
    "zero_channels",
]
