"""The generation engine against transformers' `generate` and logits on the demo checkpoint."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from seedoss.config import SeedOssConfig
from seedoss.engine import (EngineConfig, LLMEngine, LocalPipeline, LocalStageExecutor, RequestError,
                            StageUnavailable, collect)
from seedoss.loader import load_head, load_stage
from seedoss.partition import partition_layers
from seedoss.sampling import SamplingParams
from seedoss.tokenizer import SeedOssTokenizer

PROMPTS = [
    "Hello world",
    "The history of the city is long and full of",
    "a",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Ελληνικά και 日本語 mixed with English words",
]


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    return SeedOssTokenizer.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def hf_model(demo_checkpoint):
    return AutoModelForCausalLM.from_pretrained(demo_checkpoint).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids):
    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
        out.append(gen[0, len(ids):].tolist())
    return out


def run(coro):
    return asyncio.run(coro)


async def _generate_all(engine, prompts, params_list):
    try:
        return await asyncio.gather(*[collect(engine.generate(p, params)) for p, params in zip(prompts, params_list)])
    finally:
        await engine.shutdown()


def _kv_blocks_in_use(engine):
    return [s["blocks_in_use"] for s in engine.pipeline.cache_stats()]


def _engine_with_a_thread_per_stage(path, num_stages: int, config: EngineConfig) -> LLMEngine:
    """An in-process engine whose stages compute on threads of their own, so it keeps one micro-batch per stage in
    flight, as the Serve pipeline does (`from_checkpoint` runs every stage on one thread: one micro-batch)."""
    model_config = SeedOssConfig.from_pretrained(path)
    ranges = partition_layers(model_config, num_stages)
    pipeline = LocalPipeline([LocalStageExecutor(functools.partial(load_stage, path, s, e), config.kv_budget_bytes,
                                                 config.block_size) for s, e in ranges])
    return LLMEngine(pipeline, load_head(path, "generate"), SeedOssTokenizer.from_pretrained(path), model_config,
                     config)


@pytest.mark.parametrize(
    "num_stages, kv_budget, chunk, thread_per_stage",
    [(1, 64 << 20, 512, False), (2, 64 << 20, 512, False), (3, 64 << 20, 16, False),
     (2, 2 * 3 * 16 * 2 * 32 * 4 * 7, 32, False), (2, 64 << 20, 32, True), (3, 2 * 3 * 16 * 2 * 32 * 4 * 7, 32, True)],
    ids=["1-stage", "2-stages", "3-stages-chunked-prefill", "2-stages-tiny-kv-preempting",
         "2-stages-a-thread-each", "3-stages-a-thread-each-tiny-kv-preempting"],
)
def test_greedy_equals_transformers_generate(demo_checkpoint, prompt_ids, hf_greedy, num_stages, kv_budget, chunk,
                                             thread_per_stage):
    config = EngineConfig(kv_budget_bytes=kv_budget, max_batched_tokens=chunk)
    if thread_per_stage:
        engine = _engine_with_a_thread_per_stage(demo_checkpoint, num_stages, config)
        assert engine.pipeline.micro_batches == num_stages  # micro-batches overlap across stages
    else:
        engine = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=num_stages, config=config)
        assert engine.pipeline.micro_batches == 1  # one thread computes every stage
    params = SamplingParams(temperature=0, max_tokens=40)
    results = run(_generate_all(engine, prompt_ids, [params] * len(prompt_ids)))
    for result, ref in zip(results, hf_greedy):
        out = result.outputs[0]
        assert out.token_ids == ref  # HF stops at eos too (and includes it)
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
    if kv_budget < 1 << 20:
        assert engine.stats().num_preemptions > 0  # the tiny cache really forced recomputation
    assert _kv_blocks_in_use(engine) == [0] * num_stages and engine.scheduler.kv_usage == 0


def test_seeded_request_is_independent_of_batch_mates(demo_checkpoint, prompt_ids):
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24)
    alone = run(_generate_all(LLMEngine.from_checkpoint(demo_checkpoint), [prompt_ids[1]], [target]))[0]
    others = [SamplingParams(temperature=1.0 + 0.05 * i, top_k=50 if i % 2 else 0, max_tokens=10 + i,
                             seed=None if i % 3 else i, presence_penalty=0.5 if i % 4 == 0 else 0.0) for i in range(15)]
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(15)]
    prompts.insert(7, prompt_ids[1])
    others.insert(7, target)
    engine = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2, config=EngineConfig(max_batched_tokens=64))
    crowd = run(_generate_all(engine, prompts, others))
    assert crowd[7].outputs[0].token_ids == alone.outputs[0].token_ids
    different_seed = run(_generate_all(LLMEngine.from_checkpoint(demo_checkpoint), [prompt_ids[1]],
                                       [target.model_copy(update={"seed": 99})]))[0]
    assert different_seed.outputs[0].token_ids != alone.outputs[0].token_ids


def test_logprobs_equal_log_softmax_of_reference_logits(demo_checkpoint, prompt_ids, hf_model):
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=12, logprobs=5)
    engine = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2)
    out = run(_generate_all(engine, [prompt_ids[3]], [params]))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 12
    full = torch.tensor([prompt_ids[3] + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(full).logits[0].float(), -1)
    n = len(prompt_ids[3])
    for k, lp in enumerate(out.logprobs):
        row = ref[n - 1 + k]
        assert lp.token_id == out.token_ids[k]
        assert abs(lp.logprob - row[lp.token_id].item()) <= 1e-4
        top = row.topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist())) <= 1e-4


def test_top_k_1_equals_greedy(demo_checkpoint, prompt_ids, hf_greedy):
    engine = LLMEngine.from_checkpoint(demo_checkpoint)
    params = SamplingParams(temperature=1.5, top_k=1, max_tokens=40)
    results = run(_generate_all(engine, prompt_ids[:3], [params] * 3))
    assert [r.outputs[0].token_ids for r in results] == hf_greedy[:3]


def test_stop_string_never_appears_and_stream_is_clean(demo_checkpoint, prompt_ids, tokenizer):
    base = run(_generate_all(LLMEngine.from_checkpoint(demo_checkpoint), [prompt_ids[0]],
                             [SamplingParams(temperature=0, max_tokens=40)]))[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[8:11]  # a string the unconstrained output contains
    engine = LLMEngine.from_checkpoint(demo_checkpoint)

    async def stream():
        deltas = []
        async for out in engine.generate(prompt_ids[0], SamplingParams(temperature=0, max_tokens=40, stop=[stop])):
            deltas += [o.text for o in out.outputs]
            final = out
        await engine.shutdown()
        return deltas, final

    deltas, final = run(stream())
    joined = "".join(deltas)
    assert stop not in joined and joined == text[: text.index(stop)]
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop
    kept = run(_generate_all(LLMEngine.from_checkpoint(demo_checkpoint), [prompt_ids[0]],
                             [SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)]))
    assert kept[0].outputs[0].text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_max_tokens_ignore_eos_and_min_tokens(demo_checkpoint, prompt_ids, hf_greedy):
    ref = hf_greedy[1]
    engine = LLMEngine.from_checkpoint(demo_checkpoint)
    stop_id = ref[5]
    params = [
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=7),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id], min_tokens=ref.index(stop_id) + 1),
    ]
    r = run(_generate_all(engine, [prompt_ids[1]] * 3, params))
    first = ref.index(stop_id)
    assert r[0].outputs[0].token_ids == ref[: first + 1] and r[0].outputs[0].stop_reason == stop_id
    assert r[1].outputs[0].token_ids == ref[:7] and r[1].outputs[0].finish_reason == "length"
    assert stop_id not in r[2].outputs[0].token_ids[: first + 1]  # masked until min_tokens
    # ignore_eos: force eos to be likely by banning nothing but generating past it
    eos_engine = LLMEngine.from_checkpoint(demo_checkpoint)
    out = run(_generate_all(eos_engine, [prompt_ids[1]], [SamplingParams(temperature=0, max_tokens=40,
                                                                       stop_token_ids=[], ignore_eos=True)]))
    assert len(out[0].outputs[0].token_ids) == 40


def _penalised_greedy(hf_model, prompt, n, rule):
    """Reference: greedy decoding on HF logits with a penalty `rule(logits, prompt_ids, output_ids)` applied."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + out])).logits[0, -1].float()
        out.append(int(rule(logits, prompt, out).argmax()))
    return out


