"""Metadata that passes hand on to each other and that survives save/load.

It lives in the ONNX file itself, as JSON under one ``metadata_props`` key, so any tool that
copies the model keeps it. Three scopes:

- ``history``: one record per pass that ran (name, plugin, options, whether it changed the
  model) — ``optcc inspect`` shows it;
- ``tensors``: per tensor name, e.g. a pruning or 2:4 mask, a calibration range;
- ``nodes``: per node name, e.g. the precision chosen for a layer and the reason.

Values are JSON, plus numpy arrays: boolean arrays (masks) are stored bit-packed and
base64-encoded, other arrays as raw little-endian bytes, so a mask costs 1 bit per weight.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METADATA_KEY = "optcc.meta"
FORMAT_VERSION = 1


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == np.bool_:
            packed = np.packbits(value.ravel())
            return {
                "__ndarray__": "bits",
                "shape": list(value.shape),
                "data": base64.b64encode(packed.tobytes()).decode("ascii"),
            }
        arr = np.ascontiguousarray(value)
        return {
            "__ndarray__": "raw",
            "dtype": arr.dtype.newbyteorder("<").str,
            "shape": list(arr.shape),
            "data": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).decode(
                "ascii"
            ),
        }
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        kind = value.get("__ndarray__")
        if kind == "bits":
            shape = tuple(value["shape"])
            count = int(np.prod(shape)) if shape else 1
            raw = np.frombuffer(base64.b64decode(value["data"]), dtype=np.uint8)
            return np.unpackbits(raw, count=count).astype(bool).reshape(shape)
        if kind == "raw":
            raw = base64.b64decode(value["data"])
            return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@dataclass
class Metadata:
    """Per-model, per-tensor and per-node annotations carried through every pass."""

    history: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tensor(self, name: str) -> dict[str, Any]:
        """The (mutable) annotation dict of tensor ``name``, created empty if absent."""
        return self.tensors.setdefault(name, {})

    def node(self, name: str) -> dict[str, Any]:
        """The (mutable) annotation dict of node ``name``, created empty if absent."""
        return self.nodes.setdefault(name, {})

    def rename_tensor(self, old: str, new: str) -> None:
        if old in self.tensors:
            self.tensors[new] = self.tensors.pop(old)

    def prune(self, tensor_names: set[str], node_names: set[str]) -> None:
        """Drop annotations of tensors and nodes that no longer exist."""
        self.tensors = {k: v for k, v in self.tensors.items() if k in tensor_names}
        self.nodes = {k: v for k, v in self.nodes.items() if k in node_names}

    def copy(self) -> Metadata:
        return copy.deepcopy(self)

    def to_json(self) -> str:
        payload = {
            "format": FORMAT_VERSION,
            "history": _encode(self.history),
            "tensors": _encode(self.tensors),
            "nodes": _encode(self.nodes),
        }
        return json.dumps(payload, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Metadata:
        payload = json.loads(text)
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported optcc metadata format {payload.get('format')!r}")
        return cls(
            history=_decode(payload.get("history", [])),
            tensors=_decode(payload.get("tensors", {})),
            nodes=_decode(payload.get("nodes", {})),
        )
