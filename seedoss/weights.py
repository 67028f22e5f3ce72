"""Reading only the tensors a stage or head needs from an HF safetensors checkpoint.

A checkpoint is a directory with `model.safetensors` or a sharded set described by `model.safetensors.index.json`.
Files are memory-mapped by safetensors (never unpickled); each requested tensor is read, checked against the
shape the module expects, and cast to the requested dtype. Every read is logged in `Checkpoint.read_log` so
tests (and operators) can see exactly what a stage touched. Loading a stage of a large checkpoint takes minutes:
`LoadProgress` logs the bytes read so far, the rate and the ETA while it happens (logger `seedoss.load`).
"""

from __future__ import annotations

import json
import logging
import re
import time
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


log = logging.getLogger("seedoss.load")
PROGRESS_INTERVAL_S = 2.0  # a 17 GiB stage read at ~1 GiB/s: ~9 lines


def _size(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.1f} MiB"


class LoadProgress:
    """Checkpoint bytes read for one stage or head: a line when it starts, one at most every PROGRESS_INTERVAL_S
    while it runs (bytes, percent, rate, ETA), one when done. Each record carries `load_label`, `load_bytes`,
    `load_total` and `load_done` (True on the last) for log processors and tests."""

    def __init__(self, label: str, total: int, files: int, clock=time.monotonic):
        self.label, self.total, self.bytes, self.clock = label, total, 0, clock
        self.start = self.last = clock()
        self._log(f"{label}: loading {_size(total)} from {files} file(s)", done=False)

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes
        now = self.clock()
        if self.bytes < self.total and now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9)
            self._log(f"{self.label}: {_size(self.bytes)} / {_size(self.total)} ({100 * self.bytes / self.total:.0f}%)"
                      f", {_size(rate)}/s, ETA {(self.total - self.bytes) / rate:.0f}s", done=False)

    def finish(self) -> None:
        elapsed = self.clock() - self.start
        self._log(f"{self.label}: loaded {_size(self.bytes)} in {elapsed:.1f}s "
                  f"({_size(self.bytes / max(elapsed, 1e-9))}/s)", done=True)

    def _log(self, message: str, done: bool) -> None:
        log.info(message, extra={"load_label": self.label, "load_bytes": self.bytes, "load_total": self.total,
                                 "load_done": done})


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

    def read(self, names: list[str], dtype: torch.dtype, device: str | torch.device = "cpu",
             label: str | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, cast and moved; progress logged under `label` (default: the checkpoint's path)."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor(s) {missing[:5]}{' …' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        sizes = {file: _tensor_bytes(file) for file in by_file}
        progress = LoadProgress(label or str(self.path), sum(sizes[self.files[n]].get(n, 0) for n in names),
                                len(by_file))
        out = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for n in file_names:
                        out[n] = f.get_tensor(n).to(device=device, dtype=dtype)
                        self.read_log.append(n)
                        progress.add(sizes[file].get(n, 0))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read safetensors data ({e}); the file may be truncated or corrupt") from None
        progress.finish()
        return out

    def load_into(self, module: nn.Module, layout: dict[str, list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype,
                  device: str | torch.device = "cpu", label: str | None = None) -> None:
        """Fill `module`'s parameters; `layout` maps each to the checkpoint tensors (name, expected shape) it is
        made of, concatenated along dim 0 when there are several (fused projections). Shapes are checked."""
        tensors = self.read([n for parts in layout.values() for n, _ in parts], dtype, device, label)
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


def _tensor_bytes(file: Path) -> dict[str, int]:
    """Tensor name → bytes on disk, from the safetensors header (8-byte little-endian length, then JSON with each
    tensor's `data_offsets`): what progress counts, known before any data is read."""
    try:
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        return {name: end - begin for name, entry in header.items() if name != "__metadata__"
                for begin, end in [entry["data_offsets"]]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors header ({e!r}); the file may be truncated or corrupt") from None


def build_on_meta(factory):
    """Construct a module without allocating its parameters (they are assigned when loading)."""
    with torch.device("meta"):
        return factory()