def _repetition(p):
    def rule(logits, prompt, out):
        seen = torch.tensor(sorted(set(prompt + out)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / p, logits[seen] * p)
        return logits
    return rule


def _frequency_presence(freq, presence):
    def rule(logits, prompt, out):
        for t in set(out):
            logits[t] -= freq * out.count(t) + presence
        return logits
    return rule


REPEATING = "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"  # plain greedy repeats one token here
VARIED = "The history of the city is long and full of"  # plain greedy output has no repeats here


@pytest.mark.parametrize("text, params, rule", [
    (REPEATING, {"repetition_penalty": 1.8}, _repetition(1.8)),
    (VARIED, {"repetition_penalty": 0.5}, _repetition(0.5)),
    (REPEATING, {"frequency_penalty": 1.5}, _frequency_presence(1.5, 0.0)),
    (REPEATING, {"presence_penalty": 1.5}, _frequency_presence(0.0, 1.5)),
    (VARIED, {"frequency_penalty": -1.0, "presence_penalty": 0.5}, _frequency_presence(-1.0, 0.5)),
], ids=["repetition", "repetition<1", "frequency", "presence", "negative-frequency+presence"])
def test_penalties_follow_vllm_rules(demo_checkpoint, tokenizer, hf_model, text, params, rule):
    """Greedy decoding with a penalty equals greedy decoding on reference logits with the penalty applied by hand,
    and differs from plain greedy (so an ignored penalty fails)."""
    prompt = tokenizer.encode(text)
    engine = LLMEngine.from_checkpoint(demo_checkpoint)
    plain, penalised = run(_generate_all(engine, [prompt] * 2, [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, **params),
    ]))
    expected = _penalised_greedy(hf_model, prompt, 20, rule)
    assert penalised.outputs[0].token_ids == expected
    assert expected != plain.outputs[0].token_ids


