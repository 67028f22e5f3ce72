"""The native kernels: they build here; decode attention equals gather + SDPA on a paged cache, and chunk attention
gather + masked SDPA; the fused rotary + KV write equals apply_rotary + index_copy_ bit for bit, RMSNorm and
SiLU * up torch's ops within float rounding, in float32 and in bfloat16; a stage gives the same decode and
chunked-prefill outputs with and without them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from seedoss import model as model_module
from seedoss import native
from seedoss.loader import load_stage
from seedoss.model import StepBatch
from seedoss.rope import apply_rotary


def _reference(q, k_cache, v_cache, slots, lens, scale):
    keys, values = k_cache[slots], v_cache[slots]  # [B, max_kv, kv_heads, D]
    mask = (torch.arange(slots.shape[1])[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0]


def test_kernel_builds_where_a_compiler_exists():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine: the torch path is used")
    assert native.library() is not None


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 32), (8, 2, 64), (12, 4, 64), (6, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_gather_and_sdpa(heads, kv_heads, dim, dtype):
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(heads * dim)
    block, num_blocks = 4, 96
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    lens = torch.tensor([1, 7, 33, 60, 16])
    tables = torch.randperm(num_blocks, generator=g)[: 5 * 15].view(5, 15)  # scattered blocks per sequence
    slots = (tables[:, :, None] * block + torch.arange(block)).view(5, -1)
    slots = torch.where(torch.arange(slots.shape[1])[None, :] < lens[:, None], slots, 0)
    q = torch.randn(5, heads, dim, generator=g).to(dtype)
    out = native.paged_decode_attention(q, k_cache, v_cache, slots, lens, dim**-0.5)
    assert out is not None and out.shape == q.shape and out.dtype == dtype
    # bfloat16: the kernel computes in float32 from the same bfloat16 inputs and rounds once, so it is compared
    # with SDPA run in float32 on them, to bfloat16's rounding (2^-8 relative)
    reference = _reference(q.float(), k_cache.float(), v_cache.float(), slots, lens, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lone_sequence_gets_the_numbers_it_gets_in_a_batch(dtype):
    """Fewer sequences than threads are split by kv head across the threads, more are not: the same arithmetic
    per head either way, so each sequence's output is bit-identical alone and in a batch."""
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = (torch.randn(256, 4, 64, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([200, 37, 129, 1])
    slots = torch.stack([torch.randperm(256, generator=g)[:200] for _ in lens])
    q = torch.randn(len(lens), 12, 64, generator=g).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batched = native.paged_decode_attention(q, k_cache, v_cache, slots, lens, 0.125)
        alone = [native.paged_decode_attention(q[b: b + 1], k_cache, v_cache, slots[b: b + 1], lens[b: b + 1], 0.125)
                 for b in range(len(lens))]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.cat(alone), batched)


def test_kernel_declines_what_it_does_not_cover():
    q, cache = torch.randn(2, 4, 8), torch.randn(16, 2, 8)
    slots, lens = torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2])
    assert native.paged_decode_attention(q.half(), cache.half(), cache.half(), slots, lens, 1.0) is None
    assert native.paged_decode_attention(q.bfloat16(), cache, cache, slots, lens, 1.0) is None  # mixed dtypes
    assert native.paged_decode_attention(q.transpose(0, 1).contiguous().transpose(0, 1), cache, cache, slots, lens,
                                         1.0) is None
    assert native.paged_decode_attention(q, cache, cache, slots.int(), lens, 1.0) is None


