"""Input-channel permutation before magnitude 2:4 (the idea of NVIDIA Apex's ASP).

Which 4 input channels share a group is an accident of the channel order. Permuting the
channels of a tensor changes the groups, and with them how much weight magnitude the N:M
mask can keep. The model computes the same function when the permutation is applied
everywhere the channels appear: the producers' output rows (and their biases, BatchNorm
and other per-channel vectors), every consumer's input columns, and every layer coupled to
them through residual Adds, Concat, depthwise convolutions. ``optcc.channels`` finds that
coupling (the same analysis structured pruning uses) and ``permute_channels`` applies it.

The search, per group of coupled channels: stack the magnitudes ``|W|`` of every
sparsified consumer as one matrix ``M`` (rows: output channel × kernel position of every
consumer; columns: the group's channels in their current order). The objective is the
magnitude the N:M mask keeps, ``Σ_rows Σ_groups top_n(M[row, group])``. Starting from the
current order, a sweep visits every group of ``m`` columns and tries exchanging each of
its columns with each column of ``window`` other groups, applying the best exchange when
it keeps more; sweeps repeat until one finds nothing (a local optimum under single
swaps) or ``sweeps`` is reached. Deterministic: no randomness, no time limit.

Groups whose channels come in units of more than one (attention heads: a head moves as a
whole, so permuting heads never changes a group of 4 inside it), or whose consumers see
the channels at unaligned or differently ordered positions (a Concat at an offset that is
not a multiple of ``m``), are left alone with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from optcc import Model, NMPattern, channels

logger = logging.getLogger(__name__)


def kept_magnitude(groups: np.ndarray, n: int) -> np.ndarray:
    """Magnitude kept by N:M over ``groups`` (..., rows, m): the top-``n`` per row, summed
    over rows."""
    m = groups.shape[-1]
    return np.sort(groups, axis=-1)[..., m - n:].sum(axis=(-1, -2))


def _leave_one_out(group: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For a group (rows × m) and each column i: the sum of the top ``n-1`` of the other
    columns, and their ``n``-th largest, both (m, rows). With them, replacing column i by
    a column ``c`` keeps ``S_i + max(r_i, c)`` per row: no sorting inside the search."""
    m = group.shape[1]
    others = np.stack([np.delete(group, i, axis=1) for i in range(m)])  # (m, rows, m-1)
    ordered = -np.sort(-others, axis=-1)
    return ordered[..., : n - 1].sum(axis=-1), ordered[..., n - 1]


def search_permutation(magnitudes: np.ndarray, pattern: NMPattern, *, sweeps: int = 4,
                       window: int = 64) -> np.ndarray:
    """A column order of ``magnitudes`` (rows × C, C a multiple of m) that keeps more
    magnitude under ``pattern`` (see the module docstring); ``order[j]`` is the current
    column placed at position ``j``."""
    n, m = pattern.n, pattern.m
    count = magnitudes.shape[1] // m
    order = np.arange(magnitudes.shape[1])
    if count < 2:
        return order
    groups = np.ascontiguousarray(
        np.asarray(magnitudes, dtype=np.float32).T.reshape(count, m, -1).transpose(0, 2, 1))
    cache = [_leave_one_out(g, n) for g in groups]
    kept = np.array([kept_magnitude(g, n) for g in groups])
    scale = float(kept.sum()) or 1.0
    for _ in range(sweeps):
        improved = False
        for g in range(count):
            partners = np.array([(g + d) % count for d in range(1, min(window, count - 1) + 1)])
            s_a, r_a = cache[g]  # (m, rows)
            s_b = np.stack([cache[h][0] for h in partners])  # (P, m, rows)
            r_b = np.stack([cache[h][1] for h in partners])
            a = groups[g].T  # (m, rows): column i of a
            b = np.stack([groups[h].T for h in partners])  # (P, m, rows)
            # a's column i <-> partner's column j: (P, i, j)
            new_a = (s_a[None, :, None, :] + np.maximum(r_a[None, :, None, :], b[:, None, :, :])).sum(-1)
            new_b = (s_b[:, None, :, :] + np.maximum(r_b[:, None, :, :], a[None, :, None, :])).sum(-1)
            gain = new_a + new_b - (kept[g] + kept[partners])[:, None, None]
            p, i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
            if gain[p, i, j] > 1e-7 * scale:
                h = int(partners[p])
                column = groups[g][:, i].copy()
                groups[g][:, i] = groups[h][:, j]
                groups[h][:, j] = column
                for x in (g, h):
                    cache[x] = _leave_one_out(groups[x], n)
                    kept[x] = kept_magnitude(groups[x], n)
                order[g * m + i], order[h * m + j] = order[h * m + j], order[g * m + i]
                improved = True
        if not improved:
            break
    return order


