"""Selection: which classes to remove, from the importances, the ratio and the recipe's
rounding, minimum, per-layer overrides and exclusions."""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict

import numpy as np

from .importance import Group


def plan_removal(
    groups: list[Group],
    ratio: float,
    *,
    round_to: int,
    min_channels: int,
    overrides: dict[str, float],
    exclude: list[str],
    scope: str,
) -> tuple[set[int], dict[str, str]]:
    """Which classes to remove. Returns (removed roots, skip reasons by group name)."""
    removed: set[int] = set()
    skipped: dict[str, str] = {}
    counts: dict[int, int] = {}
    active = []
    for gi, g in enumerate(groups):
        if any(fnmatch.fnmatchcase(s, p) for s in g.sources for p in exclude):
            skipped[g.name] = "excluded by the recipe"
            continue
        r = ratio
        for pattern, value in overrides.items():
            if any(fnmatch.fnmatchcase(s, pattern) for s in g.sources):
                r = value
        active.append((gi, r))
    if scope == "global" and active:
        normalized = []
        for gi, _ratio in active:
            imp = groups[gi].importance
            mean = float(imp.mean()) if imp.size and imp.mean() > 0 else 1.0
            normalized += [(v / mean, gi) for v in imp]
        normalized.sort()
        budget = int(ratio * len(normalized))
        per_group: dict[int, int] = defaultdict(int)
        for _, gi in normalized[:budget]:
            per_group[gi] += 1
        for gi, r in active:
            target = per_group.get(gi, 0)
            if r != ratio:  # a per-layer override wins over the global ranking
                target = int(round(r * len(groups[gi].classes)))
            counts[gi] = target
    else:
        for gi, r in active:
            counts[gi] = int(round(r * len(groups[gi].classes)))
    for gi, drop in counts.items():
        g = groups[gi]
        n = len(g.classes)
        keep = n - drop
        step = max(1, round_to // math.gcd(round_to, g.unit)) if round_to > 1 else 1
        keep = max(keep, math.ceil(min_channels / g.unit), 1)
        keep = min(n, int(math.ceil(keep / step) * step))
        if keep >= n:
            if drop > 0:
                skipped[g.name] = (
                    f"{n} unit(s): rounding to a multiple of {round_to} channels and the "
                    f"minimum of {min_channels} leave nothing to remove"
                )
            continue
        order = np.argsort(g.importance, kind="stable")
        removed.update(g.classes[i] for i in order[: n - keep])
    return removed, skipped
