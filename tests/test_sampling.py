"""Sampler and SamplingParams: vLLM semantics, distributions, penalties, seeds, validation."""

import math
import random

import pytest
import torch
from pydantic import ValidationError

from seedoss.sampling import Sampler, SamplingParams, SamplingState


def make_states(n, vocab, prompt=(), eos=None, **params):
    p = SamplingParams(**params)
    return [SamplingState(p, list(prompt), eos, vocab) for _ in range(n)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- greedy-equivalent settings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_temperature_zero_is_argmax(dtype):
    logits = torch.randn(32, 100, generator=gen(0)).to(dtype)
    out = Sampler(gen(1))(logits, make_states(32, 100, temperature=0.0))
    assert out.token_ids == logits.float().argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, temperature=5.0)],
    ids=["top_k=1", "tiny top_p", "min_p=1", "top_k=1 hot"],
)
def test_filters_that_leave_only_the_argmax(params):
    # flat logits (scaled down) so an unfiltered sampler would almost never pick the argmax
    logits = torch.randn(64, 200, generator=gen(2)) * 0.3
    sampler = Sampler(gen(3))
    for _ in range(3):
        assert sampler(logits, make_states(64, 200, **params)).token_ids == logits.argmax(-1).tolist()
    unfiltered = sampler(logits, make_states(64, 200)).token_ids
    assert unfiltered != logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_the_top_k():
    V, k = 50, 5
    sampler = Sampler(gen(4))
    seen = set()
    for seed in range(200):
        logits = torch.randn(1, V, generator=gen(seed))
        states = make_states(1, V, top_k=k, temperature=3.0, seed=seed)
        tok = sampler(logits, states).token_ids[0]
        top = logits[0].topk(k).indices.tolist()
        assert tok in top
        seen.add(top.index(tok))
    assert len(seen) == k  # it samples, not just argmax


def test_top_p_keeps_exactly_the_nucleus():
    V = 40
    perm = torch.randperm(V, generator=gen(5))
    head = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.03])
    probs = torch.full((V,), 0.01 / (V - 5))
    probs[perm[:5]] = head
    logits = probs.log().unsqueeze(0)
    sampler = Sampler(gen(6))
    for top_p, size in [(0.65, 2), (0.75, 3), (0.93, 4), (1.0, V)]:
        states = make_states(1, V, top_p=top_p)
        expected = torch.zeros(V)
        keep = perm[:size] if size < V else torch.arange(V)
        expected[keep] = probs[keep] / probs[keep].sum()
        torch.testing.assert_close(sampler.probs(logits, states)[0], expected, atol=1e-6, rtol=1e-5)
        draws = sampler(logits.expand(3000, V), make_states(3000, V, top_p=top_p)).token_ids
        if size < V:
            assert set(draws) == set(keep.tolist())


# ---------------------------------------------------------------- distributions


def chi_square(draws, probs):
    n = len(draws)
    counts = torch.bincount(torch.tensor(draws), minlength=probs.numel()).double()
    expected = probs.double() * n
    mask = expected > 0
    assert counts[~mask].sum() == 0, "sampled a zero-probability token"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


CHI2_DF5_P001 = 20.52  # critical value, 5 degrees of freedom, p = 0.001


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("seeded", [False, True], ids=["shared-generator", "per-request-seed"])
def test_empirical_distribution_follows_temperature(temperature, seeded):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    N = 20000
    if seeded:
        states = [
            SamplingState(SamplingParams(temperature=temperature, seed=s), [], None, 6) for s in range(N)
        ]
    else:
        states = make_states(N, 6, temperature=temperature)
    draws = Sampler(gen(7))(logits.expand(N, 6), states).token_ids
    assert chi_square(draws, torch.softmax(logits / temperature, -1)) < CHI2_DF5_P001
    assert chi_square(draws, torch.softmax(logits, -1)) > 10 * CHI2_DF5_P001  # T is not ignored


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    N = 20000
    states = make_states(N, 8, temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)
    sampler = Sampler(gen(8))
    probs = sampler.probs(logits, states[:1])[0]
    assert (probs > 0).sum() == 4  # the filters did something; the rest keep their ratios
    draws = sampler(logits.expand(N, 8), states).token_ids
    kept = probs > 0
    assert chi_square(draws, probs) < 16.27  # df 3, p = 0.001
    assert set(draws) == set(kept.nonzero().flatten().tolist())


# ---------------------------------------------------------------- penalties

LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.5, 1.0, 0.0, -2.0])


