"""How numbers, paths and names are written in reports and tables: a few significant
digits, units, percentages for fractions."""

from __future__ import annotations

import os
import re
from typing import Any

# Stats keys whose values in [0, 1] are fractions, shown as percentages.
_FRACTION_KEY = re.compile(
    r"(^|_)(removed|ratio|sparsity|coverage|accuracy|agreement|drop|budget|share|fraction)($|_)"
    r"|^metric_"
)
_SECONDS_KEY = re.compile(r"(^|_)(seconds|secs|time)$|_s$")


def fmt_int(n: int | float | None) -> str:
    """A count with a unit and about four significant digits: 520.8k, 7.71M, 950."""
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            scaled = n / size
            text = f"{scaled:.1f}" if abs(scaled) >= 100 else f"{scaled:.2f}"
            text = text.rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{n:.4g}" if isinstance(n, float) else str(n)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds >= 60:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_pct(fraction: float | None, digits: int = 2) -> str:
    return "–" if fraction is None else f"{100 * fraction:.{digits}f} %"


def fmt_ratio(ratio: float | None) -> str:
    """×0.252, ×9.76, ×120"""
    if ratio is None:
        return "–"
    return f"×{ratio:.3g}" if ratio < 100 else f"×{ratio:.0f}"


def fmt_diff(value: float | None) -> str:
    """A largest output change: 0, 9.5e-07, 0.35, 12."""
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2g}"


def fmt_path(path: str | None) -> str:
    """A path without ``..`` segments (``torch:`` sources are left as they are)."""
    if not path:
        return "–"
    if path.startswith("torch:"):
        return path
    return os.path.normpath(path)


def humanize(key: str) -> str:
    """``params_removed`` → ``params removed``."""
    return key.replace("_", " ")


def fmt_value(key: str, value: Any) -> str:
    """A statistic for a person: fractions as percentages, seconds with a unit, floats with
    four significant digits, large integers grouped."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if _FRACTION_KEY.search(key) and 0.0 <= value <= 1.0:
            return fmt_pct(value)
        if _SECONDS_KEY.search(key):
            return fmt_seconds(value)
        return f"{value:.4g}"
    if isinstance(value, list | tuple | dict) and not value:
        return "none"
    if isinstance(value, list | tuple):
        shown = [fmt_value(key, v) for v in value[:12]]
        more = f", … ({len(value) - 12} more)" if len(value) > 12 else ""
        return ", ".join(shown) + more
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt_value(str(k), v)}" for k, v in list(value.items())[:8]) + (
            ", …" if len(value) > 8 else ""
        )
    return str(value)


def short_names(names: list[str], width: int = 34) -> list[str]:
    """Layer names for plot axes: a prefix shared by all of them dropped, and long ones cut
    in the middle (``/encoder/layer.11/…/query/MatMul``)."""
    if len(names) > 1:
        prefix = os.path.commonprefix(names)
        cut = prefix.rfind("/") + 1 if "/" in prefix else 0
        if cut and all(len(n) > cut for n in names):
            names = [n[cut:] for n in names]
    out = []
    for name in names:
        if len(name) > width:
            keep = (width - 1) // 2
            name = name[:keep] + "…" + name[-(width - 1 - keep):]
        out.append(name)
    return out
