"""Capacity planner: the 36B numbers of DESIGN.md §2 exactly, small configs computed by hand, the CLI table."""

from pathlib import Path

import pytest

from seedoss.cli import main
from seedoss.config import SeedOssConfig
from seedoss.planner import GiB, KiB, plan, pod_memory_gib, suggest_split

CONFIG_36B = Path(__file__).parent / "data" / "seed_oss_36b_config.json"


@pytest.fixture(scope="module")
def c36():
    return SeedOssConfig.from_pretrained(CONFIG_36B)


def test_36b_design_numbers(c36):
    p = plan(c36, "bfloat16", layers_per_stage=[16, 16, 16, 16], gpus_per_node=4, gpu_mem_gib=80)
    assert p.total_params == 36_151_104_512
    assert p.total_weight_bytes == 72_302_209_024 and f"{p.total_weight_bytes / 1e9:.1f}" == "72.3"  # 72.3 GB
    assert p.layer_params == 540_039_168
    assert p.layer_bytes == 1_080_078_336 and round(p.layer_bytes / 1e9, 2) == 1.08  # 1.08 GB per layer
    assert p.kv_bytes_per_token_per_layer == 4 * KiB  # 4 KiB/token/layer
    assert p.kv_bytes_per_token == 256 * KiB  # 256 KiB/token for 64 layers
    assert [s.kv_bytes_per_token for s in p.stages] == [64 * KiB] * 4
    # even 4 x 16: ≈ 17.6 / 16.1 / 16.1 / 17.6 GiB (embed_tokens on the first, norm + lm_head on the last)
    assert [s.params for s in p.stages] == [9_434_923_008, 8_640_626_688, 8_640_626_688, 9_434_928_128]
    assert [round(s.weight_bytes / GiB, 1) for s in p.stages] == [17.6, 16.1, 16.1, 17.6]
    assert sum(s.params for s in p.stages) == 36_151_104_512
    assert p.num_nodes == 1
    # 80 GiB x 0.9 = 72 GiB: 54.43 GiB left on the heaviest stage, 64 KiB a token there
    assert p.usable_bytes == 72 * GiB
    assert p.stages[0].free_bytes == 72 * GiB - 9_434_923_008 * 2
    assert p.stages[0].max_tokens == (72 * GiB - 9_434_923_008 * 2) // (64 * KiB) == 891_717
    assert p.max_tokens == p.stages[3].max_tokens == 891_716
    assert p.kv_budget_bytes == min(s.free_bytes for s in p.stages)


def test_36b_balanced_split_and_suggestion(c36):
    p = plan(c36, "bfloat16", num_stages=4, gpu_mem_gib=80)
    assert p.layers_per_stage == [15, 17, 17, 15]  # the DP balances embed/lm_head against layers
    assert [round(s.weight_bytes / GiB, 2) for s in p.stages] == [16.57, 17.10, 17.10, 16.57]
    assert p.num_nodes == 4
    # weights alone (67.34 GiB) fit one 80 GiB GPU at 0.9 ...
    assert p.suggested_layers == (64,)
    # ... but not with room for 32k tokens of KV cache, nor on 40 GiB GPUs
    assert plan(c36, gpu_mem_gib=80, min_kv_tokens=32768).suggested_layers == (32, 32)
    p40 = plan(c36, gpu_mem_gib=40, min_kv_tokens=32768)
    assert p40.layers_per_stage == [21, 22, 21] and p40.fits
    assert suggest_split(c36, 2, 16 * GiB) == [12, 13, 13, 14, 12]  # 4 stages need 17.10 GiB; 5 need 14.08


def tiny(**overrides) -> SeedOssConfig:
    raw = {"vocab_size": 100, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 4,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "max_position_embeddings": 64,
           "attention_bias": True}
    return SeedOssConfig.from_dict({**raw, **overrides})


# hand arithmetic for tiny(): q = 2 x 4 = 8, kv = 1 x 4 = 4
#   attention  8*8 (q) + 2 * 8*4 (k, v) + 8*8 (o) + 8 + 2*4 (q/k/v bias) = 208
#   mlp        3 * 8 * 16 = 384;   norms 2 * 8 = 16        -> 608 params per layer
#   embed_tokens = lm_head = 100 * 8 = 800;  final norm 8
#   KV: 2 (k, v) x 1 kv head x 4 dims x 4 bytes (fp32) = 32 B per token per layer
TINY_LAYER = 608
TINY_GPU_GIB = 16384 / GiB  # 16 KiB "GPU" (exact in binary floating point)


def test_tiny_two_stages_by_hand():
    p = plan(tiny(), "float32", num_stages=2, gpu_mem_gib=TINY_GPU_GIB, mem_util=0.5)
    assert p.layer_params == TINY_LAYER
    assert p.layers_per_stage == [2, 2]
    assert [s.params for s in p.stages] == [2 * 608 + 800, 2 * 608 + 8 + 800] == [2016, 2024]
    assert [s.weight_bytes for s in p.stages] == [8064, 8096]
    assert p.total_params == 4040
    assert p.kv_bytes_per_token_per_layer == 32 and p.kv_bytes_per_token == 128
    assert [s.kv_bytes_per_token for s in p.stages] == [64, 64]
    assert p.usable_bytes == 8192
    assert [s.free_bytes for s in p.stages] == [128, 96]
    assert [s.max_tokens for s in p.stages] == [2, 1]
    assert p.max_tokens == 1 and p.kv_budget_bytes == 96
    assert all(s.fits for s in p.stages)


