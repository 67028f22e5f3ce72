"""Splitting L decoder layers into N contiguous pipeline stages.

Stages are balanced by parameter bytes: every layer costs the same, the first stage also carries the embedding
table and the last one the final norm and the LM head (which the generation head service places beside it).
The split minimises the heaviest stage (exact, by dynamic programming over cut points).
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import SeedOssConfig


def layer_param_count(c: SeedOssConfig) -> int:
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if c.attention_bias else 0) + (h if c.attention_out_bias else 0)
    mlp = 3 * h * c.intermediate_size + (2 * c.intermediate_size + h if c.mlp_bias else 0)
    return attn + mlp + 2 * h


def stage_param_counts(c: SeedOssConfig, ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Parameters per stage: its layers, + embeddings (first), + final norm and LM head (last)."""
    embed = c.vocab_size * c.hidden_size
    out = []
    for start, end in ranges:
        n = (end - start) * layer_param_count(c)
        n += embed if start == 0 else 0
        n += c.hidden_size + (0 if c.tie_word_embeddings else embed) if end == c.num_hidden_layers else 0
        out.append(n)
    return out


def partition_layers(config: SeedOssConfig, num_stages: int | None = None,
                     layers_per_stage: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) per stage: balanced over `num_stages`, or exactly `layers_per_stage` when given."""
    total = config.num_hidden_layers
    if layers_per_stage is not None:
        if any(n < 1 for n in layers_per_stage) or sum(layers_per_stage) != total:
            raise ValueError(
                f"layers_per_stage {list(layers_per_stage)} must be positive and sum to num_hidden_layers ({total})"
            )
        if num_stages is not None and num_stages != len(layers_per_stage):
            raise ValueError(f"num_stages={num_stages} disagrees with layers_per_stage of length {len(layers_per_stage)}")
        bounds = [0]
        for n in layers_per_stage:
            bounds.append(bounds[-1] + n)
        return list(zip(bounds[:-1], bounds[1:]))
    num_stages = num_stages or 1
    if not 1 <= num_stages <= total:
        raise ValueError(f"num_stages must be between 1 and num_hidden_layers ({total}), got {num_stages}")

    def cost(start: int, end: int) -> int:
        return stage_param_counts(config, [(start, end)])[0]

    # best[k][e]: minimal max-stage cost splitting layers [0, e) into k stages; cut[k][e]: start of the k-th
    inf = float("inf")
    best = [[inf] * (total + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (total + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for e in range(k, total - (num_stages - k) + 1):
            for s in range(k - 1, e):
                value = max(best[k - 1][s], cost(s, e))
                if value < best[k][e]:
                    best[k][e], cut[k][e] = value, s
    bounds, e = [total], total
    for k in range(num_stages, 0, -1):
        e = cut[k][e]
        bounds.append(e)
    bounds.reverse()
    return list(zip(bounds[:-1], bounds[1:]))
