"""The model every pass reads and writes: an onnx-graphsurgeon graph plus optcc metadata.

Passes edit ``model.graph`` (an ``onnx_graphsurgeon.Graph``) in place or build a new one;
the wrapper adds what passes keep needing: loading and saving with external data, the
producer and consumers of a tensor, the constant weight of a layer, and metadata that
survives save/load (see :mod:`optcc.ir.metadata`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optcc.errors import ModelError, first_line
from optcc.ir.metadata import METADATA_KEY, Metadata

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GiB; above this many bytes of weights a model
# is saved with its tensors in a side file (ONNX external data).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000

# Ops whose second input is a weight: the layers that pruning, sparsity and INT8 act on.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class Model:
    """An ONNX model held as an onnx-graphsurgeon graph, with optcc metadata.

    Create one with :meth:`load` (a file) or :meth:`from_proto`; write it with :meth:`save`.
    ``copy()`` is a deep copy, so a pass can keep the model it was given untouched.
    """

    def __init__(
        self,
        graph: gs.Graph,
        *,
        meta: Metadata | None = None,
        ir_version: int | None = None,
        producer: str | None = None,
        source: str | None = None,
        extra_metadata: dict[str, str] | None = None,
    ) -> None:
        self.graph = graph
        self.meta = meta if meta is not None else Metadata()
        self.ir_version = ir_version
        self.producer = producer
        self.source = source
        self.extra_metadata = dict(extra_metadata or {})
        self._name_unnamed_nodes()

    # ------------------------------------------------------------------ load / save
    @classmethod
    def load(cls, path: str | Path) -> Model:
        """Load an ONNX file (with external data, if it has any) and check its structure.
        A file system error (permissions, a name too long) is a clear error too."""
        try:
            return cls._load(Path(path))
        except OSError as exc:
            from optcc.resources import os_error

            mapped = os_error(exc, "reading the model")
            if mapped is not None:
                raise mapped from exc
            raise ModelError(f"cannot read the model: {exc.strerror or exc}", path=path) from exc

    @classmethod
    def _load(cls, path: Path) -> Model:
        if not path.exists():
            raise ModelError("model file not found", path=path)
        if path.is_dir():
            raise ModelError("expected an .onnx file, got a folder", path=path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except OSError:
            raise
        except Exception as exc:  # protobuf DecodeError and friends
            raise ModelError(
                f"not a valid ONNX model ({type(exc).__name__}: {exc})",
                path=path,
                hint="the file may be truncated or not an ONNX file; re-export it",
            ) from exc
        missing = sorted(
            {
                entry.value
                for tensor in proto.graph.initializer
                if tensor.data_location == onnx.TensorProto.EXTERNAL
                for entry in tensor.external_data
                if entry.key == "location" and not (path.parent / entry.value).is_file()
            }
        )
        if missing:
            raise ModelError(
                f"external data file(s) missing: {', '.join(missing)}",
                path=path,
                hint="keep the weights file saved next to the model in the same folder",
            )
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelError(f"cannot read the external data: {exc}", path=path) from exc
        if not proto.graph.node and not proto.graph.output:
            raise ModelError("not a valid ONNX model (empty graph)", path=path)
        model = cls.from_proto(proto, source=str(path))
        return model

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, *, source: str | None = None) -> Model:
        """Wrap an in-memory ``ModelProto``, reading optcc metadata from its properties."""
        try:
            # The in-memory checker cannot take protos over 2 GiB (and ByteSize() itself fails
            # on them); those are checked by path in verify_model.
            if _initializer_bytes(proto) <= EXTERNAL_DATA_THRESHOLD:
                onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"invalid ONNX model: {first_line(exc)}", path=source) from exc
        meta = Metadata()
        extra: dict[str, str] = {}
        for prop in proto.metadata_props:
            if prop.key == METADATA_KEY:
                try:
                    meta = Metadata.from_json(prop.value)
                except (ValueError, KeyError) as exc:
                    logger.warning("ignoring unreadable optcc metadata in %s: %s", source, exc)
            else:
                extra[prop.key] = prop.value
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:
            raise ModelError(f"cannot import the graph: {exc}", path=source) from exc
        return cls(
            graph,
            meta=meta,
            ir_version=proto.ir_version or None,
            producer=proto.producer_name or None,
            source=source,
            extra_metadata=extra,
        )

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ``ModelProto`` with the metadata attached."""
        kwargs: dict[str, Any] = {}
        if self.ir_version:
            kwargs["ir_version"] = min(self.ir_version, onnx.IR_VERSION)
        try:
            proto = gs.export_onnx(self.graph, **kwargs)
        except Exception as exc:
            raise ModelError(f"cannot export the graph to ONNX: {exc}") from exc
        proto.producer_name = "optcc"
        from optcc import __version__

        proto.producer_version = __version__
        del proto.metadata_props[:]
        for key, value in sorted(self.extra_metadata.items()):
            proto.metadata_props.add(key=key, value=value)
        self.meta.prune(
            {t.name for t in self.graph.tensors().values()}, {n.name for n in self.graph.nodes}
        )
        proto.metadata_props.add(key=METADATA_KEY, value=self.meta.to_json())
        return proto

    def weight_bytes(self) -> int:
        """Bytes held in constant tensors (the model's weights)."""
        total = 0
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                total += int(np.prod(tensor.shape or [1])) * np.dtype(tensor.dtype).itemsize
        return total

    def save(self, path: str | Path, *, external_data: bool | None = None) -> Path:
        """Write the model to ``path`` atomically (a temp file, then a rename).

        ``external_data=None`` chooses by size: weights above ~1.5 GB go to ``<name>.data``
        beside the model, because protobuf cannot hold a message over 2 GiB.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if external_data is None:
            external_data = self.needs_external_data()
        proto = self.to_proto()
        # Write into a private folder beside the target, then rename into place: a crash
        # never leaves a half-written model (or weights file) under the final name.
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        data_name = path.name + ".data"
        try:
            if external_data:
                onnx.save_model(
                    proto,
                    str(staging / path.name),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data_name,
                    size_threshold=1024,
                )
                if (staging / data_name).exists():
                    os.replace(staging / data_name, path.with_name(data_name))
            else:
                onnx.save_model(proto, str(staging / path.name))
            os.replace(staging / path.name, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def copy(self) -> Model:
        """A deep copy (graph, tensors and metadata)."""
        return Model(
            self.graph.copy(),
            meta=self.meta.copy(),
            ir_version=self.ir_version,
            producer=self.producer,
            source=self.source,
            extra_metadata=self.extra_metadata,
        )

    def needs_external_data(self) -> bool:
        """Whether the model is too large for one protobuf message (> ~1.5 GB of weights)."""
        return self.weight_bytes() > EXTERNAL_DATA_THRESHOLD

    # ------------------------------------------------------------------ queries
    @property
    def opset(self) -> int:
        """The default-domain opset the graph is written against."""
        return int(self.graph.opset)

    @property
    def inputs(self) -> list[gs.Variable]:
        return list(self.graph.inputs)

    @property
    def outputs(self) -> list[gs.Variable]:
        return list(self.graph.outputs)

    def tensor_map(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def producer_of(self, tensor: str | gs.Tensor) -> gs.Node | None:
        """The node that computes ``tensor``, or None for graph inputs and constants."""
        t = self.tensor_map()[tensor] if isinstance(tensor, str) else tensor
        return t.inputs[0] if t.inputs else None

    def consumers_of(self, tensor: str | gs.Tensor) -> list[gs.Node]:
        """The nodes that read ``tensor``."""
        t = self.tensor_map()[tensor] if isinstance(tensor, str) else tensor
        return list(t.outputs)

    def node(self, name: str) -> gs.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def replace_all_uses(
        self,
        old: gs.Tensor,
        new: gs.Tensor,
        *,
        nodes: Iterable[gs.Node] | None = None,
        graph_outputs: bool = False,
    ) -> int:
        """Make every node that reads ``old`` read ``new`` instead; return how many inputs
        changed.

        ``nodes`` limits the rewiring to those readers (give one reader its own copy of a
        shared constant). Graph outputs keep ``old`` unless ``graph_outputs`` is True, so a
        model's output names never change by accident. The producer of ``old`` is left as
        it is: remove it, or let ``graph.cleanup()`` drop it once nothing reads it.
        """
        only = None if nodes is None else {id(n) for n in nodes}
        changed = 0
        for reader in list(old.outputs):
            if only is not None and id(reader) not in only:
                continue
            for i, tensor in enumerate(reader.inputs):
                if tensor is old:
                    reader.inputs[i] = new
                    changed += 1
        if graph_outputs:
            for i, tensor in enumerate(self.graph.outputs):
                if tensor is old:
                    self.graph.outputs[i] = new  # type: ignore[call-overload]
                    changed += 1
        return changed

    def toposorted_nodes(self) -> list[gs.Node]:
        self.graph.toposort()
        return list(self.graph.nodes)

    def weighted_layers(self) -> Iterator[tuple[gs.Node, gs.Constant, str]]:
        """Yield ``(node, weight, precision)`` for every Conv/Gemm/MatMul with a constant weight.

        The weight is either a constant input or a constant behind a DequantizeLinear (an
        INT8-quantized weight); ``precision`` is the weight's storage type name
        (``float32``, ``float16``, ``int8``, ...).
        """
        for node in self.graph.nodes:
            if node.op not in WEIGHTED_OPS:
                continue
            weight = constant_weight(node)
            if weight is None:
                continue
            yield node, weight, np.dtype(weight.dtype).name

    def _name_unnamed_nodes(self) -> None:
        """Give every node a unique name: reports and metadata refer to nodes by name."""
        seen: set[str] = set()
        counter = 0
        for node in self.graph.nodes:
            name = node.name
            while not name or name in seen:
                counter += 1
                name = f"{node.op}_{counter}"
            node.name = name
            seen.add(name)


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto (external data not counted)."""
    total = 0
    for tensor in proto.graph.initializer:
        total += len(tensor.raw_data) if tensor.raw_data else 4 * (
            len(tensor.float_data) + len(tensor.int32_data)
        ) + 8 * (len(tensor.int64_data) + len(tensor.double_data))
    return total


def _constant_through_dq(tensor: gs.Tensor) -> gs.Constant | None:
    if isinstance(tensor, gs.Constant):
        return tensor
    if tensor.inputs:
        producer = tensor.inputs[0]
        if producer.op == "DequantizeLinear" and isinstance(producer.inputs[0], gs.Constant):
            return producer.inputs[0]
        if producer.op in {"Transpose", "Identity", "Cast"} and producer.inputs:
            return _constant_through_dq(producer.inputs[0])
    return None


def constant_weight(node: gs.Node) -> gs.Constant | None:
    """The constant weight of a Conv/ConvTranspose/Gemm/MatMul node, or None.

    For MatMul the weight may be either operand (``x @ W`` or ``W @ x``); the second is
    tried first. A weight stored as INT8 behind a DequantizeLinear is returned as the INT8
    constant.
    """
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
        return None
    weight = _constant_through_dq(node.inputs[1])
    if weight is None and node.op == "MatMul":
        weight = _constant_through_dq(node.inputs[0])
    return weight
