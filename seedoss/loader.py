"""Building stages and heads from a checkpoint directory, reading only their own tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import SeedOssConfig
from .heads import HEAD_CLASSES, TASKS
from .model import Stage, pack_linears
from .weights import Checkpoint, build_on_meta, parse_dtype


def load_stage(path: str | Path, start: int = 0, end: int | None = None, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", checkpoint: Checkpoint | None = None) -> Stage:
    """Layers [start, end) of the checkpoint at `path` (end defaults to all layers), Linear weights prepacked
    when on CPU in float32 or bfloat16 (`pack_linears`). Progress is logged as `stage layers START-LAST`
    (seedoss.weights.LoadProgress)."""
    config = SeedOssConfig.from_pretrained(path)
    end = config.num_hidden_layers if end is None else end
    ckpt = checkpoint or Checkpoint(path)
    stage = build_on_meta(lambda: Stage(config, start, end))
    ckpt.load_into(stage, stage.checkpoint_layout(ckpt.prefix), parse_dtype(dtype), device,
                   label=f"stage layers {start}-{end - 1}")
    pack_linears(stage)
    return stage.eval()


def load_head(path: str | Path, task: str, *, dtype: str | torch.dtype = "float32",
              device: str | torch.device = "cpu", checkpoint: Checkpoint | None = None):
    """The `task` head ("generate", "classify", "tag", "qa") of the checkpoint at `path`.

    Its config.json supplies the label set (`id2label`) for classify/tag.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    config = SeedOssConfig.from_pretrained(path)
    ckpt = checkpoint or Checkpoint(path)
    head = build_on_meta(lambda: HEAD_CLASSES[task](config))
    params = dict(head.named_parameters())
    layout = {ours: [(theirs, tuple(params[ours].shape))] for ours, theirs in head.hf_names(config, ckpt.prefix).items()}
    ckpt.load_into(head, layout, parse_dtype(dtype), device, label=f"{task} head")
    pack_linears(head, gemv_on_plain_weight=task == "generate")  # batch-1 decode; task heads stay batch-invariant
    return head.eval()


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters (what a stage keeps resident)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
