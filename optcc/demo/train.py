"""Make the bundled demo: scikit-learn's digits as ``digits.npz`` and a trained residual CNN
as ``digits_cnn.onnx``.

Run ``python -m optcc.demo.train`` (needs the dev extra: torch and scikit-learn). It takes
about 20 s on 2 CPU cores. The model is a small ResNet: a 64-channel stem, two residual
blocks at 8x8, a strided 128-channel stage with one residual block, global average pooling
and a linear classifier (about 0.5 M parameters). It is big enough that compression shows
in ONNX Runtime latency (tens of ms per 256-image batch on one thread) and small enough to
train in seconds. It is exported with the legacy exporter and ``do_constant_folding=False``
so that BatchNormalization nodes stay in the graph, as they do in many exported models, and
the batch dimension is dynamic.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPLIT_SEED = 0
TRAIN_SAMPLES = 1400


def make_dataset(path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(digits.target))
    np.savez_compressed(
        path,
        images=digits.images.astype(np.uint8),  # values 0..16
        labels=digits.target.astype(np.int64),
        train_index=np.sort(order[:TRAIN_SAMPLES]),
        test_index=np.sort(order[TRAIN_SAMPLES:]),
    )


def build_net(width: int = 64):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    class DigitsResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
            self.stage1 = nn.Sequential(Block(width), Block(width))
            self.down = nn.Sequential(
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
            )
            self.stage2 = Block(2 * width)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2 * width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stage2(self.down(self.stage1(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    return DigitsResNet()


def pretrained_net():  # type: ignore[no-untyped-def]
    """The bundled trained CNN as a torch module: :func:`build_net` with the weights and
    BatchNorm statistics read from ``digits_cnn.onnx`` (its initializers carry the
    module's parameter names). For recipes that start from a PyTorch module."""
    import onnx
    import torch
    from onnx import numpy_helper

    net = build_net()
    proto = onnx.load(str(HERE / "digits_cnn.onnx"))
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    state = net.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"digits_cnn.onnx lacks {', '.join(missing)}; remake it with train.py")
    net.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    return net.eval()


def train(data_path: Path, epochs: int = 15, seed: int = 0):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(seed)
    with np.load(data_path) as data:
        images = data["images"].astype(np.float32)[:, None] / 16.0
        labels = data["labels"]
        train_idx, test_idx = data["train_index"], data["test_index"]
    x_train = torch.from_numpy(images[train_idx])
    y_train = torch.from_numpy(labels[train_idx])
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * ((len(x_train) + 63) // 64)
    )
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(x_train), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x_train):.4f}")
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(images[test_idx])).argmax(1).numpy()
    accuracy = float((pred == labels[test_idx]).mean())
    return net, accuracy


def export(net, path: Path) -> None:  # type: ignore[no-untyped-def]
    import warnings

    import torch

    example = torch.zeros(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(path), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_path = args.out / "digits.npz"
    make_dataset(data_path)
    net, accuracy = train(data_path, args.epochs)
    export(net, args.out / "digits_cnn.onnx")
    print(f"test accuracy {accuracy:.4f}; {time.perf_counter() - start:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
