"""A zoo of small random-init Hugging Face models, exported by both torch exporters.

Fifteen architectures that real deployments use, each built offline from a tiny
``transformers`` config (random weights, seeded), wrapped so it takes plain tensors and
returns one tensor, and exported to ONNX through optcc's own torch frontend:

    from zoo import NAMES, export, spec

    path = export("llama", "dynamo")          # -> Path of a cached model.onnx
    feeds = spec("llama").feeds(batch=3)      # valid inputs: ids < vocab, masks of ones

Exports are cached: in ``OPTCC_ZOO_CACHE`` when that variable names a folder (a cache that
survives between runs; entries are keyed by the zoo's source, torch and transformers
versions, so a change re-exports), otherwise in one temporary folder per process, removed
when the process exits. :func:`export` is safe to call from several tests; the first call exports.

Each :class:`ZooModel` says what its inputs are (:class:`ZooInput`: float data, token ids
below the vocabulary size, or attention masks of ones) and which dimensions are dynamic
(``batch`` always; ``sequence`` for text). Sizes are tiny so the whole zoo exports in CI
time; they still keep every structural feature that matters to compression passes: multi-
head attention (GQA and RoPE for Llama, relative position bias for T5, fused QKV with
``Split`` for GPT-2), LayerNorm/RMSNorm, GroupNorm, depthwise convolutions, padding,
windowed attention (Swin), BatchNorm.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Exporters every zoo model is exported with.
EXPORTERS = ("legacy", "dynamo")

IMAGE = 32  # pixels per side for the vision models
SEQUENCE = 8  # tokens for the text models
VOCAB = 96


@dataclass(frozen=True)
class ZooInput:
    """One model input: ``kind`` is ``float`` (standard normal), ``ids`` (integers in
    ``[0, high)``) or ``mask`` (all ones). Dimensions named by a string are dynamic."""

    name: str
    shape: tuple[int | str, ...]
    kind: str = "float"
    high: int = 0

    @property
    def dtype(self) -> str:
        return "float32" if self.kind == "float" else "int64"

    def as_spec(self) -> dict[str, Any]:
        """The input as optcc's torch frontend (and a recipe's ``inputs:``) writes it."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def sample(self, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
        shape = [d if isinstance(d, int) else sizes[d] for d in self.shape]
        if self.kind == "ids":
            return rng.integers(0, self.high, shape).astype(np.int64)
        if self.kind == "mask":
            return np.ones(shape, np.int64)
        return rng.standard_normal(shape).astype(np.float32)


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo: how to build it and what it takes."""

    name: str
    family: str  # vision | text | audio
    inputs: tuple[ZooInput, ...]
    build: Callable[[], Any] = field(repr=False)
    sizes: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def feeds(self, batch: int = 3, seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
        """Valid random inputs at ``batch`` (token ids in the vocabulary, masks of ones)."""
        dims = {**self.sizes, **sizes, "batch": batch}
        rng = np.random.default_rng(seed)
        return {i.name: i.sample(dims, rng) for i in self.inputs}

    def input_specs(self) -> list[dict[str, Any]]:
        return [i.as_spec() for i in self.inputs]


# --------------------------------------------------------------------------- wrappers
def _seeded() -> None:
    import torch

    torch.manual_seed(0)


def _wrap(model: Any, pick: Callable[[Any], Any], arg_names: tuple[str, ...]) -> Any:
    """A module taking ``arg_names`` as positional tensors and returning one tensor
    (explicit parameters: torch.export matches dynamic shapes to them one by one)."""
    import torch

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.eval()

        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return pick(self.model(**{arg_names[0]: a}))

    class Two(One):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return pick(self.model(**{arg_names[0]: a, arg_names[1]: b}))

    return (One if len(arg_names) == 1 else Two)().eval()


def _logits(out: Any) -> Any:
    return out.logits


def _hidden(out: Any) -> Any:
    return out.last_hidden_state


PIXELS = (ZooInput("pixel_values", ("batch", 3, IMAGE, IMAGE)),)
TOKENS = (ZooInput("input_ids", ("batch", "sequence"), "ids", VOCAB),
          ZooInput("attention_mask", ("batch", "sequence"), "mask"))


def _lively(model: Any) -> Any:
    """Re-initialize convolutions, linear layers and BatchNorm so that activations keep
    their scale through a deep random network (Hugging Face's small-std init lets deep
    MobileNets output all zeros, which would make every output comparison vacuous)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model


def _vision(cls_name: str, config_name: str, lively: bool = False, **config: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        _seeded()
        cfg = getattr(transformers, config_name)(num_labels=10, **config)
        model = getattr(transformers, cls_name)(cfg)
        return _wrap(_lively(model) if lively else model, _logits, ("pixel_values",))

    return build


def _text(cls_name: str, config_name: str, pick: Callable[[Any], Any] = _logits,
          **config: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        _seeded()
        cfg = getattr(transformers, config_name)(vocab_size=VOCAB, **config)
        model = getattr(transformers, cls_name)(cfg)
        return _wrap(model, pick, ("input_ids", "attention_mask"))

    return build


def _clip_vision() -> Any:
    import transformers

    _seeded()
    cfg = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE, patch_size=8, projection_dim=32)
    model = transformers.CLIPVisionModelWithProjection(cfg)
    return _wrap(model, lambda out: out.image_embeds, ("pixel_values",))


def _whisper_encoder() -> Any:
    import transformers

    _seeded()
    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=16, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    encoder = transformers.WhisperModel(cfg).get_encoder()
    return _wrap(encoder, _hidden, ("input_features",))


def _wav2vec2() -> Any:
    import transformers

    _seeded()
    cfg = transformers.Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
        do_stable_layer_norm=False, num_labels=10, classifier_proj_size=32)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg)
    return _wrap(model, _logits, ("input_values",))


