"""Reference architectures built in code (no timm/torchvision), exported with optcc's
torch frontend: ResNet-, MobileNetV2-, BERT-style and a Concat/Split net."""

from __future__ import annotations

import math

import torch
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics so folding and slicing are exercised
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), _bn(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), _bn(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), _bn(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def mobilenet_v2_style() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), _bn(16), nn.ReLU6(),
        InvertedResidual(16, 24, 1, 4), InvertedResidual(24, 24, 1, 4),
        InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4),
        nn.Conv2d(32, 64, 1, bias=False), _bn(64), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


class ConcatNet(nn.Module):
    """Inception-style branches joined by Concat, a Split, and Flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 1)
        self.b = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), _bn(24), nn.ReLU())
        self.mix = nn.Conv2d(40, 32, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        self.fc2 = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        y = torch.relu(self.mix(y))
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        left, right = torch.split(y, [16, 16], dim=1)
        return self.fc(torch.flatten(left, 1)) + self.fc2(torch.flatten(right, 1))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.size = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.size).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.size) + mask
        context = torch.softmax(scores, dim=-1) @ v
        b, _, s, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(b, s, self.heads * self.size))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.norm1 = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, mask))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class BertStyle(nn.Module):
    """Embeddings + 2 post-norm encoder layers (HF BERT's layout), mask from attention_mask."""

    def __init__(self, vocab: int = 100, hidden: int = 64, heads: int = 4, ffn: int = 128) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(64, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.embed(input_ids) + self.position(positions))
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x


def bert_style() -> nn.Module:
    return BertStyle().eval()