def test_n_choices_are_distinct_and_reproducible(demo_checkpoint, prompt_ids):
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=10)
    a = run(_generate_all(LLMEngine.from_checkpoint(demo_checkpoint), [prompt_ids[0]], [params]))[0]
    b = run(_generate_all(LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2), [prompt_ids[0]], [params]))[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def test_abort_frees_kv_cache_in_every_stage(demo_checkpoint, prompt_ids):
    engine = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2)

    async def scenario():
        stream = engine.generate(prompt_ids[1], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        got = 0
        async for out in stream:
            got += len(out.outputs[0].token_ids)
            if got >= 5:
                break
        await stream.aclose()  # client went away
        await asyncio.sleep(0.2)
        blocks = _kv_blocks_in_use(engine)
        other = await collect(engine.generate(prompt_ids[0], SamplingParams(temperature=0, max_tokens=4)))
        await engine.shutdown()
        return blocks, other

    blocks, other = run(scenario())
    assert blocks == [0, 0] and engine.scheduler.kv_usage == 0.0
    assert len(other.outputs[0].token_ids) == 4


def test_stage_losing_its_cache_triggers_recompute(demo_checkpoint, prompt_ids, hf_greedy):
    """Drop stage 1's cache mid-generation (a restarted replica): outputs stay exactly the reference."""
    engine = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2)

    async def scenario():
        streams = [engine.generate(p, SamplingParams(temperature=0, max_tokens=40)) for p in prompt_ids[:3]]
        tasks = [asyncio.create_task(collect(s)) for s in streams]
        while engine.stats().generation_tokens < 20:
            await asyncio.sleep(0.005)
        stage1 = engine.pipeline.executors[1]
        stage1.worker.submit(stage1.cache.clear)
        results = await asyncio.gather(*tasks)
        await engine.shutdown()
        return results

    results = run(scenario())
    assert [r.outputs[0].token_ids for r in results] == hf_greedy[:3]


def test_bad_requests_name_the_field(demo_checkpoint, prompt_ids):
    engine = LLMEngine.from_checkpoint(demo_checkpoint, config=EngineConfig(max_model_len=64))

    async def attempt(ids, params):
        return await collect(engine.generate(ids, params))

    cases = [([], SamplingParams(), "prompt"), ([5] * 64, SamplingParams(), "prompt"),
             ([5] * 10, SamplingParams(max_tokens=60), "max_tokens"), ([10**6], SamplingParams(), "prompt")]
    for ids, params, field in cases:
        with pytest.raises(RequestError) as e:
            run(attempt(ids, params))
        assert e.value.field == field


def test_counters(demo_checkpoint, prompt_ids):
    engine = LLMEngine.from_checkpoint(demo_checkpoint)
    run(_generate_all(engine, prompt_ids[:2], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 2))
    s = engine.stats()
    assert s.generation_tokens == 12 and s.prompt_tokens == len(prompt_ids[0]) + len(prompt_ids[1])
    assert s.requests_finished == 2 and s.num_running == 0 and s.num_waiting == 0
    assert len(s.ttft_s) == 2 and len(s.inter_token_s) == 10 and all(t > 0 for t in s.ttft_s)


class _FlakyPipeline:
    """The real local pipeline, whose first `failures` steps fail as if a stage replica had died (and lost its
    cache) — what the Ray form reports when a replica is killed."""

    def __init__(self, inner, failures):
        self.inner, self.failures = inner, failures
        self.num_stages, self.num_blocks, self.block_size = inner.num_stages, inner.num_blocks, inner.block_size
        self.micro_batches = inner.micro_batches
        self.head_executor = inner.head_executor

    async def run(self, *args):
        if self.failures:
            self.failures -= 1
            self.inner.executors[-1].worker.submit(self.inner.executors[-1].cache.clear)
            raise StageUnavailable("replica died")
        return await self.inner.run(*args)

    def free(self, seq_ids):
        self.inner.free(seq_ids)


