"""The SeedOss decoder in plain PyTorch, as pipeline stages.

A `Stage` holds a contiguous layer range `[start, end)`: the first stage also owns `embed_tokens`, the last one
the final `norm`; a full model is one stage over all layers. Tokens travel *packed*: a step's new tokens of all
sequences form one `[T, hidden]` tensor, described by a `StepBatch` (which sequence each run belongs to, how
many tokens it already has cached). In attention, the rows with one new token (decode) are served together
straight from the paged cache (seedoss/native.py on CPU, else gather + SDPA); longer runs (a prompt or a chunk
of one) run causal SDPA one sequence at a time, so nothing is padded to the longest prompt.

The q/k/v projections are one fused `qkv_proj` and gate/up one `gate_up_proj` (fewer, larger GEMMs); the loader
concatenates the checkpoint's separate tensors into them (`Stage.checkpoint_layout`). On CPU in float32 (and in
bfloat16 where oneDNN has bf16 kernels) the loader also prepacks every Linear's weight for oneDNN (`pack_linears`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .config import SeedOssConfig
from .kv_cache import PagedKVCache
from .native import paged_chunk_attention, paged_decode_attention, rms_norm, rotary_store_kv, silu_and_mul
from .rope import RotaryEmbedding, apply_rotary

# The batch size oneDNN lays packed weights out for; it is a tuning hint only (any batch size runs).
PACK_BATCH_HINT = 32


def packed_rows(rows: int) -> int:
    """The row count a packed Linear computes `rows` rows as: exact up to 16, above that rounded up to one of 8
    sizes per doubling (at most 12.5% padding). oneDNN builds a primitive per input shape (~0.1-1 ms each; it keeps
    the last 1,024, each holding memory): with the token counts of real traffic, which change every step, a forward
    mostly paid for building them (a 2-layer demo stage's 268-token forward: 4.3 ms over varied shapes, 3.2 ms on a
    repeated one) and a replica's RSS grew by hundreds of MiB. Padded, a layer sees at most ~100 shapes up to 16,384
    rows. Padding rows do not change the real rows' results: oneDNN computes each row alike whatever the row count
    (what keeps the heads' results independent of their batch, tests/test_batching.py)."""
    if rows <= 16:
        return rows
    step = 1 << (rows - 1).bit_length() - 4  # 1/8 of the power of two at or above `rows`
    return -(-rows // step) * step


def _mkl_gemv_is_fast() -> bool:
    """Does MKL's sgemv on a plain weight beat oneDNN's packed one for a single row? On Intel CPUs, yes: the small
    preset's 48 linears at 1 row took 12 ms through F.linear and 16 ms packed (Xeon, AVX-512); on AMD, MKL takes
    slow generic paths (EPYC, AVX2: 26-30 ms through F.linear against 16-24 ms packed; bench/RESULTS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


class Linear(nn.Linear):
    """nn.Linear whose weight can also be prepacked for oneDNN (`pack`). On CPU a packed weight runs faster than
    F.linear: in float32 1.2-2x (MKL) at 8-128 rows, in bfloat16 1.15-1.3x at 1-32 rows on AVX-512 bf16 CPUs
    (bench/RESULTS.md). A single float32 row (a batch-1 decode step) is a matrix-vector product bound by reading
    the weight, where MKL is faster on Intel CPUs: there the plain weight stays too (twice this layer's weight
    memory) and one-row inputs go through it."""

    packed_weight: torch.Tensor | None = None
    gemv_on_plain_weight = False

    def pack(self, keep_plain: bool) -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_BATCH_HINT)
        self.packed_weight, self.gemv_on_plain_weight = packed, keep_plain
        if not keep_plain:  # the packed weight replaces the plain one
            self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None or (self.gemv_on_plain_weight and x.numel() == x.shape[-1]):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        padded = packed_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        padded_x = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
        y = torch.ops.mkldnn._linear_pointwise(padded_x, self.packed_weight, self.bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], y.shape[-1])


def pack_linears(module: nn.Module, gemv_on_plain_weight: bool = True) -> None:
    """Prepack every `Linear` of a loaded module whose weight is a CPU tensor in float32, or in bfloat16 where oneDNN
    has bf16 kernels for this CPU (no-op elsewhere). `gemv_on_plain_weight=False`: every input goes through the
    packed weight, so a row's output never depends on how many rows share the call (the task heads' results must
    not depend on the batch a request lands in: MKL's sgemv and oneDNN round differently, ~1e-7)."""
    if not torch.backends.mkldnn.is_available():
        return
    dtypes = {torch.float32} | ({torch.bfloat16} if torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())
    mkl_gemv = gemv_on_plain_weight and _mkl_gemv_is_fast()
    for m in module.modules():
        if isinstance(m, Linear) and m.packed_weight is None and m.weight.device.type == "cpu" \
                and m.weight.dtype in dtypes:
            m.pack(keep_plain=mkl_gemv and m.weight.dtype == torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = rms_norm(x, self.weight, self.eps)  # one native pass (seedoss/csrc/fused_layer_ops.c)
        return self._torch(x) if out is None else out

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): a decoder layer's residual add and the norm after it, one pass."""
        fused = rms_norm(x, self.weight, self.eps, residual)
        if fused is None:
            x = x + residual
            return x, self._torch(x)
        return fused

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # torch's op, bit-identical to the reference's in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()  # the reference numerics (DESIGN §2): normalize in float32, scale in the activation dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.intermediate = i
        self.gate_up_proj = Linear(h, 2 * i, bias=bias)  # checkpoint: gate_proj ; up_proj
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        h = silu_and_mul(gate_up)  # one native pass, else torch's two ops
        if h is None:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h)


@dataclass
class StepBatch:
    """Which sequences a packed step carries: `query_lens[i]` new tokens of `seq_ids[i]`, whose first
    `context_lens[i]` tokens are already in the KV cache. Index tensors are derived once and shared by layers."""

    seq_ids: list[Hashable]
    query_lens: list[int]
    context_lens: list[int]
    # per sequence (first block index, hashes of its blocks from there up to the last one this step fills): the
    # engine's prefix-cache names for them (seedoss/engine/block_manager.py); None: no prefix caching
    block_hashes: list[tuple[int, list[bytes]]] | None = None

    def __post_init__(self):
        if not (len(self.seq_ids) == len(self.query_lens) == len(self.context_lens)):
            raise ValueError("StepBatch: seq_ids, query_lens and context_lens must have the same length")
        if any(q < 1 for q in self.query_lens):
            raise ValueError("StepBatch: every sequence needs at least one new token")
        q = torch.tensor(self.query_lens)
        c = torch.tensor(self.context_lens)
        self.num_tokens = int(q.sum())
        self.max_kv = int((q + c).max())
        starts = torch.cumsum(q, 0) - q
        self.positions = torch.repeat_interleave(c, q) + torch.arange(self.num_tokens) - torch.repeat_interleave(starts, q)
        self.token_rows = torch.repeat_interleave(torch.arange(len(self.seq_ids)), q)
        self.kv_lens = c + q
        self.token_seq_lens = torch.repeat_interleave(self.kv_lens, q)
        # with a cache, decode rows (one new token) attend together and longer runs (a prompt or a chunk of
        # one) one by one: (row, first token, new tokens, cached tokens)
        self.runs = list(zip(range(len(self.seq_ids)), starts.tolist(), self.query_lens, self.context_lens))
        decode = q == 1
        self.all_decode = bool(decode.all())
        self.decode_rows = None if self.all_decode else decode.nonzero().flatten()
        self.decode_tokens = None if self.all_decode else starts[decode]

    @functools.cached_property
    def prompt_groups(self) -> list[tuple[int, torch.Tensor]]:
        """Whole prompts (no cached context) of more than one token grouped by length, for the torch path when the
        chunk-attention kernel is unavailable: (length n, the packed rows of the group's B prompts [B * n]). Their
        causal attention runs as one [B, heads, n, d] call per group instead of one per prompt: the same kernel
        computes each batch entry alone, so the numbers are those of separate calls. (A one-token prompt attends
        as a decode row.)"""
        starts: dict[int, list[int]] = {}
        for _, start, n, ctx in self.runs:
            if ctx == 0 and n > 1:
                starts.setdefault(n, []).append(start)
        return [(n, (torch.tensor(s)[:, None] + torch.arange(n)).flatten()) for n, s in starts.items()]

    @functools.cached_property
    def own_slots(self) -> torch.Tensor:
        """Each sequence's packed rows [B, most new tokens] (padded with its last row): the slots of its keys when
        a cache-less step keeps its own keys as the cache (`Stage._scratch_kv`)."""
        q = torch.tensor(self.query_lens)
        offsets = torch.minimum(torch.arange(int(q.max()))[None, :], (q - 1)[:, None])
        return (torch.cumsum(q, 0) - q)[:, None] + offsets

    @functools.cached_property
    def prompt_runs(self) -> torch.Tensor:
        """Sequences with more than one new token (a prompt, or a later chunk of one over its cached context):
        [runs, 4] int64 rows of (first packed token, new tokens, cached tokens, row)."""
        rows = [(start, n, ctx, row) for row, start, n, ctx in self.runs if n > 1]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 4)

    @property
    def last_token_index(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed layout."""
        return torch.cumsum(torch.tensor(self.query_lens), 0) - 1

    def to(self, device: torch.device) -> "StepBatch":
        """A copy whose index tensors live on `device` (they are built on the CPU)."""
        moved = copy.copy(self)
        for name in ("positions", "kv_lens", "token_seq_lens", "decode_rows", "decode_tokens"):
            if getattr(self, name) is not None:
                setattr(moved, name, getattr(self, name).to(device))
        return moved


class Attention(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        # checkpoint: q_proj ; k_proj ; v_proj
        self.qkv_proj = Linear(h, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=config.attention_out_bias)

    def forward(self, x, cos, sin, batch: StepBatch, kv: tuple[torch.Tensor, ...]):
        """kv: (key cache, value cache, write slots, read slots) of this layer (a cache-less step's own scratch
        cache: `Stage._scratch_kv`)."""
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.n_heads + 2 * self.n_kv, self.head_dim)
        v = qkv[:, self.n_heads + self.n_kv:]
        # rotary and the cache write in one pass (seedoss/csrc/fused_layer_ops.c), else torch ops
        fused = rotary_store_kv(qkv, cos, sin, kv[0], kv[1], kv[2])
        if fused is None:
            qk = apply_rotary(qkv[:, : self.n_heads + self.n_kv], cos, sin)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads:]
        else:
            q, k = fused
        k_cache, v_cache, write, read = kv
        if fused is None:
            k_cache.index_copy_(0, write, k)
            v_cache.index_copy_(0, write, v)
        if batch.all_decode:
            out = self._decode(q.contiguous(), k_cache, v_cache, read, batch.kv_lens)
            return self.o_proj(out.view(t, self.n_heads * self.head_dim))
        out = q.new_empty(t, self.n_heads, self.head_dim)
        if len(batch.decode_tokens):
            rows, tokens = batch.decode_rows, batch.decode_tokens
            out[tokens] = self._decode(q[tokens].contiguous(), k_cache, v_cache, read[rows], batch.kv_lens[rows])
        # prompts and later chunks of them (over the cached context, then themselves), straight from the cache
        prompts = batch.prompt_runs
        if len(prompts) and not paged_chunk_attention(q, k_cache, v_cache, read, prompts, self.head_dim**-0.5, out):
            self._prompts(out, q, k, v, batch.prompt_groups)
            for start, n, ctx, row in prompts.tolist():
                if ctx > 0:
                    span = slice(start, start + n)
                    keys, values = k_cache[read[row, : ctx + n]], v_cache[read[row, : ctx + n]]
                    out[span] = self._sdpa(q[span], keys, values, causal_lower_right(n, ctx + n))
        return self.o_proj(out.view(t, self.n_heads * self.head_dim))

    def _prompts(self, out, q, k, v, groups: list[tuple[int, torch.Tensor]]) -> None:
        """Causal attention of whole prompts over their own keys, one call per group of equal length
        (`StepBatch.prompt_groups`), written into `out` [T, heads, d]."""
        for n, rows in groups:
            rows = rows.to(q.device)
            b = len(rows) // n

            def split(x):  # [B * n, heads, d] → [B, heads, n, d]
                return x[rows].view(b, n, x.shape[1], self.head_dim).transpose(1, 2)

            y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True,
                                               scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv)
            out[rows] = y.transpose(1, 2).reshape(b * n, self.n_heads, self.head_dim)

    def _decode(self, q, k_cache, v_cache, slots, lens):
        """One query per sequence over its cached context: the native kernel, else gather + masked SDPA."""
        out = paged_decode_attention(q, k_cache, v_cache, slots, lens, self.head_dim**-0.5)
        if out is None:
            mask = torch.arange(slots.shape[1], device=q.device)[None, :] < lens[:, None]
            out = F.scaled_dot_product_attention(
                q[:, :, None], k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2),
                attn_mask=mask[:, None, None, :], scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv,
            )[:, :, 0]
        return out

    def _sdpa(self, q, keys, values, mask):
        """q [n, heads, d] over keys/values [m, kv_heads, d] → [n, heads, d]."""
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=mask,
            scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv,
        )[0].transpose(0, 1)


class DecoderLayer(nn.Module):
    def __init__(self, config: SeedOssConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, batch, kv):
        x, h = self.post_attention_layernorm.add(x, self.self_attn(self.input_layernorm(x), cos, sin, batch, kv))
        return x + self.mlp(h)


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

    def checkpoint_layout(self, prefix: str = "model.") -> dict[str, list[tuple[str, tuple[int, ...]]]]:
        """Our parameter → the checkpoint tensors (HF name, shape) it is made of, concatenated along dim 0."""
        c = self.config
        fused = {"self_attn.qkv_proj": [("self_attn.q_proj", c.num_attention_heads * c.head_dim),
                                        ("self_attn.k_proj", c.num_key_value_heads * c.head_dim),
                                        ("self_attn.v_proj", c.num_key_value_heads * c.head_dim)],
                 "mlp.gate_up_proj": [("mlp.gate_proj", c.intermediate_size), ("mlp.up_proj", c.intermediate_size)]}
        layout = {}
        for name, param in self.named_parameters():
            if not name.startswith("layers."):
                layout[name] = [(prefix + name, tuple(param.shape))]
                continue
            _, local, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            theirs = f"{prefix}layers.{self.start + int(local)}."
            parts = fused.get(module, [(module, param.shape[0])])
            layout[name] = [(f"{theirs}{part}.{kind}", (rows, *param.shape[1:])) for part, rows in parts]
        return layout

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
        if cache is None:
            if batch.num_tokens == 1:  # alone, one row would take `Linear`'s sgemv path, which rounds unlike the
                # GEMM it meets in any batch (~1e-7): as two rows, a head's input gets the same numbers either way
                return self._layers(torch.cat([inputs, inputs]), StepBatch([0, 1], [1, 1], [0, 0]), None)[:1]
            return self._layers(inputs, batch, None)
        write, read, named = cache.bind(batch)
        try:
            return self._layers(inputs, batch, cache, write, read)
        except BaseException:
            cache.blocks.unregister(named)  # what those blocks hold is not what their names say
            raise

    def _layers(self, inputs, batch, cache, *slots):
        if self.device.type != "cpu":
            batch = batch.to(self.device)
        x = self.embed_tokens(inputs.to(self.device)) if self.is_first else inputs.to(self.device, self.dtype)
        cos, sin = self.rotary(batch.positions, self.dtype, batch.token_seq_lens)
        scratch = self._scratch_kv(batch, x) if cache is None else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, (cache.k[i], cache.v[i], *slots) if cache is not None else scratch)
        return self.norm(x) if self.is_last else x

    def _scratch_kv(self, batch: StepBatch, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A cache-less step's (keys, values, write slots, read slots): its own tokens' keys and values in a
        scratch cache that every layer overwrites before it reads. Whole prompts then take the kernels of prompts
        with a cache — rotary + store in one pass, one chunk-attention call per layer for all of them — instead of
        a gather and an SDPA call per group of equal-length prompts (what a head's batch of many short inputs of
        different lengths paid)."""
        keys = x.new_empty(batch.num_tokens, self.config.num_key_value_heads, self.config.head_dim)
        write = torch.arange(batch.num_tokens, device=x.device)
        return keys, torch.empty_like(keys), write, batch.own_slots.to(x.device)


def run_stages(stages: Sequence[Stage], input_ids: torch.Tensor, batch: StepBatch,
               caches: Sequence[PagedKVCache | None] | None = None) -> torch.Tensor:
    """Chain stages in-process; each keeps its own cache."""
    x = input_ids
    for i, stage in enumerate(stages):
        x = stage(x, batch, caches[i] if caches else None)
    return x
