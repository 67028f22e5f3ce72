"""Pipeline stages: chaining any split equals one stage; each stage reads and keeps only its own tensors;
incremental decoding through the paged KV cache equals a full forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_config, save_hf_model
from transformers import SeedOssForCausalLM

from seedoss.config import SeedOssConfig
from seedoss.engine.errors import KVCacheFull, MissingSequenceCache
from seedoss import model as model_module
from seedoss.loader import load_head, load_stage, parameter_bytes
from seedoss.model import Linear, StepBatch, packed_rows, run_stages
from seedoss.partition import partition_layers, stage_param_counts
from seedoss.weights import Checkpoint

LAYERS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = save_hf_model(SeedOssForCausalLM, hf_config(num_hidden_layers=LAYERS, num_key_value_heads=1), path, seed=3)
    return path, model


def _prompts(lengths, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("num_stages", [1, 2, 3, LAYERS])
def test_chained_stages_equal_one_stage(checkpoint, num_stages):
    path, _ = checkpoint
    config = SeedOssConfig.from_pretrained(path)
    prompts = _prompts([11, 4, 23])
    batch = StepBatch([0, 1, 2], [11, 4, 23], [0, 0, 0])
    whole = load_stage(path)(torch.cat(prompts), batch)
    ranges = partition_layers(config, num_stages)
    assert len(ranges) == num_stages and ranges[0][0] == 0 and ranges[-1][1] == LAYERS
    stages = [load_stage(path, s, e) for s, e in ranges]
    assert stages[0].embed_tokens is not None and all(s.embed_tokens is None for s in stages[1:])
    assert stages[-1].norm is not None and all(s.norm is None for s in stages[:-1])
    chained = run_stages(stages, torch.cat(prompts), batch)
    assert torch.equal(chained, whole)


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("cached", [False, True])
def test_prompts_attend_together_exactly_as_alone(checkpoint, cached, kernels, monkeypatch):
    """Whole prompts of a step attend in one chunk-attention call per layer (the native kernel; a cache-less step's
    own keys are its scratch cache), or, on the torch path, in one SDPA call per group of equal length
    (`StepBatch.prompt_groups`): either way each prompt's hidden states are bit-identical to its forward alone,
    beside prompts of other lengths too. Without a cache (the heads' forward) that holds for a one-token prompt too."""
    if kernels == "torch":
        for name in ("paged_decode_attention", "paged_chunk_attention", "rotary_store_kv", "rms_norm", "silu_and_mul"):
            monkeypatch.setattr(model_module, name, lambda *a: None)
    path, _ = checkpoint
    stage = load_stage(path)
    lengths = [9, 4, 9, 1, 9, 4, 30, 1] if not cached else [9, 4, 9, 2, 9, 4, 30, 2]
    prompts = _prompts(lengths, seed=5)
    batch = StepBatch(list(range(len(lengths))), lengths, [0] * len(lengths))
    assert sorted(len(rows) // n for n, rows in batch.prompt_groups) == ([1, 2, 3] if not cached else [1, 2, 2, 3])

    def forward(x, b):
        return stage(x, b, stage.new_kv_cache(budget_bytes=1 << 20)) if cached else stage(x, b)

    together = forward(torch.cat(prompts), batch).split(lengths)
    for i, p in enumerate(prompts):
        assert torch.equal(together[i], forward(p, StepBatch([i], [len(p)], [0]))), i


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packed weights need oneDNN")
def test_packed_linear_pads_rows_to_few_shapes_without_changing_any_row():
    """A packed Linear computes a row count as `packed_rows(rows)`: few shapes (oneDNN builds a primitive per
    shape), at most 12.5% padding, and every row's result exactly what it is among any other number of rows."""
    shapes = {packed_rows(rows) for rows in range(1, 16385)}
    assert len(shapes) <= 100
    assert all(rows <= packed_rows(rows) <= max(rows, 1.125 * rows) for rows in range(1, 16385))
    torch.manual_seed(0)
    plain = Linear(96, 160, bias=True).requires_grad_(False)
    packed = Linear(96, 160, bias=True).requires_grad_(False)
    packed.load_state_dict(plain.state_dict())
    packed.pack(keep_plain=False)
    assert packed.packed_weight is not None
    x = torch.randn(300, 96)
    with torch.inference_mode():
        whole = packed(x)
        torch.testing.assert_close(whole, plain(x), rtol=1e-5, atol=1e-5)
        for rows in (2, 7, 16, 17, 19, 33, 100, 257):  # padded (17, 19, 33, 100, 257) and exact sizes
            assert torch.equal(packed(x[:rows]), whole[:rows]), rows
            assert torch.equal(packed(x[rows:2 * rows]), whole[rows:2 * rows]), rows
        assert torch.equal(packed(x[:38].view(2, 19, 96)), whole[:38].view(2, 19, 160))  # any leading shape


def test_stage_reads_and_keeps_only_its_tensors(checkpoint):
    path, _ = checkpoint
    ckpt = Checkpoint(path)
    stage = load_stage(path, 2, 4, checkpoint=ckpt)
    read = set(ckpt.read_log)
    assert read == {n for n in ckpt.files if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert not any("embed_tokens" in n or "lm_head" in n or n == "model.norm.weight" for n in read)
    config = SeedOssConfig.from_pretrained(path)
    expected = stage_param_counts(config, [(2, 4)])[0] * 4
    assert parameter_bytes(stage) == expected
    full = load_stage(path)
    assert parameter_bytes(stage) < parameter_bytes(full) / 2


def test_bfloat16_stage_halves_resident_bytes(checkpoint):
    path, _ = checkpoint
    assert parameter_bytes(load_stage(path, 0, 2, dtype="bfloat16")) * 2 == parameter_bytes(load_stage(path, 0, 2))


def test_partition_balances_and_accepts_explicit_split():
    raw = json.loads(open("tests/data/seed_oss_36b_config.json").read())
    config = SeedOssConfig.from_dict(raw)
    assert sum(stage_param_counts(config, [(0, 64)])) == 36_151_104_512
    even = partition_layers(config, layers_per_stage=[16, 16, 16, 16])
    gib = [n * 2 / 2**30 for n in stage_param_counts(config, even)]
    assert [round(g, 1) for g in gib] == [17.6, 16.1, 16.1, 17.6]
    balanced = partition_layers(config, 4)
    assert max(stage_param_counts(config, balanced)) < max(stage_param_counts(config, even))
    with pytest.raises(ValueError, match="sum to num_hidden_layers"):
        partition_layers(config, layers_per_stage=[16, 16, 16])
    with pytest.raises(ValueError, match="num_stages"):
        partition_layers(config, 65)


def test_incremental_decoding_equals_full_forward(checkpoint):
    """40 decode steps of a 3-sequence batch with different prompt lengths, through 2 stages each with its own
    paged cache (block size 4, so sequences span many non-contiguous blocks), match HF's full forward."""
    path, model = checkpoint
    stages = [load_stage(path, 0, 2), load_stage(path, 2, LAYERS)]
    head = load_head(path, "generate")
    caches = [s.new_kv_cache(budget_bytes=1 << 20, block_size=4) for s in stages]
    seqs = [p.tolist() for p in _prompts([9, 1, 30], seed=5)]
    ids = ["a", "b", "c"]
    new, context = [list(s) for s in seqs], [0, 0, 0]
    for step in range(40):
        batch = StepBatch(ids, [len(n) for n in new], context)
        hidden = run_stages(stages, torch.tensor(sum(new, [])), batch, caches)
        last = head(hidden[batch.last_token_index])
        for i, seq in enumerate(seqs):
            with torch.no_grad():
                ref = model(torch.tensor(seq)[None]).logits[0, -1]
            assert (last[i] - ref).abs().max().item() <= 1e-4, f"step {step}, sequence {i}"
        context = [len(s) for s in seqs]
        tokens = last.argmax(-1).tolist()
        for s, t in zip(seqs, tokens):
            s.append(t)
        new = [[t] for t in tokens]
    for cache in caches:  # every stage cached all but the last sampled token of every sequence
        assert [cache.length(i) for i in ids] == [len(s) - 1 for s in seqs]


def test_mixed_prefill_and_decode_in_one_step(checkpoint):
    """A step that carries a decode token for one sequence and a prompt chunk for another is exact."""
    path, model = checkpoint
    stage, head = load_stage(path), load_head(path, "generate")
    cache = stage.new_kv_cache(budget_bytes=1 << 20)
    a, b = _prompts([12, 20], seed=9)
    stage(a, StepBatch(["a"], [12], [0]), cache)
    stage(b[:8], StepBatch(["b"], [8], [0]), cache)  # first chunk of b's prompt
    nxt = torch.tensor([7])
    hidden = stage(torch.cat([nxt, b[8:]]), StepBatch(["a", "b"], [1, 12], [12, 8]), cache)
    with torch.no_grad():
        ref_a = model(torch.cat([a, nxt])[None]).logits[0, -1]
        ref_b = model(b[None]).logits[0]
    assert (head(hidden[0]) - ref_a).abs().max().item() <= 1e-4
    assert (head(hidden[1:]) - ref_b[8:]).abs().max().item() <= 1e-4


def test_cache_budget_free_and_missing_context(checkpoint):
    path, _ = checkpoint
    stage = load_stage(path, 0, 1)
    cache = stage.new_kv_cache(budget_bytes=2 * 1 * 16 * 1 * 32 * 4 * 3, block_size=16)  # exactly 3 blocks
    assert cache.num_blocks == 3 and cache.capacity_tokens == 48
    stage(torch.arange(3, 33), StepBatch(["x"], [30], [0]), cache)
    assert cache.num_free_blocks == 1 and "x" in cache
    with pytest.raises(KVCacheFull):
        stage(torch.arange(3, 23), StepBatch(["y"], [20], [0]), cache)
    assert "y" not in cache and cache.num_free_blocks == 1  # all or nothing
    with pytest.raises(MissingSequenceCache) as e:
        stage(torch.tensor([5]), StepBatch(["z"], [1], [17]), cache)
    assert e.value.seq_ids == ["z"]
    cache.free("x")
    assert cache.num_free_blocks == 3 and cache.usage == 0.0
    stage(torch.arange(3, 23), StepBatch(["y"], [20], [0]), cache)
    assert cache.length("y") == 20


def test_stage_executor_evicts_least_recently_used_stale_sequences(checkpoint):
    """A stage replica whose cache is full of sequences nobody freed (their steps went elsewhere) evicts the least
    recently used ones instead of failing; an evicted sequence that returns is reported missing (recompute)."""
    import asyncio

    from seedoss.engine import LocalStageExecutor

    path, _ = checkpoint
    executor = LocalStageExecutor(load_stage(path, 0, 1), kv_budget_bytes=2 * 16 * 1 * 32 * 4 * 4, block_size=16)
    assert executor.num_blocks == 4

    async def scenario():
        await executor.forward(torch.arange(3, 34), ["old"], [31], [0])    # 2 blocks
        await executor.forward(torch.arange(3, 19), ["recent"], [16], [0])  # 1 block
        await executor.forward(torch.tensor([7]), ["old"], [1], [31])      # "old" used again: now most recent
        await executor.forward(torch.arange(3, 35), ["new"], [32], [0])    # needs 2 blocks: evicts "recent"
        stats = executor.cache_stats()
        with pytest.raises(MissingSequenceCache):
            await executor.forward(torch.tensor([7]), ["recent"], [1], [16])
        return stats

    stats = asyncio.run(scenario())
    assert stats["sequences"] == 2 and executor.cache.length("old") == 32 and executor.cache.length("new") == 32
    executor.close()


def test_stage_executor_loads_and_computes_on_its_one_thread(checkpoint):
    """Given a loader, the executor loads the stage on the thread that then runs its forwards and packs a list of
    sequences there: one thread does all of the stage's math (one OpenMP team)."""
    import asyncio
    import threading

    from seedoss.engine import LocalStageExecutor

    path, _ = checkpoint
    loaded_on = []

    def load():
        loaded_on.append(threading.get_ident())
        return load_stage(path, 0, 2)

    executor = LocalStageExecutor(load, kv_budget_bytes=1 << 20, block_size=16)
    prompts = _prompts([5, 9])

    packed = asyncio.run(executor.forward(prompts, [0, 1], [5, 9], [0, 0], use_cache=False))
    forward_thread = executor.worker.submit(threading.get_ident).result()
    assert loaded_on == [forward_thread] != [threading.get_ident()]
    assert torch.equal(packed, load_stage(path, 0, 2)(torch.cat(prompts), StepBatch([0, 1], [5, 9], [0, 0])))
    executor.close()
