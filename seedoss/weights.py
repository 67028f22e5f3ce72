"""Reading only the tensors a stage or head needs from an HF safetensors checkpoint.

A checkpoint is a directory with `model.safetensors` or a sharded set described by `model.safetensors.index.json`.
Files are memory-mapped by safetensors (never unpickled); each requested tensor is read, checked against the
shape the module expects, and cast to the requested dtype. Every read is logged in `Checkpoint.read_log` so
tests (and operators) can see exactly what a stage touched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BACKBONE_PREFIXES = ("model.", "transformer.")
# Every tensor name a SeedOss checkpoint may hold, after its backbone prefix (or at top level for heads).
_KNOWN = re.compile(
    r"^(embed_tokens\.weight|norm\.weight|"
    r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"layers\.(\d+)\.self_attn\.[qkvo]_proj\.(weight|bias)|"
    r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias))$"
)
HEAD_TENSORS = ("lm_head.weight", "score.weight", "score.bias", "qa_outputs.weight", "qa_outputs.bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class Checkpoint:
    """Tensor name → file map of one checkpoint directory, with the backbone prefix it uses."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.read_log: list[str] = []
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif single.is_file():
            self.files = {name: single for name in _keys(single)}
        else:
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} found (is this an HF SeedOss checkpoint directory?)"
            )
        for file in set(self.files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        # backbone prefix: `model.` (CausalLM and most heads), `transformer.` (QA), none (bare SeedOssModel)
        self.prefix = next((p for p in BACKBONE_PREFIXES if any(n.startswith(p) for n in self.files)), "")
        unexpected = [
            n for n in self.files
            if n not in HEAD_TENSORS and not (n.startswith(self.prefix) and _KNOWN.match(n[len(self.prefix):]))
        ]
        if unexpected:
            raise CheckpointError(f"{self.path}: unexpected tensor(s) {sorted(unexpected)[:5]} (not a SeedOss checkpoint?)")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str], dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for n in file_names:
                        out[n] = f.get_tensor(n).to(device=device, dtype=dtype)
                        self.read_log.append(n)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read safetensors data ({e}); the file may be truncated or corrupt") from None
        return out

    def load_into(self, module: nn.Module, layout: dict[str, list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype,
                  device: str | torch.device = "cpu") -> None:
        """Fill `module`'s parameters; `layout` maps each to the checkpoint tensors (name, expected shape) it is
        made of, concatenated along dim 0 when there are several (fused projections). Shapes are checked."""
        tensors = self.read([n for parts in layout.values() for n, _ in parts], dtype, device)
        state = {}
        for ours, parts in layout.items():
            for theirs, shape in parts:
                t = tensors[theirs]
                if tuple(t.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{self.files[theirs]}: tensor '{theirs}' has shape {tuple(t.shape)}, "
                        f"expected {tuple(shape)} from config.json"
                    )
            state[ours] = tensors[parts[0][0]] if len(parts) == 1 else torch.cat([tensors[n] for n, _ in parts])
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False)


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors header ({e}); the file may be truncated or corrupt") from None


def build_on_meta(factory):
    """Construct a module without allocating its parameters (they are assigned when loading)."""
    with torch.device("meta"):
        return factory()
