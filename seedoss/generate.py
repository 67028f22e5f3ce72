"""Thin in-process generation for `seedoss generate`: one stage, a KV cache, greedy or temperature sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .detokenizer import IncrementalDetokenizer
from .loader import load_head, load_stage
from .model import StepBatch
from .tokenizer import SeedOssTokenizer


def generate_text(checkpoint: str | Path, prompt: str, *, max_tokens: int = 32, temperature: float = 0.0,
                  seed: int | None = None, dtype: str = "float32", chat: bool = False) -> Iterator[str]:
    """Yield text deltas of the continuation of `prompt`; stops at EOS or after max_tokens."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 = greedy)")
    tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
    stage = load_stage(checkpoint, dtype=dtype)
    head = load_head(checkpoint, "generate", dtype=dtype)
    ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True) if chat
           else tokenizer.encode(prompt))
    if len(ids) + max_tokens > stage.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens exceeds the context of {stage.config.max_position_embeddings}")
    cache = stage.new_kv_cache(budget_bytes=_cache_bytes(stage, len(ids) + max_tokens))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    detok = IncrementalDetokenizer(tokenizer, ids)
    new, context = ids, 0
    for _ in range(max_tokens):
        hidden = stage(torch.tensor(new), StepBatch([0], [len(new)], [context]), cache)
        logits = head(hidden[-1:]).float()[0]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        if token in stage.config.eos_token_ids:
            break
        context += len(new)
        new = [token]
        yield detok.add(token)
    yield detok.flush()


def _cache_bytes(stage, tokens: int) -> int:
    c = stage.config
    per_token = 2 * len(stage.layers) * c.num_key_value_heads * c.head_dim * stage.layers[0].input_layernorm.weight.element_size()
    return per_token * (tokens + 16)
