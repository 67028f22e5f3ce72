"""The SeedOss decoder in plain PyTorch, as pipeline stages.

A `Stage` holds a contiguous layer range `[start, end)`: the first stage also owns `embed_tokens`, the last one
the final `norm`; a full model is one stage over all layers. Tokens travel *packed*: a step's new tokens of all
sequences form one `[T, hidden]` tensor, described by a `StepBatch` (which sequence each run belongs to, how
many tokens it already has cached). Attention pads them into `[B, q, ...]` only around the SDPA call.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SeedOssConfig
from .kv_cache import MissingSequenceCache, PagedKVCache
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class StepBatch:
    """Which sequences a packed step carries: `query_lens[i]` new tokens of `seq_ids[i]`, whose first
    `context_lens[i]` tokens are already in the KV cache. Index tensors are derived once and shared by layers."""

    seq_ids: list[Hashable]
    query_lens: list[int]
    context_lens: list[int]

    def __post_init__(self):
        if not (len(self.seq_ids) == len(self.query_lens) == len(self.context_lens)):
            raise ValueError("StepBatch: seq_ids, query_lens and context_lens must have the same length")
        if any(q < 1 for q in self.query_lens):
            raise ValueError("StepBatch: every sequence needs at least one new token")
        q = torch.tensor(self.query_lens)
        c = torch.tensor(self.context_lens)
        self.num_tokens = int(q.sum())
        self.max_q = int(q.max())
        self.max_kv = int((q + c).max())
        b = len(self.seq_ids)
        # positions of the packed tokens, and where each lands in the padded [B, max_q] layout
        starts = torch.repeat_interleave(torch.cumsum(q, 0) - q, q)
        offsets = torch.arange(self.num_tokens) - starts
        rows = torch.repeat_interleave(torch.arange(b), q)
        self.positions = torch.repeat_interleave(c, q) + offsets
        self.token_seq_lens = torch.repeat_interleave(c + q, q)
        self.pad_index = rows * self.max_q + offsets
        # causal mask over [B, max_q, max_kv]: query j of row i sees keys up to c_i + j; padded queries see key 0
        qpos = c[:, None] + torch.arange(self.max_q)[None, :]
        mask = torch.arange(self.max_kv)[None, None, :] <= qpos[:, :, None]
        mask &= (torch.arange(self.max_q)[None, :] < q[:, None])[:, :, None]
        mask[:, :, 0] = True
        self.mask = mask[:, None]

    @property
    def last_token_index(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed layout."""
        return torch.cumsum(torch.tensor(self.query_lens), 0) - 1

    def to(self, device: torch.device) -> "StepBatch":
        """A copy whose index tensors live on `device` (they are built on the CPU)."""
        moved = copy.copy(self)
        for name in ("positions", "token_seq_lens", "pad_index", "mask"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def bind_cache(self, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the cache holds each sequence's context, reserve room for the new tokens, and return the slot
        indices (write [T] for the new tokens, read [B, max_kv] for whole contexts) in that cache.

        A sequence starting from position 0 replaces whatever the cache held for it; one whose cached length is
        longer than its context is truncated (a retried step); one with less cached raises MissingSequenceCache.
        """
        missing = [s for s, c in zip(self.seq_ids, self.context_lens) if c > 0 and cache.length(s) < c]
        if missing:
            raise MissingSequenceCache(missing)
        for s, c in zip(self.seq_ids, self.context_lens):
            if c == 0:
                cache.free(s)
            elif cache.length(s) > c:
                cache.truncate(s, c)
        cache.reserve({s: c + q for s, q, c in zip(self.seq_ids, self.query_lens, self.context_lens)})
        write, read = [], torch.zeros(len(self.seq_ids), self.max_kv, dtype=torch.long)
        for i, (s, q, c) in enumerate(zip(self.seq_ids, self.query_lens, self.context_lens)):
            slots = cache.slots(s, 0, c + q)
            write.append(slots[c:])
            read[i, : c + q] = slots
            cache.set_length(s, c + q)
        return torch.cat(write).to(cache.k.device), read.to(cache.k.device)


class Attention(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_out_bias)

    def forward(self, x, cos, sin, batch: StepBatch, kv: tuple[torch.Tensor, ...] | None):
        """kv: (key cache, value cache, write slots, read slots) of this layer, or None for cache-less prefill."""
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        b = len(batch.seq_ids)
        if kv is not None:
            k_cache, v_cache, write, read = kv
            k_cache.index_copy_(0, write, k)
            v_cache.index_copy_(0, write, v)
            keys, values = k_cache[read], v_cache[read]  # [B, max_kv, n_kv, d]
        else:
            keys, values = _pad(k, batch), _pad(v, batch)
        out = F.scaled_dot_product_attention(
            _pad(q, batch).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=batch.mask, scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv,
        )  # [B, heads, max_q, d]
        out = out.transpose(1, 2).reshape(b * batch.max_q, self.n_heads * self.head_dim)
        if b * batch.max_q != t:
            out = out[batch.pad_index]
        return self.o_proj(out)


def _pad(x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Packed [T, ...] → padded [B, max_q, ...] (zeros where a sequence has fewer new tokens)."""
    b = len(batch.seq_ids)
    if b * batch.max_q == x.shape[0]:
        return x.view(b, batch.max_q, *x.shape[1:])
    out = x.new_zeros(b * batch.max_q, *x.shape[1:])
    out[batch.pad_index] = x
    return out.view(b, batch.max_q, *x.shape[1:])


class DecoderLayer(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, batch, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Stage(nn.Module):
    """Layers `[start, end)` of the decoder (+ embeddings on the first stage, + final norm on the last)."""

    def __init__(self, config: SeedOssConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"stage layer range [{start}, {end}) is not within [0, {config.num_hidden_layers})")
        self.config, self.start, self.end = config, start, end
        self.is_first, self.is_last = start == 0, end == config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(start, end))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else None
        self.rotary = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    def hf_names(self, prefix: str = "model.") -> dict[str, str]:
        """Our parameter name → the HF checkpoint tensor name it loads from."""
        names = {}
        for name, _ in self.named_parameters():
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                names[name] = f"{prefix}layers.{self.start + int(local)}.{rest}"
            else:
                names[name] = prefix + name
        return names

    def new_kv_cache(self, budget_bytes: int, block_size: int = 16) -> PagedKVCache:
        c = self.config
        return PagedKVCache.from_budget(
            budget_bytes, len(self.layers), c.num_key_value_heads, c.head_dim,
            block_size=block_size, dtype=self.dtype, device=self.device,
        )

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, batch: StepBatch, cache: PagedKVCache | None = None) -> torch.Tensor:
        """inputs: token ids [T] on the first stage, hidden states [T, hidden] otherwise. Returns [T, hidden].

        With a cache the new tokens attend to the sequence's cached context and are appended to it; without,
        each sequence is a fresh prompt (context_lens must be 0) and nothing is stored.
        """
        if cache is None and any(batch.context_lens):
            raise ValueError("a step with cached context needs the stage's KV cache")
        slots = batch.bind_cache(cache) if cache is not None else None
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        x = self.embed_tokens(inputs.to(self.device)) if self.is_first else inputs.to(self.device, self.dtype)
        cos, sin = self.rotary(batch.positions, self.dtype, batch.token_seq_lens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, (cache.k[i], cache.v[i], *slots) if cache is not None else None)
        return self.norm(x) if self.is_last else x


def run_stages(stages: Sequence[Stage], input_ids: torch.Tensor, batch: StepBatch,
               caches: Sequence[PagedKVCache | None] | None = None) -> torch.Tensor:
    """Chain stages in-process; each keeps its own cache."""
    x = input_ids
    for i, stage in enumerate(stages):
        x = stage(x, batch, caches[i] if caches else None)
    return x