def permute_for_pattern(model: Model, sparsified: set[str], pattern: NMPattern, *,
                        sweeps: int = 4, window: int = 64) -> list[dict[str, Any]]:
    """Permute every editable channel group of ``model`` (in place) so that magnitude N:M
    keeps more weight in the layers named in ``sparsified``; the dense function stays the
    same. One row per group: its layers, kept magnitude before and after, or why it was
    left alone."""
    channels.materialize_constant_aliases(model)
    analysis = channels.analyze(model)
    find = analysis.find
    moves: dict[int, int] = {}
    rows = []
    for group in analysis.groups():
        row: dict[str, Any] = {"group": group.name, "channels": len(group.classes)}
        rows.append(row)
        if group.unit != 1:
            row["skipped"] = f"channels move in units of {group.unit} (attention heads)"
            continue
        members = set(group.classes)
        slots: list[int] | None = None
        blocks = []
        for s in analysis.slices:
            if s.role != "in" or s.node is None or s.node.name not in sparsified:
                continue
            positions = [(i, find(cid)) for i, cid in enumerate(s.ids) if find(cid) in members]
            if not positions:
                continue
            where = [i for i, _ in positions]
            order = [root for _, root in positions]
            if (len(set(order)) != len(order) or len(order) != len(members)
                    or where != list(range(where[0], where[0] + len(where))) or where[0] % pattern.m):
                row["skipped"] = f"'{s.node.name}' reads the channels at unaligned or repeated positions"
                break
            if slots is None:
                slots = order
            elif order != slots:
                row["skipped"] = f"'{s.node.name}' reads the channels in another order"
                break
            values = np.moveaxis(np.abs(np.asarray(s.tensor.values, dtype=np.float32)), s.axis, -1)
            values = values.reshape(-1, values.shape[-1])
            blocks.append(values[:, where[0]:where[0] + len(where)])
        if "skipped" in row:
            continue
        if slots is None or len(slots) % pattern.m:
            row["skipped"] = ("no sparsified layer reads these channels" if slots is None
                              else f"{len(slots)} channels is not a multiple of {pattern.m}")
            continue
        magnitudes = np.concatenate(blocks, axis=0)
        order = search_permutation(magnitudes, pattern, sweeps=sweeps, window=window)
        before = float(kept_magnitude(_as_groups(magnitudes, pattern.m), pattern.n).sum())
        after = float(kept_magnitude(_as_groups(magnitudes[:, order], pattern.m), pattern.n).sum())
        total = float(magnitudes.sum()) or 1.0
        row.update(kept_before=before / total, kept_after=after / total,
                   moved=int(np.sum(order != np.arange(len(order)))))
        for j, source in enumerate(order):
            if source != j:
                moves[slots[j]] = slots[int(source)]
    if moves:
        channels.permute_channels(model, analysis, moves)
    return rows


def _as_groups(matrix: np.ndarray, m: int) -> np.ndarray:
    rows, cols = matrix.shape
    return matrix.reshape(rows, cols // m, m).transpose(1, 0, 2)
