"""Model sampling defaults from the checkpoint's `generation_config.json` (vLLM's `--generation-config auto`).

Seed-OSS ships the sampling its model card recommends (temperature 1.1, top_p 0.95) in `generation_config.json`;
users expect a request that leaves those fields out to get them, as vLLM serves it. Only fields the request did
not set are filled, so an explicit value always wins, and `generation_config: none` (AppConfig) turns it off
(then the neutral vLLM defaults apply: temperature 1, top_p 1, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json key -> request field (the keys vLLM reads)
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(checkpoint: str | Path, mode: str = "auto") -> dict[str, Any]:
    """The request defaults in `checkpoint`'s generation_config.json ({} for mode "none" or no file)."""
    path = Path(checkpoint) / "generation_config.json"
    if mode == "none" or not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    return {field: config[key] for key, field in _FIELDS.items() if config.get(key) is not None}


def apply_defaults(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`body` with every default it leaves unset (absent; an explicit null is the client's own choice)."""
    missing = {k: v for k, v in defaults.items() if k not in body}
    return {**missing, **body} if missing else body