def processed(states, logits=LOGITS):
    return Sampler().probs(logits.expand(len(states), -1).clone(), states)


def test_repetition_penalty_matches_hand_computation():
    (s,) = make_states(1, 8, prompt=[0, 1, 1], repetition_penalty=2.0)
    s.append(3)
    expected_logits = torch.tensor([1.0, -2.0, 0.5, 1.5, -0.5, 1.0, 0.0, -2.0])
    after = processed([s])[0]
    torch.testing.assert_close(after, torch.softmax(expected_logits, -1))
    before = torch.softmax(LOGITS, -1)
    assert all(after[t] < before[t] for t in (0, 1, 3))
    others = [2, 4, 5, 6, 7]  # untouched tokens keep their relative order and ratios
    torch.testing.assert_close(after[others] / after[others].sum(), before[others] / before[others].sum())
    # a penalty < 1 rewards repetition (positive logits x2, negative ones /2): relative to an
    # untouched token, both prompt tokens gain
    (s,) = make_states(1, 8, prompt=[0, 1], repetition_penalty=0.5)
    rewarded = processed([s])[0]
    for t in (0, 1):
        assert rewarded[t] / rewarded[6] > before[t] / before[6]


def test_repetition_penalty_changes_greedy_choice():
    (s,) = make_states(1, 8, prompt=[3], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(LOGITS[None], [s]).token_ids == [0]  # 3.0 / 2 = 1.5 < 2.0
    (s,) = make_states(1, 8, prompt=[3], temperature=0.0)
    assert Sampler()(LOGITS[None], [s]).token_ids == [3]


@pytest.mark.parametrize("freq,pres", [(0.5, 0.3), (-0.5, -0.3), (1.0, 0.0), (0.0, -2.0)])
def test_frequency_and_presence_penalties(freq, pres):
    (s,) = make_states(1, 8, prompt=[0], frequency_penalty=freq, presence_penalty=pres)
    for t in [2, 2, 5]:
        s.append(t)
    expected = LOGITS.clone()
    expected[2] -= 2 * freq + pres
    expected[5] -= 1 * freq + pres
    after = processed([s])[0]
    torch.testing.assert_close(after, torch.softmax(expected, -1))
    before = torch.softmax(LOGITS, -1)
    direction = 1 if (freq + pres) > 0 else -1  # positive penalties lower, negative raise
    assert direction * (before[2] - after[2]) > 0 and direction * (before[5] - after[5]) > 0
    # prompt tokens are not subject to presence/frequency penalties
    ratio = after[0] / after[6]
    torch.testing.assert_close(ratio, before[0] / before[6])


def test_penalties_over_long_outputs_and_mixed_batch():
    """Counts stay right past the state's initial buffer, and unpenalised rows are untouched."""
    V = 8
    (s,) = make_states(1, V, frequency_penalty=0.01)
    rng = random.Random(1)
    toks = [rng.randrange(V) for _ in range(300)]
    for t in toks:
        s.append(t)
    (plain,) = make_states(1, V)
    expected = LOGITS - 0.01 * torch.bincount(torch.tensor(toks), minlength=V)
    out = processed([plain, s])
    torch.testing.assert_close(out[1], torch.softmax(expected, -1))
    torch.testing.assert_close(out[0], torch.softmax(LOGITS, -1))


def test_min_tokens_masks_eos_and_stop_token_ids():
    V, eos = 10, 2
    logits = torch.zeros(1, V)
    logits[0, eos], logits[0, 7], logits[0, 4] = 10.0, 9.0, 1.0
    for greedy in (True, False):
        params = dict(min_tokens=3, stop_token_ids=[7], temperature=0.0 if greedy else 1.0, seed=0)
        (s,) = make_states(1, V, eos=eos, **params)
        sampler = Sampler(gen(9))
        produced = []
        for _ in range(6):
            t = sampler(logits, [s]).token_ids[0]
            s.append(t)
            produced.append(t)
        assert not set(produced[:3]) & {eos, 7}
        if greedy:
            assert produced[3:] == [eos] * 3
            assert produced[:3] == [4] * 3
    # without min_tokens, eos comes first
    (s,) = make_states(1, V, eos=eos, temperature=0.0)
    assert Sampler()(logits, [s]).token_ids == [eos]
    # several eos ids (a model's generation config may list more than one)
    (s,) = make_states(1, V, eos=[eos, 4], min_tokens=1, stop_token_ids=[7], temperature=0.0)
    assert Sampler()(logits, [s]).token_ids not in ([eos], [4], [7])


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_top_k_sorted():
    V = 60
    logits = (torch.randn(5, V, generator=gen(10)) * 2).to(torch.bfloat16)
    raw = torch.log_softmax(logits.float(), -1)
    params = [
        dict(logprobs=5, temperature=0.7, repetition_penalty=1.5, presence_penalty=1.0),
        dict(logprobs=0),
        dict(logprobs=None, top_k=3),
        dict(logprobs=20, temperature=0.0, frequency_penalty=2.0),
        dict(logprobs=1, top_p=0.5, min_p=0.1),
    ]
    states = [SamplingState(SamplingParams(**p), [0, 1, 2], None, V) for p in params]
    for s in states:
        for t in (3, 3, 4):
            s.append(t)
    out = Sampler(gen(11))(logits, states)
    for i, (p, tok) in enumerate(zip(params, out.token_ids)):
        k = p["logprobs"]
        if k is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-6)
        top = out.top_logprobs[i]
        assert len(top) == k
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        ref_vals, ref_ids = raw[i].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in top] == ref_ids.tolist()
        assert vals == pytest.approx(ref_vals.tolist(), abs=1e-6)


