"""Capacity planning for a pipeline of SeedOss stages, one GPU each (no Ray, no torch).

For a model config, a weight dtype, a stage split and a GPU size, `plan()` says per stage: the weight bytes
(stage 0 also holds the embedding table, the last stage the final norm and the LM head, which the generation
service keeps beside it), the KV-cache bytes one token costs in that stage
(2 × kv_heads × head_dim × dtype bytes × layers), the memory left for the KV cache once the weights are in
(`gpu_mem_gib × mem_util − weights`) and so the most tokens that stage can hold at once. It also suggests a split:
the smallest number of stages, balanced by `partition_layers`, whose stages each fit one GPU.

`seedoss plan --config CONFIG.json --gpus-per-node N --gpu-mem GiB` prints `Plan.table()`. The 36B numbers of
DESIGN.md §2 are its test case (tests/test_planner.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .config import SeedOssConfig
from .partition import layer_param_count, partition_layers, stage_param_counts

GiB = 1 << 30
KiB = 1 << 10
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Host memory of a stage pod (see `pod_memory_gib`): Ray's object store and the runtime beside the weights.
OBJECT_STORE_GIB = 4
RUNTIME_OVERHEAD_GIB = 8
POD_MEMORY_GRANULARITY_GIB = 4


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPE_BYTES)})") from None


def kv_bytes_per_token_per_layer(config: SeedOssConfig, nbytes: int) -> int:
    """Key + value of one token in one layer: 2 × kv_heads × head_dim × dtype bytes."""
    return 2 * config.num_key_value_heads * config.head_dim * nbytes


def pod_memory_gib(weight_bytes: int, *, object_store_gib: int = OBJECT_STORE_GIB,
                   overhead_gib: int = RUNTIME_OVERHEAD_GIB, granularity_gib: int = POD_MEMORY_GRANULARITY_GIB) -> int:
    """Host RAM (GiB) for the pod of a stage whose weights take `weight_bytes` on its GPU: the weights pass through
    host memory while they load, plus Ray's object store (`object-store-memory`) and the runtime (raylet, Python,
    torch, the CUDA context), rounded up to a multiple of `granularity_gib`."""
    need = weight_bytes / GiB + object_store_gib + overhead_gib
    return granularity_gib * math.ceil(need / granularity_gib)


@dataclass(frozen=True)
class StagePlan:
    index: int
    start: int  # first layer
    end: int  # one past the last layer
    params: int
    weight_bytes: int
    kv_bytes_per_token: int  # over this stage's layers
    usable_bytes: int  # GPU memory this stage may use: gpu_mem × mem_util

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def free_bytes(self) -> int:
        """Memory left for the KV cache once the weights are in (negative when the weights do not fit)."""
        return self.usable_bytes - self.weight_bytes

    @property
    def max_tokens(self) -> int:
        """Tokens whose KV cache this stage can hold at once (0 when the weights alone do not fit)."""
        return max(self.free_bytes, 0) // self.kv_bytes_per_token

    @property
    def fits(self) -> bool:
        return self.free_bytes >= 0


@dataclass(frozen=True)
class Plan:
    config: SeedOssConfig
    dtype: str
    dtype_bytes: int
    gpus_per_node: int
    gpu_mem_gib: float
    mem_util: float
    min_kv_tokens: int
    stages: tuple[StagePlan, ...]
    suggested_layers: tuple[int, ...] | None  # the smallest balanced split that fits; None if none does
    nodes: int | None = None  # GPU nodes available for generation lanes, if known

    @property
    def lanes(self) -> int | None:
        """Whole lanes (one engine + one replica of every stage, each stage on its own GPU) that `nodes` hold."""
        if self.nodes is None:
            return None
        return self.nodes * self.gpus_per_node // len(self.stages)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.stages)

    @property
    def total_weight_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    @property
    def layer_params(self) -> int:
        return layer_param_count(self.config)

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return kv_bytes_per_token_per_layer(self.config, self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """Over all layers (the whole pipeline)."""
        return self.kv_bytes_per_token_per_layer * self.config.num_hidden_layers

    @property
    def usable_bytes(self) -> int:
        return usable_bytes(self.gpu_mem_gib, self.mem_util)

    @property
    def layers_per_stage(self) -> list[int]:
        return [s.num_layers for s in self.stages]

    @property
    def num_nodes(self) -> int:
        return math.ceil(len(self.stages) / self.gpus_per_node)

    @property
    def max_tokens(self) -> int:
        """Concurrent tokens the whole pipeline holds: every stage keeps a token's KV for its own layers."""
        return min(s.max_tokens for s in self.stages)

    @property
    def kv_budget_bytes(self) -> int:
        """The largest per-stage KV budget every stage can give (AppConfig.engine.kv_budget_bytes is one value)."""
        return max(min(s.free_bytes for s in self.stages), 0)

    @property
    def fits(self) -> bool:
        return all(s.free_bytes >= self.min_kv_tokens * s.kv_bytes_per_token for s in self.stages)

    def table(self) -> str:
        c, gb = self.config, 1e9
        lines = [
            f"SeedOss: {self.total_params:,} params, {self.dtype} ({self.dtype_bytes} B) -> "
            f"{self.total_weight_bytes / gb:.1f} GB ({_gib(self.total_weight_bytes)}) of weights",
            f"per layer: {self.layer_params:,} params = {self.layer_bytes / gb:.2f} GB; KV cache "
            f"{_size(self.kv_bytes_per_token_per_layer)}/token/layer, {_size(self.kv_bytes_per_token)}/token for "
            f"{c.num_hidden_layers} layers",
            f"GPU: {self.gpu_mem_gib:g} GiB x {self.mem_util:g} = {_gib(self.usable_bytes)} usable per stage; "
            f"{len(self.stages)} stage(s) on {self.num_nodes} node(s) of {self.gpus_per_node} GPU(s)",
            "",
        ]
        header = ("stage", "layers", "#layers", "params", "weights", "KV/token", "free for KV", "max tokens", "fits")
        rows = [header]
        for s in self.stages:
            rows.append((str(s.index), f"{s.start}-{s.end - 1}", str(s.num_layers), f"{s.params:,}",
                         _gib(s.weight_bytes), _size(s.kv_bytes_per_token), _gib(s.free_bytes),
                         f"{s.max_tokens:,}", "yes" if s.fits else "NO"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
        lines.append(f"per lane ({len(self.stages)} GPU(s) on {self.num_nodes} node(s)): {self.max_tokens:,} concurrent "
                     f"tokens; per-stage KV budget (engine.kv_budget_bytes) {self.kv_budget_bytes:,} B "
                     f"({_gib(self.kv_budget_bytes)})")
        if self.nodes is not None:
            lines.append(f"lanes: {self.nodes} node(s) x {self.gpus_per_node} GPU(s) hold {self.lanes} lane(s) "
                         f"(lanes.max), {self.lanes * self.max_tokens:,} concurrent tokens in all")
        need = f" and KV for {self.min_kv_tokens:,} tokens" if self.min_kv_tokens else ""
        if self.suggested_layers is None:
            lines.append(f"suggested: none - even one layer per stage does not fit {_gib(self.usable_bytes)}{need}")
        else:
            lines.append(f"suggested: {len(self.suggested_layers)} stage(s), layers_per_stage "
                         f"{list(self.suggested_layers)} (the fewest balanced stages whose weights{need} fit one GPU)")
        return "\n".join(lines)


def usable_bytes(gpu_mem_gib: float, mem_util: float) -> int:
    """gpu_mem_gib x mem_util in whole bytes, rounded down, computed on the decimals as written (0.9 is 9/10)."""
    return math.floor(Fraction(repr(gpu_mem_gib)) * GiB * Fraction(repr(mem_util)))


def stage_plans(config: SeedOssConfig, ranges: Sequence[tuple[int, int]], nbytes: int,
                usable: int) -> tuple[StagePlan, ...]:
    per_layer = kv_bytes_per_token_per_layer(config, nbytes)
    return tuple(
        StagePlan(index=k, start=start, end=end, params=params, weight_bytes=params * nbytes,
                  kv_bytes_per_token=per_layer * (end - start), usable_bytes=usable)
        for k, ((start, end), params) in enumerate(zip(ranges, stage_param_counts(config, ranges)))
    )


def suggest_split(config: SeedOssConfig, nbytes: int, usable: int, min_kv_tokens: int = 0) -> list[int] | None:
    """The smallest number of balanced stages (`partition_layers`) whose stages each hold their weights plus the
    KV cache of `min_kv_tokens` tokens in `usable` bytes, as layers per stage; None when no split fits."""
    for n in range(1, config.num_hidden_layers + 1):
        stages = stage_plans(config, partition_layers(config, n), nbytes, usable)
        if all(s.free_bytes >= min_kv_tokens * s.kv_bytes_per_token for s in stages):
            return [s.num_layers for s in stages]
    return None


def plan(config: SeedOssConfig, dtype: str = "bfloat16", *, num_stages: int | None = None,
         layers_per_stage: Sequence[int] | None = None, gpus_per_node: int = 1, gpu_mem_gib: float = 80.0,
         mem_util: float = 0.9, min_kv_tokens: int = 0, nodes: int | None = None) -> Plan:
    """Plan `num_stages` balanced stages (or exactly `layers_per_stage`); with neither, the suggested split."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be at least 1, got {gpus_per_node}")
    if gpu_mem_gib <= 0:
        raise ValueError(f"gpu_mem_gib must be positive, got {gpu_mem_gib}")
    if not 0 < mem_util <= 1:
        raise ValueError(f"mem_util must be in (0, 1], got {mem_util}")
    if min_kv_tokens < 0:
        raise ValueError(f"min_kv_tokens must be >= 0, got {min_kv_tokens}")
    if nodes is not None and nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    nbytes = dtype_bytes(dtype)
    usable = usable_bytes(gpu_mem_gib, mem_util)
    suggested = suggest_split(config, nbytes, usable, min_kv_tokens)
    if num_stages is None and layers_per_stage is None:
        layers_per_stage = suggested or [1] * config.num_hidden_layers
    ranges = partition_layers(config, num_stages, layers_per_stage)
    return Plan(config=config, dtype=dtype, dtype_bytes=nbytes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib,
                mem_util=mem_util, min_kv_tokens=min_kv_tokens, stages=stage_plans(config, ranges, nbytes, usable),
                suggested_layers=tuple(suggested) if suggested else None, nodes=nodes)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: int) -> str:
    if n >= GiB:
        return _gib(n)
    if n >= 1 << 20:
        return f"{n / (1 << 20):g} MiB"
    if n >= KiB:
        return f"{n / KiB:g} KiB"
    return f"{n} B"