@pytest.mark.parametrize("failures, succeeds", [(3, True), (50, False)])
def test_unavailable_stage_is_retried_then_reported(demo_checkpoint, prompt_ids, hf_greedy, failures, succeeds):
    local = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2)
    engine = LLMEngine(_FlakyPipeline(local.pipeline, failures), local.lm_head, local.tokenizer, local.model_config,
                       EngineConfig(max_step_retries=5, retry_backoff_s=0.01))
    params = SamplingParams(temperature=0, max_tokens=40)
    if succeeds:
        results = run(_generate_all(engine, prompt_ids[:2], [params] * 2))
        assert [r.outputs[0].token_ids for r in results] == hf_greedy[:2]
    else:
        with pytest.raises(StageUnavailable):
            run(_generate_all(engine, prompt_ids[:2], [params] * 2))
        assert engine.scheduler.kv_usage == 0.0


def test_engine_serves_callers_on_successive_event_loops(demo_checkpoint, prompt_ids, hf_greedy):
    """asyncio.run twice on one engine (a CLI, a test, a notebook): the scheduling loop and its wake-up event
    follow the caller's event loop instead of staying bound to the first, closed one."""
    engine = LLMEngine.from_checkpoint(demo_checkpoint)
    params = SamplingParams(temperature=0, max_tokens=40)
    for _ in range(2):
        result = asyncio.run(collect(engine.generate(prompt_ids[0], params)))
        assert result.outputs[0].token_ids == hf_greedy[0]

    async def loop_is_current():
        await collect(engine.generate(prompt_ids[1], SamplingParams(temperature=0, max_tokens=2)))
        return engine._loop_task.get_loop() is asyncio.get_running_loop()

    assert asyncio.run(loop_is_current())


async def _deltas(engine, ids, params, **kwargs) -> dict[int, list[tuple[list[int], str]]]:
    """Per choice, the (token ids, text) of every streamed output, in order."""
    deltas: dict[int, list] = {}
    try:
        async for out in engine.generate(ids, params, **kwargs):
            for o in out.outputs:
                deltas.setdefault(o.index, []).append((o.token_ids, o.text, o.finish_reason, o.stop_reason))
    finally:
        await engine.shutdown()
    return deltas


@pytest.mark.parametrize("cut", [1, 7, 15])
def test_resumed_request_continues_exactly_where_the_lost_engine_stopped(demo_checkpoint, prompt_ids, tokenizer, cut):
    """A lane that dies mid-stream hands its request to another engine with the tokens the client already has:
    the continuation (seeded sampling with penalties and n=2; greedy with a stop string that may be held back across
    the cut) streams exactly what the uninterrupted run streamed after that point, and a finished choice is not
    generated again."""
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=11, n=2, max_tokens=24, frequency_penalty=0.5,
                             ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = run(_deltas(LLMEngine.from_checkpoint(demo_checkpoint), prompt_ids[1], greedy))[0]
    stop_text = tokenizer.decode([t for d in plain[cut + 2: cut + 4] for t in d[0]])
    stopped = greedy.model_copy(update={"stop": [stop_text]})

    for params, resume_of in [(sampled, lambda ids: {0: ids, 1: None}), (stopped, lambda ids: {0: ids})]:
        full = run(_deltas(LLMEngine.from_checkpoint(demo_checkpoint), prompt_ids[1], params))
        delivered = [t for d in full[0][:cut] for t in d[0]]  # decode steps: one token per delta
        assert len(delivered) == cut
        rest = run(_deltas(LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2), prompt_ids[1], params,
                           request_id="cmpl-x", resume=resume_of(delivered)))
        assert list(rest) == [0]
        expected = full[0][cut:]
        assert [t for d in rest[0] for t in d[0]] == [t for d in expected for t in d[0]]
        assert "".join(d[1] for d in rest[0]) == "".join(d[1] for d in expected)
        assert rest[0][-1][2:] == expected[-1][2:]  # finish and stop reason


def test_cache_misses_are_counted_per_sequence_step(demo_checkpoint, prompt_ids):
    engine = LLMEngine.from_checkpoint(demo_checkpoint, num_stages=2)

    async def scenario():
        tasks = [asyncio.create_task(collect(engine.generate(p, SamplingParams(temperature=0, max_tokens=30))))
                 for p in prompt_ids[:3]]
        while engine.stats().generation_tokens < 15:
            await asyncio.sleep(0.005)
        assert engine.stats().cache_misses == 0
        stage1 = engine.pipeline.executors[1]
        stage1.worker.submit(stage1.cache.clear)
        await asyncio.gather(*tasks)
        await engine.shutdown()

    run(scenario())
    s = engine.stats()
    assert 1 <= s.cache_misses <= 3 and s.steps >= s.generation_tokens