# ---------------------------------------------------------------- seeds


def random_params(rng):
    return SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.5]),
        top_k=rng.choice([0, 5, 20]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.3]),
        presence_penalty=rng.choice([0.0, 0.5]),
        seed=rng.choice([None, None, rng.randrange(1 << 30)]),
    )


def run_seeded(params, step_logits, mates=0, rng_seed=0, fork_index=0):
    V = step_logits[0].numel()
    rng = random.Random(rng_seed)
    target = SamplingState(params, [1, 2, 3], None, V, fork_index=fork_index)
    others = [SamplingState(random_params(rng), [4, 5], None, V) for _ in range(mates)]
    sampler = Sampler()  # unseeded rows use torch's global RNG
    tokens = []
    for step, target_logits in enumerate(step_logits):
        rows = others + [target]
        rng.shuffle(rows)
        logits = torch.randn(len(rows), V) * 3
        logits[rows.index(target)] = target_logits
        out = sampler(logits, rows)
        for s, t in zip(rows, out.token_ids):
            s.append(t)
        tokens.append(out.token_ids[rows.index(target)])
    return tokens


STEP_LOGITS = [torch.randn(128, generator=gen(100 + i)) for i in range(20)]
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, top_k=60, presence_penalty=0.2, seed=1234)


def test_seed_reproducible_alone_and_in_any_batch():
    torch.manual_seed(0)
    alone = run_seeded(SEEDED, STEP_LOGITS)
    assert len(set(alone)) > 5  # really sampling
    assert run_seeded(SEEDED, STEP_LOGITS) == alone
    for mix in range(3):
        torch.manual_seed(mix + 1)
        assert run_seeded(SEEDED, STEP_LOGITS, mates=15, rng_seed=mix) == alone


def test_different_seeds_and_forks_give_different_streams():
    streams = {tuple(run_seeded(SEEDED.model_copy(update={"seed": s}), STEP_LOGITS)) for s in range(5)}
    assert len(streams) == 5
    base = run_seeded(SEEDED, STEP_LOGITS)
    forks = [run_seeded(SEEDED, STEP_LOGITS, fork_index=f) for f in (1, 2)]
    assert forks[0] != base and forks[1] != base and forks[0] != forks[1]
    assert run_seeded(SEEDED, STEP_LOGITS, mates=7, fork_index=1) == forks[0]


def test_unseeded_requests_vary():
    (a,) = make_states(1, 128)
    draws = {Sampler()(STEP_LOGITS[0][None], [a]).token_ids[0] for _ in range(20)}
    assert len(draws) > 1


# ---------------------------------------------------------------- params and validation


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.max_tokens, p.min_tokens) == (None, [], [], 16, 0)
    assert (p.ignore_eos, p.logprobs, p.skip_special_tokens, p.include_stop_str_in_output) == (
        False, None, True, False)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy
    with pytest.raises(ValidationError):
        p.temperature = 0.5  # frozen


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", [""]),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [-1]),
        ("seed", "abc"),
        ("bogus_field", 1),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValidationError) as exc:
        SamplingParams(**{field: value})
    assert field in str(exc.value)


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValidationError) as exc:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert "min_tokens" in str(exc.value)
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5


def test_vocab_mismatch_is_an_error():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(1, 10), make_states(1, 11))
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), make_states(1, 10))
