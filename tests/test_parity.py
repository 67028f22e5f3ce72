"""Our logits and head outputs equal transformers' SeedOss classes on the same safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_config, save_hf_model
from transformers import (
    SeedOssForCausalLM,
    SeedOssForQuestionAnswering,
    SeedOssForSequenceClassification,
    SeedOssForTokenClassification,
)

from seedoss.loader import load_head, load_stage
from seedoss.model import StepBatch

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    # max_position_embeddings is 32 below, so the 48-token prompt triggers the dynamic/yarn/llama3 scaling paths
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}

# (seed, heads, kv_heads, head_dim, hidden, attention_bias, attention_out_bias, mlp_bias, rope)
CASES = [
    (0, 4, 4, 32, 64, True, False, False, "default"),   # MHA (GQA ratio 1)
    (1, 4, 2, 32, 64, True, False, False, "default"),   # GQA 2, head_dim*heads (128) != hidden (64)
    (2, 8, 2, 32, 96, False, True, True, "default"),    # GQA 4, every bias flag flipped
    (3, 4, 1, 48, 64, True, True, False, "linear"),     # GQA 4 (one kv head), head_dim 48
    (4, 4, 2, 32, 64, False, False, True, "dynamic"),
    (5, 4, 2, 32, 64, True, True, True, "yarn"),
    (6, 8, 4, 32, 64, True, False, False, "llama3"),
    (7, 2, 2, 64, 64, False, False, False, "default"),  # head_dim*heads == hidden
]
IDS = [f"seed{c[0]}-gqa{c[1] // c[2]}-hd{c[3]}-{c[8]}" for c in CASES]


def _config(case):
    seed, heads, kv, head_dim, hidden, ab, aob, mb, rope = case
    return hf_config(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, hidden_size=hidden,
                     attention_bias=ab, attention_out_bias=aob, mlp_bias=mb, rope_parameters=dict(ROPES[rope]),
                     max_position_embeddings=32 if rope != "default" else 256)


def _prompts(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _our_logits(path, prompts, dtype):
    stage, head = load_stage(path, dtype=dtype), load_head(path, "generate", dtype=dtype)
    hidden = stage(torch.cat(prompts), StepBatch(list(range(len(prompts))), [len(p) for p in prompts], [0] * len(prompts)))
    return head(hidden).float().split([len(p) for p in prompts])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_causal_lm_float32(case, tmp_path):
    config = _config(case)
    model = save_hf_model(SeedOssForCausalLM, config, tmp_path, seed=case[0])
    prompts = _prompts(config.vocab_size, [48, 17, 5], case[0])
    ours = _our_logits(tmp_path, prompts, "float32")
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = model(p[None]).logits[0]
        assert (logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]], ids=[IDS[1], IDS[2], IDS[5]])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_causal_lm_half_precision(case, dtype, tmp_path):
    """Both implementations round every op to 8 (bf16) / 11 (fp16) mantissa bits, but not always at the same
    points (SDPA padding, fused vs. separate ops), so each logit may differ by a few units in the last place of
    the largest logit: we allow 4 ulps of max|logit| (bf16 ulp = 2^-7 relative), and require the same argmax
    wherever the float32 reference has a clear winner."""
    config = _config(case)
    model = save_hf_model(SeedOssForCausalLM, config, tmp_path, seed=case[0])
    torch_dtype = getattr(torch, dtype)
    ref_model = model.to(torch_dtype)
    prompts = _prompts(config.vocab_size, [40, 9], case[0])
    ours = _our_logits(tmp_path, prompts, dtype)
    ulp = 2.0 ** (-7 if dtype == "bfloat16" else -10)
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = ref_model(p[None]).logits[0].float()
        scale = ref.abs().max().item()
        assert (logits - ref).abs().max().item() <= 4 * ulp * scale
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 8 * ulp * scale
        assert torch.equal(logits.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_legacy_rope_config_style_loads_identically(tmp_path):
    """`rope_theta` + `rope_scaling` (transformers 4 style) means the same as `rope_parameters`."""
    config = _config(CASES[6])
    model = save_hf_model(SeedOssForCausalLM, config, tmp_path, seed=6)
    raw = json.loads((tmp_path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(raw))
    prompts = _prompts(config.vocab_size, [40], 6)
    with torch.no_grad():
        ref = model(prompts[0][None]).logits[0]
    assert (_our_logits(tmp_path, prompts, "float32")[0] - ref).abs().max().item() <= 1e-4


def _padded(prompts, pad_id, side):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification(side, tmp_path):
    config = hf_config(num_labels=3, pad_token_id=1)
    model = save_hf_model(SeedOssForSequenceClassification, config, tmp_path, seed=11)
    prompts = _prompts(config.vocab_size, [12, 5, 20], 11)
    ids, mask = _padded(prompts, 1, side)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    stage, head = load_stage(tmp_path), load_head(tmp_path, "classify")
    seqs = [p.tolist() for p in prompts]
    hidden = stage(torch.cat(prompts), StepBatch([0, 1, 2], [len(s) for s in seqs], [0, 0, 0]))
    ours = head(hidden, seqs)
    assert ours.shape == (3, 3)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sequence_classification_pools_rightmost_non_pad_token(tmp_path):
    """A sequence that itself ends in pad tokens is scored at its last non-pad token, as HF does."""
    config = hf_config(num_labels=2, pad_token_id=1)
    model = save_hf_model(SeedOssForSequenceClassification, config, tmp_path, seed=12)
    seq = torch.tensor([5, 9, 33, 7, 1, 1])
    with torch.no_grad():
        ref = model(input_ids=seq[None]).logits
    stage, head = load_stage(tmp_path), load_head(tmp_path, "classify")
    assert head.pool_index(seq.tolist()) == 3
    ours = head(stage(seq, StepBatch([0], [6], [0])), [seq.tolist()])
    assert (ours - ref).abs().max().item() <= 1e-4


def test_token_classification(tmp_path):
    config = hf_config(num_labels=5)
    model = save_hf_model(SeedOssForTokenClassification, config, tmp_path, seed=13)
    prompts = _prompts(config.vocab_size, [9, 14], 13)
    stage, head = load_stage(tmp_path), load_head(tmp_path, "tag")
    ours = head(stage(torch.cat(prompts), StepBatch([0, 1], [9, 14], [0, 0]))).split([9, 14])
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = model(input_ids=p[None]).logits[0]
        assert (logits - ref).abs().max().item() <= 1e-4


def test_question_answering_with_transformer_prefix(tmp_path):
    config = hf_config()
    model = save_hf_model(SeedOssForQuestionAnswering, config, tmp_path, seed=14)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.startswith("transformer.layers.") for k in f.keys())
    prompts = _prompts(config.vocab_size, [16, 7], 14)
    stage, head = load_stage(tmp_path), load_head(tmp_path, "qa")
    start, end = head(stage(torch.cat(prompts), StepBatch([0, 1], [16, 7], [0, 0])))
    for i, (s, e) in enumerate(zip(start.split([16, 7]), end.split([16, 7]))):
        with torch.no_grad():
            ref = model(input_ids=prompts[i][None])
        assert (s - ref.start_logits[0]).abs().max().item() <= 1e-4
        assert (e - ref.end_logits[0]).abs().max().item() <= 1e-4


def test_bare_backbone_without_prefix(tmp_path):
    """A bare SeedOssModel checkpoint (no `model.` prefix) loads as a stage with the same hidden states."""
    from transformers import SeedOssModel

    config = hf_config()
    model = save_hf_model(SeedOssModel, config, tmp_path, seed=15)
    p = _prompts(config.vocab_size, [10], 15)[0]
    with torch.no_grad():
        ref = model(p[None]).last_hidden_state[0]
    ours = load_stage(tmp_path)(p, StepBatch([0], [10], [0]))
    assert (ours - ref).abs().max().item() <= 1e-4
