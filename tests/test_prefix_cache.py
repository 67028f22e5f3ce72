"""Automatic prefix caching: full KV blocks named by a hash chain of their tokens are shared between sequences, in
the engine's accounting and in every stage. Greedy outputs must be exactly those of the engine without prefix
caching (which tests/test_engine.py holds to transformers' `generate`), whatever the stages, preemption, forks or a
stage that lost its cache; and the cache must really be used (hits counted, `num_cached_tokens` reported)."""

from __future__ import annotations

import asyncio

import pytest

from seedoss.engine import EngineConfig, LLMEngine, collect
from seedoss.engine.block_manager import BlockManager, hash_block, hash_blocks
from seedoss.sampling import SamplingParams
from seedoss.tokenizer import SeedOssTokenizer

BLOCK = 16
SHARED = 53  # tokens of the shared "system prompt": 3 full blocks (48 tokens) can be shared
TINY_BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 32 * 4  # k+v, 2 layers (a half of the tiny demo model), 2 kv heads, dim 32, fp32


@pytest.fixture(scope="module")
def prompts(demo_checkpoint):
    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    system = tokenizer.encode("You are a meticulous assistant who answers questions about the history of cities, "
                              "rivers, mountains and the people who lived there for many centuries. " * 2)[:SHARED]
    assert len(system) == SHARED
    questions = ["When was the bridge built?", "Who founded the town", "Name three rivers.", "Why?",
                 "Tell me about the old harbour and its lighthouse"]
    return [system + tokenizer.encode(" " + q) for q in questions]


def _run(engine: LLMEngine, rounds: list[list[tuple[list[int], SamplingParams]]], salt: str | None = None):
    """Each round's requests run concurrently, the rounds one after another (so later rounds find cached blocks)."""
    async def go():
        out = []
        try:
            for requests in rounds:
                out.append(await asyncio.gather(*[collect(engine.generate(p, params, cache_salt=salt))
                                                  for p, params in requests]))
        finally:
            await engine.shutdown()
        return out

    return asyncio.run(go())


def _engine(checkpoint, caching: bool, num_stages: int = 1, **config) -> LLMEngine:
    return LLMEngine.from_checkpoint(checkpoint, num_stages=num_stages,
                                     config=EngineConfig(enable_prefix_caching=caching, **config))


def _tokens(rounds):
    return [[[o.token_ids for o in r.outputs] for r in results] for results in rounds]


def _stage_blocks_in_use(engine):
    return [s["blocks_in_use"] for s in engine.pipeline.cache_stats()]


GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.mark.parametrize("num_stages, chunk", [(1, 512), (2, 512), (3, 16)],
                         ids=["1-stage", "2-stages", "3-stages-chunked-prefill"])
def test_greedy_outputs_equal_without_prefix_caching(demo_checkpoint, prompts, num_stages, chunk):
    rounds = [[(prompts[0], GREEDY)], [(p, GREEDY) for p in prompts[1:]]]
    cached = _engine(demo_checkpoint, True, num_stages, max_batched_tokens=chunk)
    plain = _engine(demo_checkpoint, False, num_stages, max_batched_tokens=chunk)
    with_cache, without = _run(cached, rounds), _run(plain, rounds)
    assert _tokens(with_cache) == _tokens(without)
    assert [r.num_cached_tokens for r in with_cache[1]] == [48] * 4  # every later request reused the 3 full blocks
    assert with_cache[0][0].num_cached_tokens == 0 and all(r.num_cached_tokens == 0 for r in without[1])
    stats = cached.stats()
    assert stats.prefix_cache_hits == 4 * 48 and stats.prefix_cache_queries == sum(len(p) for p in prompts)
    assert plain.stats().prefix_cache_queries == 0 and stats.cache_misses == 0
    # nothing referenced once all finished: cached blocks count as free, in the engine and in every stage
    assert cached.scheduler.kv_usage == 0 and _stage_blocks_in_use(cached) == [0] * num_stages


def test_preempted_sequences_reuse_what_is_still_cached(demo_checkpoint, prompts):
    """8 blocks per stage for 4 sequences of up to 6 blocks: preemption is certain; recomputed sequences take
    their cached blocks back (more hits than admissions alone would give)."""
    rounds = [[(prompts[0], GREEDY)], [(p, GREEDY) for p in prompts[1:]]]
    config = dict(kv_budget_bytes=8 * TINY_BLOCK_BYTES, max_batched_tokens=32)
    cached, plain = _engine(demo_checkpoint, True, 2, **config), _engine(demo_checkpoint, False, 2, **config)
    with_cache, without = _run(cached, rounds), _run(plain, rounds)
    assert _tokens(with_cache) == _tokens(without)
    assert cached.stats().num_preemptions > 0 and plain.stats().num_preemptions > 0
    assert cached.stats().prefix_cache_hits >= 4 * 48
    assert cached.stats().cache_misses == 0
    assert _stage_blocks_in_use(cached) == [0, 0]


