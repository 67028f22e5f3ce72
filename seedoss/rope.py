"""Rotary position embeddings: inverse frequencies for each rope type, and cos/sin for given positions.

The formulas follow transformers' `modeling_rope_utils` (checked there by our parity tests). `dynamic` NTK
scaling depends on a sequence's current length, as transformers computes it for a single-sequence forward.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig, SeedOssConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.rope_theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.rope_theta, dim)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def inv_freq_for(config: SeedOssConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] in float32, cos/sin scaling) for `config`'s rope type."""
    rope, dim = config.rope, config.head_dim
    if rope.rope_type == "default":
        return _base_inv_freq(rope.rope_theta, dim), 1.0
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.rope_theta, dim) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = rope.rope_theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    if rope.rope_type == "llama3":
        return _llama3(rope, dim), 1.0
    raise ValueError(f"unknown rope type {rope.rope_type!r}")


class RotaryEmbedding:
    """cos/sin tables for arbitrary positions; static inverse frequencies are computed once."""

    def __init__(self, config: SeedOssConfig):
        self.config = config
        self.dynamic = config.rope.rope_type == "dynamic"
        with torch.device("cpu"):  # stages are built on the meta device; these tables are real
            self.inv_freq, self.scaling = inv_freq_for(config)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype,
                 seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] for positions [T]. `seq_lens` [T] is the length of each token's sequence: dynamic
        NTK scaling stretches a sequence's frequencies once it outgrows max_position_embeddings (per sequence, so
        batch mates never change each other's numbers)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)
        scaling = self.scaling
        if self.dynamic and seq_lens is not None:
            for length in seq_lens.unique().tolist():
                if length > self.config.max_position_embeddings:
                    with torch.device("cpu"):
                        inv_freq, scaling = inv_freq_for(self.config, length)
                    rows = seq_lens == length
                    freqs[rows] = positions[rows].to(torch.float32)[:, None] * inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation of x [T, heads, head_dim] with cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
