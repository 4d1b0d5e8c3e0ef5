"""Models for the GPU run (bench/gpu.sh): prepared on a CPU machine, or built on the GPU one.

``python bench/gpu_models.py OUT_DIR`` (CPU, before the GPU session) writes

- ``minilm_2to4.onnx.xz``: the real all-MiniLM-L6-v2 encoder (legacy export, opset 17) with
  every MatMul weight made 2:4 along its input channels (optcc's ``sparsify-2of4`` pass with
  the magnitude criterion where it is installed, else the same rule here), and its word-embedding
  table cut down to the token ids that occur in the test sentences (ids remapped). The
  encoder computes exactly what the full model computes on those sentences, and the file
  fits the GPU machine's 64 MiB transfer limit. xz-compressed (the zeros compress).
- ``minilm_2to4_inputs.npz``: 128 tokenized real sentences (batch x 128 tokens).

:func:`resnet50_style_model` builds a ResNet-50-shaped CNN in code (random weights, every
1x1 convolution and the classifier 2:4) and exports it; it runs where torch is, the GPU
machine included, so nothing large has to be carried.
"""

from __future__ import annotations

import lzma
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ = 128
SENTENCES = 128


def magnitude_2to4(matrix: np.ndarray) -> np.ndarray:
    """Keep the two largest |w| of each group of four along the last axis."""
    groups = matrix.reshape(*matrix.shape[:-1], -1, 4)
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.where(keep, groups, 0).reshape(matrix.shape).astype(matrix.dtype)


def sparsify_matmuls(model):  # type: ignore[no-untyped-def]
    """Every MatMul/Gemm weight 2:4 along its input channels (the sparsity pass does this
    with better criteria; a magnitude rule is enough to time and check the kernels)."""
    from optcc.ir.model import constant_weight

    changed = 0
    for node in model.graph.nodes:
        if node.op not in ("MatMul", "Gemm"):
            continue
        weight = constant_weight(node)
        if weight is None or np.asarray(weight.values).ndim != 2:
            continue
        values = np.asarray(weight.values)
        transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        matrix = values if transposed else values.T  # [N, K]
        if matrix.shape[1] % 4:
            continue
        pruned = magnitude_2to4(matrix)
        weight.values = (pruned if transposed else pruned.T).astype(values.dtype)
        changed += 1
    return changed


def make_2to4(model):  # type: ignore[no-untyped-def]
    """Make the GEMM weights 2:4: with optcc's sparsity pass when it is installed
    (``sparsify-2of4``, magnitude criterion), else with :func:`sparsify_matmuls`."""
    from optcc.plugins import get_registry

    pass_cls = get_registry().passes.get("sparsify-2of4")
    if pass_cls is not None:
        result = pass_cls(method="magnitude")(model)
        return result.model, "the sparsify-2of4 pass (magnitude)"
    return model, f"a magnitude rule on {sparsify_matmuls(model)} MatMul weights"


def restrict_vocabulary(model, input_ids: np.ndarray):  # type: ignore[no-untyped-def]
    """Keep only the word-embedding rows of ``input_ids``; return the remapped ids."""
    import onnx_graphsurgeon as gs

    used = np.unique(input_ids)
    for node in model.graph.nodes:
        if node.op == "Gather" and any(t.name == "input_ids" for t in node.inputs[1:2]):
            table = node.inputs[0]
            if isinstance(table, gs.Constant):
                table.values = np.ascontiguousarray(np.asarray(table.values)[used])
                return np.searchsorted(used, input_ids).astype(input_ids.dtype)
    raise RuntimeError("no word-embedding Gather on input_ids found")


def prepare_minilm(out_dir: Path) -> Path:
    from bench.models import CACHE, minilm
    from optcc import Model

    onnx_path, data_path = minilm(CACHE / f"minilm-seq{SEQ}.onnx", CACHE / f"minilm-seq{SEQ}.npz",
                                  seq=SEQ)
    model = Model.load(onnx_path)
    with np.load(data_path) as data:
        feeds = {k: data[k][:SENTENCES] for k in data.files}
    model, how = make_2to4(model)
    feeds["input_ids"] = restrict_vocabulary(model, feeds["input_ids"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = model.save(Path(tmp) / "minilm_2to4.onnx", external_data=False)
        target = out_dir / "minilm_2to4.onnx.xz"
        with open(plain, "rb") as src, lzma.open(target, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst)
    np.savez(out_dir / "minilm_2to4_inputs.npz", **feeds)
    print(f"{target}: made 2:4 with {how}, vocabulary cut to "
          f"{int(feeds['input_ids'].max()) + 1} tokens, {target.stat().st_size / 2**20:.1f} MiB")
    return target


def unpack_minilm(folder: Path) -> Path | None:
    """Decompress minilm_2to4.onnx.xz beside itself (on the GPU machine)."""
    packed = folder / "minilm_2to4.onnx.xz"
    target = folder / "minilm_2to4.onnx"
    if target.is_file() or not packed.is_file():
        return target if target.is_file() else None
    with lzma.open(packed, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def resnet50_style_model(batch_example: int = 2):  # type: ignore[no-untyped-def]
    """ResNet-50's layout (stem, 3-4-6-3 bottlenecks of 64-128-256-512 x4 channels, fc),
    random weights, 1x1 convolutions and fc 2:4; exported with the legacy exporter."""
    import torch
    from torch import nn

    from optcc import Model

    torch.manual_seed(0)

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, stride: int) -> None:
            super().__init__()
            cout = mid * 4
            self.a = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
                                   nn.ReLU())
            self.c = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                          else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.c(self.b(self.a(x))) + self.short(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1024)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d)
                                                 and module.kernel_size == (1, 1)):
                flat = module.weight.reshape(module.weight.shape[0], -1)
                module.weight.copy_(torch.from_numpy(magnitude_2to4(flat.numpy())).reshape(
                    module.weight.shape))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        torch.onnx.export(net, (torch.randn(batch_example, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return Model.load(path)


if __name__ == "__main__":
    prepare_minilm(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / ".gpu")