def test_n_forks_share_their_prompt_blocks(demo_checkpoint, prompts):
    """The forks of one request are admitted together: fork 0 names the prompt's full blocks as it schedules them,
    forks 1 and 2 take them in the same micro-batch (every stage writes them before it reads them)."""
    greedy = SamplingParams(temperature=0, max_tokens=16, n=3)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=16, n=3)
    rounds = [[(prompts[1], greedy), (prompts[2], seeded)]]
    for num_stages in (1, 2):
        cached, plain = _engine(demo_checkpoint, True, num_stages), _engine(demo_checkpoint, False, num_stages)
        with_cache, without = _run(cached, rounds), _run(plain, rounds)
        assert _tokens(with_cache) == _tokens(without)
        ids = _tokens(with_cache)[0]
        assert ids[0][0] == ids[0][1] == ids[0][2] and len({tuple(t) for t in ids[1]}) == 3
        # forks 1 and 2 of each request reuse the 3 full prompt blocks, and so does fork 0 of the second request
        # (its prompt shares them with the first's): 5 sequences of 6 took 48 tokens each from the cache
        assert cached.stats().prefix_cache_hits == 5 * 48
        assert [r.num_cached_tokens for r in with_cache[0]] == [0, 48]
        assert cached.stats().cache_misses == 0  # every stage held what the engine said was cached


def test_stage_losing_its_cache_recomputes_to_the_same_outputs(demo_checkpoint, prompts):
    """Stage 1 loses everything (a restarted replica: its prefix cache too) while sequences that share prefix
    blocks run: the engine's blocks say 'cached' but the stage does not hold them; it reports the sequences
    missing, the engine forgets those names and recomputes, and the outputs stay exact."""
    params = SamplingParams(temperature=0, max_tokens=40)
    engine = _engine(demo_checkpoint, True, 2)
    plain = _engine(demo_checkpoint, False, 2)

    async def scenario():
        await collect(engine.generate(prompts[0], params))  # the shared blocks are cached now
        tasks = [asyncio.create_task(collect(engine.generate(p, params))) for p in prompts[1:]]
        while engine.stats().generation_tokens < 40 + 20:
            await asyncio.sleep(0.005)
        stage1 = engine.pipeline.executors[1]
        stage1.worker.submit(stage1.cache.clear)
        results = await asyncio.gather(*tasks)
        later = await collect(engine.generate(prompts[0], params))  # after the restart: cached again, recomputed
        await engine.shutdown()
        return results, later

    results, later = asyncio.run(scenario())
    reference = _run(plain, [[(p, params) for p in prompts]])[0]
    assert [r.outputs[0].token_ids for r in results] == [r.outputs[0].token_ids for r in reference[1:]]
    assert later.outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert engine.stats().cache_misses > 0
    assert _stage_blocks_in_use(engine) == [0, 0]