def test_tiny_dtype_and_tied_embeddings():
    p = plan(tiny(tie_word_embeddings=True), "bfloat16", layers_per_stage=[1, 3], gpu_mem_gib=TINY_GPU_GIB)
    assert [s.params for s in p.stages] == [608 + 800, 3 * 608 + 8] == [1408, 1832]  # no lm_head when tied
    assert [s.weight_bytes for s in p.stages] == [2816, 3664]
    assert [s.kv_bytes_per_token for s in p.stages] == [16, 48]  # 2 x 1 x 4 x 2 B per layer
    assert p.usable_bytes == 14745  # 16384 x 0.9 = 14745.6, rounded down
    assert [s.max_tokens for s in p.stages] == [(14745 - 2816) // 16, (14745 - 3664) // 48] == [745, 230]
    assert plan(tiny(), "float16", num_stages=1, gpu_mem_gib=1).total_weight_bytes == 4040 * 2


def test_tiny_suggestion_by_hand():
    # 8192 usable bytes, fp32: one stage (16,160 B) does not fit; the balanced [2, 2] (8,064 / 8,096 B) does
    p = plan(tiny(), "float32", gpu_mem_gib=TINY_GPU_GIB, mem_util=0.5)
    assert p.suggested_layers == (2, 2) and p.layers_per_stage == [2, 2]
    # room for 2 tokens: stage 1 has 96 B < 2 x 64 B; 3 balanced stages [1, 2, 1] = 1408 / 1216 / 1416 params
    p = plan(tiny(), "float32", gpu_mem_gib=TINY_GPU_GIB, mem_util=0.5, min_kv_tokens=2)
    assert p.suggested_layers == (1, 2, 1)
    assert [s.weight_bytes for s in p.stages] == [5632, 4864, 5664]
    assert [s.max_tokens for s in p.stages] == [(8192 - 5632) // 32, (8192 - 4864) // 64, (8192 - 5664) // 32]
    # nothing fits: no suggestion, one layer per stage shown, marked as not fitting
    p = plan(tiny(), "float32", gpu_mem_gib=1024 / GiB)
    assert p.suggested_layers is None and p.layers_per_stage == [1, 1, 1, 1]
    assert not p.fits and not p.stages[0].fits and p.stages[0].max_tokens == 0
    assert "suggested: none" in p.table()


def test_an_explicit_split_that_does_not_fit_is_reported():
    p = plan(tiny(), "float32", num_stages=1, gpu_mem_gib=TINY_GPU_GIB, mem_util=0.5)
    assert p.stages[0].free_bytes == 8192 - 16160 and not p.stages[0].fits and p.max_tokens == 0
    assert "NO" in p.table()


def test_pod_memory():
    assert pod_memory_gib(int(17.10 * GiB)) == 32  # 17.10 + 4 object store + 8 runtime = 29.10 -> 32
    assert pod_memory_gib(20 * GiB) == 32
    assert pod_memory_gib(20 * GiB + 1) == 36
    assert pod_memory_gib(0, object_store_gib=2, overhead_gib=1, granularity_gib=1) == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "int4"}, "unknown dtype"),
    ({"mem_util": 0}, "mem_util"),
    ({"mem_util": 1.5}, "mem_util"),
    ({"gpus_per_node": 0}, "gpus_per_node"),
    ({"gpu_mem_gib": 0}, "gpu_mem_gib"),
    ({"min_kv_tokens": -1}, "min_kv_tokens"),
    ({"num_stages": 5}, "num_stages"),
    ({"layers_per_stage": [2, 1]}, "layers_per_stage"),
    ({"nodes": 0}, "nodes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(tiny(), **kwargs)


def test_cli_table(capsys):
    main(["plan", "--config", str(CONFIG_36B), "--layers-per-stage", "16,16,16,16", "--gpus-per-node", "4",
          "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert "36,151,104,512 params" in out and "72.3 GB" in out and "1.08 GB" in out
    assert "4 KiB/token/layer" in out and "256 KiB/token for 64 layers" in out
    assert out.count("17.57 GiB") == 2 and out.count("16.09 GiB") == 2
    assert "4 stage(s) on 1 node(s) of 4 GPU(s)" in out
    assert "suggested: 1 stage(s), layers_per_stage [64]" in out


def test_cli_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "/nonexistent/config.json", "--gpus-per-node", "1", "--gpu-mem", "80"])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("nodes, gpus_per_node, lanes", [(4, 1, 1), (7, 1, 1), (8, 1, 2), (3, 4, 3), (1, 2, 0)])
def test_lanes_that_fit_on_n_nodes(c36, nodes, gpus_per_node, lanes):
    """A lane is one replica of every stage, each on a GPU of its own: 4 stages need 4 GPUs per lane."""
    p = plan(c36, "bfloat16", num_stages=4, gpus_per_node=gpus_per_node, gpu_mem_gib=80, nodes=nodes)
    assert p.lanes == lanes
    assert f"hold {lanes} lane(s) (lanes.max), {lanes * p.max_tokens:,} concurrent tokens" in p.table()
    assert plan(c36, "bfloat16", num_stages=4, gpu_mem_gib=80).lanes is None
