"""Deterministic demo checkpoints in the real HF layout (weights cannot be downloaded here).

`write_demo_checkpoint(dir)` writes a causal-LM checkpoint (config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json) and, under `heads/{classify,tag,qa}/`, checkpoints that transformers'
`SeedOssForSequenceClassification`, `...ForTokenClassification` and `...ForQuestionAnswering` load directly:
each holds the *same* backbone plus its head tensors (QA under the `transformer.` prefix, as HF saves it).
Weights are random but seeded, so every machine produces byte-identical files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import SeedOssConfig
from .model import Stage
from .tokenizer import train_demo_tokenizer
from .weights import build_on_meta

PRESETS = {
    # ~1.6M parameters: tests and the laptop demo
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
    # ~80M parameters: benchmarks
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64),
}
VOCAB_SIZE = 4096
CLASSIFY_LABELS = ["negative", "neutral", "positive"]
TAG_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
HEAD_ARCHITECTURES = {
    "classify": "SeedOssForSequenceClassification",
    "tag": "SeedOssForTokenClassification",
    "qa": "SeedOssForQuestionAnswering",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def demo_config(preset: str = "tiny", **overrides) -> SeedOssConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=4096, rms_norm_eps=1e-6, torch_dtype="float32")
    fields.update(PRESETS[preset])
    fields.update(overrides)
    return SeedOssConfig(**fields)


def _random_backbone(config: SeedOssConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights scaled so logits are well spread (greedy decoding has clear winners, not near-ties)."""
    stage = build_on_meta(lambda: Stage(config, 0, config.num_hidden_layers))
    shapes = dict(part for parts in stage.checkpoint_layout().values() for part in parts)
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=generator)
        else:
            t = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
        tensors[name] = t.contiguous()
    return tensors


def _linear(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=generator) / math.sqrt(cols)).contiguous()


def write_demo_checkpoint(out_dir: str | Path, preset: str = "tiny", *, seed: int = 0, heads: bool = True,
                          overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint; pass overwrite=True (CLI: --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(preset)
    g = torch.Generator().manual_seed(seed)
    backbone = _random_backbone(config, g)
    lm = dict(backbone, **{"lm_head.weight": _linear(config.vocab_size, config.hidden_size, g)})
    _write(out, config.to_dict(), lm)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids[0], "pad_token_id": config.pad_token_id},
        indent=2) + "\n")
    train_demo_tokenizer(out, vocab_size=config.vocab_size)
    if heads:
        h = config.hidden_size
        head_tensors = {
            "classify": ({"score.weight": _linear(len(CLASSIFY_LABELS), h, g)}, CLASSIFY_LABELS, "model."),
            "tag": ({"score.weight": _linear(len(TAG_LABELS), h, g), "score.bias": 0.1 * torch.randn(len(TAG_LABELS), generator=g)},
                    TAG_LABELS, "model."),
            "qa": ({"qa_outputs.weight": _linear(2, h, g), "qa_outputs.bias": 0.1 * torch.randn(2, generator=g)}, [], "transformer."),
        }
        for task, (tensors, labels, prefix) in head_tensors.items():
            task_dir = out / "heads" / task
            task_dir.mkdir(parents=True, exist_ok=True)
            raw = config.to_dict()
            raw["architectures"] = [HEAD_ARCHITECTURES[task]]
            if labels:
                raw["id2label"] = {str(i): label for i, label in enumerate(labels)}
                raw["label2id"] = {label: i for i, label in enumerate(labels)}
            renamed = {prefix + k[len("model."):]: v for k, v in backbone.items()}
            _write(task_dir, raw, dict(renamed, **tensors))
            for name in TOKENIZER_FILES:
                shutil.copyfile(out / name, task_dir / name)
    return out


def _write(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def head_dir(checkpoint: str | Path, task: str) -> Path:
    """Where a demo-layout checkpoint keeps the `task` head (the LM head lives at the root)."""
    return Path(checkpoint) if task == "generate" else Path(checkpoint) / "heads" / task
