"""The demo checkpoint: deterministic, real HF layout that transformers' SeedOss classes load directly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from seedoss.config import SeedOssConfig
from seedoss.demo import CLASSIFY_LABELS, PRESETS, TAG_LABELS, demo_config, head_dir, write_demo_checkpoint
from seedoss.loader import load_head, load_stage
from seedoss.model import StepBatch
from seedoss.partition import stage_param_counts
from seedoss.tokenizer import SPECIAL_TOKENS

HF_CLASSES = {
    "generate": AutoModelForCausalLM,
    "classify": AutoModelForSequenceClassification,
    "tag": AutoModelForTokenClassification,
    "qa": AutoModelForQuestionAnswering,
}


def test_presets_fit_their_purpose():
    for preset in PRESETS:
        assert demo_config(preset).head_dim >= 32  # vLLM's CPU attention needs it
    small = demo_config("small")
    assert 50e6 <= sum(stage_param_counts(small, [(0, small.num_hidden_layers)])) <= 100e6


def test_demo_checkpoint_is_deterministic(demo_checkpoint, tmp_path):
    again = write_demo_checkpoint(tmp_path / "again")
    for rel in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "heads/classify/model.safetensors", "heads/tag/config.json", "heads/qa/model.safetensors"]:
        assert (again / rel).read_bytes() == (demo_checkpoint / rel).read_bytes(), rel
    with pytest.raises(FileExistsError, match="overwrite"):
        write_demo_checkpoint(again)


@pytest.mark.parametrize("task", ["generate", "classify", "tag", "qa"])
def test_tokenizer_config_loads_in_transformers_4(demo_checkpoint, task):
    """transformers 4.x (4.56.2 still has the QA pipeline) fails on a list under `extra_special_tokens`; the demo
    config has none: its only special tokens are the named bos/pad/eos, and the tag tokens are plain added tokens
    (5.x: the test below; 4.56.2: bench/qa_reference.py loads the QA head's tokenizer)."""
    config = json.loads((head_dir(demo_checkpoint, task) / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "extra_special_tokens" not in config and "additional_special_tokens" not in config
    decoder = config["added_tokens_decoder"]
    assert [decoder[str(i)]["content"] for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert [decoder[str(i)]["special"] for i in range(len(SPECIAL_TOKENS))] == [True] * 3 + [False] * 6


@pytest.mark.parametrize("task", ["generate", "classify", "tag", "qa"])
def test_transformers_loads_every_head_directly_and_agrees(demo_checkpoint, task):
    path = head_dir(demo_checkpoint, task)
    model, info = HF_CLASSES[task].from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__.startswith("SeedOssFor")
    AutoTokenizer.from_pretrained(path)
    config = SeedOssConfig.from_pretrained(path)
    if task == "classify":
        assert config.labels == CLASSIFY_LABELS
    if task == "tag":
        assert config.labels == TAG_LABELS
    ids = torch.tensor([0, 812, 77, 1500, 9, 3000, 41])
    hidden = load_stage(path)(ids, StepBatch([0], [7], [0]))
    head = load_head(path, task)
    with torch.no_grad():
        ref = model.eval()(ids[None])
    if task == "generate":
        assert (head(hidden) - ref.logits[0]).abs().max() <= 1e-4
    elif task == "classify":
        assert (head(hidden, [ids.tolist()]) - ref.logits).abs().max() <= 1e-4
    elif task == "tag":
        assert (head(hidden) - ref.logits[0]).abs().max() <= 1e-4
    else:
        start, end = head(hidden)
        assert (start - ref.start_logits[0]).abs().max() <= 1e-4 and (end - ref.end_logits[0]).abs().max() <= 1e-4


def test_heads_share_the_lm_backbone(demo_checkpoint):
    lm = load_stage(demo_checkpoint)
    for task in ["classify", "tag", "qa"]:
        other = load_stage(head_dir(demo_checkpoint, task))
        for (name, a), (_, b) in zip(lm.named_parameters(), other.named_parameters()):
            assert torch.equal(_dense(a), _dense(b)), (task, name)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_mkldnn else t


def test_cli_demo_checkpoint_and_generate(tmp_path):
    cli = [sys.executable, "-m", "seedoss.cli"]
    done = subprocess.run([*cli, "demo-checkpoint", str(tmp_path / "d"), "--no-heads"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d" / "model.safetensors").exists() and not (tmp_path / "d" / "heads").exists()
    gen = [*cli, "generate", "--checkpoint", str(tmp_path / "d"), "--max-tokens", "8"]
    one = subprocess.run([*gen, "Hello there"], capture_output=True, text=True)
    two = subprocess.run([*gen, "--num-stages", "2", "Hello there"], capture_output=True, text=True)
    assert one.returncode == 0 and one.stdout.strip() and one.stdout == two.stdout
    bad = subprocess.run([*gen, "--temperature", "-1", "Hello"], capture_output=True, text=True)
    assert bad.returncode == 2 and "temperature" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([*cli, "generate", "--checkpoint", str(tmp_path / "nope"), "x"], capture_output=True, text=True)
    assert missing.returncode == 2 and "config.json" in missing.stderr and "Traceback" not in missing.stderr