def test_cache_salt_isolates_prefixes(demo_checkpoint, prompts):
    engine = _engine(demo_checkpoint, True)

    async def go():
        out = []
        for salt in ("tenant-a", "tenant-b", "tenant-a", None):
            out.append(await collect(engine.generate(prompts[0], GREEDY, cache_salt=salt)))
        await engine.shutdown()
        return out

    a, b, a_again, unsalted = asyncio.run(go())
    assert [r.num_cached_tokens for r in (a, b, a_again, unsalted)] == [0, 0, 48, 0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == a_again.outputs[0].token_ids


def test_hash_chain_names_a_block_by_everything_before_it():
    tokens = list(range(3, 3 + 40))
    chain = hash_blocks(tokens, BLOCK, None, [])
    assert len(chain) == 2 and chain[0] == hash_block(None, tokens[:16])
    assert chain[1] == hash_block(chain[0], tokens[16:32])
    other = hash_blocks([99] + tokens[1:], BLOCK, None, [])
    assert other[0] != chain[0] and other[1] != chain[1]  # same tokens in block 1, different history
    assert hash_blocks(tokens, BLOCK, "salt", [])[1] != chain[1]
    grown = chain[:1]
    assert hash_blocks(tokens, BLOCK, None, grown) is grown and grown == chain


def test_block_manager_shares_by_reference_and_evicts_least_recently_freed():
    m = BlockManager(num_blocks=4, block_size=BLOCK)
    ha, hb, hc = hash_block(None, [1] * 16), hash_block(None, [2] * 16), hash_block(None, [3] * 16)
    m.reserve({"a": 16})
    m.register("a", [ha])
    m.adopt("a2", m.cached_prefix([ha, hb]))  # only the cached prefix: [block of a]
    assert m.tables["a2"] == m.tables["a"] and m.num_free_blocks == 3
    m.free("a")
    assert m.num_free_blocks == 3  # still referenced by a2
    m.free("a2")
    assert m.num_free_blocks == 4 and m.cached_prefix([ha]) != []  # unreferenced, still findable
    m.reserve({"b": 16})
    m.register("b", [hb])
    m.free("b")  # b freed after a: a's block is the least recently freed
    m.reserve({"c": 3 * 16})  # 2 never-named blocks + 1 evicted
    assert m.cached_prefix([ha]) == [] and m.cached_prefix([hb]) != []
    m.register("c", [hc], start=0)
    m.unregister(m.tables["c"])
    assert m.cached_prefix([hc]) == [] and m.num_free_blocks == 1
    disabled = BlockManager(2, BLOCK, enable_prefix_caching=False)
    disabled.reserve({"a": 16})
    assert disabled.register("a", [ha]) == [] and disabled.cached_prefix([ha]) == []


def test_a_stage_takes_a_cached_prefix_and_matches_transformers(demo_checkpoint):
    """Stage level: sequence b names its first two blocks as a did; the stage gives b a's blocks (shared, not
    copied) and computes only b's own tokens, whose logits equal transformers' over b's whole prompt. A stage that
    never cached the prefix, or a step that does not ship the names from block 0, is told apart: missing."""
    import torch
    from transformers import AutoModelForCausalLM

    from seedoss.engine.errors import MissingSequenceCache
    from seedoss.loader import load_head, load_stage
    from seedoss.model import StepBatch

    stage, head = load_stage(demo_checkpoint), load_head(demo_checkpoint, "generate")
    g = torch.Generator().manual_seed(5)
    a = torch.randint(3, 4000, (40,), generator=g)
    b = torch.cat([a[:32], torch.randint(3, 4000, (10,), generator=g)])
    names_a, names_b = hash_blocks(a.tolist(), BLOCK, None, []), hash_blocks(b.tolist(), BLOCK, None, [])
    assert names_a[:2] == names_b[:2]
    cache = stage.new_kv_cache(1 << 20)
    stage(a, StepBatch(["a"], [40], [0], [(0, names_a)]), cache)
    logits = head(stage(b[32:], StepBatch(["b"], [10], [32], [(0, names_b)]), cache))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(demo_checkpoint).eval()(b[None]).logits[0, 32:]
    assert (logits - ref).abs().max().item() <= 1e-4
    assert cache.blocks.tables["b"][:2] == cache.blocks.tables["a"][:2] and cache.num_free_blocks < cache.num_blocks
    for other, names in ((stage.new_kv_cache(1 << 20), [(0, names_b)]), (cache, [(2, [])])):
        with pytest.raises(MissingSequenceCache) as e:
            stage(b[32:], StepBatch(["c"], [10], [32], names), other)
        assert e.value.seq_ids == ["c"]


def test_retried_step_copies_a_shared_block_before_rewriting_it():
    """A retried step truncates a sequence into a block another sequence took by name: the retrying sequence gets a
    copy (same contents so far), the sharer keeps the named original untouched."""
    import torch

    from seedoss.kv_cache import PagedKVCache
    from seedoss.model import StepBatch

    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=6, block_size=4)
    names = hash_blocks(list(range(3, 11)), 4, None, [])
    write, _, _ = cache.bind(StepBatch(["a"], [8], [0], [(0, names)]))
    cache.k[0, write] = torch.arange(16.0).view(8, 1, 2)
    cache.bind(StepBatch(["b"], [1], [8], [(0, names)]))  # takes both of a's blocks
    shared = cache.blocks.tables["a"][1]
    assert cache.blocks.tables["b"][:2] == cache.blocks.tables["a"] and cache.blocks.ref_counts[shared] == 2
    cache.bind(StepBatch(["a"], [3], [5], [(1, names[1:])]))  # a's step 5..8 again
    mine = cache.blocks.tables["a"][1]
    assert mine != shared and cache.blocks.tables["b"][1] == shared and cache.blocks.cached[names[1]] == shared
    assert torch.equal(cache.k[0, mine * 4: mine * 4 + 1], cache.k[0, shared * 4: shared * 4 + 1])
