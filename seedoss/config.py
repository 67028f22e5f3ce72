"""SeedOss model configuration, read from a Hugging Face `config.json`.

Both rope styles are accepted: transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}`,
older configs carry a top-level `rope_theta` plus an optional `rope_scaling` dict. Either way the result is
normalised into `RopeConfig`, with the defaults transformers applies (theta 10000, `original_max_position_embeddings`
falling back to `max_position_embeddings` for yarn/llama3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a SeedOss model; the message names the offending key."""


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Keys each rope type needs beyond rope_theta (as transformers validates them).
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    rope_theta: float = 10_000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class SeedOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = True
    attention_out_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    id2label: dict[int, str] = field(default_factory=dict)
    torch_dtype: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label) or 2

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    @property
    def labels(self) -> list[str]:
        """Label names in id order (HF's default `LABEL_i` when the config has none)."""
        return [self.id2label.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Key + value bytes one token costs in one layer, for 2-byte activations."""
        return 2 * self.num_key_value_heads * self.head_dim * 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SeedOssConfig":
        def need(key: str, kind=int):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"config.json: missing required key '{key}'")
            value = raw[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"config.json: '{key}' must be a positive integer, got {value!r}")
            return value

        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        hidden = need("hidden_size")
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: 'num_attention_heads' ({heads}) must be a multiple of 'num_key_value_heads' ({kv_heads})"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: 'hidden_act' {act!r} is not supported (SeedOss uses 'silu')")
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("config.json: 'partial_rotary_factor' is not supported by SeedOss")
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        id2label = {int(k): v for k, v in (raw.get("id2label") or {}).items()}
        max_pos = need("max_position_embeddings")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw, max_pos),
            attention_bias=bool(raw.get("attention_bias", True)),
            attention_out_bias=bool(raw.get("attention_out_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act=act,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", 0),
            pad_token_id=raw.get("pad_token_id", 1),
            eos_token_ids=eos_ids,
            id2label=id2label,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SeedOssConfig":
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ConfigError(f"{file}: no such file (expected an HF checkpoint directory with config.json)")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json form (transformers-5 `rope_parameters` style)."""
        rope = {f.name: getattr(self.rope, f.name) for f in fields(self.rope)}
        rope = {k: v for k, v in rope.items() if v is not None and not (k == "truncate" and v)}
        out = {
            "architectures": ["SeedOssForCausalLM"],
            "model_type": "seed_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "attention_out_bias": self.attention_out_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "attention_dropout": 0.0,
            "residual_dropout": 0.0,
        }
        if self.id2label:
            out["id2label"] = {str(i): label for i, label in self.id2label.items()}
            out["label2id"] = self.label2id
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        return out


def _parse_rope(raw: dict[str, Any], max_pos: int) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: 'rope_parameters' must be an object, got {params!r}")
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: unknown rope type {rope_type!r} in 'rope_parameters' (supported: {', '.join(ROPE_TYPES)})")
    theta = params.pop("rope_theta", raw.get("rope_theta", 10_000.0))
    for key in _ROPE_REQUIRED[rope_type]:
        if params.get(key) is None and not (rope_type == "yarn" and key == "factor"):
            raise ConfigError(f"config.json: rope type {rope_type!r} needs 'rope_parameters.{key}'")
    known = {f.name for f in fields(RopeConfig)}
    unknown = set(params) - known - {"partial_rotary_factor"}
    if unknown:
        raise ConfigError(f"config.json: unknown key(s) {sorted(unknown)} in 'rope_parameters'")
    params.pop("partial_rotary_factor", None)
    if rope_type in ("yarn", "llama3"):
        params.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings") or max_pos)
    if rope_type == "yarn" and params.get("factor") is None:
        params["factor"] = max_pos / params["original_max_position_embeddings"]
    return RopeConfig(rope_type=rope_type, rope_theta=float(theta), **params)