_ATTN = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}

ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("vit", "vision", PIXELS, _vision(
        "ViTForImageClassification", "ViTConfig", image_size=IMAGE, patch_size=8, **_ATTN)),
    ZooModel("deit", "vision", PIXELS, _vision(
        "DeiTForImageClassification", "DeiTConfig", image_size=IMAGE, patch_size=8, **_ATTN)),
    ZooModel("clip-vision", "vision", PIXELS, _clip_vision),
    ZooModel("convnext", "vision", PIXELS, _vision(
        "ConvNextForImageClassification", "ConvNextConfig", image_size=IMAGE,
        hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], patch_size=2)),
    ZooModel("resnet", "vision", PIXELS, _vision(
        "ResNetForImageClassification", "ResNetConfig", embedding_size=16,
        hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], layer_type="basic")),
    ZooModel("swin", "vision", PIXELS, _vision(
        "SwinForImageClassification", "SwinConfig", image_size=IMAGE, patch_size=4,
        embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4)),
    ZooModel("mobilenet-v2", "vision", PIXELS, _vision(
        "MobileNetV2ForImageClassification", "MobileNetV2Config", lively=True, image_size=IMAGE,
        depth_multiplier=0.35), note="TF-style padding: explicit Pad nodes"),
    ZooModel("mobilevit", "vision", PIXELS, _vision(
        "MobileViTForImageClassification", "MobileViTConfig", lively=True, image_size=IMAGE,
        hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 40, 64],
        num_attention_heads=4)),
    ZooModel("gpt2", "text", TOKENS, _text(
        "GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=0, eos_token_id=0),
        {"sequence": SEQUENCE}),
    ZooModel("distilbert", "text", TOKENS, _text(
        "DistilBertForSequenceClassification", "DistilBertConfig", dim=64, n_layers=2,
        n_heads=4, hidden_dim=128, max_position_embeddings=32, num_labels=10),
        {"sequence": SEQUENCE}),
    ZooModel("roberta", "text", TOKENS, _text(
        "RobertaForSequenceClassification", "RobertaConfig", max_position_embeddings=40,
        num_labels=10, **_ATTN), {"sequence": SEQUENCE}),
    ZooModel("t5-encoder", "text", TOKENS, _text(
        "T5EncoderModel", "T5Config", _hidden, d_model=64, d_kv=16, d_ff=128, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8), {"sequence": SEQUENCE}),
    ZooModel("whisper-encoder", "audio", (ZooInput("input_features", ("batch", 16, 32)),),
             _whisper_encoder),
    ZooModel("llama", "text", TOKENS, _text(
        "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, max_position_embeddings=32,
        **_ATTN), {"sequence": SEQUENCE}, note="GQA (4 query, 2 key/value heads) and RoPE"),
    ZooModel("wav2vec2", "audio", (ZooInput("input_values", ("batch", 400)),), _wav2vec2,
             note="GroupNorm with groups == channels in the feature encoder"),
]}

#: Every zoo model's name, in a stable order.
NAMES: tuple[str, ...] = tuple(ZOO)


def spec(name: str) -> ZooModel:
    """The zoo entry ``name`` (KeyError names the known ones)."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(NAMES)}") from None


def build(name: str) -> Any:
    """The torch module of ``name`` (random weights, seeded, eval mode); the export
    factory (``zoo.py:build`` with ``kwargs={"name": ...}``)."""
    return spec(name).build()


# --------------------------------------------------------------------------- export cache
_LOCK = threading.Lock()
_SESSION_DIR: Path | None = None


def _cache_root() -> Path:
    global _SESSION_DIR
    configured = os.environ.get("OPTCC_ZOO_CACHE")
    if configured:
        return Path(configured)
    if _SESSION_DIR is None:
        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="optcc-zoo-"))
        atexit.register(shutil.rmtree, _SESSION_DIR, True)  # a per-process cache goes with it
    return _SESSION_DIR


def _cache_key() -> str:
    import torch
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{torch.__version__}/{transformers.__version__}".encode())
    return digest.hexdigest()[:12]


def export(name: str, exporter: str, cache_dir: Path | None = None) -> Path:
    """Export zoo model ``name`` with ``exporter`` (``legacy`` or ``dynamo``) through
    optcc's torch frontend, which checks that ONNX Runtime reproduces the module; return
    the cached ONNX file (exported once per cache)."""
    from optcc.frontend import export_torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    entry = spec(name)
    folder = Path(cache_dir or _cache_root()) / _cache_key()
    path = folder / f"{name}-{exporter}.onnx"
    with _LOCK:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            model = export_torch(f"{Path(__file__).resolve()}:build", inputs=entry.input_specs(),
                                 exporter=exporter, kwargs={"name": name})
            model.save(path)  # atomic: a concurrent reader never sees half a file
    return path
