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
import binascii
import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optcc.resources import check_allocation

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


def _shape(value: Any) -> tuple[int, ...]:
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"bad array shape {shape!r}")
    return tuple(shape)


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode`. Metadata comes from a file anyone may have written, so
    every array's declared size is checked against the bytes that are really there (and
    against the memory budget) before anything is allocated; a mismatch is a ValueError."""
    if isinstance(value, dict):
        kind = value.get("__ndarray__")
        if kind == "bits":
            shape = _shape(value)
            count = math.prod(shape)
            raw = base64.b64decode(value["data"], validate=True)
            if len(raw) != (count + 7) // 8:
                raise ValueError(f"a bit array of shape {list(shape)} needs {(count + 7) // 8} "
                                 f"bytes, the file holds {len(raw)}")
            check_allocation(count, "decoding a metadata mask")
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count)
            return bits.astype(bool).reshape(shape)
        if kind == "raw":
            shape = _shape(value)
            dtype = np.dtype(value["dtype"])
            if dtype.hasobject:
                raise ValueError("object arrays are not allowed in metadata")
            raw = base64.b64decode(value["data"], validate=True)
            if len(raw) != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"an array of shape {list(shape)} and type {dtype} does not "
                                 f"match its {len(raw)} bytes")
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
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
        """Parse metadata; anything malformed raises ValueError (callers warn and go on
        without it)."""
        try:
            payload = json.loads(text)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
            if payload.get("format") != FORMAT_VERSION:
                raise ValueError(f"unsupported optcc metadata format {payload.get('format')!r}")
            meta = cls(
                history=_decode(payload.get("history", [])),
                tensors=_decode(payload.get("tensors", {})),
                nodes=_decode(payload.get("nodes", {})),
            )
        except (KeyError, TypeError, AttributeError, RecursionError, binascii.Error) as exc:
            raise ValueError(f"malformed optcc metadata ({type(exc).__name__}: {exc})") from exc
        if not (isinstance(meta.history, list) and isinstance(meta.tensors, dict)
                and isinstance(meta.nodes, dict)
                and all(isinstance(v, dict) for v in (*meta.tensors.values(), *meta.nodes.values()))
                and all(isinstance(h, dict) and isinstance(h.get("pass"), str) for h in meta.history)):
            raise ValueError("malformed optcc metadata (wrong structure)")
        return meta
