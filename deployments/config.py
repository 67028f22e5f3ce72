"""One pydantic config drives the whole Serve app: checkpoint, stage split, and per-deployment options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from seedoss.engine import EngineConfig
from seedoss.services.limits import Limits

from .batching import BatchingConfig
from .faults import RetryPolicy, Timeouts
from .logs import LogOptions
from .serve_env import REPLICA_ENV

# Serve's end-to-end bound on one HTTP request (proxy `http_options.request_timeout_s`): above the longest stream a
# deployment should serve (a 32k-token answer at 40 tokens/s is ~800 s); per-call bounds are `AppConfig.timeouts`.
REQUEST_TIMEOUT_S = 900

TASK_DEPLOYMENTS = {"classify": "Classification", "tag": "Tagging", "qa": "QA", "embed": "Embedding"}


def checked_api_keys(keys: list[str], source: str) -> list[str]:
    """`keys` unchanged, or ValueError: auth must fail closed, so a key that is empty, blank or padded with
    whitespace (which no client's header can match, or which ``Authorization: Bearer `` would) stops the config
    from loading instead of being skipped or accepted."""
    for i, key in enumerate(keys):
        if not key.strip() or key != key.strip():
            raise ValueError(f"{source}: key {i} is empty or has surrounding whitespace")
    return keys


def resolve_api_keys(api_keys: list[str] | None, env: str, required: bool) -> list[str]:
    """The keys a gateway accepts: the config's plus `env` (``SEEDOSS_API_KEYS``: comma-separated, items stripped;
    unset or blank means none, an empty item is an error); ValueError when `required` and there are none."""
    env_keys = checked_api_keys([k.strip() for k in env.split(",")], "SEEDOSS_API_KEYS") if env.strip() else []
    keys = [*(api_keys or []), *env_keys]
    if required and not keys:
        raise ValueError("require_api_keys is set but no key is configured (api_keys or SEEDOSS_API_KEYS)")
    return keys


class DeploymentOptions(BaseModel):
    """What Serve needs to place and scale one deployment (see DESIGN.md §3 for the defaults we override)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1, description="a fixed replica count (default 1; Generation and "
                                     "the stages: one per lane, see `lanes`)")
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="per caller; -1 is unbounded (never use in production)")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0})

    @field_validator("autoscaling_config")
    @classmethod
    def _valid_autoscaling(cls, value: dict | None) -> dict | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig.model_validate(value)
        return value

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.autoscaling_config is not None:
            self.num_replicas = None  # autoscaling decides; Serve rejects both
        return self

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class VllmOptions(BaseModel):
    """How the vLLM backend (`generation.backend: vllm`, `deployments/vllm_backend.py`) builds its `AsyncLLM`. The
    pipeline-parallel degree is the app's `num_stages`; `engine.max_num_seqs`, `max_batched_tokens` and
    `max_model_len` apply as vLLM's `max_num_seqs`, `max_num_batched_tokens` and `max_model_len`."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per pipeline stage (GPU only)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM's fraction of device memory for weights + KV cache (default: vLLM's)")
    engine_args: dict[str, Any] = Field(default_factory=dict,
                                        description="further vllm AsyncEngineArgs fields, passed through as given")


class GenerationOptions(DeploymentOptions):
    """The Generation deployment's options plus which engine it runs: ours over the stage deployments (`seedoss`)
    or vLLM's `AsyncLLM` on the same checkpoint (`vllm`; install with `scripts/install.sh vllm`). The API in front
    is the same either way; a request field the vLLM backend cannot honour is a 400 naming it."""

    backend: Literal["seedoss", "vllm"] = "seedoss"
    vllm: VllmOptions | None = Field(None, description="the vLLM backend's engine options (default: VllmOptions())")

    def vllm_options(self) -> VllmOptions:
        return self.vllm or VllmOptions()

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"backend", "vllm"})


def batched_head_options() -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=128, max_queued_requests=64)


class LaneConfig(BaseModel):
    """How many generation lanes run (a lane: one Generation engine + one replica of each stage, see
    `deployments/routing.py`). `min == max`: a fixed count. Otherwise lanes autoscale on the engines' own load
    (`deployments/autoscaling.py`): enough lanes that each has at most `target_sequences` sequences running or
    waiting and at most `target_kv_usage` of its KV cache in use, averaged over `look_back_period_s`; changes wait
    `upscale_delay_s` / `downscale_delay_s`. A lane being removed finishes its streams within the Generation
    deployment's `graceful_shutdown_timeout_s`; streams still running then continue on another lane. The `prefix_*`
    fields: which lane a request goes to (`deployments/prefix_routing.py`)."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    initial: int | None = Field(None, ge=1, description="lanes at deploy time (default: min)")
    target_sequences: float = Field(32, gt=0, description="running + waiting sequences per lane")
    target_kv_usage: float = Field(0.8, gt=0, le=1, description="fraction of a lane's KV cache in use")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    look_back_period_s: float = Field(10.0, gt=0)
    prefix_affinity: bool = Field(True, description="send a request to the lane recently sent the longest run of "
                                  "its prompt's leading KV blocks (deployments/prefix_routing.py); off: Serve's "
                                  "power-of-two-choices on ongoing requests")
    prefix_imbalance: int = Field(8, ge=0, description="ongoing requests a lane may carry above the least loaded "
                                  "lane and still get its prefixes' requests")
    prefix_min_blocks: int = Field(1, ge=1, description="leading full KV blocks a lane must share with a prompt "
                                   "for affinity")
    prefix_blocks_per_lane: int = Field(65536, ge=1, description="block names the router remembers per lane (LRU)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.max < self.min:
            raise ValueError(f"lanes.max ({self.max}) is below lanes.min ({self.min})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"lanes.initial ({self.initial}) is outside [{self.min}, {self.max}]")
        return self

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def scaling(self, policy: str, **policy_kwargs) -> dict[str, Any]:
        """Serve options for a deployment with one replica per lane."""
        if self.fixed:
            return {"num_replicas": self.min}
        autoscaling = {"min_replicas": self.min, "max_replicas": self.max, "initial_replicas": self.initial,
                       "look_back_period_s": self.look_back_period_s,
                       "policy": {"policy_function": policy, "policy_kwargs": policy_kwargs}}
        if policy_kwargs:  # the Generation deployment decides; the stages follow it at once
            autoscaling.update(upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s)
        else:
            autoscaling.update(upscale_delay_s=0.0, downscale_delay_s=0.0)
        return {"autoscaling_config": {k: v for k, v in autoscaling.items() if v is not None}}


# A stage with more than one torch thread runs all its math on one thread, so its process has one OpenMP team
# (seedoss/engine/executor.py), which libgomp lets spin ~300,000 times after each parallel region, milliseconds of a
# core that the other stage, the gateway and Generation wait for when they share the machine: 2-thread stages on
# 2 cores answered 202 classify requests/s at 32 clients, 444 with 2,000 spins (still enough to bridge the gaps
# between one forward's ops: 1-stream generation kept its speed; bench/RESULTS.md).
STAGE_OMP_ENV = {"GOMP_SPINCOUNT": "2000"}
LANE_POLICY = "seedoss.deployments.autoscaling:LanePolicy"
FOLLOW_LANES_POLICY = "seedoss.deployments.autoscaling:FollowLanes"
LANE_ROUTER = "seedoss.deployments.routing:LaneRouter"
PREFIX_ROUTER = "seedoss.deployments.prefix_routing:PrefixAffinityRouter"

# Every replica runs its user code and its handles' routers on one event loop and calls other deployments over
# gRPC by value (`serve_env.REPLICA_ENV`, measured in bench/RESULTS.md, issues 15 and 18). These are Serve's own
# switches, read when a replica's process starts, so besides the cluster's environment (`serve_env.apply`, the
# k8s manifests) they travel as each deployment's runtime_env. Our replicas never block their loop: compute,
# sampling, tokenization and sync methods run in worker threads.
def same_loop(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with `REPLICA_ENV` in its ray_actor_options' runtime_env (`with_env_defaults`)."""
    return with_env_defaults(options, REPLICA_ENV)


def with_env_defaults(options: dict[str, Any], defaults: dict[str, str]) -> dict[str, Any]:
    """`options` with `defaults` in its ray_actor_options' runtime_env; env vars set in the options win, then those
    set in this process (`RAY_SERVE_USE_GRPC_BY_DEFAULT=0 seedoss serve` turns that switch off)."""
    actor = dict(options.get("ray_actor_options", {}))
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**{k: os.environ.get(k, v) for k, v in defaults.items()}, **runtime_env.get("env_vars", {})}
    actor["runtime_env"] = runtime_env
    return {**options, "ray_actor_options": actor}


class AppConfig(BaseModel):
    """`serve run seedoss.deployments.app:build_app checkpoint=... num_stages=2` or a Serve config's `args:`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str = Field("seedoss", description="the model id clients ask for (OpenAI `model`)")
    api_keys: list[str] | None = Field(None, description="bearer tokens accepted (also SEEDOSS_API_KEYS, comma-separated)")
    require_api_keys: bool = Field(
        False, description="the gateway refuses to start without a key (api_keys or SEEDOSS_API_KEYS): fail closed")
    limits: Limits = Field(default_factory=Limits, description="per-request limits (services/limits.py, README)")
    tokenizer_threads: int = Field(
        2, ge=1, le=64, description="threads per gateway replica that tokenize prompts (off its event loop); a "
        "prompt's text is tokenized only there, whichever front end it came through")
    head_checkpoints: dict[Literal["classify", "tag", "qa", "embed"], str] | None = Field(
        None, description="task → HF checkpoint with that head; default: the demo layout's heads/<task>/ when present, "
                          "and embeddings (the bare backbone, no head weights) from `checkpoint` itself")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    generation_config: Literal["auto", "none"] = Field(
        "auto", description="auto: the checkpoint's generation_config.json sampling defaults (temperature, top_p, "
                            "top_k, min_p, repetition_penalty, max_new_tokens) fill fields a request leaves unset "
                            "(vLLM's --generation-config auto); none: the neutral defaults")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where stage replicas keep weights and KV cache; auto: the GPU a replica was given, if any")
    num_stages: int = Field(2, ge=1)
    layers_per_stage: list[int] | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="scheduling limits; kv_budget_bytes and block_size apply to each stage replica")
    pin_stages: bool = Field(False, description="stage k asks for custom resource `stage{k}: 1` (one node per stage)")
    stage_threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads of each stage replica; null: Ray's, from the replica's "
        "num_cpus (one for a fraction). A pipeline's stages take turns on each step, so at low load one stage can "
        "use every core: 2 on a 2-core box took 1 stream from 0.66-0.71 to 0.74-0.79 of the in-process engine, but "
        "cost the heads' many small batches 17% at 32 clients, where both stages and the gateway compute at once "
        "(bench/RESULTS.md); so the default leaves it to num_cpus")
    stage_prompt_threads: int | None = Field(
        2, ge=1, le=1024, description="torch threads a stage replica uses for a prompt step (16 or more new tokens) "
        "that its lane sent with no other step in flight — at low load, when the other stages idle meanwhile; null "
        "or not above the replica's threads: never more. A prompt is compute-bound: at 1 stream on a 2-core box it "
        "cut the TTFT of fresh prompts (bench/RESULTS.md). Steps over Serve calls (`stage_transport: serve`) and the "
        "heads' forwards keep the replica's threads")
    stage_transport: Literal["direct", "serve"] = Field(
        "direct", description="how generation steps and the heads' forwards reach the stage replicas: direct: TCP "
        "connections of their own, to the replicas Serve names (deployments/step_channel.py); serve: Serve handle "
        "calls. A Serve call cost 2.5-5.9 ms per hop on 2-core boxes, the connection 0.05-0.09 ms (bench/RESULTS.md)")
    stream_transport: Literal["direct", "serve"] = Field(
        "direct", description="how generation streams' chunks reach the gateway: direct: over a connection from each "
        "Generation replica to each gateway replica, a step's chunks in one frame (deployments/stream_channel.py); "
        "serve: as Serve stream items, one per chunk (a third of both replicas' CPU at 32 streams, bench/RESULTS.md)")
    lanes: LaneConfig = Field(default_factory=LaneConfig, description="generation lanes: count or autoscaling range")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="stage and head call timeouts (503 past them)")
    retry: RetryPolicy = Field(default_factory=RetryPolicy,
                               description="how calls whose replica was lost are sent again (stage steps and "
                                           "forwards, head calls, generation streams)")
    stage: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=64, max_queued_requests=256))
    generation: GenerationOptions = Field(default_factory=lambda: GenerationOptions(max_ongoing_requests=256, max_queued_requests=512))
    batching: BatchingConfig = Field(default_factory=BatchingConfig,
                                     description="how the heads pack concurrent requests into backbone forwards")
    head_placement: Literal["gateway", "deployments"] = Field(
        "gateway", description="where the classify/tag/qa/embed heads run: in every gateway replica (a request "
        "makes no Serve call of its own, only its batch's stage forwards; the heads scale with the gateway), or as "
        "deployments of their own (`classify:` ... `embed:` options; one more Serve call per request)")
    # With head_placement: deployments, a head replica batches across its ongoing requests, so it takes many at once;
    # its bounds are below the gateway's, so excess load meets the head's queue limit and is answered 429.
    classify: DeploymentOptions = Field(default_factory=lambda: batched_head_options())
    tag: DeploymentOptions = Field(default_factory=lambda: batched_head_options())
    qa: DeploymentOptions = Field(default_factory=lambda: batched_head_options())
    embed: DeploymentOptions = Field(default_factory=lambda: batched_head_options())
    gateway: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, max_queued_requests=512))
    logs: LogOptions = Field(default_factory=LogOptions, description="log encoding (TEXT/JSON), level, stage access "
                             "logs (see deployments/logs.py)")

    @field_validator("api_keys")
    @classmethod
    def _keys_fail_closed(cls, keys: list[str] | None) -> list[str] | None:
        if keys is not None and not keys:
            raise ValueError("an empty list would turn auth off (likely a templating mistake); "
                             "use null to serve without keys")
        return keys if keys is None else checked_api_keys(keys, "api_keys")

    @model_validator(mode="after")
    def _lanes_own_scaling(self):
        if not (self.lanes.fixed and self.lanes.min == 1):
            for name in ("generation", "stage"):
                options = getattr(self, name)
                if options.num_replicas is not None or options.autoscaling_config is not None:
                    raise ValueError(f"{name}: set the replica count through `lanes` (one {name} replica per "
                                     f"lane), not {name}.num_replicas / autoscaling_config")
        return self

    @model_validator(mode="after")
    def _head_options_need_head_deployments(self):
        given = [task for task in TASK_DEPLOYMENTS if task in self.model_fields_set]
        if given and self.head_placement == "gateway":
            raise ValueError(f"{', '.join(given)}: options of a head deployment, which exists only with "
                             "head_placement: deployments; with head_placement: gateway (the default) the heads run "
                             "in the gateway replicas, so set `gateway:` and `batching:` instead")
        return self

    def args(self) -> dict[str, Any]:
        """This config as JSON-able Serve application `args:` that validate back to it (no head-deployment options
        where the heads run in the gateway)."""
        inert = set(TASK_DEPLOYMENTS) if self.head_placement == "gateway" else None
        return self.model_dump(mode="json", exclude_none=True, exclude=inert)

    @field_validator("checkpoint")
    @classmethod
    def _expand_home(cls, path: str) -> str:
        return str(Path(path).expanduser())

    def heads(self) -> dict[str, str]:
        if self.head_checkpoints is not None:
            return dict(self.head_checkpoints)
        root = Path(self.checkpoint) / "heads"
        heads = {task: str(root / task) for task in TASK_DEPLOYMENTS if (root / task / "config.json").exists()}
        return {**heads, "embed": self.checkpoint}

    def head_options(self, task: str) -> dict[str, Any]:
        return same_loop({**getattr(self, task).serve_options(), "logging_config": self.logs.serve_logging()})

    def gateway_options(self) -> dict[str, Any]:
        return same_loop({**self.gateway.serve_options(), "logging_config": self.logs.serve_logging()})

    def _lane_scaled(self, name: str, policy: str, **policy_kwargs) -> dict[str, Any]:
        options = getattr(self, name).serve_options()
        options["logging_config"] = self.logs.serve_logging(stage=name == "stage")
        if "num_replicas" not in options and "autoscaling_config" not in options:
            options.update(self.lanes.scaling(policy, **policy_kwargs))
        return same_loop(options)

    def generation_options(self) -> dict[str, Any]:
        options = self._lane_scaled("generation", LANE_POLICY, target_sequences=self.lanes.target_sequences,
                                    target_kv_usage=self.lanes.target_kv_usage)
        if self.generation.backend == "vllm" and self.device == "cuda":
            options.update(self.vllm_placement())
        if self.lanes.prefix_affinity and self.lanes.max > 1:  # one lane: nothing to choose
            options["request_router_config"] = {"request_router_class": PREFIX_ROUTER, "request_router_kwargs": {
                "block_size": self.engine.block_size, "imbalance": self.lanes.prefix_imbalance,
                "min_blocks": self.lanes.prefix_min_blocks, "blocks_per_lane": self.lanes.prefix_blocks_per_lane}}
        return options

    def vllm_placement(self) -> dict[str, Any]:
        """Serve placement of a vLLM Generation replica on GPUs: one placement-group bundle per pipeline stage (each
        `tensor_parallel_size` GPUs; with `pin_stages` also the node's `stage{k}` resource, strictly spread), which
        vLLM's Ray executor finds as the replica's placement group and fills with one worker per GPU. The replica
        itself runs in bundle 0, which therefore also holds what its `ray_actor_options` ask for."""
        gpus = self.generation.vllm_options().tensor_parallel_size
        bundles = [{"GPU": gpus, **({f"stage{k}": 1} if self.pin_stages else {})} for k in range(self.stage_count())]
        actor = self.generation.ray_actor_options
        own = {"CPU": actor.get("num_cpus", 0), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
        bundles[0].update({k: bundles[0].get(k, 0) + v for k, v in own.items() if v})
        return {"placement_group_bundles": bundles,
                "placement_group_strategy": "STRICT_SPREAD" if self.pin_stages else "PACK"}

    def stage_count(self) -> int:
        return len(self.layers_per_stage) if self.layers_per_stage else self.num_stages

    def deploys_stages(self) -> bool:
        """Our stage deployments run for our engine and for the heads; with the vLLM backend and no heads
        (`head_checkpoints: {}`) none is deployed."""
        return self.generation.backend == "seedoss" or bool(self.heads())

    def stage_options(self, k: int) -> dict[str, Any]:
        options = self._lane_scaled("stage", FOLLOW_LANES_POLICY)
        options["request_router_config"] = {"request_router_class": LANE_ROUTER}
        if (self.stage_threads or 1) > 1:  # an OpenMP team: it spins between forwards only briefly (STAGE_OMP_ENV)
            options = with_env_defaults(options, STAGE_OMP_ENV)
        if self.pin_stages:
            actor = dict(options.get("ray_actor_options", {}))
            actor["resources"] = {**actor.get("resources", {}), f"stage{k}": 1}
            options["ray_actor_options"] = actor
        return options
