"""Task heads over the backbone's final hidden states, loadable from their HF tensor names.

| task       | HF class                          | tensors                              | output            |
|------------|-----------------------------------|--------------------------------------|-------------------|
| `generate` | SeedOssForCausalLM                | lm_head.weight (or tied embeddings)  | vocab logits      |
| `classify` | SeedOssForSequenceClassification  | score.weight                         | [B, labels] pooled|
| `tag`      | SeedOssForTokenClassification     | score.weight, score.bias             | [T, labels]       |
| `qa`       | SeedOssForQuestionAnswering       | qa_outputs.weight, qa_outputs.bias   | start/end [T]     |
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SeedOssConfig
from .model import Linear

TASKS = ("generate", "classify", "tag", "qa")


class LMHead(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def hf_names(self, config: SeedOssConfig, prefix: str) -> dict[str, str]:
        return {"lm_head.weight": f"{prefix}embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class SequenceClassificationHead(nn.Module):
    """Scores the right-most token that is not padding (HF's rule, which covers left and right padding)."""

    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def hf_names(self, config: SeedOssConfig, prefix: str) -> dict[str, str]:
        return {"score.weight": "score.weight"}

    def pool_index(self, token_ids: list[int]) -> int:
        if self.pad_token_id is None:
            return len(token_ids) - 1
        non_pad = [i for i, t in enumerate(token_ids) if t != self.pad_token_id]
        return non_pad[-1] if non_pad else 0

    def forward(self, hidden: torch.Tensor, sequences: list[list[int]]) -> torch.Tensor:
        """hidden: packed [T, H] of `sequences` (in order) → logits [B, num_labels]."""
        starts = torch.cumsum(torch.tensor([0] + [len(s) for s in sequences[:-1]]), 0)
        index = starts + torch.tensor([self.pool_index(s) for s in sequences])
        return self.score(hidden[index])


class TokenClassificationHead(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.score = Linear(config.hidden_size, config.num_labels, bias=True)

    def hf_names(self, config: SeedOssConfig, prefix: str) -> dict[str, str]:
        return {"score.weight": "score.weight", "score.bias": "score.bias"}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)


class QuestionAnsweringHead(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.qa_outputs = Linear(config.hidden_size, 2, bias=True)

    def hf_names(self, config: SeedOssConfig, prefix: str) -> dict[str, str]:
        return {"qa_outputs.weight": "qa_outputs.weight", "qa_outputs.bias": "qa_outputs.bias"}

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (start logits [T], end logits [T])."""
        logits = self.qa_outputs(hidden)
        return logits[:, 0], logits[:, 1]


HEAD_CLASSES = {
    "generate": LMHead,
    "classify": SequenceClassificationHead,
    "tag": TokenClassificationHead,
    "qa": QuestionAnsweringHead,
}