def _chunk_case(heads, kv_heads, dim, dtype, chunks, seed=0):
    """A paged cache with scattered slots and `chunks` [(cached tokens, new tokens)] packed one after another:
    (q, k_cache, v_cache, slots, runs)."""
    g = torch.Generator().manual_seed(seed)
    max_kv, num_slots = max(c + n for c, n in chunks), 4096
    k_cache, v_cache = (torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    slots = torch.stack([torch.randperm(num_slots, generator=g)[:max_kv] for _ in chunks])
    starts = torch.cumsum(torch.tensor([0] + [n for _, n in chunks]), 0)[:-1].tolist()
    runs = torch.tensor([(start, n, c, row) for row, (start, (c, n)) in enumerate(zip(starts, chunks))])
    q = torch.randn(sum(n for _, n in chunks), heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, slots, runs


def _chunk_reference(q, k_cache, v_cache, slots, runs):
    out = torch.zeros(q.shape)
    for start, n, ctx, row in runs.tolist():
        keys, values = k_cache[slots[row, : ctx + n]].float(), v_cache[slots[row, : ctx + n]].float()
        out[start: start + n] = F.scaled_dot_product_attention(
            q[start: start + n].float().transpose(0, 1)[None], keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], attn_mask=model_module.causal_lower_right(n, ctx + n),
            scale=q.shape[-1] ** -0.5, enable_gqa=True)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("heads,kv_heads,dim", [(12, 4, 64), (4, 2, 32), (8, 8, 16), (10, 2, 128), (6, 2, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_kernel_equals_gather_and_masked_sdpa(heads, kv_heads, dim, dtype):
    """Chunks shorter and longer than a tile of query rows, contexts on and off the kernel's 64-key blocks, and a
    whole prompt (nothing cached before it)."""
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    q, k_cache, v_cache, slots, runs = _chunk_case(heads, kv_heads, dim, dtype,
                                                   [(37, 5), (1024, 48), (3, 130), (64, 64), (1, 2), (0, 70)])
    out = torch.full_like(q, float("nan"))
    assert native.paged_chunk_attention(q, k_cache, v_cache, slots, runs, dim**-0.5, out)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # bfloat16: computed in float32, rounded once
    torch.testing.assert_close(out.float(), _chunk_reference(q, k_cache, v_cache, slots, runs),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_row_gets_the_same_numbers_in_any_tile_and_batch(dtype):
    """A row's arithmetic does not depend on the chunk's length (its tiling), the other chunks or the threads:
    the first 20 queries of a 300-token chunk packed with another chunk equal a 20-token chunk alone."""
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    q, k_cache, v_cache, slots, runs = _chunk_case(12, 4, 64, dtype, [(100, 300), (500, 7)], seed=3)
    out = torch.empty_like(q)
    assert native.paged_chunk_attention(q, k_cache, v_cache, slots, runs, 0.125, out)
    alone = torch.empty_like(q[:20])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert native.paged_chunk_attention(q[:20].contiguous(), k_cache, v_cache, slots[:1].contiguous(),
                                            torch.tensor([[0, 20, 100, 0]]), 0.125, alone)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, out[:20])


def test_chunk_kernel_declines_what_it_does_not_cover():
    q, k_cache, v_cache, slots, runs = _chunk_case(4, 2, 16, torch.float32, [(5, 3)])
    out = torch.empty_like(q)
    assert not native.paged_chunk_attention(q[..., :8].contiguous(), k_cache[..., :8].contiguous(),
                                            v_cache[..., :8].contiguous(), slots, runs, 1.0, out[..., :8].contiguous())
    assert not native.paged_chunk_attention(q.bfloat16(), k_cache, v_cache, slots, runs, 1.0, out)  # mixed dtypes
    assert not native.paged_chunk_attention(q, k_cache, v_cache, slots.int(), runs, 1.0, out)
    assert not native.paged_chunk_attention(q.half(), k_cache.half(), v_cache.half(), slots, runs, 1.0, out.half())


@pytest.mark.parametrize("tokens,heads,kv_heads,dim", [(1, 12, 4, 64), (37, 8, 2, 32), (5, 4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_store_equals_rotary_and_index_copy(tokens, heads, kv_heads, dim, dtype):
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    angles = torch.randn(tokens, dim // 2, generator=g) * 50
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    write = torch.randperm(64, generator=g)[:tokens]
    k_cache, v_cache = torch.zeros(64, kv_heads, dim, dtype=dtype), torch.zeros(64, kv_heads, dim, dtype=dtype)
    q, k = native.rotary_store_kv(qkv, cos, sin, k_cache, v_cache, write)
    qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)
    assert torch.equal(q, qk[:, :heads]) and torch.equal(k, qk[:, heads:])
    ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref_k.index_copy_(0, write, qk[:, heads:])
    ref_v.index_copy_(0, write, qkv[:, heads + kv_heads:])
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert native.rotary_store_kv(qkv.half(), cos.half(), sin.half(), k_cache.half(), v_cache.half(), write) is None
    assert native.rotary_store_kv(qkv.float(), cos.double(), sin, k_cache.float(), v_cache.float(), write) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_and_mul_equal_the_torch_ops(dtype):
    """The reference's arithmetic (DESIGN §2) up to the order of the sum of squares and the exp: float32 within
    float rounding; bfloat16 within one bfloat16 rounding of torch's ops; the residual sum exact."""
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(5)
    x, residual = ((torch.randn(37, 768, generator=g) * 3).to(dtype) for _ in range(2))
    weight = torch.randn(768, generator=g).to(dtype)
    h = (x + residual).float()
    reference = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    summed, normed = native.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(summed, x + residual)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(normed.float(), reference.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(native.rms_norm(summed, weight, 1e-6).float(), normed.float(), rtol=0, atol=0)
    gate_up = (torch.randn(37, 2 * 300, generator=g) * 6).to(dtype)  # silu's tails on both sides
    gate, up = gate_up.split(300, dim=-1)
    torch.testing.assert_close(native.silu_and_mul(gate_up).float(), (F.silu(gate) * up).float(), rtol=tolerance,
                               atol=tolerance)


def test_rms_norm_and_silu_and_mul_give_a_row_the_same_numbers_alone_and_in_a_batch():
    """Rows are independent and computed alike whatever their count (the heads' results must not depend on the
    batch a request lands in), also where a large batch spreads rows over threads."""
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(6)
    x, residual = torch.randn(300, 768, generator=g), torch.randn(300, 768, generator=g)
    weight, gate_up = torch.randn(768, generator=g), torch.randn(300, 4096, generator=g)
    summed, normed = native.rms_norm(x, weight, 1e-6, residual)
    alone = native.rms_norm(x[7:8].contiguous(), weight, 1e-6, residual[7:8].contiguous())
    assert torch.equal(alone[0], summed[7:8]) and torch.equal(alone[1], normed[7:8])
    assert torch.equal(native.silu_and_mul(gate_up[7:8].contiguous()), native.silu_and_mul(gate_up)[7:8])


def test_norm_and_silu_kernels_decline_what_they_do_not_cover():
    x, weight = torch.randn(3, 16), torch.randn(16)
    assert native.rms_norm(x.half(), weight.half(), 1e-6) is None
    assert native.rms_norm(x, weight.bfloat16(), 1e-6) is None  # mixed dtypes
    assert native.rms_norm(x, weight, 1e-6, torch.randn(3, 8)) is None  # residual of another shape
    assert native.rms_norm(x, torch.randn(8), 1e-6) is None  # weight of another size: it would be read past its end
    assert native.rms_norm(x.t(), torch.randn(3), 1e-6) is None  # not contiguous
    assert native.silu_and_mul(x.half()) is None


def _decode(stage, steps=6):
    cache = stage.new_kv_cache(1 << 20, block_size=4)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 12, 1]
    stage(torch.randint(3, 300, (sum(lengths),), generator=g), StepBatch([0, 1, 2], lengths, [0, 0, 0]), cache)
    outs = []
    for step in range(steps):
        ctx = [n + step for n in lengths]
        outs.append(stage(torch.randint(3, 300, (3,), generator=g), StepBatch([0, 1, 2], [1, 1, 1], ctx), cache))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage_decode_is_the_same_with_and_without_the_kernels(demo_checkpoint, monkeypatch, dtype):
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    stage = load_stage(demo_checkpoint, dtype=dtype)
    calls = []
    kernel = model_module.paged_decode_attention
    monkeypatch.setattr(model_module, "paged_decode_attention", lambda *a: calls.append(1) or kernel(*a))
    with_kernel = _decode(stage)
    # every layer of every decode step used it, and of the prompt step too (for its 1-token prompt)
    assert len(calls) == 7 * len(stage.layers)
    for name in ("paged_decode_attention", "rotary_store_kv", "rms_norm", "silu_and_mul"):
        monkeypatch.setattr(model_module, name, lambda *a: None)
    _assert_same_within_rounding(_decode(stage), with_kernel)


def _assert_same_within_rounding(without: torch.Tensor, with_kernel: torch.Tensor) -> None:
    if with_kernel.dtype == torch.float32:
        torch.testing.assert_close(without, with_kernel, rtol=1e-5, atol=1e-5)
    else:  # torch's attention rounds the softmax weights to bfloat16 before it weighs the values, the kernels keep
        # them in float32: as in the parity test, allow 4 bfloat16 ulps (2^-7 relative) of the largest value
        ulp = 2.0**-7 * with_kernel.float().abs().max()
        assert (without.float() - with_kernel.float()).abs().max() <= 4 * ulp


def _chunked_prefill(stage):
    """Prompts of 40 and 23 tokens, then both continued by chunks of 9 and 30 tokens over their cached context."""
    cache = stage.new_kv_cache(1 << 20, block_size=4)
    g = torch.Generator().manual_seed(2)
    stage(torch.randint(3, 300, (63,), generator=g), StepBatch([0, 1], [40, 23], [0, 0]), cache)
    return stage(torch.randint(3, 300, (39,), generator=g), StepBatch([0, 1], [9, 30], [40, 23]), cache)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage_chunked_prefill_is_the_same_with_and_without_the_chunk_kernel(demo_checkpoint, monkeypatch, dtype):
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    stage = load_stage(demo_checkpoint, dtype=dtype)
    calls = []
    kernel = model_module.paged_chunk_attention
    monkeypatch.setattr(model_module, "paged_chunk_attention", lambda *a: calls.append(len(a[4])) or kernel(*a))
    with_kernel = _chunked_prefill(stage)
    assert calls == [2] * 2 * len(stage.layers)  # both prompts, then both chunks: one call per layer and step
    monkeypatch.setattr(model_module, "paged_chunk_attention", lambda *a: False)
    _assert_same_within_rounding(_chunked_prefill(stage), with_kernel)


def _cacheless(stage):
    """A cache-less step (the heads' forward): prompts of 40, 1, 23 and 40 tokens."""
    g = torch.Generator().manual_seed(3)
    return stage(torch.randint(3, 300, (104,), generator=g), StepBatch([0, 1, 2, 3], [40, 1, 23, 40], [0] * 4))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage_cacheless_forward_is_the_same_with_and_without_the_kernels(demo_checkpoint, monkeypatch, dtype):
    """Without a cache a step's own keys are its scratch cache: its prompts take the chunk kernel, one call per
    layer, and its one-token prompt the decode kernel."""
    if native.library() is None:
        pytest.skip("native kernels unavailable")
    stage = load_stage(demo_checkpoint, dtype=dtype)
    calls = {"paged_chunk_attention": [], "paged_decode_attention": []}
    for name, seen in calls.items():
        kernel = getattr(model_module, name)
        monkeypatch.setattr(model_module, name, lambda *a, k=kernel, seen=seen: seen.append(len(a[0])) or k(*a))
    with_kernels = _cacheless(stage)
    assert calls == {"paged_chunk_attention": [104] * len(stage.layers), "paged_decode_attention": [1] * len(stage.layers)}
    for name in ("paged_decode_attention", "paged_chunk_attention", "rotary_store_kv", "rms_norm", "silu_and_mul"):
        monkeypatch.setattr(model_module, name, lambda *a: None)
    _assert_same_within_rounding(_cacheless(stage), with_kernels)


CPUINFO = """processor\t: 0
model name\t: Example CPU @ 3.00GHz
flags\t\t: fpu sse2 avx2 {extra}

processor\t: 1
model name\t: Example CPU @ 3.00GHz
flags\t\t: fpu sse2 avx2 {extra}
"""


def test_cache_key_covers_the_cpu_flags():
    """Same CPU model name, one more instruction set: a -march=native build must not be shared."""
    plain, avx512 = native.cpu_identity(CPUINFO.format(extra="")), native.cpu_identity(CPUINFO.format(extra="avx512f"))
    assert "avx2" in plain and "avx512f" in avx512 and "Example CPU" in plain
    assert native.cache_key("cc", plain) != native.cache_key("cc", avx512)
    assert native.cache_key("cc", plain) == native.cache_key("cc", native.cpu_identity(CPUINFO.format(extra="")))
    assert "flags" in native.cpu_identity()  # this machine's key includes its flags


def test_only_a_cached_library_of_this_user_and_not_writable_by_others_is_loaded(tmp_path, monkeypatch, caplog):
    import os
    import stat

    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("SEEDOSS_CACHE", str(tmp_path))
    target = native.cache_dir() / f"kernels-{native.cache_key(compiler)}.so"
    native._load(compiler)
    assert native.trusted(target) and stat.S_IMODE(target.stat().st_mode) == 0o755
    built = target.stat().st_ino
    native._load(compiler)
    assert target.stat().st_ino == built  # a trusted cached build is reused

    # a world-writable file under the expected name (anyone could have put code there) is not loaded: were it,
    # CDLL would fail on these bytes; it is replaced by a fresh build instead, and the log says so
    target.unlink()  # a new file: rewriting the loaded one in place would change code this process has mapped
    target.write_bytes(b"not a shared library")
    target.chmod(0o666)
    with caplog.at_level("WARNING", logger="seedoss.native"):
        assert native._load(compiler).paged_decode_attention is not None
    assert "not loading the cached kernel" in caplog.text
    assert native.trusted(target) and target.stat().st_size > 1000

    target.chmod(0o775)  # group-writable
    assert not native.trusted(target)
    native._load(compiler)
    assert native.trusted(target)

    if os.getuid() == 0:  # only root can give the file to another user
        os.chown(target, 65534, 65534)
        assert not native.trusted(target)
        native._load(compiler)
        assert native.trusted(target) and target.stat().st_uid == 0

    target.unlink()  # a symlink to a file of ours is not trusted either (its target could change)
    real = tmp_path / "elsewhere.so"
    real.write_bytes(b"x")
    target.symlink_to(real)
    assert not native.trusted(target)
    native._load(compiler)
    assert native.trusted(target) and not target.is_symlink()
