"""Keep recorded N:M patterns valid after a pass reshapes weights.

A layer sparsified to N:M carries ``sparsity`` metadata on its node (pattern, method) and a
``mask`` on its weight tensor. A pass that slices weights (structured pruning removing input
channels) shifts the groups: four consecutive channels after the cut are not the four
before it, so a group can now hold more than N non-zeros, and the stored mask no longer has
the weight's shape. :func:`restore_nm_patterns` re-derives the pattern on the weight as it
is now: groups that still follow it are left exactly as they are; in a group that does not,
the N largest magnitudes are kept (every weight that was zero stays zero). The mask is
rewritten to the new shape. When the reduction length is no longer a multiple of M the
pattern cannot hold; the layer's metadata then says so and its mask is dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from optcc.ir.model import Model
from optcc.sparse.pattern import (
    NMPattern,
    check_matrix,
    matrix_to_weight,
    nm_keep,
    pattern_fit,
    sparse_layer,
)

logger = logging.getLogger(__name__)


def restore_nm_patterns(model: Model) -> list[dict[str, Any]]:
    """Re-derive every recorded N:M pattern on ``model`` (in place); one row per layer:
    ``status`` is ``kept`` (still valid), ``re-derived`` (``fixed_groups`` groups re-masked)
    or ``lost`` (with the ``reason``)."""
    rows = []
    nodes = {node.name: node for node in model.graph.nodes}
    for name, info in list(model.meta.nodes.items()):
        record = info.get("sparsity")
        if not isinstance(record, dict) or "pattern" not in record or name not in nodes:
            continue
        layer = sparse_layer(nodes[name])
        pattern = NMPattern.parse(record["pattern"])
        row: dict[str, Any] = {"name": name, "pattern": str(pattern)}
        fit = pattern_fit(layer, pattern) if layer is not None else "the layer has no constant weight"
        if layer is None or fit is not None or layer.quantized:
            if layer is not None and fit is None:  # INT8 weights: report, do not requantize
                check = layer.check(pattern)
                row.update(status="kept" if check and not check.violating else "lost",
                           reason=None if check and not check.violating else "INT8 weight breaks the pattern")
            else:
                row.update(status="lost", reason=fit)
            if row["status"] == "lost":
                record["lost"] = row["reason"]
                if layer is not None:
                    model.meta.tensor(layer.weight.name).pop("mask", None)
            rows.append(row)
            continue
        matrix = layer.matrix()
        check = check_matrix(matrix, pattern)
        keep = nm_keep(np.abs(matrix), pattern) & (matrix != 0)
        values = np.asarray(layer.weight.values)
        if check.violating:
            layer.weight.values = matrix_to_weight(np.where(keep, matrix, 0), layer.shape,
                                                   layer.axis).astype(values.dtype)
        meta = model.meta.tensor(layer.weight.name)
        meta["mask"] = np.ascontiguousarray(matrix_to_weight(keep, layer.shape, layer.axis))
        meta["nm_pattern"] = {"pattern": str(pattern), "axis": layer.axis}
        record.update(weight=layer.weight.name, axis=layer.axis)
        record.pop("lost", None)
        row.update(status="re-derived" if check.violating else "kept", fixed_groups=check.violating)
        rows.append(row)
    _drop_stale_masks(model)
    return rows


def _drop_stale_masks(model: Model) -> None:
    """Masks whose shape no longer matches their tensor are meaningless: drop them."""
    tensors = model.tensor_map()
    for name, meta in model.meta.tensors.items():
        mask = meta.get("mask")
        tensor = tensors.get(name)
        if mask is None or tensor is None or not hasattr(tensor, "values"):
            continue
        if tuple(np.asarray(mask).shape) != tuple(np.asarray(tensor.values).shape):
            logger.debug("dropping the stale mask of %s", name)
            meta.pop("mask")
