"""Tile-configuration autotuning for the sparse kernels, with a persistent cache.

The library holds a small table of tile configurations per architecture and element types
(``KernelLibrary.configs``). Which one is fastest depends on the GEMM shape and the card, so
the first time a shape ``(M, N, K)`` runs, :class:`KernelTuner` times every configuration
that accepts it on the real operands and keeps the fastest; later runs, in this process or
any other, read the choice from the cache, the way TensorRT's timing cache works.

The cache is a JSON file optcc owns (default ``~/.cache/optcc/kernels/tuning.json``;
``OPTCC_CACHE_DIR`` moves it, a backend option names another). Entries are keyed by card
name, library build and problem, so a new GPU, driver-independent rebuild or shape is tuned
afresh and nothing stale is reused. Writes go through a temporary file and a rename, under
a lock, so concurrent processes never leave a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_path() -> Path:
    root = os.environ.get("OPTCC_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "optcc"
    return base / "kernels" / "tuning.json"


@dataclass(frozen=True)
class TuneKey:
    """What a tuning decision depends on."""

    device: str
    library: str
    arch: int
    ab_dtype: str
    d_dtype: str
    m: int
    n: int
    k: int

    def text(self) -> str:
        return (f"{self.device}|{self.library}|sm{self.arch}|{self.ab_dtype}->{self.d_dtype}|"
                f"{self.m}x{self.n}x{self.k}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TuningCache:
    """The on-disk table of decisions: key text -> {config, name, times_ms}."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_cache_path()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            payload = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable tuning cache %s: %s", self.path, exc)
            return {}
        if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
            return {}
        entries = payload.get("entries", {})
        return entries if isinstance(entries, dict) else {}

    def get(self, key: TuneKey) -> dict[str, Any] | None:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries.get(key.text())

    def put(self, key: TuneKey, entry: dict[str, Any]) -> None:
        """Record a decision and write the file (merged with what others wrote meanwhile)."""
        with self._lock, _file_lock(self.path):
            entries = self._read()
            entries[key.text()] = entry
            self._entries = entries
            payload = {"version": CACHE_VERSION, "entries": dict(sorted(entries.items()))}
            fd, tmp = tempfile.mkstemp(prefix=".tuning.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(payload, handle, indent=1)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)


class KernelTuner:
    """Chooses a tile configuration per problem: cached, or timed once and cached.

    ``timer(launch)`` returns the time of ``launch()`` in milliseconds (the backend times
    with CUDA events); ``accepts(config)`` says whether a configuration can run the problem
    at all (the library's shape check).
    """

    def __init__(self, cache: TuningCache | None, *, enabled: bool = True) -> None:
        self.cache = cache
        self.enabled = enabled
        self.decisions: dict[str, dict[str, Any]] = {}

    def choose(
        self,
        key: TuneKey,
        names: list[str],
        accepts: Callable[[int], bool],
        launch: Callable[[int], None],
        timer: Callable[[Callable[[], None]], float],
    ) -> int:
        """The index of the configuration to use for ``key``."""
        text = key.text()
        if text in self.decisions:
            return int(self.decisions[text]["config"])
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None and 0 <= int(cached.get("config", -1)) < len(names) and \
                cached.get("name") == names[int(cached["config"])] and accepts(int(cached["config"])):
            self.decisions[text] = cached
            return int(cached["config"])
        candidates = [i for i in range(len(names)) if accepts(i)]
        if not candidates:
            raise ValueError(f"no kernel configuration accepts {text}")
        if not self.enabled or len(candidates) == 1:
            entry = {"config": candidates[0], "name": names[candidates[0]], "tuned": False}
            self.decisions[text] = entry
            return candidates[0]
        times = {names[i]: timer(lambda i=i: launch(i)) for i in candidates}
        best = min(candidates, key=lambda i: times[names[i]])
        entry = {"config": best, "name": names[best], "tuned": True,
                 "times_ms": {name: round(t, 5) for name, t in times.items()}}
        logger.info("tuned %s: %s (%s)", text, names[best],
                    ", ".join(f"{n} {t:.4f} ms" for n, t in times.items()))
        self.decisions[text] = entry
        if self.cache is not None:
            self.cache.put(key, entry)
        return best
